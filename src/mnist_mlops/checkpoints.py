"""A training that survives being killed: after every epoch, the full state of the model in
training and the history so far go to a folder that the next run continues from.

The state is every variable of the model and of its optimizer: weights, batch-norm statistics,
the optimizer's moments and step counter (which drives the cosine schedule) and the dropout
layers' seed-generator states, which Keras's `save_weights` (and so `BackupAndRestore`) leaves
out. With batches drawn from the epoch's number (`augmentation.SeededBatches`), a resumed
training ends with the same weights as an uninterrupted one.

Models are numbered (ensemble members, trained one after another): a finished member's state
stays beside the one in training. `checkpoint.json`, written last and atomically after each
epoch, says which files hold the current state, so a kill at any moment leaves a consistent
checkpoint. A checkpoint belongs to one configuration (its fingerprint) and one MLflow run; any
other, or one whose run finished or is gone, is discarded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
from mlflow.tracking import MlflowClient

from mnist_mlops.files import atomic_path, read_json, write_json

STATE_FILE = "checkpoint.json"
log = logging.getLogger(__name__)


class TrainingCheckpoint:
    """The checkpoint folder of one training: `open` it, `start` it with the run it logs to,
    `restore` each model before training it, train with `callback`, `finish` after success."""

    def __init__(self, directory: Path, fingerprint: str, state: Mapping[str, Any]) -> None:
        self.directory = directory
        self.fingerprint = fingerprint
        self.run_id: str | None = state.get("run_id")
        # model number (as a string: JSON keys) -> the file holding its latest state
        self.files: dict[str, str] = dict(state.get("files", {}))
        # one row per epoch trained so far, every model: {"model": 0, "loss": ..., ...}
        self.rows: list[dict[str, float]] = list(state.get("rows", []))

    @classmethod
    def open(cls, directory: Path, fingerprint: str) -> TrainingCheckpoint:
        """The unfinished checkpoint in `directory` if it was made with `fingerprint` and its
        run can be continued; else an empty one (the folder's content deleted)."""
        state_file = directory / STATE_FILE
        state = read_json(state_file) if state_file.exists() else {}
        matches = state.get("fingerprint") == fingerprint and not state.get("finished")
        if matches and _resumable(state.get("run_id")):
            return cls(directory, fingerprint, state)
        if state:
            log.info("discarding the checkpoint in %s: %s", directory, _why(state, fingerprint))
        shutil.rmtree(directory, ignore_errors=True)
        return cls(directory, fingerprint, {})

    @property
    def epochs_done(self) -> int:
        return len(self.rows)

    def start(self, run_id: str) -> None:
        """Bind the checkpoint to the run its epochs are logged to."""
        self.run_id = run_id
        self._write()

    def restore(self, model: keras.Model, number: int) -> int:
        """Load model `number`'s saved state into `model` (built and compiled as it was at the
        start); return its epochs already trained (0: nothing saved, `model` is untouched)."""
        name = self.files.get(str(number))
        if name is None:
            return 0
        model.optimizer.build(model.trainable_variables)
        with np.load(self.directory / name) as saved:
            values = [saved[f"arr_{i}"] for i in range(len(saved.files))]
        for variable, value in zip(_state_variables(model), values, strict=True):
            variable.assign(value)
        return sum(1 for row in self.rows if row["model"] == number)

    def callback(self, number: int) -> keras.callbacks.Callback:
        """A Keras callback saving model `number`'s state and epoch logs after each epoch."""
        return _SaveEachEpoch(self, number)

    def history(self) -> dict[str, list[float]]:
        """Every epoch trained, every model, as columns (`model`: which model trained it)."""
        return {key: [row[key] for row in self.rows] for key in self.rows[0]}

    def finish(self) -> None:
        """After success: drop the saved states, keep a note that this configuration finished."""
        shutil.rmtree(self.directory, ignore_errors=True)
        self.files, self.rows = {}, []
        self._write(finished=True)

    def save_epoch(self, model: keras.Model, number: int, logs: Mapping[str, Any]) -> None:
        row = {"model": number, **{k: float(v) for k, v in logs.items() if np.ndim(v) == 0}}
        epochs = sum(1 for r in self.rows if r["model"] == number) + 1
        name = f"model{number}-epoch{epochs}.npz"
        with atomic_path(self.directory / name) as tmp:
            np.savez(tmp, *[np.asarray(v.numpy()) for v in _state_variables(model)])
        previous = self.files.get(str(number))
        self.files[str(number)] = name
        self.rows.append(row)
        self._write()  # the commit point: from here on, a restore uses `name`
        if previous:
            (self.directory / previous).unlink(missing_ok=True)

    def _write(self, finished: bool = False) -> None:
        state = {
            "fingerprint": self.fingerprint,
            "run_id": self.run_id,
            "finished": finished,
            "files": self.files,
            "rows": self.rows,
        }
        write_json(self.directory / STATE_FILE, state)


class _SaveEachEpoch(keras.callbacks.Callback):
    def __init__(self, checkpoint: TrainingCheckpoint, number: int) -> None:
        super().__init__()
        self.checkpoint = checkpoint
        self.number = number

    def on_epoch_end(self, epoch: int, logs: Mapping[str, Any] | None = None) -> None:
        self.checkpoint.save_epoch(self.model, self.number, logs or {})


def _state_variables(model: keras.Model) -> list[keras.Variable]:
    """Everything training changes, in a fixed order: `model.variables` includes the seed
    generators' states that `model.weights` lacks."""
    return [*model.variables, *model.optimizer.variables]


def _resumable(run_id: str | None) -> bool:
    """Whether run `run_id` exists and did not finish (a finished run's model is registered)."""
    if run_id is None:
        return False
    try:
        status = MlflowClient().get_run(run_id).info.status
    except mlflow.exceptions.MlflowException:
        return False  # the store was reset
    return status != "FINISHED"


def _why(state: Mapping[str, Any], fingerprint: str) -> str:
    if state.get("finished"):
        return "its training finished"
    if state.get("fingerprint") != fingerprint:
        return "params, data or code changed since"
    return f"its MLflow run {state.get('run_id')} finished or is gone"


def fingerprint(payload: Mapping[str, Any]) -> str:
    """A digest of what a checkpoint depends on (JSON-able values)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()
