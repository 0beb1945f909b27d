from importlib import metadata

import keras
from mlflow.tracking import MlflowClient

from mnist_mlops import tracking
from mnist_mlops.tracking import model_requirements


def test_model_requirements_pin_the_active_keras_backend():
    pins = dict(requirement.split("==") for requirement in model_requirements())
    backend = keras.backend.backend()
    assert pins[backend] == metadata.version(backend)
    assert {"mlflow", "keras", "numpy", "pillow"} <= pins.keys()


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
