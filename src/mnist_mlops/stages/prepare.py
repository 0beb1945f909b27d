"""prepare: verified MNIST -> seeded stratified train/validation split + untouched test set.

Reads: the four IDX files from $MNIST_DIR, else data/raw/ (IDX files or Keras's mnist.npz,
downloaded there when missing). Writes: data/prepared/{train,val,test}.npz and summary.json.
"""

from __future__ import annotations

import hashlib
import logging
import os
from typing import Any

import mlflow
import numpy as np

from mnist_mlops import data, lineage, plots
from mnist_mlops.config import PrepareParams, load_params
from mnist_mlops.errors import exit_on_pipeline_error
from mnist_mlops.files import atomic_dir, write_json
from mnist_mlops.paths import ProjectPaths, project_root
from mnist_mlops.stage_process import single_stage_process
from mnist_mlops.tracking import stage_run

STAGE = "prepare"
log = logging.getLogger(STAGE)


def run(
    params: PrepareParams, paths: ProjectPaths, *, seed: int, arrays: data.MnistArrays
) -> dict[str, Any]:
    """Split and write the prepared arrays; return the summary (also written as summary.json).

    The whole folder is staged and moved into place at the end, so a failure never leaves a
    half-prepared dataset behind.
    """
    x_train, y_train = arrays.x_train, arrays.y_train
    if params.train_subset is not None:
        x_train, y_train = data.stratified_subset(
            x_train, y_train, params.train_subset, seed, name="prepare.train_subset"
        )
    x_tr, y_tr, x_val, y_val = data.stratified_split(
        x_train, y_train, params.val_size, seed, name="prepare.val_size"
    )
    splits = {
        "train": (x_tr, y_tr),
        "val": (x_val, y_val),
        "test": (arrays.x_test, arrays.y_test),
    }
    # No source path in here: the same data from any source must hash the same for DVC.
    summary = {
        "seed": seed,
        "sizes": {name: len(y) for name, (_, y) in splits.items()},
        "class_counts": {name: data.class_counts(y) for name, (_, y) in splits.items()},
        "sha256": {name: _digest(x, y) for name, (x, y) in splits.items()},
    }
    with atomic_dir(paths.prepared) as staging:
        for name, (x, y) in splits.items():
            data.save_split(staging / paths.split(name).name, x, y)
        write_json(staging / paths.data_summary.name, summary)
    return summary


def _digest(x: np.ndarray, y: np.ndarray) -> str:
    """Content digest of one split: identical prepared data hashes identically on any machine."""
    return hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()


@exit_on_pipeline_error(STAGE)
@single_stage_process(STAGE)
def main() -> None:
    paths = ProjectPaths.cwd()
    params = load_params(paths.params)
    mnist_dir = os.environ.get("MNIST_DIR")
    # Relative to the repository, also when `dvc exp run --temp` runs us in a copy of it.
    source_dir = project_root() / mnist_dir if mnist_dir else None
    arrays, source = data.load_mnist(source_dir, paths.raw)
    log.info("verified MNIST from %s", source)
    with stage_run(STAGE, params, (STAGE,)):
        summary = run(params.prepare, paths, seed=params.seed, arrays=arrays)
        mlflow.set_tag("data_source", source)
        mlflow.log_metrics({f"{name}_size": size for name, size in summary["sizes"].items()})
        mlflow.log_dict(summary, "summary.json")
        lineage.log_splits(paths, {split: "output" for split in summary["sizes"]})
        x_train, y_train = data.load_split(paths.split("train"))
        mlflow.log_figure(plots.sample_grid(x_train, y_train), "sample_grid.png")
    sizes = ", ".join(f"{name} {size}" for name, size in summary["sizes"].items())
    log.info("wrote %s: %s", paths.prepared, sizes)


if __name__ == "__main__":
    main()
