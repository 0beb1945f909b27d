"""baseline: the reference projects' plain CNN, trained on the training split.

Reads: data/prepared/{train,val}.npz.
Writes: models/baseline/{model.keras,config.json,history.json}.
"""

from __future__ import annotations

import logging

import mlflow

from mnist_mlops import lineage, plots
from mnist_mlops.config import BaselineParams, load_params
from mnist_mlops.data import load_split, to_model_input
from mnist_mlops.errors import exit_on_pipeline_error
from mnist_mlops.models import BASELINE_ARCHITECTURE, build_model
from mnist_mlops.paths import ProjectPaths
from mnist_mlops.stage_process import single_stage_process
from mnist_mlops.tracking import EpochMetricsLogger, log_keras_model, stage_run
from mnist_mlops.training import fit, save_model, seed_everything

STAGE = "baseline"
log = logging.getLogger(STAGE)


def run(
    params: BaselineParams, paths: ProjectPaths, *, seed: int, run_id: str
) -> dict[str, list[float]]:
    """Train the baseline, logging each epoch to MLflow run `run_id`; return its history."""
    seed_everything(seed)
    train = load_split(paths.require(paths.split("train")))
    val = load_split(paths.require(paths.split("val")))
    architecture = {
        **BASELINE_ARCHITECTURE,
        "optimizer": "adam",
        "learning_rate": params.learning_rate,
        "label_smoothing": params.label_smoothing,
    }
    model = build_model(**architecture, seed=seed)
    model.summary(print_fn=lambda text, **_: log.info("%s", text))
    history = fit(
        model,
        train,
        val,
        epochs=params.epochs,
        batch_size=params.batch_size,
        callbacks=[EpochMetricsLogger(run_id)],
    )
    config = {"seed": seed, "architecture": architecture, "fit": params.model_dump()}
    save_model(model, paths.model_dir(STAGE), config, history)
    mlflow.log_dict(config, "config.json")
    mlflow.log_figure(plots.training_curves(history, "Baseline CNN"), "training_curves.png")
    mlflow.log_metric("parameters", model.count_params())
    log_keras_model(model, to_model_input(val[0][:2]))
    return history


@exit_on_pipeline_error(STAGE)
@single_stage_process(STAGE)
def main() -> None:
    paths = ProjectPaths.cwd()
    params = load_params(paths.params)
    with stage_run(STAGE, params, (STAGE,)) as active:
        lineage.log_splits(paths, {"train": "training", "val": "validation"})
        history = run(params.baseline, paths, seed=params.seed, run_id=active.info.run_id)
    log.info("val_accuracy %.4f; saved %s", history["val_accuracy"][-1], paths.model_dir(STAGE))


if __name__ == "__main__":
    main()
