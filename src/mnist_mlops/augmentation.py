"""Training-time data augmentation: random small rotations, shifts and zooms of digit images.

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


class AugmentedBatches(keras.utils.PyDataset):
    """Shuffled batches of randomly transformed training images, seeded for reproducibility."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int) -> None:
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(len(y))

    def __len__(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        picks = self.order[index * self.batch_size : (index + 1) * self.batch_size]
        return random_affine(self.x[picks], self.rng), self.y[picks]

    def on_epoch_end(self) -> None:
        self.order = self.rng.permutation(len(self.y))


def fit_data(
    x: np.ndarray, y: np.ndarray, batch_size: int, augment_seed: int | None
) -> dict[str, Any]:
    """`model.fit`'s data arguments: seeded augmented batches, or the arrays themselves."""
    if augment_seed is None:
        return {"x": x, "y": y, "batch_size": batch_size}
    return {"x": AugmentedBatches(x, y, batch_size, augment_seed)}
