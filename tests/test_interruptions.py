"""Stages killed and stopped for real: SIGKILL, SIGTERM, a killed `dvc` parent, a second start.

Each test runs real stage processes on a tiny real-MNIST project against a throwaway sqlite
MLflow store, and kills them with real signals at a point it reads from the store or from the
retrain checkpoint (never after a fixed sleep).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import keras
import mlflow
import numpy as np
import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient
from support import REPO_ROOT, merged_params

from mnist_mlops import checkpoints, data
from mnist_mlops.config import parse_params
from mnist_mlops.paths import ProjectPaths
from mnist_mlops.stages import prepare

pytestmark = pytest.mark.slow

EPOCHS = 4  # per ensemble member; two members: eight epochs in all
RETRAIN = [sys.executable, "-m", "mnist_mlops.stages.retrain"]
WAIT_S = 240  # bound on every wait for a stage to reach a point or to end
# A small CNN with everything a resume must restore: batch norm, dropout (seed generators),
# Adam's moments and the step counter of the cosine schedule, augmentation, two members.
BEST = {
    "trial_id": "0",
    "val_accuracy": 0.9,
    "hyperparameters": {"family": "cnn", "batch_size": 64},
    "architecture": {
        "family": "cnn",
        "conv_filters": [8, 16],
        "convs_per_block": 1,
        "kernel_size": 3,
        "padding": "same",
        "batch_norm": True,
        "dropout": 0.2,
        "dense_units": [32],
        "optimizer": "adam",
        "learning_rate": 0.002,
    },
    "batch_size": 64,
}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> Path:
    """A project with prepared data (2,000 training images) and a tuned configuration."""
    root = tmp_path_factory.mktemp("interruptions") / "template"
    root.mkdir()
    raw = merged_params(
        {
            "prepare": {"train_subset": 2000, "val_size": 400},
            "retrain": {"epochs": EPOCHS, "ensemble_size": 2, "test_time_shift": 0},
        }
    )
    (root / "params.yaml").write_text(yaml.safe_dump(raw))
    arrays, _ = data.load_mnist(mnist_dir, mnist_dir)
    params = parse_params(raw)
    prepare.run(params.prepare, ProjectPaths(root), seed=params.seed, arrays=arrays)
    (root / "tuning").mkdir()
    (root / "tuning" / "best_hparams.json").write_text(json.dumps(BEST))
    return root


@pytest.fixture
def project(prepared: Path, tmp_path: Path, mlflow_store: str) -> Path:
    root = tmp_path / "project"
    shutil.copytree(prepared, root)
    return root


@pytest.fixture
def spawn(mlflow_store: str) -> Iterator:
    """Start processes in their own process group; whatever is left is killed at the end."""
    started: list[subprocess.Popen] = []
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # dvc, python
        "MLFLOW_TRACKING_URI": mlflow_store,
        "PYTHONPATH": str(REPO_ROOT / "src"),
    }
    env.pop("PIPELINE_RUN_ID", None)

    def start(command: list[str], cwd: Path) -> subprocess.Popen:
        process = subprocess.Popen(
            command,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        started.append(process)
        return process

    yield start
    for process in started:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.communicate(timeout=WAIT_S)


def _finish(process: subprocess.Popen) -> tuple[int, str]:
    """Wait for `process` to end; its exit code and everything it wrote."""
    out, err = process.communicate(timeout=WAIT_S)
    return process.returncode, out + err


def _checkpoint_rows(root: Path) -> int:
    state = ProjectPaths(root).retrain_checkpoint / checkpoints.STATE_FILE
    return len(json.loads(state.read_text())["rows"]) if state.exists() else 0


def _wait_for_epochs(root: Path, process: subprocess.Popen, epochs: int) -> None:
    """Poll the retrain checkpoint until `epochs` epochs are saved in it."""
    deadline = time.monotonic() + WAIT_S
    while _checkpoint_rows(root) < epochs:
        assert process.poll() is None, "retrain ended before it could be interrupted"
        assert time.monotonic() < deadline, f"retrain never reached epoch {epochs}"
        time.sleep(0.05)


def _retrain_runs() -> list[mlflow.entities.Run]:
    client = MlflowClient()
    experiment = client.get_experiment_by_name(merged_params()["mlflow"]["experiment"])
    return client.search_runs([experiment.experiment_id], filter_string="tags.stage = 'retrain'")


def _weights(root: Path) -> list[np.ndarray]:
    return keras.saving.load_model(ProjectPaths(root).model_file("tuned")).get_weights()


def test_sigkilled_retrain_resumes_from_its_last_epoch_to_the_same_model(project, spawn):
    # The reference: the same project trained without interruption.
    reference = project.parent / "reference"
    shutil.copytree(project, reference)
    code, output = _finish(spawn(RETRAIN, reference))
    assert code == 0, output[-3000:]

    killed = spawn(RETRAIN, project)
    _wait_for_epochs(project, killed, EPOCHS + 1)  # the second member is training
    killed.send_signal(signal.SIGKILL)
    _finish(killed)
    done = _checkpoint_rows(project)
    assert EPOCHS < done < 2 * EPOCHS
    [left] = [r for r in _retrain_runs() if r.info.status == "RUNNING"]

    code, output = _finish(spawn(RETRAIN, project))
    assert code == 0, output[-3000:]
    assert f"run {left.info.run_id} of an earlier retrain process" in output
    assert f"resuming the interrupted run {left.info.run_id} after {done} trained epoch" in output
    # Only the epochs after the checkpoint were trained again.
    trained = [
        int(line.split()[1].split("/")[0])
        for line in output.splitlines()
        if line.startswith("Epoch ")
    ]
    assert trained == list(range(done + 1, 2 * EPOCHS + 1))

    runs = _retrain_runs()
    assert sorted(r.info.status for r in runs) == ["FINISHED", "FINISHED"]
    resumed = MlflowClient().get_run(left.info.run_id)
    assert resumed.info.status == "FINISHED" and "stop_reason" not in resumed.data.tags
    steps = {m.step for m in MlflowClient().get_metric_history(left.info.run_id, "loss")}
    assert steps == set(range(2 * EPOCHS))
    # Bit for bit the model of the uninterrupted run.
    for resumed_weights, reference_weights in zip(
        _weights(project), _weights(reference), strict=True
    ):
        np.testing.assert_array_equal(resumed_weights, reference_weights)
    history = json.loads(ProjectPaths(project).model_history("tuned").read_text())
    assert [row["member"] for row in history] == [0] * EPOCHS + [1] * EPOCHS
    # Success leaves only the note that this configuration finished.
    checkpoint = ProjectPaths(project).retrain_checkpoint
    assert [p.name for p in checkpoint.iterdir()] == [checkpoints.STATE_FILE]
    assert json.loads((checkpoint / checkpoints.STATE_FILE).read_text())["finished"] is True


def test_sigterm_ends_the_run_killed_with_one_line(project, spawn):
    stopped = spawn(RETRAIN, project)
    _wait_for_epochs(project, stopped, 1)
    stopped.send_signal(signal.SIGTERM)
    code, output = _finish(stopped)
    assert code == 128 + signal.SIGTERM
    assert "Traceback" not in output
    assert output.rstrip().splitlines()[-1].endswith("[retrain] stopped: SIGTERM received")
    [run] = _retrain_runs()
    assert run.info.status == "KILLED"
    assert run.data.tags["stop_reason"] == "SIGTERM received"


def test_a_stage_stops_when_its_dvc_process_is_killed(project, spawn):
    stage = yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]["retrain"]
    stage["deps"] = ["data/prepared", "tuning/best_hparams.json"]  # the code is not copied
    (project / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"retrain": stage}}))
    dvc_bin = str(Path(sys.executable).parent / "dvc")  # the venv's, also outside `make test`
    subprocess.run([dvc_bin, "init", "--no-scm", "-q"], cwd=project, check=True)
    dvc = spawn(["dvc", "repro", "retrain"], project)
    _wait_for_epochs(project, dvc, 1)
    stage_pid = int(ProjectPaths(project).stage_lock("retrain").read_text())
    # dvc runs the command through a shell, which may or may not exec it (bash does, dash
    # does not): dvc is an ancestor, not always the parent.
    assert dvc.pid in [parent.pid for parent in psutil.Process(stage_pid).parents()]

    dvc.send_signal(signal.SIGKILL)  # the dvc process alone, not its process group
    dvc.wait(timeout=WAIT_S)
    deadline = time.monotonic() + WAIT_S
    while _alive(stage_pid):
        assert time.monotonic() < deadline, "the stage outlived its dvc process"
        time.sleep(0.05)
    [run] = _retrain_runs()
    assert run.info.status == "KILLED"
    assert run.data.tags["stop_reason"] == f"its dvc process (PID {dvc.pid}) is gone"


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_a_second_process_of_a_stage_is_refused_with_one_line(project, spawn):
    first = spawn(RETRAIN, project)
    _wait_for_epochs(project, first, 1)
    code, output = _finish(spawn(RETRAIN, project))
    assert code == 1
    assert "Traceback" not in output
    assert (
        output.rstrip()
        .splitlines()[-1]
        .endswith(
            f"[retrain] another retrain process (PID {first.pid}) is running in this project "
            f"({project.resolve()}); wait for it to end or stop it (kill {first.pid})"
        )
    )
    assert first.poll() is None  # untouched
    assert [r.info.status for r in _retrain_runs()] == ["RUNNING"]
