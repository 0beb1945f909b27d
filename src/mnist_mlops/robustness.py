"""MNIST-C (Mu & Gilmer 2019): corrupted copies of MNIST digits, deterministic for a seed, or the
published copies read from files.

BENCHMARK holds the benchmark's 15 corruptions, each at the one severity the released dataset
used (google-research/mnist-c `corruptions.py`: each function's default severity); they are for
evaluation only. HELD_OUT holds the paper's other corruptions (all but frost, snow and pessimal
noise, which need files), for choices made on validation data without looking at the benchmark,
as the ImageNet-C protocol asks.

Each corruption draws from its own generator seeded by (seed, its index in CORRUPTIONS), so a
copy depends only on the images and the seed: not on which other corruptions ran, or in what
order. Every corruption works on all images at once (numpy, scipy.ndimage) where the reference
loops in Python; only Canny edges, JPEG and Pillow's box resize go one image at a time, through
the libraries that define them.

Where the reference code does something its paper does not say, the released data follow the
code, and so does this module:
- gaussian_blur and glass_blur blur along columns only: the reference passes
  `multichannel=True` with a 2-D image, which made scikit-image take the columns for channels;
- glass_blur truncates (not rounds) between its two blurs, and its pixel swaps move up or left
  only (numpy's `randint(-d, d)` excludes d);
- motion_blur is ImageMagick's: a one-sided line of Gaussian weights, read ahead of each pixel.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import feature

from mnist_mlops.errors import PipelineError

BENCHMARK = (
    "shot_noise",
    "impulse_noise",
    "glass_blur",
    "motion_blur",
    "shear",
    "scale",
    "rotate",
    "brightness",
    "translate",
    "stripe",
    "fog",
    "spatter",
    "dotted_line",
    "zigzag",
    "canny_edges",
)
HELD_OUT = (
    "gaussian_noise",
    "speckle_noise",
    "gaussian_blur",
    "defocus_blur",
    "zoom_blur",
    "contrast",
    "pixelate",
    "jpeg_compression",
    "elastic_transform",
    "inverse",
    "quantize",
)
CORRUPTIONS = BENCHMARK + HELD_OUT  # a corruption's index here seeds its generator

SIDE = 28  # MNIST-C's constants (line ends, stripe widths, anchor points) assume 28x28 digits
_CENTRE = (SIDE - 1) / 2  # the point the shear, rotation and scaling keep in place
_GAUSSIAN_TRUNCATE = 4.0  # scikit-image's (and scipy's) default kernel extent, in sigmas
_FOG_BATCH = 64  # fractal maps made at once: 64 x 256 x 256 float32 = 16 MiB

# The published dataset: <dir>/<corruption>/test_images.npy (N, 28, 28, 1) uint8 and
# test_labels.npy, the test digits in MNIST's order.
PUBLISHED_IMAGES = "test_images.npy"
PUBLISHED_LABELS = "test_labels.npy"

Corruption = Callable[[np.ndarray, np.random.Generator], np.ndarray]
log = logging.getLogger(__name__)


def corrupt(images: np.ndarray, name: str, seed: int) -> np.ndarray:
    """A corrupted copy of uint8 digits [N, 28, 28] (see the module docstring for `name`s)."""
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (SIDE, SIDE):
        raise ValueError(
            f"need uint8 images [N, {SIDE}, {SIDE}], got {images.dtype} {images.shape}"
        )
    if name not in CORRUPTIONS:
        raise ValueError(f"unknown corruption {name!r}; expected one of {CORRUPTIONS}")
    rng = np.random.default_rng([seed, CORRUPTIONS.index(name)])
    corrupted = _FUNCTIONS[name](images / 255.0, rng)
    # Rounded, as the reference's images were when the dataset was saved as uint8.
    return np.round(np.clip(corrupted, 0.0, 1.0) * 255.0).astype(np.uint8)


def corrupted_sets(images: np.ndarray, names: Iterable[str], seed: int) -> dict[str, np.ndarray]:
    """One corrupted copy of `images` per corruption in `names`, in that order."""
    return {name: corrupt(images, name, seed) for name in names}


def benchmark_sets(
    test: tuple[np.ndarray, np.ndarray], seed: int, published: Path | None
) -> tuple[dict[str, np.ndarray], str]:
    """The BENCHMARK corruptions of the test set (images, labels), and where they came from:
    read from `published` (the released files) when given, else generated with `seed`."""
    images, labels = test
    if published is not None:
        return load_published(published, BENCHMARK, labels), f"the published files in {published}"
    started = time.perf_counter()
    sets = corrupted_sets(images, BENCHMARK, seed)
    log.info(
        "MNIST-C: %d corruptions of %d test digits made in %.1f s",
        len(sets),
        len(images),
        time.perf_counter() - started,
    )
    return sets, f"generated from the test set with seed {seed}"


def load_published(
    directory: Path, names: Sequence[str], labels: np.ndarray
) -> dict[str, np.ndarray]:
    """The published MNIST-C test sets in `directory` as uint8 [N, 28, 28], checked against
    `labels` (the test split's: the same digits in the same order)."""
    sets = {}
    for name in names:
        images_path = directory / name / PUBLISHED_IMAGES
        labels_path = directory / name / PUBLISHED_LABELS
        images, published_labels = _read_npy(images_path), _read_npy(labels_path)
        expected = (len(labels), SIDE, SIDE, 1)
        if images.dtype != np.uint8 or images.shape != expected:
            raise PipelineError(
                f"MNISTC_DIR: {images_path}: expected uint8 {expected}, "
                f"got {images.dtype} {images.shape}"
            )
        if published_labels.shape != labels.shape or not np.array_equal(published_labels, labels):
            raise PipelineError(
                f"MNISTC_DIR: {labels_path}: the labels differ from the test split's "
                f"(MNIST-C holds the {len(labels)} MNIST test digits in their original order)"
            )
        sets[name] = images[..., 0]
    return sets


def _read_npy(path: Path) -> np.ndarray:
    try:
        array = np.load(path, allow_pickle=False)
    except FileNotFoundError:
        raise PipelineError(
            f"MNISTC_DIR: {path}: not found (expected the published layout "
            f"<dir>/<corruption>/{PUBLISHED_IMAGES} and {PUBLISHED_LABELS})"
        ) from None
    except (OSError, ValueError, EOFError) as err:
        raise PipelineError(f"MNISTC_DIR: {path}: not a readable .npy file ({err})") from None
    if not isinstance(array, np.ndarray):  # an .npz archive under an .npy name
        array.close()
        raise PipelineError(f"MNISTC_DIR: {path}: an .npz archive, not a .npy array")
    return array


# --- the corruptions: float images [N, 28, 28] in [0, 1] in, unclipped floats out -------------
# Each constant is the reference's value at the severity the benchmark used.


def _shot_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    photons = 3  # at full brightness; severity 5 of (60, 25, 12, 5, 3)
    return rng.poisson(x * photons) / photons


def _impulse_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    amount = 0.17  # share of pixels set to black or white; severity 4 of (.03, .06, .09, .17, .27)
    hit = rng.random(x.shape) < amount
    white = rng.random(x.shape) < 0.5
    return np.where(hit, white.astype(float), x)


def _glass_blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    sigma, reach, rounds = 0.7, 1, 2  # severity 1 of 5
    flat = np.floor(_column_blur(x, sigma) * 255).reshape(len(x), -1)
    images = np.arange(len(x))
    # The reference's sequence of swaps, from the bottom-right corner back, in every image at
    # once: a swap may move a pixel that an earlier swap moved.
    for _ in range(rounds):
        for row in range(SIDE - reach, reach, -1):
            for col in range(SIDE - reach, reach, -1):
                swapping = images[rng.random(len(x)) < 0.5]
                d_row, d_col = rng.integers(-reach, reach, (2, len(swapping)))
                here = row * SIDE + col
                there = (row + d_row) * SIDE + col + d_col
                moved = flat[swapping, here]
                flat[swapping, here] = flat[swapping, there]
                flat[swapping, there] = moved
    return _column_blur(flat.reshape(x.shape) / 255, sigma)


def _motion_blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    radius, sigma = 10, 3  # severity 1 of 5
    # ImageMagick's MotionBlurImage: 2 * radius + 1 taps at whole-pixel offsets along the angle,
    # Gaussian weights from the pixel itself onwards, the image's edge repeated beyond it.
    steps = np.arange(2 * radius + 1)
    weights = np.exp(-(steps**2) / (2 * sigma**2))
    weights /= weights.sum()
    angles = np.deg2rad(rng.uniform(-45, 45, len(x)))[:, None]
    d_col = np.ceil(steps * np.cos(angles) - 0.5).astype(int)  # [N, taps]
    d_row = np.ceil(steps * np.sin(angles) - 0.5).astype(int)
    pad = len(steps)
    padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad)), mode="edge")
    blurred = np.zeros_like(x)
    for tap, weight in enumerate(weights):
        # A tap's offset takes a few dozen values over all the angles: one slice each.
        offsets, group = np.unique(np.c_[d_row[:, tap], d_col[:, tap]], axis=0, return_inverse=True)
        for (row, col), members in zip(
            offsets + pad, _members(group.ravel(), len(offsets)), strict=True
        ):
            blurred[members] += weight * padded[members, row : row + SIDE, col : col + SIDE]
    return np.round(blurred * 255) / 255  # ImageMagick wrote an 8-bit PNG


def _shear(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    angle = 0.4 * rng.choice([-1, 1], len(x))  # radians, either way; severity 2 of 5
    zero = np.zeros_like(angle)
    # scikit-image's AffineTransform(shear=angle), used as warp's inverse map.
    return _warp_about_centre(x, np.stack([[zero + 1, -np.sin(angle)], [zero, np.cos(angle)]]))


def _rotate(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    angle = 0.4 * rng.choice([-1, 1], len(x))  # radians, either way; severity 2 of 5
    cos, sin = np.cos(angle), np.sin(angle)
    return _warp_about_centre(x, np.stack([[cos, -sin], [sin, cos]]))


def _scale(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    factor = 1 / 0.7  # sampling step: the digit shrinks to 70%; severity 3 of 5
    return _warp_about_centre(x, np.broadcast_to(np.eye(2)[..., None] * factor, (2, 2, len(x))))


def _translate(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    pixels = 3  # along each axis, either way; severity 3 of 5
    offsets = pixels * rng.choice([-1, 1], (len(x), 2))
    return _warp(x, np.broadcast_to(np.eye(2), (len(x), 2, 2)), offsets)


def _brightness(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # +0.5 to the HSV value (severity 5 of 5): of a grey image, that is its grey level.
    return x + 0.5


def _stripe(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    striped = x.copy()
    striped[:, :, :7] = 1 - x[:, :, :7]
    striped[:, :, SIDE - 7 :] = 1 - x[:, :, SIDE - 7 :]
    return striped


def _fog(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    strength, decay = 3.0, 1.4  # severity 5 of 5
    fractal = np.concatenate(
        [
            _plasma_fractal_corners(min(_FOG_BATCH, len(x) - start), decay, rng)
            for start in range(0, len(x), _FOG_BATCH)
        ]
    )
    brightest = x.max(axis=(1, 2), keepdims=True)
    return (x + strength * fractal) * brightest / (brightest + strength)


def _spatter(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    mean, spread, sigma, level, mask_sigma = 0.65, 0.3, 1, 0.65, 1.5  # severity 4 of 5
    liquid = _gaussian(rng.normal(mean, spread, x.shape), sigma)
    mud = _gaussian((liquid > level).astype(float), mask_sigma)
    mud[mud < 0.8] = 0
    return x * (1 - mud) + 63 / 255 * mud


def _dotted_line(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ends = rng.integers(0, SIDE - 1, (len(x), 2))  # the rows at columns 0 and 27
    return x + _drawn_once(ends, _dotted_lines)


def _dotted_lines(ends: np.ndarray) -> np.ndarray:
    count = len(ends)
    lines = _lines(np.zeros(count), ends[:, 0], np.full(count, SIDE - 1.0), ends[:, 1])
    gaps = (np.arange(SIDE) // 2) % 2 == 0  # columns 0-1, 4-5, ..., 24-25 stay dark
    lines[:, :, gaps] = 0
    return lines


def _zigzag(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    start_row = rng.integers(0, SIDE - 1, len(x))
    rise = rng.integers(-5, 5, len(x))
    return x + _drawn_once(np.stack([start_row, rise], axis=1), _zigzags)


def _zigzags(starts_and_rises: np.ndarray) -> np.ndarray:
    corners = [_zigzag_corners(int(rise)) for rise in starts_and_rises[:, 1]]
    count = max(len(c) for c in corners)
    # Shorter zigzags repeat their last corner: a segment of zero length draws nothing.
    points = np.stack([np.concatenate([c, np.repeat(c[-1:], count - len(c), 0)]) for c in corners])
    cols, rows = points[..., 0], points[..., 1] + starts_and_rises[:, :1]
    return sum(
        _lines(cols[:, i], rows[:, i], cols[:, i + 1], rows[:, i + 1]) for i in range(count - 1)
    )


def _canny_edges(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    # scikit-image's defaults: sigma 1, hysteresis at 0.1 and 0.2 of the full range.
    return np.stack([feature.canny(image) for image in x]).astype(float)


def _gaussian_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x + rng.normal(0, 0.38, x.shape)  # severity 5 of 5


def _speckle_noise(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return x + x * rng.normal(0, 0.6, x.shape)  # severity 5 of 5


def _gaussian_blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return _column_blur(x, sigma=2)  # severity 2 of 5


def _defocus_blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    radius = 3  # severity 1 of 5; the reference's 0.1-sigma anti-aliasing changes no weight
    offsets = np.arange(-8, 9)
    disk = (offsets[:, None] ** 2 + offsets**2 <= radius**2).astype(float)
    # OpenCV's filter2D border, BORDER_REFLECT_101, is scipy's "mirror".
    return ndimage.correlate(x, disk[None] / disk.sum(), mode="mirror")


def _zoom_blur(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    factors = np.arange(1, 1.31, 0.03)  # 1.00 to 1.30; severity 5 of 5
    zoomed = sum(_centre_zoom(x, factor) for factor in factors)
    return (x + zoomed) / (len(factors) + 1)


def _contrast(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    mean = x.mean(axis=(1, 2), keepdims=True)
    return (x - mean) * 0.1 + mean  # severity 4 of 5


def _pixelate(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    small = int(SIDE * 0.4)  # severity 3 of 5: 11x11 blocks
    box = Image.Resampling.BOX
    return _per_image(x, lambda image: image.resize((small, small), box).resize((SIDE, SIDE), box))


def _jpeg_compression(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    def compress(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=7)  # severity 5 of 5
        return Image.open(buffer)

    return _per_image(x, compress)


def _elastic_transform(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    amplitude, sigma, jitter = SIDE * 2, SIDE * 0.7, SIDE * 0.1  # severity 1 of 5
    # A random affine map: three anchor points (column, row) each moved by up to `jitter`.
    anchors = np.array([[23.0, 23.0], [23.0, 5.0], [5.0, 5.0]])
    moved = anchors + rng.uniform(-jitter, jitter, (len(x), 3, 2))
    forward = np.linalg.solve(np.c_[anchors, np.ones(3)], moved).transpose(0, 2, 1)  # [N, 2, 3]
    inverse = np.linalg.inv(forward[:, :, :2])
    warped = _warp(x, inverse, -np.einsum("nij,nj->ni", inverse, forward[:, :, 2]))
    # Then every pixel moves by a smooth random field.
    d_col, d_row = (
        _gaussian(rng.uniform(-1, 1, x.shape), sigma, mode="reflect", truncate=3) * amplitude
        for _ in range(2)
    )
    rows, cols = np.mgrid[0:SIDE, 0:SIDE]
    return _sample(warped, rows + d_row, cols + d_col)


def _inverse(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    return 1 - x


def _quantize(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    levels = 2**1 - 1  # 1 bit per pixel; severity 5 of 5
    return np.round(x * levels) / levels


_FUNCTIONS: dict[str, Corruption] = {
    "shot_noise": _shot_noise,
    "impulse_noise": _impulse_noise,
    "glass_blur": _glass_blur,
    "motion_blur": _motion_blur,
    "shear": _shear,
    "scale": _scale,
    "rotate": _rotate,
    "brightness": _brightness,
    "translate": _translate,
    "stripe": _stripe,
    "fog": _fog,
    "spatter": _spatter,
    "dotted_line": _dotted_line,
    "zigzag": _zigzag,
    "canny_edges": _canny_edges,
    "gaussian_noise": _gaussian_noise,
    "speckle_noise": _speckle_noise,
    "gaussian_blur": _gaussian_blur,
    "defocus_blur": _defocus_blur,
    "zoom_blur": _zoom_blur,
    "contrast": _contrast,
    "pixelate": _pixelate,
    "jpeg_compression": _jpeg_compression,
    "elastic_transform": _elastic_transform,
    "inverse": _inverse,
    "quantize": _quantize,
}


# --- helpers ------------------------------------------------------------------------------------


def _gaussian(
    x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = _GAUSSIAN_TRUNCATE
) -> np.ndarray:
    """scikit-image's `gaussian` of each image (its default edge mode: nearest)."""
    blur = _blur_matrix(sigma, mode, truncate)
    return blur @ x @ blur.T


def _column_blur(x: np.ndarray, sigma: float) -> np.ndarray:
    """The reference's `gaussian(image, sigma, multichannel=True)` of a 2-D image: the columns
    were taken for channels, so the blur runs down each column only."""
    return _blur_matrix(sigma, "nearest", _GAUSSIAN_TRUNCATE) @ x


def _blur_matrix(sigma: float, mode: str, truncate: float) -> np.ndarray:
    """scipy's 1-D Gaussian filter along a line of 28 pixels, as a matrix: one matrix product
    filters every image at once (a wide kernel, as elastic_transform's, costs no more)."""
    return ndimage.gaussian_filter1d(np.eye(SIDE), sigma, axis=0, mode=mode, truncate=truncate)


def _sample(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Bilinear samples of each image at (rows, cols) [N or 1, H, W]; black outside the image."""
    rows, cols = np.broadcast_arrays(rows, cols)
    rows, cols = (np.broadcast_to(a, (len(x), *a.shape[-2:])) for a in (rows, cols))
    images = np.broadcast_to(np.arange(len(x), dtype=float)[:, None, None], rows.shape)
    # "grid-constant" blends a black pixel in near the edge, as scikit-image's and OpenCV's
    # bilinear warps do (scipy's "constant" would not blend).
    return ndimage.map_coordinates(x, [images, rows, cols], order=1, mode="grid-constant")


def _warp(x: np.ndarray, matrices: np.ndarray, offsets: np.ndarray) -> np.ndarray:
    """Each output pixel at (column, row) p takes the input at matrices @ p + offsets, per image
    ([N, 2, 2] and [N, 2] in (column, row) order): scikit-image's `warp` with an inverse map."""
    rows, cols = np.mgrid[0:SIDE, 0:SIDE].astype(float)
    m, t = matrices[:, :, :, None, None], offsets[:, :, None, None]
    source_cols = m[:, 0, 0] * cols + m[:, 0, 1] * rows + t[:, 0]
    source_rows = m[:, 1, 0] * cols + m[:, 1, 1] * rows + t[:, 1]
    return _sample(x, source_rows, source_cols)


def _warp_about_centre(x: np.ndarray, matrices: np.ndarray) -> np.ndarray:
    """`_warp` with matrices given as [2, 2, N], offset so the image centre stays in place."""
    matrices = np.moveaxis(matrices, -1, 0)
    return _warp(x, matrices, _CENTRE - matrices @ np.full(2, _CENTRE))


def _drawn_once(params: np.ndarray, draw: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """`draw(params)` [N, 28, 28] for rows of `params` [N, k], drawing each distinct row once
    (a few hundred shapes serve 10,000 images)."""
    distinct, which = np.unique(params, axis=0, return_inverse=True)
    return draw(distinct)[which.ravel()]


def _lines(c0: np.ndarray, r0: np.ndarray, c1: np.ndarray, r1: np.ndarray) -> np.ndarray:
    """One soft line per image [N, 28, 28] through (column, row) points (c0, r0) and (c1, r1),
    drawn on columns floor(c0) to ceil(c1) - 1; nothing where c0 == c1.

    Brightness falls with the vertical distance d as 1 + log(1 - d / 2.3): full on the line,
    none from about 1.45 pixels away.
    """
    c0, r0, c1, r1 = (np.asarray(v, float)[:, None, None] for v in (c0, r0, c1, r1))
    rows, cols = np.ogrid[0:SIDE, 0:SIDE]
    flat = c1 == c0
    slope = (r1 - r0) / np.where(flat, 1, c1 - c0)
    distance = np.minimum(np.abs(rows - (slope * (cols - c0) + r0)), 2.3 - 1e-10)
    brightness = np.clip(np.log(1 - distance / 2.3) + 1, 0, 1)
    drawn = (cols >= np.floor(c0)) & (cols < np.ceil(c1)) & ~flat
    return np.where(drawn, brightness, 0.0)


def _zigzag_corners(rise: int) -> np.ndarray:
    """The corners (column, row) of the reference's zigzag from column 2 to 25 that climbs
    `rise` rows, starting at row 0: teeth 2 pixels long and 2 pixels high."""
    tooth, height, start, end = 2.0, 2.0, 2, 25
    angle = np.arctan(rise / (end - start))
    length = (end - start) / np.cos(angle)
    corners = [(0.0, 0.0)]
    for i in range(int((length - tooth) // (2 * tooth)) + 1):
        corners.append(((2 * i + 1) * tooth, (-1) ** i * height))
    whole_teeth = 2 * tooth * (length // (2 * tooth))
    if length != whole_teeth:  # the reference's closing corner, as it computes it
        corners.append((length, corners[-1][1] / (2 * (length - whole_teeth))))
    along, across = np.array(corners).T
    cos, sin = np.cos(angle), np.sin(angle)
    return np.stack([cos * along - sin * across + start, sin * along + cos * across], axis=1)


def _plasma_fractal_corners(count: int, decay: float, rng: np.random.Generator) -> np.ndarray:
    """The top-left 28x28 of `count` diamond-square fractals of 256x256 (the reference's
    plasma_fractal, each scaled to [0, 1] over its whole map)."""
    size = 256
    # Maps last, so each grid point's values for all maps lie together; float32 halves the
    # memory traffic, which is what this costs.
    maps = np.zeros((size, size, count), np.float32)
    step, wobble = size, 100.0

    def noisy_mean(total: np.ndarray) -> np.ndarray:
        noise = rng.random(total.shape, np.float32)
        return total / 4 + wobble * wobble * (2 * noise - 1)

    while step >= 2:
        half = step // 2
        corners = maps[::step, ::step]
        square = corners + np.roll(corners, -1, axis=0)
        square += np.roll(square, -1, axis=1)
        maps[half::step, half::step] = noisy_mean(square)
        centres = maps[half::step, half::step]
        left = centres + np.roll(centres, 1, axis=0) + corners + np.roll(corners, -1, axis=1)
        top = centres + np.roll(centres, 1, axis=1) + corners + np.roll(corners, -1, axis=0)
        maps[::step, half::step] = noisy_mean(left)
        maps[half::step, ::step] = noisy_mean(top)
        step //= 2
        wobble /= decay
    low, high = maps.min(axis=(0, 1)), maps.max(axis=(0, 1))
    return np.moveaxis((maps[:SIDE, :SIDE] - low) / (high - low), -1, 0)


def _centre_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """The centre of each image magnified by `factor`, cut back to 28x28: scipy's bilinear
    `zoom`, applied as the matrix it is along each axis."""
    crop = int(np.ceil(SIDE / factor))
    top = (SIDE - crop) // 2
    magnify = ndimage.zoom(np.eye(crop), (factor, 1), order=1)
    trim = (len(magnify) - SIDE) // 2
    magnify = magnify[trim : trim + SIDE]
    return magnify @ x[:, top : top + crop, top : top + crop] @ magnify.T


def _members(group: np.ndarray, count: int) -> list[np.ndarray]:
    """The indices in each of `count` groups, given each item's group number."""
    order = np.argsort(group, kind="stable")
    return np.split(order, np.cumsum(np.bincount(group, minlength=count))[:-1])


def _per_image(x: np.ndarray, transform: Callable[[Image.Image], Image.Image]) -> np.ndarray:
    images = np.round(x * 255).astype(np.uint8)
    return np.stack([np.asarray(transform(Image.fromarray(image))) for image in images]) / 255
