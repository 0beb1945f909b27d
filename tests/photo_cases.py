"""Photograph-like images built from real MNIST digits, and images that hold no digit at all: the
inputs a person sends the served model (tests/test_photos.py, benchmarks/photos.py).

A photographed digit is dark ink on paper whose light is uneven, at any size and place, with
strokes thicker or thinner than MNIST's and some sensor noise; the builders make each of these
apart and all at once. Light is multiplicative, as on real paper: ink reflects a share of the
light that falls on it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from PIL import Image
from scipy import ndimage

Builder = Callable[[np.ndarray, np.random.Generator], np.ndarray]

PHOTO_SIDE = 112  # a 28x28 digit drawn 4x larger: strokes ~10 pixels wide, as on a phone photo
INK_REFLECTANCE = 0.25  # share of the light that full ink reflects (paper: 1)


def enlarged(digit: np.ndarray, side: int = PHOTO_SIDE) -> np.ndarray:
    """A uint8 28x28 MNIST digit -> its ink as floats in [0, 1], `side` pixels square."""
    image = Image.fromarray(digit).resize((side, side), Image.Resampling.BILINEAR)
    return np.asarray(image, np.float32) / 255


def placed(ink: np.ndarray, height: int, width: int, top: int, left: int) -> np.ndarray:
    """`ink` on an empty field height x width with its corner at (top, left)."""
    field = np.zeros((height, width), np.float32)
    field[top : top + ink.shape[0], left : left + ink.shape[1]] = ink
    return field


def on_paper(ink: np.ndarray, light: np.ndarray | float) -> np.ndarray:
    """Ink (0..1) on white paper under `light` (0..255, a field or one level) -> uint8 photo."""
    reflected = light * (1 - ink * (1 - INK_REFLECTANCE))
    return np.clip(np.round(reflected), 0, 255).astype(np.uint8)


def uneven_light(height: int, width: int, low: float = 90, high: float = 235) -> np.ndarray:
    """Light falling off from one corner to the other (a lamp beside the page)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    return low + (high - low) * (y / height + x / width) / 2


def noisy(photo: np.ndarray, rng: np.random.Generator, sigma: float = 8) -> np.ndarray:
    """Sensor noise: Gaussian, `sigma` grey levels."""
    return np.clip(photo + rng.normal(0, sigma, photo.shape), 0, 255).astype(np.uint8)


def grey_paper(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Dark ink on paper exactly 128 grey: the fixed-threshold conversion inverted it."""
    return on_paper(np.pad(enlarged(digit), 20), 128.0)


def light_on_grey(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """MNIST-C's brightness: light strokes on a ground of 128, which a fixed threshold at 128
    took for light paper; it inverted the image and the digit vanished."""
    return (128 + 127 * np.pad(enlarged(digit), 20)).astype(np.uint8)


def dark_on_light(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return on_paper(np.pad(enlarged(digit), 20), 235.0)


def white_on_black(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Chalk on a blackboard: light strokes on a dark ground."""
    return (30 + 200 * np.pad(enlarged(digit), 20)).astype(np.uint8)


def uneven_lighting(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ink = np.pad(enlarged(digit), 20)
    return on_paper(ink, uneven_light(*ink.shape))


def thick_strokes(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A felt pen: strokes about twice MNIST's width."""
    ink = ndimage.grey_dilation(enlarged(digit), size=(7, 7))
    return on_paper(np.pad(ink, 20), 235.0)


def thin_strokes(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A fine pen: strokes about half MNIST's width."""
    ink = ndimage.grey_erosion(enlarged(digit), size=(5, 5))
    return on_paper(np.pad(ink, 20), 235.0)


def off_centre(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """The digit in a corner of a wide page."""
    return on_paper(placed(enlarged(digit), 300, 400, 10, 270), 235.0)


def large_canvas(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A 1000x800 photo with a digit 400 pixels tall, left of centre."""
    return on_paper(placed(enlarged(digit, 400), 800, 1000, 250, 120), 235.0)


def mild_noise(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return noisy(dark_on_light(digit, rng), rng)


def all_at_once(digit: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Thick strokes off-centre on a large page in uneven light, with noise."""
    ink = ndimage.grey_dilation(enlarged(digit, 300), size=(9, 9))
    field = placed(ink, 800, 1000, 450, 600)
    return noisy(on_paper(field, uneven_light(*field.shape, 70, 220)), rng)


PHOTO_CASES: dict[str, Builder] = {
    "grey paper (128), dark ink": grey_paper,
    "grey ground (128), light ink": light_on_grey,
    "dark ink, light paper": dark_on_light,
    "white on black": white_on_black,
    "uneven lighting": uneven_lighting,
    "thick strokes": thick_strokes,
    "thin strokes": thin_strokes,
    "off-centre": off_centre,
    "large canvas 1000x800": large_canvas,
    "mild noise": mild_noise,
    "all at once": all_at_once,
}


# --- images without a digit ---------------------------------------------------------------------


def random_size(rng: np.random.Generator) -> tuple[int, int]:
    return int(rng.integers(28, 301)), int(rng.integers(28, 301))


def blank(rng: np.random.Generator) -> np.ndarray:
    """White or black paper, nothing on it."""
    return np.full(random_size(rng), 255 if rng.random() < 0.5 else 0, np.uint8)


def uniform(rng: np.random.Generator) -> np.ndarray:
    """One grey level, any."""
    return np.full(random_size(rng), rng.integers(0, 256), np.uint8)


def uneven_blank_paper(rng: np.random.Generator) -> np.ndarray:
    """Empty paper in uneven light, with sensor noise."""
    height, width = random_size(rng)
    low = float(rng.uniform(40, 150))
    light = uneven_light(height, width, low, low + float(rng.uniform(20, 100)))
    return noisy(light, rng, float(rng.uniform(0, 8)))


def gaussian_noise(rng: np.random.Generator) -> np.ndarray:
    """Noise around any grey level, from faint (sigma 2) to heavy (sigma 60)."""
    field = np.full(random_size(rng), rng.uniform(30, 225), np.float32)
    return noisy(field, rng, float(rng.uniform(2, 60)))


def salt_and_pepper(rng: np.random.Generator, density: float | None = None) -> np.ndarray:
    """A grey field with a share `density` (default: 1-20%) of its pixels black or white."""
    field = np.full(random_size(rng), rng.integers(0, 256), np.uint8)
    hit = rng.random(field.shape) < (rng.uniform(0.01, 0.2) if density is None else density)
    field[hit] = np.where(rng.random(int(hit.sum())) < 0.5, 0, 255)
    return field


NO_DIGIT_CASES: dict[str, Callable[[np.random.Generator], np.ndarray]] = {
    "blank": blank,
    "uniform grey": uniform,
    "uneven empty paper": uneven_blank_paper,
    "Gaussian noise": gaussian_noise,
    "salt and pepper (1-20%)": salt_and_pepper,
}
