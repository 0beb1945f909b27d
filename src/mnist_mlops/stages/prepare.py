"""prepare: verified MNIST -> seeded stratified train/validation split + untouched test set.

Reads: the four IDX files from $MNIST_DIR, else data/raw/ (IDX files or Keras's mnist.npz,
downloaded there when missing). Writes: data/prepared/{train,val,test}.npz and summary.json.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import mlflow
import numpy as np

from mnist_mlops import data, plots
from mnist_mlops.config import Params, load_params
from mnist_mlops.errors import exit_on_pipeline_error
from mnist_mlops.tracking import project_root, stage_run
from mnist_mlops.training import write_json

STAGE = "prepare"
RAW_DIR = Path("data/raw")
PREPARED_DIR = Path("data/prepared")


def run(arrays: data.MnistArrays, params: Params, out_dir: Path) -> dict[str, Any]:
    """Split and write the prepared arrays; return the summary (also written as summary.json).

    Everything is written to a sibling temporary directory first and moved into place at the
    end, so a failure never leaves a half-prepared dataset behind.
    """
    x_train, y_train = arrays.x_train, arrays.y_train
    if params.prepare.train_subset is not None:
        x_train, y_train = data.stratified_subset(
            x_train, y_train, params.prepare.train_subset, params.seed
        )
    x_tr, y_tr, x_val, y_val = data.stratified_split(
        x_train, y_train, params.prepare.val_size, params.seed
    )
    splits = {
        "train": (x_tr, y_tr),
        "val": (x_val, y_val),
        "test": (arrays.x_test, arrays.y_test),
    }
    # No source path in here: the same data from any source must hash the same for DVC.
    summary = {
        "seed": params.seed,
        "sizes": {name: len(y) for name, (_, y) in splits.items()},
        "class_counts": {name: data.class_counts(y) for name, (_, y) in splits.items()},
        "sha256": {name: _digest(x, y) for name, (x, y) in splits.items()},
    }
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        for name, (x, y) in splits.items():
            data.save_split(staging / f"{name}.npz", x, y)
        write_json(staging / "summary.json", summary)
        shutil.rmtree(out_dir, ignore_errors=True)
        staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return summary


def _digest(x: np.ndarray, y: np.ndarray) -> str:
    """Content digest of one split: identical prepared data hashes identically on any machine."""
    return hashlib.sha256(x.tobytes() + y.tobytes()).hexdigest()


@exit_on_pipeline_error(STAGE)
def main() -> None:
    params = load_params()
    mnist_dir = os.environ.get("MNIST_DIR")
    # Relative to the repository, also when `dvc exp run --temp` runs us in a copy of it.
    source_dir = project_root() / mnist_dir if mnist_dir else None
    arrays, source = data.load_mnist(source_dir, RAW_DIR)
    print(f"[{STAGE}] verified MNIST from {source}")
    with stage_run(STAGE, params, ("prepare",)):
        summary = run(arrays, params, PREPARED_DIR)
        mlflow.set_tag("data_source", source)
        mlflow.log_metrics({f"{name}_size": size for name, size in summary["sizes"].items()})
        mlflow.log_dict(summary, "summary.json")
        x_train, y_train = data.load_split(PREPARED_DIR / "train.npz")
        mlflow.log_figure(plots.sample_grid(x_train, y_train), "sample_grid.png")
    print(
        f"[{STAGE}] wrote {PREPARED_DIR}: "
        + ", ".join(f"{name} {size}" for name, size in summary["sizes"].items())
    )


if __name__ == "__main__":
    main()
