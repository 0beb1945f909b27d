"""A search across worker processes (`tune.workers` > 1, `distributed.py`), for real: Keras Tuner's
oracle served over gRPC on loopback, worker processes training real MNIST trials, killed with
SIGKILL, and every trial logged to the PostgreSQL-backed tracking server.

The first tests drive the chief's `LeasedOracle` directly (a real Keras Tuner oracle, a real
MLflow store, no training); the others run the tune stage as `dvc repro` does."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import keras_tuner as kt
import mlflow
import psutil
import pytest
import yaml
from keras_tuner.src.distribute.oracle_client import OracleClient
from mlflow.tracking import MlflowClient
from support import REPO_ROOT, merged_params

from mnist_mlops import data, distributed
from mnist_mlops.config import parse_params
from mnist_mlops.paths import ProjectPaths
from mnist_mlops.stages import prepare

Status = kt.engine.trial.TrialStatus


# --- the chief's oracle, driven directly ---------------------------------------------------


def make_oracle(directory: Path, max_trials: int = 3) -> kt.Oracle:
    oracle = kt.oracles.RandomSearchOracle(
        objective=kt.Objective("score", "max"), max_trials=max_trials, seed=1
    )
    oracle._set_project_dir(str(directory), "search")
    hp = oracle.get_space()
    hp.Int("x", 0, 1000)
    oracle.update_space(hp)
    return oracle


def trial_run(parent_id: str, trial_id: str) -> str:
    """A trial's MLflow run, as a worker opens it."""
    client = MlflowClient()
    experiment = client.get_run(parent_id).info.experiment_id
    tags = {"mlflow.parentRunId": parent_id, "trial_id": trial_id, "stage": "tune"}
    return client.create_run(experiment, tags=tags).info.run_id


def complete(leased: distributed.LeasedOracle, trial: kt.engine.trial.Trial) -> None:
    leased.update_trial(trial.trial_id, {"score": 1.0})
    trial.status = Status.COMPLETED
    leased.end_trial(trial)


@pytest.fixture
def parent_run(mlflow_store: str) -> Iterator[str]:
    with mlflow.start_run(run_name="tune") as run:
        yield run.info.run_id


def test_an_expired_lease_hands_the_trial_out_once_more_then_fails_it(tmp_path, parent_run):
    leased = distributed.LeasedOracle(make_oracle(tmp_path), 0.2, parent_run)
    first = leased.create_trial("tuner0")
    run_id = trial_run(parent_run, first.trial_id)
    time.sleep(0.25)
    leased.expire_leases()
    client = MlflowClient()
    killed = client.get_run(run_id)
    assert killed.info.status == "KILLED"
    assert "no result from tuner0 within the 0.2 s lease" in killed.data.tags["stop_reason"]
    again = leased.create_trial("tuner1")
    assert again.trial_id == first.trial_id  # handed out again, before any new trial
    time.sleep(0.25)
    leased.expire_leases()
    assert leased.get_trial(first.trial_id).status == Status.FAILED
    assert leased.create_trial("tuner1").trial_id != first.trial_id


def test_workers_wait_while_a_trial_is_leased_and_stop_after(tmp_path, parent_run):
    leased = distributed.LeasedOracle(make_oracle(tmp_path, max_trials=1), 600, parent_run)
    trial = leased.create_trial("tuner0")
    # Keras Tuner would answer STOPPED: every trial is handed out.
    assert leased.create_trial("tuner1").status == Status.IDLE
    assert not leased.finished()
    complete(leased, trial)
    assert not leased.finished()  # tuner0 and tuner1 have not been told to stop yet
    assert leased.create_trial("tuner1").status == Status.STOPPED
    assert leased.create_trial("tuner0").status == Status.STOPPED
    assert leased.finished()


def test_each_trial_counts_once_and_a_failure_is_logged_with_its_error(
    tmp_path, parent_run, caplog
):
    leased = distributed.LeasedOracle(make_oracle(tmp_path), 600, parent_run)
    done = leased.create_trial("tuner0")
    complete(leased, done)
    complete(leased, done)  # a duplicate result: ignored
    assert leased.oracle.end_order == [done.trial_id]
    failing = leased.create_trial("tuner0")
    # What the worker's tuner does before it reports (`Trial.to_proto` drops the message).
    MlflowClient().set_tag(trial_run(parent_run, failing.trial_id), "error", "ValueError: boom")
    failing.status = Status.FAILED
    leased.end_trial(failing)
    assert "trial 2 failed on tuner0: ValueError: boom" in caplog.text
    assert leased.get_trial(failing.trial_id).message == "ValueError: boom"


def test_a_restarted_chief_keeps_the_trials_in_flight_for_their_workers(tmp_path, parent_run):
    leased = distributed.LeasedOracle(make_oracle(tmp_path), 600, parent_run)
    held = {tuner: leased.create_trial(tuner).trial_id for tuner in ("tuner0", "tuner1")}
    restarted = make_oracle(tmp_path)
    restarted.reload()  # as the tuner does on a restart: Keras Tuner re-queues both trials
    leased = distributed.LeasedOracle(restarted, 600, parent_run)
    assert leased.create_trial("tuner1").trial_id == held["tuner1"]
    fresh = leased.create_trial("tuner2")
    assert fresh.trial_id not in held.values()


def test_an_idle_worker_backs_off_instead_of_spinning(tmp_path, parent_run, monkeypatch):
    leased = distributed.LeasedOracle(make_oracle(tmp_path, max_trials=1), 600, parent_run)
    monkeypatch.setenv("KERASTUNER_ORACLE_IP", "127.0.0.1")
    monkeypatch.setenv("KERASTUNER_TUNER_ID", "tuner1")
    with distributed.oracle_server(leased, "127.0.0.1:0") as port:
        monkeypatch.setenv("KERASTUNER_ORACLE_PORT", str(port))
        trial = leased.create_trial("tuner0")
        client = distributed.PatientOracleClient(OracleClient(make_oracle(tmp_path / "w")))
        answers = []
        waiting = threading.Thread(target=lambda: answers.append(client.create_trial("tuner1")))
        waiting.start()
        time.sleep(2.0)
        # 0.1 + 0.2 + 0.4 + 0.8 s: 4 or 5 requests in 2 s, where Keras Tuner sends thousands.
        assert 3 <= leased.idle_answers <= 5
        complete(leased, trial)
        waiting.join(timeout=10)
    assert answers[0].status == Status.STOPPED


# --- the tune stage with workers, against the tracking server ------------------------------


class Search:
    """The tune stage of a small project, run as a process group with its workers."""

    def __init__(self, root: Path, uri: str, experiment: str) -> None:
        self.root = root
        self.uri = uri
        self.env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(REPO_ROOT / "src")}
        self.env.pop("MLFLOW_RUN_ID", None)
        self.client = MlflowClient(uri)
        self.experiment = experiment
        self.processes: list[subprocess.Popen] = []
        self.seen_pids: set[int] = set()

    def start(self, command: list[str] | None = None, **env: str) -> subprocess.Popen:
        process = subprocess.Popen(
            command or [sys.executable, "-m", "mnist_mlops.stages.tune"],
            cwd=self.root,
            env={**self.env, **env},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.processes.append(process)
        return process

    def tune_run(self) -> mlflow.entities.Run | None:
        experiment = self.client.get_experiment_by_name(self.experiment)
        if experiment is None:
            return None
        runs = self.client.search_runs(
            [experiment.experiment_id], "tags.stage = 'tune' and attributes.run_name = 'tune'"
        )
        return runs[0] if runs else None

    def trial_runs(self, parent_id: str) -> list[mlflow.entities.Run]:
        experiment = self.client.get_run(parent_id).info.experiment_id
        return self.client.search_runs(
            [experiment], f"tags.`mlflow.parentRunId` = '{parent_id}'", max_results=500
        )

    def wait_for_trial_mid_training(self, timeout: float = 120) -> mlflow.entities.Run:
        """A trial run that has logged its first epoch (of three) and is still RUNNING."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for process in self.processes:
                assert process.poll() is None, process.stderr.read()[-3000:]
                self._note_children(process.pid)
            if parent := self.tune_run():
                for run in self.trial_runs(parent.info.run_id):
                    if run.info.status == "RUNNING" and self.client.get_metric_history(
                        run.info.run_id, "loss"
                    ):
                        return run
            time.sleep(0.2)
        raise AssertionError("no trial reached its second epoch")

    def _note_children(self, pid: int) -> None:
        with contextlib.suppress(psutil.NoSuchProcess):
            self.seen_pids.update(p.pid for p in psutil.Process(pid).children(recursive=True))

    def finish(self, process: subprocess.Popen, timeout: float) -> None:
        try:
            _, err = process.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout} s") from None
        assert process.returncode == 0, err[-4000:]

    def kill_all(self) -> None:
        for pid in {p.pid for p in self.processes} | self.seen_pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
        for process in self.processes:
            process.wait(timeout=30)


@pytest.fixture(scope="module")
def mnist_arrays(mnist_dir: Path):
    return data.load_mnist(mnist_dir, mnist_dir)[0]


@pytest.fixture
def search(request, tmp_path, mnist_arrays, tracking_server) -> Iterator:
    """Make a project with these tune params; yields a `Search` on it, killed in teardown."""
    made: list[Search] = []

    def make(**tune) -> Search:
        experiment = f"distributed-{request.node.name}-{time.time_ns()}"
        raw = merged_params(
            {
                "mlflow": {"experiment": experiment},
                "prepare": {"train_subset": 1500, "val_size": 300},
                "tune": {"tuner": "random", "epochs": 1, "max_conv_mmacs": None, **tune},
            }
        )
        root = tmp_path / "project"
        root.mkdir()
        (root / "params.yaml").write_text(yaml.safe_dump(raw))
        params = parse_params(raw)
        prepare.run(params.prepare, ProjectPaths(root), seed=params.seed, arrays=mnist_arrays)
        made.append(Search(root, tracking_server["url"], experiment))
        return made[-1]

    yield make
    for each in made:
        each.kill_all()


def by_trial(runs: list) -> dict[str, list[str]]:
    statuses: dict[str, list[str]] = {}
    for run in runs:
        statuses.setdefault(run.data.tags["trial_id"], []).append(run.info.status)
    return {trial: sorted(s) for trial, s in statuses.items()}


def test_a_chief_and_two_workers_log_every_trial_once(search):
    project = search(workers=2, max_trials=3)
    project.finish(project.start(), timeout=180)
    parent = project.tune_run()
    runs = project.trial_runs(parent.info.run_id)
    assert by_trial(runs) == {str(i): ["FINISHED"] for i in range(3)}
    assert {run.data.tags["worker"] for run in runs} == {"tuner0", "tuner1"}
    summary = json.loads((project.root / "tuning" / "metrics.json").read_text())
    assert summary["trials_completed"] == 3
    best = project.client.get_run(parent.data.tags["best_trial_run_id"])
    assert best.data.metrics["final_val_accuracy"] == pytest.approx(summary["best_val_accuracy"])
    assert summary["best_val_accuracy"] == max(r.data.metrics["final_val_accuracy"] for r in runs)
    assert parent.data.tags[distributed.ORACLE_PORT_TAG]


def test_a_worker_killed_mid_trial_costs_one_lease_not_a_hang(search):
    lease = 20  # above the longest trial here, even on a loaded machine
    project = search(workers=2, max_trials=2, epochs=3, trial_lease_s=lease)
    stage = project.start()
    victim = project.wait_for_trial_mid_training()
    os.kill(int(victim.data.tags["process.pid"]), signal.SIGKILL)
    killed_at = time.monotonic()
    project.finish(stage, timeout=lease + 90)
    assert time.monotonic() - killed_at < lease + 60
    trials = by_trial(project.trial_runs(project.tune_run().info.run_id))
    assert trials.pop(victim.data.tags["trial_id"]) == ["FINISHED", "KILLED"]
    assert list(trials.values()) == [["FINISHED"]]
    assert "no result from" in project.client.get_run(victim.info.run_id).data.tags["stop_reason"]


def test_a_worker_restarted_under_the_same_id_gets_its_trial_back(search):
    project = search(workers=2, max_trials=2, epochs=3)
    stage = project.start()
    victim = project.wait_for_trial_mid_training()
    os.kill(int(victim.data.tags["process.pid"]), signal.SIGKILL)
    parent = project.tune_run()
    # As on another machine: Keras Tuner's variables; the tune run is found by the chief's port.
    project.start(
        [sys.executable, "-m", "mnist_mlops.stages.tune", "--worker"],
        KERASTUNER_TUNER_ID=victim.data.tags["worker"],
        KERASTUNER_ORACLE_IP="127.0.0.1",
        KERASTUNER_ORACLE_PORT=parent.data.tags[distributed.ORACLE_PORT_TAG],
    )
    project.finish(stage, timeout=150)
    trials = by_trial(project.trial_runs(parent.info.run_id))
    assert trials.pop(victim.data.tags["trial_id"]) == ["FINISHED", "KILLED"]
    assert list(trials.values()) == [["FINISHED"]]
    summary = json.loads((project.root / "tuning" / "metrics.json").read_text())
    assert summary["trials_completed"] == summary["trials"] == 2


def test_a_killed_distributed_search_resumes_without_duplicates(search):
    project = search(workers=2, max_trials=3, epochs=3)
    project.start()
    project.wait_for_trial_mid_training()
    project.kill_all()  # the chief and both workers, SIGKILL
    parent = project.tune_run()
    before = by_trial(project.trial_runs(parent.info.run_id))
    rerun = project.start()
    project.finish(rerun, timeout=150)
    trials = by_trial(project.trial_runs(parent.info.run_id))
    assert sorted(trials) == ["0", "1", "2"]
    for trial_id, statuses in trials.items():
        assert Counter(statuses)["FINISHED"] == 1, (trial_id, statuses)
        assert set(statuses) <= {"FINISHED", "KILLED"}
        if before.get(trial_id) == ["FINISHED"]:
            assert statuses == ["FINISHED"]  # not trained again
    assert project.client.get_run(parent.info.run_id).info.status == "FINISHED"
