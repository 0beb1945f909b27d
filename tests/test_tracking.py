import subprocess
import sys
from importlib import metadata

import keras
import psutil
from mlflow.tracking import MlflowClient

from mnist_mlops import tracking
from mnist_mlops.stage_process import ProcessIdentity
from mnist_mlops.tracking import model_requirements


def test_model_requirements_pin_the_active_keras_backend():
    pins = dict(requirement.split("==") for requirement in model_requirements())
    backend = keras.backend.backend()
    assert pins[backend] == metadata.version(backend)
    assert {"mlflow", "keras", "numpy", "pillow"} <= pins.keys()


def test_only_runs_of_ended_processes_are_marked_killed(mlflow_store):
    ended = subprocess.Popen([sys.executable, "-c", "pass"])
    identities = {
        "alive": ProcessIdentity.current(),
        "ended": ProcessIdentity(
            ended.pid, ProcessIdentity.current().host, psutil.Process(ended.pid).create_time()
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
