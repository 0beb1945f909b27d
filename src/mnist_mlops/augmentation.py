"""Training-time data augmentation: random small rotations, shifts and zooms of digit images,
and random degradations (noise, blur, tint, erasing, lines...), in seeded, resumable batches.

Lives in the input pipeline (not in the models), so saved models hold no training-only layers.
Used by `training.fit` (baseline, retrain) and by the tuner's trials (`models.MnistHyperModel`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import keras
import numpy as np
from scipy import ndimage


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


def random_degradations(
    images: np.ndarray, rng: np.random.Generator, rate: float, max_ops: int = 3
) -> np.ndarray:
    """Degrade a share `rate` of float images [N, 28, 28, 1] in [0, 1], each by 1 to `max_ops`
    randomly chosen DEGRADATIONS applied one after the other (AugMix-style chains, no mixing).

    Generic photometric and occlusion damage, not MNIST-C's corruption code: the benchmark's 15
    stay unseen until evaluation (docs/robustness.md).
    """
    x = images[..., 0].astype(np.float32, copy=True)
    n = len(x)
    chosen = rng.random(n) < rate
    ops_per_image = np.where(chosen, rng.integers(1, max_ops + 1, n), 0)
    for step in range(max_ops):
        op_of_image = rng.integers(0, len(DEGRADATIONS), n)
        for op_index, degrade in enumerate(DEGRADATIONS.values()):
            picked = np.flatnonzero((ops_per_image > step) & (op_of_image == op_index))
            if len(picked):
                x[picked] = degrade(x[picked], rng)
    return np.clip(x, 0.0, 1.0)[..., None]


def _noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Pixel noise: Gaussian, of a random strength per image."""
    sigma = rng.uniform(0.05, 0.5, (len(x), 1, 1))
    return x + rng.normal(0.0, 1.0, x.shape) * sigma


def _blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Gaussian blur of a random width per image."""
    sigmas = rng.uniform(0.5, 1.5, len(x))
    return np.stack([ndimage.gaussian_filter(image, s) for image, s in zip(x, sigmas, strict=True)])


def _tint(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Lower contrast on a lighter, unevenly lit background: x * c + level + a linear ramp."""
    n, side = len(x), x.shape[1]
    contrast = rng.uniform(0.3, 1.0, (n, 1, 1))
    level = rng.uniform(0.0, 0.6, (n, 1, 1))
    angle = rng.uniform(0, 2 * np.pi, (n, 1, 1))
    ramp_strength = rng.uniform(0.0, 0.5, (n, 1, 1))
    rows, cols = np.mgrid[0:side, 0:side] / (side - 1) - 0.5
    ramp = (np.cos(angle) * cols + np.sin(angle) * rows) * ramp_strength
    return x * contrast + level + ramp


def _erase(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random rectangle filled with one random grey level."""
    return _in_rectangles(x, rng, lambda patch, value: np.broadcast_to(value, patch.shape))


def _invert_patch(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random rectangle with its dark and light swapped."""
    return _in_rectangles(x, rng, lambda patch, value: 1.0 - patch)


def _lines(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One to three straight strokes across the image, 1 to 2.5 pixels wide."""
    n, side = len(x), x.shape[1]
    rows, cols = np.mgrid[0:side, 0:side].astype(np.float32)
    out = x.copy()
    for _ in range(rng.integers(1, 4)):
        (r0, c0), (r1, c1) = rng.uniform(0, side - 1, (2, 2, n, 1, 1))
        width = rng.uniform(0.5, 1.25, (n, 1, 1))
        value = rng.uniform(0.5, 1.0, (n, 1, 1))
        dr, dc = r1 - r0, c1 - c0
        t = np.clip(((rows - r0) * dr + (cols - c0) * dc) / np.maximum(dr**2 + dc**2, 1e-6), 0, 1)
        distance = np.hypot(rows - (r0 + t * dr), cols - (c0 + t * dc))
        out = np.maximum(out, value * np.clip(width + 0.5 - distance, 0.0, 1.0))
    return out


def _stroke_width(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Thicker or thinner strokes: a grey dilation or erosion by a 2x2 square."""
    thicker = rng.random(len(x)) < 0.5
    out = x.copy()
    out[thicker] = ndimage.grey_dilation(x[thicker], size=(1, 2, 2))
    out[~thicker] = ndimage.grey_erosion(x[~thicker], size=(1, 2, 2))
    return out


def _in_rectangles(x: np.ndarray, rng: np.random.Generator, fill: Any) -> np.ndarray:
    n, side = len(x), x.shape[1]
    heights, widths = rng.integers(4, side // 2 + 1, (2, n))
    tops = rng.integers(0, side - heights + 1)
    lefts = rng.integers(0, side - widths + 1)
    values = rng.uniform(0.0, 1.0, n)
    out = x.copy()
    for i in range(n):
        rows = slice(tops[i], tops[i] + heights[i])
        cols = slice(lefts[i], lefts[i] + widths[i])
        out[i, rows, cols] = fill(out[i, rows, cols], values[i])
    return out


def cosine_fade(rate: float, epochs: int, first_epoch: int = 0) -> Callable[[int], float]:
    """A degradation share per epoch that fades as a cosine learning rate does: `rate` in
    `first_epoch`, half of it midway, near 0 in the last of `epochs` epochs. The model learns
    robustness while its steps are large and settles on mostly clean digits."""

    def rate_of_epoch(epoch: int) -> float:
        return rate * 0.5 * (1 + np.cos(np.pi * (epoch - first_epoch) / epochs))

    return rate_of_epoch


def scheduled_rate(
    rate: float, schedule: str, epochs: int, first_epoch: int = 0
) -> float | Callable[[int], float]:
    """`SeededBatches`' degradation_rate for a schedule: "constant" keeps `rate` in every epoch,
    "cosine" fades it over `epochs` epochs from `first_epoch` (`cosine_fade`)."""
    return cosine_fade(rate, epochs, first_epoch) if schedule == "cosine" else rate


DEGRADATIONS = {
    "noise": _noise,
    "blur": _blur,
    "tint": _tint,
    "erase": _erase,
    "invert_patch": _invert_patch,
    "lines": _lines,
    "stroke_width": _stroke_width,
}


class SeededBatches(keras.utils.PyDataset):
    """Training batches shuffled, and with `augment` randomly transformed, from a seed.

    `degradation_rate` is a share of images, or a function of the epoch giving one
    (`scheduled_rate`). Epoch e's order comes from (seed, e) and batch i's transforms from
    (seed, e, i), not from one generator drawn in turn: an epoch looks the same whether training
    started at epoch 0 or resumed at e (`first_epoch`), and in whatever order Keras fetches the
    batches (it fetches them ahead, out of order, and two before training to learn their
    shapes). Keras calls `on_epoch_begin` once per epoch.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        batch_size: int,
        seed: int,
        *,
        augment: bool = True,
        degradation_rate: float | Callable[[int], float] = 0.0,
        first_epoch: int = 0,
    ) -> None:
        super().__init__()
        self.x, self.y, self.batch_size = x, y, batch_size
        self.seed, self.augment, self.degradation_rate = seed, augment, degradation_rate
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
        images = random_affine(self.x[picks], rng)
        rate = self.degradation_rate
        rate = rate(self.epoch) if callable(rate) else rate
        if rate:
            images = random_degradations(images, rng, rate)
        return images, self.y[picks]

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
    degradation_rate: float | Callable[[int], float] = 0.0,
    first_epoch: int = 0,
) -> dict[str, Any]:
    """`model.fit`'s data arguments: with `data_seed`, `SeededBatches` (numbered from
    `first_epoch`); without, the arrays themselves, which Keras shuffles (not augmented)."""
    if data_seed is None:
        return {"x": x, "y": y, "batch_size": batch_size}
    batches = SeededBatches(
        x,
        y,
        batch_size,
        data_seed,
        augment=augment,
        degradation_rate=degradation_rate,
        first_epoch=first_epoch,
    )
    # shuffle=False: the batches shuffle themselves. Keras's own shuffle would reorder them
    # from Python's global `random`, which a resumed fit cannot reproduce.
    return {"x": batches, "shuffle": False}
