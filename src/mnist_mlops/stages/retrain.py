"""retrain: the search's best configuration, built by the same builder, trained on train + val.

With `retrain.ensemble_size` > 1, that many copies of the configuration train one after another
from different seeds (initial weights, dropout, augmentation draws), and the saved model averages
their probabilities (`models.average_ensemble`). Their epochs share one axis in the logs and in
history.json (member 1's epochs follow member 0's), with a `member` column saying whose they are.
With `retrain.test_time_shift` > 0 the saved model also averages over the image and four copies
of it moved that many pixels (`models.shift_averaged`).

Reads: data/prepared/{train,val}.npz and summary.json, tuning/best_hparams.json. Writes:
models/tuned/{model.keras,config.json,history.json,registered.json}; registers a new version of
the model in the MLflow Model Registry, tagged `evaluation_status=pending` until evaluate runs.
Keeps a checkpoint after every epoch in models/tuned/checkpoint/ (a persistent DVC output): a
killed retrain continues from its last finished epoch, in the same MLflow run, on the next
`dvc repro`, and ends with the same model as an uninterrupted one.
"""

from __future__ import annotations

import inspect
import logging
import math
import socket
import sys
from importlib import metadata
from typing import Any

import keras
import mlflow
import numpy as np

from mnist_mlops import augmentation, checkpoints, data, lineage, models, plots, registry, training
from mnist_mlops.checkpoints import TrainingCheckpoint
from mnist_mlops.config import Params, RetrainParams, load_params
from mnist_mlops.data import load_split
from mnist_mlops.errors import exit_on_pipeline_error
from mnist_mlops.files import read_json, write_json
from mnist_mlops.models import average_ensemble, build_model, shift_averaged
from mnist_mlops.paths import ProjectPaths
from mnist_mlops.stage_process import single_stage_process
from mnist_mlops.tracking import EpochMetricsLogger, stage_run
from mnist_mlops.training import fit, save_model, seed_everything

STAGE = "retrain"
MODEL_NAME = "tuned"  # models/tuned/
log = logging.getLogger(STAGE)


def run(
    params: RetrainParams,
    paths: ProjectPaths,
    *,
    seed: int,
    run_id: str,
    registered_model: str,
    checkpoint: TrainingCheckpoint,
) -> dict[str, Any]:
    """Train the best configuration on train + val (continuing from `checkpoint`, saving each
    epoch there), log it and register it as a new version of `registered_model`; return the
    registry hand-over (also written as registered.json)."""
    best = read_json(paths.require(paths.best_hparams))
    x_train, y_train = load_split(paths.require(paths.split("train")))
    x_val, y_val = load_split(paths.require(paths.split("val")))
    x_all, y_all = np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val])
    batch_size = best["batch_size"]
    steps = params.epochs * math.ceil(len(y_all) / batch_size)
    architecture = {
        **best["architecture"],
        "decay_steps": steps if params.lr_schedule == "cosine" else None,
        "label_smoothing": params.label_smoothing,
    }
    epochs = params.epochs
    seeds = member_seeds(seed, params.ensemble_size)
    members = []
    for i, member_seed in enumerate(seeds):
        if len(seeds) > 1:
            log.info("ensemble member %d/%d (seed %d)", i + 1, len(seeds), member_seed)
        seed_everything(member_seed)
        member = build_model(**architecture, seed=member_seed)
        if i == 0:
            member.summary(print_fn=lambda text, **_: log.info("%s", text))
        done = checkpoint.restore(member, i)
        if done:
            log.info("restored after epoch %d/%d from %s", done, epochs, checkpoint.directory)
        if done < epochs:
            fit(
                member,
                (x_all, y_all),
                None,
                epochs=epochs - done,
                batch_size=batch_size,
                # The logger first: an epoch on record in the checkpoint is on record in MLflow.
                callbacks=[EpochMetricsLogger(run_id), checkpoint.callback(i)],
                data_seed=member_seed,
                augment=params.augment,
                degradation_rate=augmentation.scheduled_rate(
                    params.degradation_rate,
                    params.degradation_schedule,
                    epochs,
                    first_epoch=i * epochs,
                ),
                initial_epoch=i * epochs + done,
            )
        members.append(member)
    model = shift_averaged(average_ensemble(members), params.test_time_shift)
    history = checkpoint.history()
    member_column = history.pop("model")
    if len(members) > 1:
        history["member"] = member_column
    config = {
        "seed": seed,
        "architecture": architecture,
        "batch_size": batch_size,
        "member_seeds": seeds,
        "fit": params.model_dump(),
        "tuned_from": best,
    }
    save_model(model, paths.model_dir(MODEL_NAME), config, history)
    mlflow.log_params({f"architecture.{k}": v for k, v in architecture.items()})
    mlflow.log_metric("parameters", model.count_params())
    mlflow.log_dict(config, "config.json")
    mlflow.log_figure(plots.training_curves(history, "Tuned CNN, retrained"), "training_curves.png")
    # The served form: validates requests and accepts tensors, raw pixels and PNGs.
    info = registry.log_serving_model(paths.model_file(MODEL_NAME))
    origin = f"{socket.gethostname()}:{paths.root.resolve()}"
    version = registry.register_candidate(info.model_uri, registered_model, origin)
    registered = {
        "name": registered_model,
        "version": version,
        "model_uri": info.model_uri,
        "run_id": run_id,
    }
    write_json(paths.registered, registered)
    return registered


def member_seeds(seed: int, ensemble_size: int) -> list[int]:
    """Seeds of the ensemble's members: the pipeline seed first, so a one-model ensemble is the
    single model; the others drawn from (seed, i), so runs with nearby seeds share no member."""
    return [seed] + [
        int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) for i in range(1, ensemble_size)
    ]


def checkpoint_fingerprint(params: Params, paths: ProjectPaths) -> str:
    """What a retrain checkpoint depends on: params, the tuned configuration, the data, the
    training code and library versions. Any change starts the training afresh."""
    code = [sys.modules[__name__], augmentation, checkpoints, data, models, training]
    return checkpoints.fingerprint(
        {
            "seed": params.seed,
            "retrain": params.retrain.model_dump(),
            "mlflow": params.mlflow.model_dump(),
            "best": read_json(paths.require(paths.best_hparams)),
            "data": read_json(paths.require(paths.data_summary))["sha256"],
            "code": [inspect.getsource(module) for module in code],
            "versions": [
                metadata.version(name) for name in ("keras", "numpy", keras.backend.backend())
            ],
        }
    )


@exit_on_pipeline_error(STAGE)
@single_stage_process(STAGE)
def main() -> None:
    paths = ProjectPaths.cwd()
    params = load_params(paths.params)
    checkpoint = TrainingCheckpoint.open(
        paths.retrain_checkpoint, checkpoint_fingerprint(params, paths)
    )
    with stage_run(STAGE, params, (STAGE,), resume_run_id=checkpoint.run_id) as active:
        if checkpoint.run_id:
            log.info(
                "resuming the interrupted run %s after %d trained epoch(s)",
                checkpoint.run_id,
                checkpoint.epochs_done,
            )
        checkpoint.start(active.info.run_id)
        # Trained on both: the search already chose the configuration on val.
        lineage.log_splits(paths, {"train": "training", "val": "training"})
        registered = run(
            params.retrain,
            paths,
            seed=params.seed,
            run_id=active.info.run_id,
            registered_model=params.mlflow.registered_model,
            checkpoint=checkpoint,
        )
    checkpoint.finish()
    log.info("registered %s version %s", registered["name"], registered["version"])


if __name__ == "__main__":
    main()
