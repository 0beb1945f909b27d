"""retrain: the search's best configuration, built by the same builder, trained on train + val.

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
from mnist_mlops.models import build_model
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
    seed_everything(params.seed)
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
    model = build_model(**architecture, seed=params.seed)
    model.summary(print_fn=lambda line, **_: print(line))
    history = fit(
        model,
        (x_all, y_all),
        None,
        epochs=params.retrain.epochs,
        batch_size=batch_size,
        callbacks=[EpochMetricsLogger(run_id)],
        augment_seed=params.seed if params.retrain.augment else None,
    )
    config = {
        "seed": params.seed,
        "architecture": architecture,
        "batch_size": batch_size,
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


@exit_on_pipeline_error(STAGE)
def main() -> None:
    params = load_params()
    best = read_json(BEST_HPARAMS, "tune")
    with stage_run(STAGE, params, (STAGE,)) as active:
        registered = run(params, best, PREPARED_DIR, OUT_DIR, active.info.run_id)
    print(f"[{STAGE}] registered {registered['name']} version {registered['version']}")


if __name__ == "__main__":
    main()
