"""MLflow setup, owned here and nowhere else: store location, stage runs, epoch metrics, models.

Every stage opens exactly one run through `stage_run`. The run is named after the stage, carries
the stage's resolved params and the tags that tie it to its code and to the other stage runs of
the same `dvc repro` (`pipeline_run_id`), and to its process (`stage_process.ProcessIdentity`).
A run whose process died without ending it (SIGKILL, a power cut) is marked KILLED by the next
run of the same stage; a run stopped by a signal ends KILLED itself.
"""

from __future__ import annotations

import logging
import os
import subprocess
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from importlib import metadata
from typing import Any

import keras
import mlflow
import numpy as np
from mlflow.entities import Metric, RunStatus
from mlflow.models import infer_signature
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from mnist_mlops import store
from mnist_mlops.config import Params
from mnist_mlops.errors import StageInterrupted
from mnist_mlops.paths import project_root
from mnist_mlops.stage_process import ProcessIdentity, dvc_ancestor, start_time

# Requirements recorded with logged models; listing them skips mlflow's slow dependency probe.
# The served model's own code needs pillow (PNG decoding) and scipy (mnist_serving's ink pieces).
_MODEL_REQUIREMENTS = ("mlflow", "keras", "numpy", "pillow", "scipy")
# MLflow 3's UI opens an experiment without this tag on its (empty) GenAI overview.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
MODEL_TRAINING = "custom_model_development"
# Set by DVC for each stage of `dvc exp run`.
DVC_EXPERIMENT_VARIABLE = "DVC_EXP_NAME"


def configure() -> None:
    """Use the store at `store.tracking_uri()` once `store.check` has found it usable."""
    uri = store.tracking_uri()
    store.check(uri)
    mlflow.set_tracking_uri(uri)


def experiment(name: str) -> str:
    """The id of experiment `name`, created on first use as a model-training experiment, with
    its artifacts where `store.artifact_location` puts them (a tracking server: where its
    --artifacts-destination says)."""
    client = MlflowClient()
    if existing := client.get_experiment_by_name(name):
        _mark_model_training(client, existing)
        return existing.experiment_id
    location = store.artifact_location(store.tracking_uri())
    return client.create_experiment(
        name, artifact_location=location, tags={EXPERIMENT_KIND_TAG: MODEL_TRAINING}
    )


def _mark_model_training(client: MlflowClient, existing: mlflow.entities.Experiment) -> None:
    """Tag an experiment created before the kind was set; a kind chosen in the UI stays."""
    if EXPERIMENT_KIND_TAG not in existing.tags:
        client.set_experiment_tag(existing.experiment_id, EXPERIMENT_KIND_TAG, MODEL_TRAINING)


def dvc_experiment_tags() -> dict[str, str]:
    """`dvc_experiment`: the experiment's name when the run is part of `dvc exp run`."""
    name = os.environ.get(DVC_EXPERIMENT_VARIABLE)
    return {"dvc_experiment": name} if name else {}


def flatten(prefix: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """{'epochs': 3} under 'baseline' -> {'baseline.epochs': 3}, recursing into mappings."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}.{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            flat.update(flatten(name, value))
        else:
            flat[name] = value
    return flat


def git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            cwd=project_root(),
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return out.stdout.strip()


def pipeline_run_id() -> str:
    """An id shared by the stage runs of one `dvc repro` (each stage is its own process).

    PIPELINE_RUN_ID wins when set. Otherwise the id derives from the `dvc` process that spawned
    this stage, so all stages of one repro agree; a stage run by hand gets an id of its own.
    """
    if explicit := os.environ.get("PIPELINE_RUN_ID"):
        return explicit
    if dvc := dvc_ancestor():
        return str(uuid.uuid5(uuid.NAMESPACE_OID, f"{dvc.pid}-{start_time(dvc)}"))
    return str(uuid.uuid4())


@contextmanager
def stage_run(
    stage: str,
    params: Params,
    sections: tuple[str, ...],
    resume_run_id: str | None = None,
) -> Iterator[mlflow.ActiveRun]:
    """Open the stage's MLflow run, logging `seed` and the given params sections.

    Under `mlflow run`, MLFLOW_RUN_ID names the project run: the stage nests under it instead of
    resuming it, so `-e main` shows one parent with five stage children. `resume_run_id`
    reopens an interrupted run of this stage instead of starting a new one.

    First, runs of this stage left RUNNING by a process that is gone are marked KILLED. A stop
    signal (`StageInterrupted`) ends the run, and any nested run still open, KILLED.
    """
    configure()
    parent_id = os.environ.pop("MLFLOW_RUN_ID", None)
    if parent_id:
        experiment_id = MlflowClient().get_run(parent_id).info.experiment_id
    else:
        experiment_id = experiment(params.mlflow.experiment)
    tags = {
        "stage": stage,
        "dvc_stage": os.environ.get("DVC_STAGE", stage),
        "git_commit": git_commit(),
        "pipeline_run_id": pipeline_run_id(),
        **ProcessIdentity.current().tags(),
        **dvc_experiment_tags(),
    }
    kill_abandoned_runs(experiment_id, stage)
    if resume_run_id:
        started = mlflow.start_run(run_id=resume_run_id)
        mlflow.set_tags(tags)
        if "stop_reason" in started.data.tags:
            MlflowClient().delete_tag(resume_run_id, "stop_reason")
    else:
        started = mlflow.start_run(
            run_name=stage, experiment_id=experiment_id, parent_run_id=parent_id, tags=tags
        )
    with started as run:
        try:
            logged = {"seed": params.seed}
            for section in sections:
                logged |= flatten(section, params.section(section))
            mlflow.log_params(logged)
            logging.getLogger(stage).info(
                "MLflow run %s in %s", run.info.run_id, store.tracking_uri()
            )
            yield run
        except StageInterrupted as stop:
            end_killed(run.info.run_id, str(stop))
            # Off the active-run stack, so leaving the `with` does not end it FAILED.
            mlflow.end_run(RunStatus.to_string(RunStatus.KILLED))
            logging.getLogger(stage).warning("MLflow run %s ended KILLED", run.info.run_id)
            raise


def kill_abandoned_runs(experiment_id: str, stage: str) -> int:
    """Mark KILLED the runs of `stage` left RUNNING by a process that has ended; return how many.

    Runs of live processes (another pipeline on the same store), of other hosts and without a
    recorded process are left alone.
    """
    client = MlflowClient()
    running = client.search_runs(
        [experiment_id],
        filter_string=f"tags.stage = '{stage}' and attributes.status = 'RUNNING'",
    )
    abandoned = [
        (run, process)
        for run in running
        if (process := ProcessIdentity.from_tags(run.data.tags)) and process.is_gone()
    ]
    for run, process in abandoned:
        end_killed(run.info.run_id, f"its process (PID {process.pid}) ended without ending it")
        logging.getLogger(stage).warning(
            "run %s of an earlier %s process (PID %d) was left RUNNING; marked KILLED",
            run.info.run_id,
            stage,
            process.pid,
        )
    return len(abandoned)


def end_killed(run_id: str, reason: str) -> None:
    """End run `run_id` and its nested runs still RUNNING (tune's trials) as KILLED, saying why
    in the tag `stop_reason`."""
    client = MlflowClient()
    experiment_id = client.get_run(run_id).info.experiment_id
    for child in client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{run_id}' "
        "and attributes.status = 'RUNNING'",
    ):
        end_killed(child.info.run_id, reason)
    client.set_tag(run_id, "stop_reason", reason)
    client.set_terminated(run_id, RunStatus.to_string(RunStatus.KILLED))


class EpochMetricsLogger(keras.callbacks.Callback):
    """Sends every epoch's logs (loss, accuracy, val_*) to one run as step-indexed histories.

    Takes an explicit run id, so a Keras Tuner trial logs into its own nested run while the
    tune stage's run stays the active one.
    """

    def __init__(self, run_id: str, prefix: str = "") -> None:
        super().__init__()
        self.run_id = run_id
        self.prefix = prefix
        self.client = MlflowClient()

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        timestamp = mlflow.utils.time.get_current_time_millis()
        metrics = [
            Metric(f"{self.prefix}{key}", float(value), timestamp, epoch)
            for key, value in (logs or {}).items()
            if np.isscalar(value) or np.ndim(value) == 0
        ]
        self.client.log_batch(self.run_id, metrics=metrics)


def model_requirements() -> list[str]:
    """Pinned pip requirements of a logged model: these libraries and the active Keras backend
    (the backend it was trained with; each is named after its package, e.g. tensorflow, jax)."""
    names = dict.fromkeys((*_MODEL_REQUIREMENTS, keras.backend.backend()))
    return [f"{name}=={metadata.version(name)}" for name in names]


def log_keras_model(
    model: keras.Model, example: np.ndarray, registered_model_name: str | None = None
) -> mlflow.models.model.ModelInfo:
    """Log a Keras model with a signature inferred from `example` (a few model inputs)."""
    # input_example= crashes on mlflow 3.17 (mlflow#16183); the signature documents the input.
    signature = infer_signature(example, np.asarray(model(example, training=False)))
    return mlflow.keras.log_model(
        model,
        name="model",
        signature=signature,
        pip_requirements=model_requirements(),
        registered_model_name=registered_model_name,
    )
