"""retrain: the search's best configuration, built by the same builder, trained on train + val.

With `retrain.ensemble_size` > 1, that many copies of the configuration train one after another
from different seeds (initial weights, dropout, augmentation draws), and the saved model averages
their probabilities (`models.average_ensemble`). Their epochs share one axis in the logs and in
history.json (member 1's epochs follow member 0's), with a `member` column saying whose they are.
With `retrain.test_time_shift` > 0 the saved model also averages over the image and four copies
of it moved that many pixels (`models.shift_averaged`).

Reads: data/prepared/{train,val}.npz, tuning/best_hparams.json. Writes:
models/tuned/{model.keras,config.json,history.json,registered.json}; registers a new version of
the model in the MLflow Model Registry.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import mlflow
import numpy as np

from mnist_mlops import lineage, plots
from mnist_mlops.config import RetrainParams, load_params
from mnist_mlops.data import load_split
from mnist_mlops.errors import exit_on_pipeline_error
from mnist_mlops.files import read_json, write_json
from mnist_mlops.models import average_ensemble, build_model, shift_averaged
from mnist_mlops.paths import ProjectPaths
from mnist_mlops.registry import log_serving_model
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
) -> dict[str, Any]:
    """Train the best configuration on train + val, log it and register it as a new version of
    `registered_model`; return the registry hand-over (also written as registered.json)."""
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
    members, histories = [], []
    for i, member_seed in enumerate(seeds):
        if len(seeds) > 1:
            log.info("ensemble member %d/%d (seed %d)", i + 1, len(seeds), member_seed)
        seed_everything(member_seed)
        member = build_model(**architecture, seed=member_seed)
        if i == 0:
            member.summary(print_fn=lambda text, **_: log.info("%s", text))
        histories.append(
            fit(
                member,
                (x_all, y_all),
                None,
                epochs=epochs,
                batch_size=batch_size,
                callbacks=[EpochMetricsLogger(run_id)],
                augment_seed=member_seed if params.augment else None,
                initial_epoch=i * epochs,
            )
        )
        members.append(member)
    model = shift_averaged(average_ensemble(members), params.test_time_shift)
    history = {key: [v for h in histories for v in h[key]] for key in histories[0]}
    if len(members) > 1:
        history["member"] = [i for i, h in enumerate(histories) for _ in h["loss"]]
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
    info = log_serving_model(paths.model_file(MODEL_NAME), registered_model_name=registered_model)
    registered = {
        "name": registered_model,
        "version": str(info.registered_model_version),
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


@exit_on_pipeline_error(STAGE)
def main() -> None:
    paths = ProjectPaths.cwd()
    params = load_params(paths.params)
    paths.require(paths.best_hparams)  # before a run is opened for nothing
    with stage_run(STAGE, params, (STAGE,)) as active:
        # Trained on both: the search already chose the configuration on val.
        lineage.log_splits(paths, {"train": "training", "val": "training"})
        registered = run(
            params.retrain,
            paths,
            seed=params.seed,
            run_id=active.info.run_id,
            registered_model=params.mlflow.registered_model,
        )
    log.info("registered %s version %s", registered["name"], registered["version"])


if __name__ == "__main__":
    main()
