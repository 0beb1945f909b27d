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

import math
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from mnist_mlops import plots
from mnist_mlops.config import Params, load_params
from mnist_mlops.data import load_split
from mnist_mlops.errors import exit_on_pipeline_error
from mnist_mlops.models import average_ensemble, build_model, shift_averaged
from mnist_mlops.serving import log_serving_model
from mnist_mlops.tracking import EpochMetricsLogger, stage_run
from mnist_mlops.training import (
    fit,
    read_json,
    save_model,
    seed_everything,
    write_json,
)

STAGE = "retrain"
PREPARED_DIR = Path("data/prepared")
BEST_HPARAMS = Path("tuning/best_hparams.json")
OUT_DIR = Path("models/tuned")


def run(
    params: Params, best: dict[str, Any], prepared_dir: Path, out_dir: Path, run_id: str
) -> dict[str, Any]:
    """Train the best configuration on train + val, log and register it; return registry info."""
    x_train, y_train = load_split(prepared_dir / "train.npz")
    x_val, y_val = load_split(prepared_dir / "val.npz")
    x_all, y_all = np.concatenate([x_train, x_val]), np.concatenate([y_train, y_val])
    batch_size = best["batch_size"]
    steps = params.retrain.epochs * math.ceil(len(y_all) / batch_size)
    architecture = {
        **best["architecture"],
        "decay_steps": steps if params.retrain.lr_schedule == "cosine" else None,
        "label_smoothing": params.retrain.label_smoothing,
    }
    epochs = params.retrain.epochs
    seeds = member_seeds(params.seed, params.retrain.ensemble_size)
    members, histories = [], []
    for i, seed in enumerate(seeds):
        if len(seeds) > 1:
            print(f"[{STAGE}] ensemble member {i + 1}/{len(seeds)} (seed {seed})")
        seed_everything(seed)
        member = build_model(**architecture, seed=seed)
        if i == 0:
            member.summary(print_fn=lambda line, **_: print(line))
        histories.append(
            fit(
                member,
                (x_all, y_all),
                None,
                epochs=epochs,
                batch_size=batch_size,
                callbacks=[EpochMetricsLogger(run_id)],
                augment_seed=seed if params.retrain.augment else None,
                initial_epoch=i * epochs,
            )
        )
        members.append(member)
    model = shift_averaged(average_ensemble(members), params.retrain.test_time_shift)
    history = {key: [v for h in histories for v in h[key]] for key in histories[0]}
    if len(members) > 1:
        history["member"] = [i for i, h in enumerate(histories) for _ in h["loss"]]
    config = {
        "seed": params.seed,
        "architecture": architecture,
        "batch_size": batch_size,
        "member_seeds": seeds,
        "fit": params.section(STAGE),
        "tuned_from": best,
    }
    save_model(model, out_dir, config, history)
    mlflow.log_params({f"architecture.{k}": v for k, v in architecture.items()})
    mlflow.log_metric("parameters", model.count_params())
    mlflow.log_dict(config, "config.json")
    mlflow.log_figure(plots.training_curves(history, "Tuned CNN, retrained"), "training_curves.png")
    # The served form: validates requests and accepts tensors, raw pixels and PNGs.
    info = log_serving_model(
        out_dir / "model.keras", registered_model_name=params.mlflow.registered_model
    )
    registered = {
        "name": params.mlflow.registered_model,
        "version": str(info.registered_model_version),
        "model_uri": info.model_uri,
        "run_id": run_id,
    }
    write_json(out_dir / "registered.json", registered)
    return registered


def member_seeds(seed: int, ensemble_size: int) -> list[int]:
    """Seeds of the ensemble's members: the pipeline seed first, so a one-model ensemble is the
    single model; the others drawn from (seed, i), so runs with nearby seeds share no member."""
    return [seed] + [
        int(np.random.SeedSequence([seed, i]).generate_state(1)[0]) for i in range(1, ensemble_size)
    ]


@exit_on_pipeline_error(STAGE)
def main() -> None:
    params = load_params()
    best = read_json(BEST_HPARAMS, "tune")
    with stage_run(STAGE, params, (STAGE,)) as active:
        registered = run(params, best, PREPARED_DIR, OUT_DIR, active.info.run_id)
    print(f"[{STAGE}] registered {registered['name']} version {registered['version']}")


if __name__ == "__main__":
    main()
