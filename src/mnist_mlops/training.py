"""What the training stages share: seeding, fitting with progress output, saving a model with its
config and history."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import keras
import numpy as np

from mnist_mlops.augmentation import fit_data
from mnist_mlops.data import one_hot, to_model_input
from mnist_mlops.files import atomic_path, write_json


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and the backend, and ask the backend for deterministic kernels.

    With the same seed and data, a re-run gives the same weights and metrics, which is what lets
    `dvc repro` skip unchanged stages without losing anything.
    """
    os.environ["PYTHONHASHSEED"] = str(seed)
    keras.utils.set_random_seed(seed)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf  # only the TF backend needs (and has) this switch

        tf.config.experimental.enable_op_determinism()


def progress_verbosity() -> int:
    """Keras progress bars on a terminal; one line per epoch in logs (DVC, CI), where a
    redrawn bar would write thousands of lines."""
    return 1 if sys.stdout.isatty() else 2


class EpochTimer(keras.callbacks.Callback):
    """Adds `epoch_seconds` (wall time of the epoch, validation included) to each epoch's logs,
    so training cost is tracked beside accuracy."""

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        if logs is not None:
            logs["epoch_seconds"] = time.perf_counter() - self.started


def fit(
    model: keras.Model,
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray] | None,
    *,
    epochs: int,
    batch_size: int,
    callbacks: list[keras.callbacks.Callback],
    data_seed: int | None = None,
    augment: bool = False,
    degradation_rate: float | Callable[[int], float] = 0.0,
    initial_epoch: int = 0,
) -> dict[str, list[float]]:
    """Train on uint8 image arrays for `epochs` epochs; return the per-epoch history.

    With `data_seed`, each epoch's order (and with `augment`, its freshly transformed copies of
    the training images) is drawn from the seed and the epoch's number, so a fit resumed at
    `initial_epoch` sees what an uninterrupted one would have; without, Keras shuffles the
    arrays.
    `initial_epoch` numbers the epochs from there on (in the logs, callbacks and MLflow steps),
    so models trained one after another into the same run continue one epoch axis.
    """
    history = model.fit(
        **fit_data(
            to_model_input(train[0]),
            one_hot(train[1]),
            batch_size,
            data_seed=data_seed,
            augment=augment,
            degradation_rate=degradation_rate,
            first_epoch=initial_epoch,
        ),
        validation_data=(to_model_input(val[0]), one_hot(val[1])) if val is not None else None,
        initial_epoch=initial_epoch,
        epochs=initial_epoch + epochs,
        # The timer runs first, so the loggers after it see epoch_seconds.
        callbacks=[EpochTimer(), *callbacks],
        verbose=progress_verbosity(),
    )
    return {key: [float(v) for v in values] for key, values in history.history.items()}


def save_model(
    model: keras.Model,
    directory: Path,
    config: dict[str, Any],
    history: dict[str, list[float]],
) -> None:
    """Write `model.keras` with the resolved `config.json` it was trained with, and its history.

    history.json holds one row per epoch (`[{"epoch": 1, "loss": ..}, ..]`), the layout
    `dvc plots` reads.
    """
    with atomic_path(directory / "model.keras") as tmp:
        model.save(tmp)
    write_json(directory / "config.json", config)
    epochs = len(history["loss"])
    rows = [
        {"epoch": i + 1, **{key: values[i] for key, values in history.items()}}
        for i in range(epochs)
    ]
    write_json(directory / "history.json", rows)
