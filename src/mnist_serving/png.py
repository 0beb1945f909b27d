"""PNG records: base64 -> PNG file (size read from its header) -> MNIST-style 28x28 image.

A PNG of any size, grayscale or colour, any background, is converted the way MNIST was made
(white digit on black, fitted into 20x20, centred by mass): the paper is fitted as a smooth
surface and the ink is what departs from it, on whichever side (`to_mnist`). Decoding costs
CPU and memory in proportion to the pixels, so a request's PNGs may hold `MAX_PNG_PIXELS` in
all; the sizes come from the PNG headers, so an over-budget request is refused before any pixel
is decoded.
"""

from __future__ import annotations

import functools
import io
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image
from scipy import ndimage

from mnist_serving.base64_text import decode_base64
from mnist_serving.errors import InvalidInputError

SIDE = 28
MAX_PNG_BASE64_CHARS = 8 * 1024 * 1024  # a 6 MiB PNG
# Decoded PNG pixels per request, all PNGs together: one 4096x4096 image, or e.g. 1024 images of
# 128x128. A 4096x4096 RGBA PNG costs ~0.4-1 s of one core and ~400 MiB at its peak.
MAX_PNG_PIXELS = 4096 * 4096
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_IHDR = struct.Struct(">I4sII")  # chunk length, chunk type, width, height

# MNIST's preprocessing: the digit is scaled to fit a 20x20 box and its centre of mass put at
# the centre of the 28x28 field (pixel index 14 on both axes, measured on the real data).
DIGIT_BOX = 20
CENTRE = 14.0
# The paper: a surface a + b*y + c*x + d*x*y (uneven light across a photo), fitted by least
# squares to the pixels that do not look like ink, refitted this many times.
PAPER_FITS = 3
PAPER_SAMPLES = 128  # the fit reads at most this many rows and columns (strided): cost bounded
# A pixel departs from the paper when it differs by more than this (0..255) and by more than
# NOISE_FACTOR times the paper's noise (robust standard deviation of the paper's pixels).
MIN_CONTRAST = 8.0
NOISE_FACTOR = 5.0
# Ink is measured as a share of the light range left to it, at least this wide (0..255).
MIN_ROOM = 64.0
INK_PERCENTILE = 99  # the ink is stretched so that this percentile of its pixels becomes 1.0
INK_THRESHOLD = 0.1  # share of full ink that counts as a pixel of the digit, for its box
# A piece of ink smaller than this share of the largest piece is a speck (dust, noise), not
# part of the digit; a broken MNIST stroke is far larger.
SPECK_SHARE = 0.05
# A digit is one piece or a few: its largest holds at least this share of its ink (45% or more
# on all 10,000 MNIST test digits; under 26% for salt-and-pepper noise), and more pixels than a
# speck has.
DIGIT_SHARE = 0.3
MAX_SPECK_PIXELS = 4
_EIGHT_NEIGHBOURS = np.ones((3, 3), bool)


@dataclass(frozen=True)
class PngFile:
    """The bytes of a PNG file and the size its header declares (nothing decoded yet)."""

    data: bytes
    width: int
    height: int

    @property
    def pixels(self) -> int:
        return self.width * self.height


def read_png_file(value: Any) -> PngFile:
    """A `png` field (base64 text) -> its PNG file, checked to be one, with its declared size."""
    if not isinstance(value, str):
        raise InvalidInputError(
            f"'png' must be a base64 string of a PNG file, got {_json_type(value)}"
        )
    data = decode_base64(value, "png", limit=MAX_PNG_BASE64_CHARS)
    if not data.startswith(PNG_SIGNATURE):
        raise InvalidInputError(
            f"'png' is not a PNG file: it starts with {data[:8]!r}, not the PNG signature"
        )
    header = data[len(PNG_SIGNATURE) : len(PNG_SIGNATURE) + _IHDR.size]
    if len(header) < _IHDR.size or header[4:8] != b"IHDR":
        raise InvalidInputError("'png' is not a decodable PNG image: its IHDR header is missing")
    _, _, width, height = _IHDR.unpack(header)
    return PngFile(data, width, height)


def check_pixel_budget(pngs: dict[int, PngFile]) -> None:
    """Refuse a request whose PNGs (record index -> file) declare over `MAX_PNG_PIXELS`."""
    total = 0
    for index, png in pngs.items():
        total += png.pixels
        if total > MAX_PNG_PIXELS:
            size = f"record {index}: 'png' is {png.width}x{png.height}"
            where = "" if total == png.pixels else f", which brings the request's PNGs to {total:,}"
            raise InvalidInputError(
                f"{size} ({png.pixels:,} pixels){where}, over the limit of {MAX_PNG_PIXELS:,} "
                "PNG pixels per request; send smaller PNGs or fewer per request"
            )


def png_to_array(png: PngFile) -> np.ndarray:
    """A PNG file -> float32 [28, 28] in [0, 1], in MNIST form."""
    return to_mnist(decode_png(png.data))


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> float32 [H, W] luminance 0..255, transparent areas filled with background."""
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            image.load()
            if image.mode.startswith("I"):  # 16-bit grayscale
                return np.asarray(image, np.float32) / 257
            if not image.has_transparency_data:
                # Pillow's luma (ITU-R 601) in uint8: a float RGB copy would cost 12 bytes a pixel.
                return np.asarray(image.convert("L"), np.float32)
            rgba = image.convert("RGBA")
            gray = np.asarray(rgba.convert("L"), np.float32)
            alpha = np.asarray(rgba.getchannel("A"), np.float32) / 255
    except Exception as err:
        # Pillow reports corrupt or foreign data with many exception types (OSError,
        # SyntaxError, ValueError, zlib and struct errors...); for bytes from a request, all
        # of them mean the same thing to the caller.
        raise InvalidInputError(f"'png' is not a decodable PNG image: {err}") from None
    if alpha.min() < 1:
        # Transparent pixels carry arbitrary colour (canvas exports store black), so lay the
        # image on the background that contrasts with its ink.
        ink = float((gray * alpha).sum() / max(float(alpha.sum()), 1e-6))
        background = 255.0 if ink < 128 else 0.0
        gray = gray * alpha + background * (1 - alpha)
    return gray


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """Any grayscale digit image (0..255) -> float32 [28, 28] in [0, 1] the way MNIST was made.

    The paper is fitted as a smooth surface (so uneven light is removed) and the ink is what
    departs from it, on the side with more strong departures: dark ink on light paper, light on
    dark, or on grey paper alike. The ink is stretched to full contrast, specks apart from the
    digit are dropped, and the digit is cropped, scaled so its longer side is 20 pixels and
    placed with its centre of mass at the centre of the 28x28 field (kept inside the field when
    the mass is far off-centre). An image with no ink comes back blank; an already-MNIST image
    comes back as it was, up to a one-pixel shift.
    """
    canvas = np.zeros((SIDE, SIDE), np.float32)
    ink = ink_map(np.asarray(gray, np.float32))
    digit = None if ink is None else _digit(ink)
    if digit is None:
        return canvas
    rows = np.flatnonzero((digit > INK_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((digit > INK_THRESHOLD).any(axis=0))
    digit = digit[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    height, width = digit.shape
    if max(height, width) != DIGIT_BOX:
        scale = DIGIT_BOX / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        resized = Image.fromarray(digit).resize(size, Image.Resampling.LANCZOS)
        # Scaling a thin stroke down spreads it over fewer, fainter pixels: stretch again.
        digit = np.maximum(np.asarray(resized, np.float32), 0)
        digit = _stretched(digit, digit > 0)
        height, width = digit.shape
    mass = float(digit.sum())
    centre_y = float(digit.sum(axis=1) @ np.arange(height)) / mass if mass else height / 2
    centre_x = float(digit.sum(axis=0) @ np.arange(width)) / mass if mass else width / 2
    top = int(np.clip(round(CENTRE - centre_y), 0, SIDE - height))
    left = int(np.clip(round(CENTRE - centre_x), 0, SIDE - width))
    canvas[top : top + height, left : left + width] = digit
    return canvas


def ink_map(gray: np.ndarray) -> np.ndarray | None:
    """Grayscale 0..255 -> the ink, float32 in [0, 1] (1: full ink), or None without any ink.

    The ink is the side of the paper with more strong departures: noise departs to both sides
    alike, ink to one. A fixed threshold (a light background is inverted) cannot tell a grey
    paper's dark ink from a dark paper's light ink. (In place where it can: a 4096x4096 image
    has 64 MiB in each float32 copy.)
    """
    paper, noise = fit_paper(gray)
    ink = gray - paper
    strong = max(MIN_CONTRAST, NOISE_FACTOR * noise)
    lighter = ink > strong
    darker = ink < -strong
    if lighter.sum() > darker.sum():
        strokes, room = lighter, np.subtract(255, paper, out=paper)
    else:
        strokes, room = darker, paper
        np.negative(ink, out=ink)
    del lighter, darker
    if not strokes.any():
        return None
    # Ink takes away a share of the light the paper would give back (or adds a share of what it
    # lacks): relative to the paper, a stroke is as strong in a dim corner as in a bright one.
    np.maximum(room, MIN_ROOM, out=room)
    # What the paper's noise alone reaches is not ink (MNIST's background is exactly 0).
    ink -= 2 * noise
    np.maximum(ink, 0, out=ink)
    ink /= room
    return _stretched(ink, strokes)


def fit_paper(gray: np.ndarray) -> tuple[np.ndarray, float]:
    """The paper under the ink: the surface a + b*y + c*x + d*x*y (float32, like `gray`) and
    the paper's noise (robust standard deviation, 0..255).

    Each fit leaves out the pixels the previous one found far from the paper, which the ink is;
    the first starts from a flat paper at the image's median, and the fits stop early once they
    leave out the same pixels (two fits on a clean scan).
    """
    terms, rows, cols, ys, xs = _paper_grid(*gray.shape)
    sample = gray[rows, cols].ravel().astype(np.float64)
    coefficients = np.array([_median(sample), 0, 0, 0])
    paper = np.ones(len(sample), bool)
    for fit in range(PAPER_FITS + 1):
        residual = sample - terms @ coefficients
        noise = _robust_std(residual)
        fitted = np.abs(residual) <= max(MIN_CONTRAST, 3 * noise)
        if np.count_nonzero(fitted) < len(coefficients) or (fit and (fitted == paper).all()):
            break
        paper = fitted
        # Least squares by its normal equations: a 4x4 system, however many pixels.
        chosen = terms[paper]
        coefficients = np.linalg.lstsq(chosen.T @ chosen, chosen.T @ sample[paper])[0]
    noise = _robust_std((sample - terms @ coefficients)[paper])
    a, b, c, d = coefficients.astype(np.float32)
    return a + b * ys + (c + d * ys) * xs, noise


@functools.lru_cache(maxsize=16)
def _paper_grid(height: int, width: int) -> tuple[np.ndarray, slice, slice, np.ndarray, np.ndarray]:
    """The fit's terms [samples, 4] (1, y, x, x*y) at the sampled pixels (rows, cols: strided
    to at most PAPER_SAMPLES each), and the coordinates of every row [H, 1] and column [1, W],
    all in -1..1. Cached: a batch of PNGs tends to share one size."""
    rows = slice(None, None, -(-height // PAPER_SAMPLES))
    cols = slice(None, None, -(-width // PAPER_SAMPLES))
    ys = np.linspace(-1, 1, height, dtype=np.float32)[:, None]
    xs = np.linspace(-1, 1, width, dtype=np.float32)[None, :]
    y, x = np.broadcast_arrays(ys[rows].astype(np.float64), xs[:, cols].astype(np.float64))
    terms = np.stack([np.ones(y.size), y.ravel(), x.ravel(), (x * y).ravel()], axis=1)
    for array in (terms, ys, xs):
        array.flags.writeable = False  # shared by every call for this size
    return terms, rows, cols, ys, xs


def _robust_std(values: np.ndarray) -> float:
    """The standard deviation of the bulk of `values`, which a minority of ink does not move."""
    return 1.4826 * _median(np.abs(values - _median(values)))


def _median(values: np.ndarray) -> float:
    """np.median of a 1-D array, without its per-call overhead (which is most of the cost for
    a 28x28 PNG)."""
    middle = len(values) // 2
    if len(values) % 2:
        return float(np.partition(values, middle)[middle])
    low, high = np.partition(values, (middle - 1, middle))[middle - 1 : middle + 1]
    return float(low + high) / 2


def _stretched(ink: np.ndarray, strokes: np.ndarray) -> np.ndarray:
    """`ink` (float32, changed in place) scaled so that the INK_PERCENTILE-th percentile of its
    `strokes` (a mask) is 1, and clipped there."""
    values = ink[strokes]
    top = 0.0
    if len(values):
        rank = round(INK_PERCENTILE / 100 * (len(values) - 1))  # np.percentile's, less its cost
        top = float(np.partition(values, rank)[rank])
    if top > 0:
        ink /= top
    return np.clip(ink, 0, 1, out=ink)


def _digit(ink: np.ndarray) -> np.ndarray | None:
    """`ink` (changed in place) less its specks: the pieces (8-connected) with under
    SPECK_SHARE of the largest piece's ink. None when what is left is dust, not a digit: the
    largest piece is a speck itself (MAX_SPECK_PIXELS) or holds under DIGIT_SHARE of the ink
    left (salt-and-pepper noise: hundreds of specks alike)."""
    pieces, count = ndimage.label(ink > INK_THRESHOLD, structure=_EIGHT_NEIGHBOURS)
    if count == 0:
        return None
    masses = np.bincount(pieces.ravel(), weights=ink.ravel(), minlength=count + 1)
    masses[0] = 0  # not a piece: the paper
    largest = int(masses.argmax())
    specks = masses < SPECK_SHARE * masses[largest]
    if (
        np.count_nonzero(pieces == largest) <= MAX_SPECK_PIXELS
        or masses[largest] < DIGIT_SHARE * masses[~specks].sum()
    ):
        return None
    ink[specks[pieces] & (pieces > 0)] = 0
    return ink


def _json_type(value: Any) -> str:
    if isinstance(value, bool | np.bool_):
        return "a boolean"
    if isinstance(value, int | float | np.number):
        return "a number"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list | tuple | np.ndarray):
        return "an array"
    return type(value).__name__
