"""Real Keras Tuner searches on a small real-MNIST subset, logged to a real sqlite MLflow store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import keras_tuner as kt
import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from support import REPO_ROOT, merged_params

from mnist_mlops import data, tuning
from mnist_mlops.config import TuneParams, parse_params
from mnist_mlops.data import one_hot, to_model_input
from mnist_mlops.models import MnistHyperModel
from mnist_mlops.paths import ProjectPaths
from mnist_mlops.stages import prepare

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def small_mnist(mnist_dir: Path) -> dict[str, np.ndarray]:
    arrays, _ = data.load_mnist(mnist_dir, mnist_dir)
    x, y = data.stratified_subset(arrays.x_train, arrays.y_train, 1200, seed=0)
    x_tr, y_tr, x_val, y_val = data.stratified_split(x, y, 300, seed=0)
    return {
        "x": to_model_input(x_tr),
        "y": one_hot(y_tr),
        "x_val": to_model_input(x_val),
        "y_val": one_hot(y_val),
    }


def tune_params(**overrides) -> TuneParams:
    values = {
        "tuner": "random",
        "max_trials": 2,
        "epochs": 1,
        "max_epochs": 2,
        "factor": 3,
        "hyperband_iterations": 1,
        "initial_points": 1,
        "executions_per_trial": 1,
        "early_stopping_patience": 1,
        "search_subset": None,
        "max_conv_mmacs": None,
        "augment": True,
        "degradation_rate": 0.5,
        "label_smoothing": 0.1,
        "workers": 1,
        "trial_lease_s": 600,
    }
    return TuneParams(**{**values, **overrides})


def trial_runs(parent_id: str) -> list[mlflow.entities.Run]:
    client = MlflowClient()
    experiment_id = client.get_run(parent_id).info.experiment_id
    return client.search_runs(
        [experiment_id], filter_string=f"tags.`mlflow.parentRunId` = '{parent_id}'"
    )


def search(tuner, small_mnist, epochs: int = 1) -> None:
    tuner.search(
        small_mnist["x"],
        small_mnist["y"],
        validation_data=(small_mnist["x_val"], small_mnist["y_val"]),
        epochs=epochs,
        verbose=0,
    )


@pytest.mark.parametrize("tuner_name", ["random", "hyperband", "bayesian"])
def test_every_trial_is_a_nested_run_with_params_and_curves(
    tuner_name, small_mnist, mlflow_store, tmp_path
):
    # hyperband with max_epochs 2 and factor 3 runs one bracket of two trials.
    params = tune_params(tuner=tuner_name)
    with mlflow.start_run(run_name="tune") as parent:
        tuner = tuning.make_tuner(params, 0, tmp_path / "state", parent.info.run_id)
        assert tuner.expected_trials == 2
        search(tuner, small_mnist)
        rows = tuning.trials_table(tuner)
    runs = trial_runs(parent.info.run_id)
    assert len(runs) == len(rows) == 2
    client = MlflowClient()
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["trial_status"] == "COMPLETED"
        assert run.info.run_name == f"trial_{run.data.tags['trial_id']}"
        assert {"family", "optimizer", "dropout", "batch_size"} <= set(run.data.params)
        # only active hyperparameters: one learning rate, one family's shape parameters
        assert len({"adam_learning_rate", "sgd_learning_rate"} & set(run.data.params)) == 1
        assert len({"conv_blocks", "mlp_layers"} & set(run.data.params)) == 1
        history = client.get_metric_history(run.info.run_id, "val_accuracy")
        assert [m.step for m in history] == list(range(len(history))) and history
        assert run.data.metrics["epochs_run"] == len(history)
        assert run.data.metrics["wall_seconds"] > 0
        assert 0 <= run.data.metrics["final_val_accuracy"] <= 1
        if tuner_name == "hyperband":
            assert run.data.tags["hyperband_bracket"] == "0"
            assert run.data.tags["hyperband_epochs"] == "2"
    best = tuning.best_configuration(tuner)
    assert best["val_accuracy"] == max(row["val_accuracy"] for row in rows)
    assert best["architecture"]["family"] in ("cnn", "mlp")


def test_same_seed_same_trial_sequence(tmp_path, mlflow_store, small_mnist):
    def sequence(seed: int, name: str) -> list[dict]:
        # The cost cap refuses costly draws before they train: the sequence is what is compared.
        params = tune_params(max_conv_mmacs=8)
        with mlflow.start_run() as parent:
            tuner = tuning.make_tuner(params, seed, tmp_path / name, parent.info.run_id)
            search(tuner, small_mnist)
        return [row | {"val_accuracy": None} for row in tuning.trials_table(tuner)]

    first = sequence(7, "a")
    assert sequence(7, "b") == first
    assert sequence(8, "c") != first


class HalfBrokenHyperModel(MnistHyperModel):
    """Trials drawing `explode=True` crash in fit(), as a trial running out of memory would."""

    def build(self, hp: kt.HyperParameters):
        hp.Boolean("explode", default=False)
        return super().build(hp)

    def fit(self, hp: kt.HyperParameters, model, *args, **kwargs):
        if hp["explode"]:
            raise ValueError("simulated training failure")
        return super().fit(hp, model, *args, **kwargs)


def test_failing_trials_are_recorded_and_do_not_abort_the_search(
    tmp_path, mlflow_store, small_mnist
):
    with mlflow.start_run() as parent:
        tuner = tuning.make_tuner(
            tune_params(max_trials=6),
            3,
            tmp_path / "state",
            parent.info.run_id,
            hypermodel=HalfBrokenHyperModel(seed=0),
        )
        search(tuner, small_mnist)
    runs = trial_runs(parent.info.run_id)
    failed = [r for r in runs if r.data.tags["trial_status"] == "FAILED"]
    completed = [r for r in runs if r.data.tags["trial_status"] == "COMPLETED"]
    assert failed and completed and len(failed) + len(completed) == len(runs)
    client = MlflowClient()
    for run in failed:
        assert run.info.status == "FAILED"
        assert "simulated training failure" in run.data.tags["error"]
        assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["error.txt"]
    assert all(r.info.status == "FINISHED" for r in completed)
    assert tuning.best_configuration(tuner)["trial_id"] in {
        r.data.tags["trial_id"] for r in completed
    }
    for run in completed:
        assert tuning.trial_run_id(parent.info.run_id, run.data.tags["trial_id"]) == run.info.run_id
    assert tuning.trial_run_id(parent.info.run_id, failed[0].data.tags["trial_id"]) is None


class RefusingHyperModel(MnistHyperModel):
    """Every trial is refused on purpose, as the conv-cost cap refuses a costly one."""

    def fit(self, hp: kt.HyperParameters, model, *args, **kwargs):
        raise kt.errors.FailedTrialError("refused on purpose")


@pytest.mark.parametrize(
    ("hypermodel", "printed", "traceback"),
    [
        (RefusingHyperModel(seed=0), "trial 1 failed: ", False),
        (HalfBrokenHyperModel(seed=0), "ValueError: simulated training failure", True),
    ],
    ids=["refused", "crashed"],
)
def test_a_refused_trial_prints_one_line_and_a_crashed_one_its_traceback(
    tmp_path, mlflow_store, small_mnist, capfd, caplog, hypermodel, printed, traceback
):
    with mlflow.start_run() as parent:
        tuner = tuning.make_tuner(
            tune_params(max_trials=4), 3, tmp_path / "state", parent.info.run_id, hypermodel
        )
        capfd.readouterr()
        search(tuner, small_mnist)
    err = capfd.readouterr().err + caplog.text  # Keras Tuner's own prints, and our log
    assert printed in err
    assert ("Traceback" in err) is traceback
    if not traceback:
        assert "refused on purpose" in err


def test_a_search_where_every_trial_fails_is_an_error(tmp_path, mlflow_store, small_mnist):
    class Broken(MnistHyperModel):
        def fit(self, hp, model, *args, **kwargs):
            raise ValueError("always broken")

    with mlflow.start_run() as parent:
        tuner = tuning.make_tuner(
            tune_params(), 0, tmp_path / "state", parent.info.run_id, hypermodel=Broken(seed=0)
        )
        search(tuner, small_mnist)
    with pytest.raises(tuning.SearchFailedError, match=r"no trial completed.*always broken"):
        tuning.best_configuration(tuner)


def test_killed_search_resumes_without_retraining_or_duplicating_runs(
    tmp_path, mlflow_store, mnist_dir
):
    project = tmp_path / "project"
    project.mkdir()
    raw = merged_params(
        {
            "prepare": {"train_subset": 2000, "val_size": 400},
            "tune": {"tuner": "random", "max_trials": 3, "epochs": 3, "max_conv_mmacs": None},
        }
    )
    (project / "params.yaml").write_text(yaml.safe_dump(raw))
    arrays, _ = data.load_mnist(mnist_dir, mnist_dir)
    params = parse_params(raw)
    prepare.run(params.prepare, ProjectPaths(project), seed=params.seed, arrays=arrays)
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_store, "PYTHONPATH": str(REPO_ROOT / "src")}
    command = [sys.executable, "-m", "mnist_mlops.stages.tune"]
    client = MlflowClient()

    first = subprocess.Popen(command, cwd=project, env=env, stdout=subprocess.DEVNULL)
    try:
        parent_id, killed_trial = _wait_for_second_trial_mid_training(client, project, first)
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=30)
    finally:
        first.kill()
    before = trial_runs(parent_id)
    finished_before = {r.data.tags["trial_id"] for r in before if r.info.status == "FINISHED"}
    assert [r.info.status for r in before].count("RUNNING") == 1
    assert client.get_run(parent_id).info.status == "RUNNING"

    resumed = subprocess.run(command, cwd=project, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming the interrupted search" in resumed.stderr  # the log, on stderr

    after = trial_runs(parent_id)
    by_status = {}
    for run in after:
        by_status.setdefault(run.info.status, []).append(run.data.tags["trial_id"])
    assert sorted(by_status) == ["FINISHED", "KILLED"]
    assert by_status["KILLED"] == [killed_trial]
    # 3 trials completed once each: the ones done before the kill were not trained again.
    assert sorted(by_status["FINISHED"]) == ["0", "1", "2"]
    assert finished_before <= set(by_status["FINISHED"])
    assert len(after) == 4
    assert client.get_run(parent_id).info.status == "FINISHED"
    summary = json.loads((project / "tuning" / "metrics.json").read_text())
    assert summary["trials"] == 3 and summary["trials_completed"] == 3


def _wait_for_second_trial_mid_training(client, project, process, timeout=240):
    """Poll until trial 0 finished and trial 1 logged its first epoch (so it is mid-training)."""
    deadline = time.monotonic() + timeout
    state_file = project / "tuning" / "state" / tuning.STATE_FILE
    while time.monotonic() < deadline:
        assert process.poll() is None, "the search ended before it could be interrupted"
        if state_file.exists():
            parent_id = json.loads(state_file.read_text())["run_id"]
            runs = trial_runs(parent_id)
            done = [r for r in runs if r.info.status == "FINISHED"]
            running = [r for r in runs if r.info.status == "RUNNING"]
            if done and running and client.get_metric_history(running[0].info.run_id, "loss"):
                return parent_id, running[0].data.tags["trial_id"]
        time.sleep(0.2)
    raise AssertionError("the second trial never started")


def test_changed_params_start_a_fresh_search(tmp_path, mlflow_store):
    state = tmp_path / "state"
    with mlflow.start_run() as run:
        pass
    client = MlflowClient()
    client.set_terminated(run.info.run_id, "KILLED")
    tuning.save_state(state, "fingerprint-a", run.info.run_id, finished=False)
    (state / "search").mkdir()
    assert tuning.resumable_run_id(state, "fingerprint-a") == run.info.run_id
    assert (state / "search").exists()
    assert tuning.resumable_run_id(state, "fingerprint-b") is None
    assert not state.exists()
    fingerprints = {
        tuning.search_fingerprint(tune_params(), 0, "data-1"),
        tuning.search_fingerprint(tune_params(tuner="bayesian"), 0, "data-1"),
        tuning.search_fingerprint(tune_params(), 1, "data-1"),
        tuning.search_fingerprint(tune_params(), 0, "data-2"),
    }
    assert len(fingerprints) == 4
    # How the search runs is not what it finds: a new worker count or lease keeps the search.
    assert tuning.search_fingerprint(
        tune_params(workers=4, trial_lease_s=60), 0, "data-1"
    ) == tuning.search_fingerprint(tune_params(), 0, "data-1")
