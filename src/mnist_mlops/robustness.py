"""Deterministic corrupted copies of a set of digits, to measure how accuracy holds up.

Each corruption draws from its own generator seeded by (seed, corruption), so a copy depends
only on the images, its severity and the seed: not on which other corruptions ran, or in what
order. numpy and Pillow only, one image at a time where Pillow needs it: 10k digits take well
under a second per corruption.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from PIL import Image, ImageFilter

CORRUPTIONS = ("rotation", "shift", "noise", "blur")
_PIXEL_MAX = 255


def corrupt(images: np.ndarray, kind: str, severity: float, seed: int) -> np.ndarray:
    """A corrupted copy of uint8 images [N, H, W].

    rotation: each image turned by a random angle within +-severity degrees. shift: moved by a
    random whole number of pixels within +-severity along each axis, the edge filled with
    background. noise: Gaussian noise of standard deviation severity (a fraction of full
    brightness) added to every pixel. blur: Gaussian blur of radius severity pixels.
    """
    if images.dtype != np.uint8 or images.ndim != 3:
        raise ValueError(f"need uint8 images [N, H, W], got {images.dtype} {images.shape}")
    if kind not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {kind!r}; expected one of {CORRUPTIONS}")
    rng = np.random.default_rng([seed, CORRUPTIONS.index(kind)])
    if kind == "rotation":
        angles = rng.uniform(-severity, severity, len(images))
        return _per_image(
            images,
            lambda image, i: image.rotate(angles[i], resample=Image.Resampling.BILINEAR),
        )
    if kind == "shift":
        return _shift(images, rng.integers(-int(severity), int(severity) + 1, (len(images), 2)))
    if kind == "noise":
        noisy = images / _PIXEL_MAX + rng.normal(0.0, severity, images.shape)
        return np.round(np.clip(noisy, 0.0, 1.0) * _PIXEL_MAX).astype(np.uint8)
    blur = ImageFilter.GaussianBlur(severity)
    return _per_image(images, lambda image, _: image.filter(blur))


def corrupted_sets(
    images: np.ndarray, severities: Mapping[str, float], seed: int
) -> dict[str, np.ndarray]:
    """One corrupted copy of `images` per entry of `severities` ({corruption: severity})."""
    return {kind: corrupt(images, kind, severity, seed) for kind, severity in severities.items()}


def _per_image(
    images: np.ndarray, transform: Callable[[Image.Image, int], Image.Image]
) -> np.ndarray:
    out = np.empty_like(images)
    for i, image in enumerate(images):
        out[i] = np.asarray(transform(Image.fromarray(image), i))
    return out


def _shift(images: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Move each image by its (dy, dx); pixels moved in from outside are background (0)."""
    _, height, width = images.shape
    pad = int(np.abs(offsets).max(initial=0))
    padded = np.pad(images, ((0, 0), (pad, pad), (pad, pad)))
    out = np.empty_like(images)
    for i, (dy, dx) in enumerate(offsets):
        out[i] = padded[i, pad - dy : pad - dy + height, pad - dx : pad - dx + width]
    return out
