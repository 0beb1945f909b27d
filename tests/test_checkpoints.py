"""The retrain checkpoint on small random data: a fit continued from it ends where an
uninterrupted fit ends, and a checkpoint for other inputs, or of a finished run, is discarded.
(tests/test_interruptions.py kills real retrain processes.)"""

from __future__ import annotations

import mlflow
import numpy as np
import pytest

from mnist_mlops.checkpoints import STATE_FILE, TrainingCheckpoint
from mnist_mlops.models import build_model
from mnist_mlops.training import fit, seed_everything

RNG = np.random.default_rng(0)
X = RNG.integers(0, 256, (256, 28, 28), dtype=np.uint8)
Y = RNG.integers(0, 10, 256).astype(np.uint8)
EPOCHS = 3


def _model():
    seed_everything(11)
    # Batch norm, dropout (seed generators), Adam and a cosine schedule: all state to restore.
    return build_model(
        conv_filters=(8,), dense_units=(16,), batch_norm=True, dropout=0.3, decay_steps=12, seed=11
    )


def _fit(model, checkpoint, first_epoch, epochs, augment):
    fit(
        model,
        (X, Y),
        None,
        epochs=epochs,
        batch_size=64,
        callbacks=[checkpoint.callback(0)],
        data_seed=5,
        augment=augment,
        initial_epoch=first_epoch,
    )


@pytest.mark.parametrize("augment", [True, False])
def test_a_fit_resumed_from_the_checkpoint_ends_with_the_same_weights(
    augment, tmp_path, mlflow_store
):
    with mlflow.start_run() as run:
        pass
    mlflow.MlflowClient().set_terminated(run.info.run_id, "KILLED")

    uninterrupted = _model()
    whole = TrainingCheckpoint.open(tmp_path / "whole", "inputs")
    whole.start(run.info.run_id)
    _fit(uninterrupted, whole, 0, EPOCHS, augment)

    first = TrainingCheckpoint.open(tmp_path / "resumed", "inputs")
    first.start(run.info.run_id)
    _fit(_model(), first, 0, 1, augment)  # then "killed"
    reopened = TrainingCheckpoint.open(tmp_path / "resumed", "inputs")
    assert reopened.run_id == run.info.run_id
    resumed = _model()
    assert reopened.restore(resumed, 0) == 1
    _fit(resumed, reopened, 1, EPOCHS - 1, augment)

    for a, b in zip(resumed.get_weights(), uninterrupted.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert reopened.history()["loss"] == whole.history()["loss"]
    # one state file per model: the previous epoch's is deleted once the next is on record
    assert sorted(p.name for p in (tmp_path / "resumed").iterdir()) == [
        STATE_FILE,
        f"model0-epoch{EPOCHS}.npz",
    ]


@pytest.mark.parametrize("ending", ["changed inputs", "finished", "run finished"])
def test_a_checkpoint_is_discarded_when_it_cannot_be_continued(ending, tmp_path, mlflow_store):
    with mlflow.start_run() as run:
        pass
    if ending != "run finished":
        mlflow.MlflowClient().set_terminated(run.info.run_id, "KILLED")
    directory = tmp_path / "checkpoint"
    checkpoint = TrainingCheckpoint.open(directory, "inputs")
    checkpoint.start(run.info.run_id)
    checkpoint.save_epoch(_model(), 0, {"loss": 1.0})
    if ending == "finished":
        checkpoint.finish()
    fingerprint = "other inputs" if ending == "changed inputs" else "inputs"

    reopened = TrainingCheckpoint.open(directory, fingerprint)
    assert reopened.run_id is None and reopened.epochs_done == 0
    assert not directory.exists()
