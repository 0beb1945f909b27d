"""Training-time data augmentation: random small rotations, shifts and zooms of digit images,
in seeded, resumable training batches.

Lives in the input pipeline (not in the models), so saved models hold no training-only layers.
Used by `training.fit` (baseline, retrain) and by the tuner's trials (`models.MnistHyperModel`).
"""

from __future__ import annotations

from typing import Any

import keras
import numpy as np


def random_affine(
    images: np.ndarray,
    rng: np.random.Generator,
    rotation: float = 0.15,
    shift: float = 0.1,
    zoom: float = 0.1,
) -> np.ndarray:
    """Rotate (radians), shift (fraction of the side) and zoom each image by a random amount.

    One projective transform per image does all three at once, an order of magnitude cheaper
    than Keras's three separate RandomRotation/Translation/Zoom layers (docs/results.md).
    """
    n, height, width = images.shape[:3]
    theta = rng.uniform(-rotation, rotation, n)
    scale = rng.uniform(1 - zoom, 1 + zoom, n)
    tx = rng.uniform(-shift, shift, n) * width
    ty = rng.uniform(-shift, shift, n) * height
    cos, sin = np.cos(theta) / scale, np.sin(theta) / scale
    cx, cy = (width - 1) / 2, (height - 1) / 2
    # Maps each output pixel to the input pixel it samples: rotate and scale about the centre.
    transforms = np.stack(
        [
            cos,
            -sin,
            cx - cos * cx + sin * cy - tx,
            sin,
            cos,
            cy - sin * cx - cos * cy - ty,
            np.zeros(n),
            np.zeros(n),
        ],
        axis=1,
    ).astype(np.float32)
    moved = keras.ops.image.affine_transform(
        images, transforms, interpolation="bilinear", fill_mode="constant"
    )
    return keras.ops.convert_to_numpy(moved)


class SeededBatches(keras.utils.PyDataset):
    """Training batches shuffled, and with `augment` randomly transformed, from a seed.

    Epoch e's order comes from (seed, e) and batch i's transforms from (seed, e, i), not from one
    generator drawn in turn: an epoch looks the same whether training started at epoch 0 or
    resumed at e (`first_epoch`), and in whatever order Keras fetches the batches (it fetches
    them ahead, out of order, and two before training to learn their shapes). Keras calls
    `on_epoch_begin` once per epoch.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int,
        seed: int,
        *,
        augment: bool = True,
        first_epoch: int = 0,
    ) -> None:
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size
        self.seed, self.augment = seed, augment
        self.epoch = first_epoch
        self.epochs_begun = 0
        self.order = self._permutation()

    def _permutation(self) -> np.ndarray:
        return np.random.default_rng([self.seed, self.epoch]).permutation(len(self.y))

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        picks = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        if not self.augment:
            return self.x[picks], self.y[picks]
        rng = np.random.default_rng([self.seed, self.epoch, index])
        return random_affine(self.x[picks], rng), self.y[picks]

    def on_epoch_begin(self) -> None:
        # The first epoch is `first_epoch` itself; each later one moves on by one.
        if self.epochs_begun:
            self.epoch += 1
            self.order = self._permutation()
        self.epochs_begun += 1


def fit_data(
    x: np.ndarray,
    y: np.ndarray,
    batch_size: int,
    *,
    data_seed: int | None = None,
    augment: bool = False,
    first_epoch: int = 0,
) -> dict[str, Any]:
    """`model.fit`'s data arguments: with `data_seed`, `SeededBatches` (numbered from
    `first_epoch`); without, the arrays themselves, which Keras shuffles (not augmented)."""
    if data_seed is None:
        return {"x": x, "y": y, "batch_size": batch_size}
    batches = SeededBatches(x, y, batch_size, data_seed, augment=augment, first_epoch=first_epoch)
    # shuffle=False: the batches shuffle themselves. Keras's own shuffle would reorder them
    # from Python's global `random`, which a resumed fit cannot reproduce.
    return {"x": batches, "shuffle": False}
