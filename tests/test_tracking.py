import subprocess
import sys
from importlib import metadata

import keras
import psutil
from mlflow.tracking import MlflowClient

from mnist_mlops import tracking
from mnist_mlops.stage_process import ProcessIdentity, start_time
from mnist_mlops.tracking import model_requirements


def test_model_requirements_pin_the_active_keras_backend():
    pins = dict(requirement.split("==") for requirement in model_requirements())
    backend = keras.backend.backend()
    assert pins[backend] == metadata.version(backend)
    assert {"mlflow", "keras", "numpy", "pillow", "scipy"} <= pins.keys()


def test_only_runs_of_ended_processes_are_marked_killed(mlflow_store):
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    identities = {
        "alive": ProcessIdentity.current(),
        "ended": ProcessIdentity(
            ended.pid, ProcessIdentity.current().host, start_time(psutil.Process(ended.pid))
        ),
        "elsewhere": ProcessIdentity(1, "another-host", 0.0),
    }
    ended.wait()
    client = MlflowClient()
    experiment = client.get_experiment_by_name("tests").experiment_id
    runs = {
        name: client.create_run(experiment, tags={"stage": "evaluate", **identity.tags()})
        for name, identity in identities.items()
    }
    unrecorded = client.create_run(experiment, tags={"stage": "evaluate"})
    trial = client.create_run(
        experiment, tags={"stage": "evaluate", "mlflow.parentRunId": runs["ended"].info.run_id}
    )
    other_stage = client.create_run(
        experiment, tags={"stage": "retrain", **identities["ended"].tags()}
    )

    assert tracking.kill_abandoned_runs(experiment, "evaluate") == 1

    def status(run) -> str:
        return client.get_run(run.info.run_id).info.status

    assert status(runs["ended"]) == status(trial) == "KILLED"
    assert status(runs["alive"]) == status(runs["elsewhere"]) == "RUNNING"
    assert status(unrecorded) == status(other_stage) == "RUNNING"
    reason = client.get_run(runs["ended"].info.run_id).data.tags["stop_reason"]
    assert reason == f"its process (PID {ended.pid}) ended without ending it"


def test_a_new_experiment_is_a_model_training_experiment(mlflow_store):
    experiment_id = tracking.experiment("fresh")
    tags = MlflowClient().get_experiment(experiment_id).tags
    # What MLflow 3's UI reads to open the runs table instead of the GenAI traces overview.
    assert tags["mlflow.experimentKind"] == "custom_model_development"


def test_an_older_experiment_gets_the_kind_and_a_chosen_kind_stays(mlflow_store):
    client = MlflowClient()
    older = client.create_experiment("older")
    chosen = client.create_experiment("chosen", tags={"mlflow.experimentKind": "genai_development"})
    assert tracking.experiment("older") == older
    assert tracking.experiment("chosen") == chosen
    assert client.get_experiment(older).tags["mlflow.experimentKind"] == "custom_model_development"
    assert client.get_experiment(chosen).tags["mlflow.experimentKind"] == "genai_development"


def test_a_stage_run_under_dvc_exp_carries_the_experiment_name(
    mlflow_store, ci_params, monkeypatch
):
    monkeypatch.setenv("DVC_EXP_NAME", "wide-search")  # what `dvc exp run` sets
    with tracking.stage_run("prepare", ci_params, ("prepare",)) as run:
        pass
    monkeypatch.delenv("DVC_EXP_NAME")
    with tracking.stage_run("prepare", ci_params, ("prepare",)) as plain:
        pass
    client = MlflowClient()
    assert client.get_run(run.info.run_id).data.tags["dvc_experiment"] == "wide-search"
    assert "dvc_experiment" not in client.get_run(plain.info.run_id).data.tags


def test_a_process_keeps_its_identity_when_the_clock_moves(monkeypatch):
    """Linux derives the boot time from the wall clock on each read; a live stage whose clock
    moved must not look gone (its run would be marked KILLED), and one `dvc repro` keeps one id."""
    identity = ProcessIdentity.current()
    shifted = psutil.boot_time() + 1.0
    monkeypatch.setattr(psutil._pslinux, "boot_time", lambda: shifted)
    assert start_time(psutil.Process()) == identity.started
    assert identity.is_gone() is False
