"""baseline: the reference projects' plain CNN, trained on the training split.

Reads: data/prepared/{train,val}.npz.
Writes: models/baseline/{model.keras,config.json,history.json}.
"""

from __future__ import annotations

from pathlib import Path

import mlflow

from mnist_mlops import plots
from mnist_mlops.config import Params, load_params
from mnist_mlops.data import load_split
from mnist_mlops.errors import exit_on_pipeline_error
from mnist_mlops.models import BASELINE_ARCHITECTURE, build_model
from mnist_mlops.tracking import EpochMetricsLogger, log_keras_model, stage_run
from mnist_mlops.training import fit, save_model, seed_everything, to_model_input

STAGE = "baseline"
PREPARED_DIR = Path("data/prepared")
OUT_DIR = Path("models/baseline")


def run(params: Params, prepared_dir: Path, out_dir: Path, run_id: str) -> dict[str, list[float]]:
    """Train the baseline, logging each epoch to MLflow run `run_id`; return its history."""
    seed_everything(params.seed)
    train = load_split(prepared_dir / "train.npz")
    val = load_split(prepared_dir / "val.npz")
    architecture = {
        **BASELINE_ARCHITECTURE,
        "optimizer": "adam",
        "learning_rate": params.baseline.learning_rate,
        "label_smoothing": params.baseline.label_smoothing,
    }
    model = build_model(**architecture, seed=params.seed)
    model.summary(print_fn=lambda line, **_: print(line))
    history = fit(
        model,
        train,
        val,
        epochs=params.baseline.epochs,
        batch_size=params.baseline.batch_size,
        callbacks=[EpochMetricsLogger(run_id)],
    )
    config = {"seed": params.seed, "architecture": architecture, "fit": params.section(STAGE)}
    save_model(model, out_dir, config, history)
    mlflow.log_dict(config, "config.json")
    mlflow.log_figure(plots.training_curves(history, "Baseline CNN"), "training_curves.png")
    mlflow.log_metric("parameters", model.count_params())
    log_keras_model(model, to_model_input(val[0][:2]))
    return history


@exit_on_pipeline_error(STAGE)
def main() -> None:
    params = load_params()
    with stage_run(STAGE, params, (STAGE,)) as active:
        history = run(params, PREPARED_DIR, OUT_DIR, active.info.run_id)
    print(f"[{STAGE}] val_accuracy {history['val_accuracy'][-1]:.4f}; saved {OUT_DIR}")


if __name__ == "__main__":
    main()
