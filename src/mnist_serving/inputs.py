"""Request validation and conversion: what a client sends -> float32 images [N, 28, 28, 1].

A request is a batch of at most `MAX_BATCH` images, one record per image. Each record holds
exactly one of these fields (docs/serving.md has the curl and Python versions):

    image   28x28 floats in [0, 1], white digit on black, as [28, 28, 1], [28, 28] or [784]
    pixels  28x28 raw pixels, JSON integers 0..255, as [28, 28], [28, 28, 1] or [784]; or a
            base64 string of the 784 bytes (row-major uint8), the compact form for bulk scoring
    png     a base64 PNG file of any size, grayscale or colour, any background: it is converted
            to the MNIST convention (white digit on black, fitted into 20x20, centred by mass)

Plain functions, unit-tested without a server; every bad input raises `InvalidInputError`,
which the scoring server answers with HTTP 400 and the message (naming record, field, problem).
"""

from __future__ import annotations

import binascii
import io
import math
from typing import Any

import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from PIL import Image

SIDE = 28
PIXELS = SIDE * SIDE
IMAGE_SHAPES = ((SIDE, SIDE, 1), (SIDE, SIDE), (PIXELS,))
FIELDS = ("image", "pixels", "png")
# Images per request. Bounds one request's memory and time (1024 images: 1 MiB as base64
# pixels, 40-150 ms of inference on 2 cores); throughput stops growing well before it.
MAX_BATCH = 1024
MAX_PNG_BASE64_CHARS = 8 * 1024 * 1024  # a 6 MiB PNG
MAX_PNG_PIXELS = 4096 * 4096
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# MNIST's preprocessing: the digit is scaled to fit a 20x20 box and its centre of mass put at
# the centre of the 28x28 field (pixel index 14 on both axes, measured on the real data).
DIGIT_BOX = 20
CENTRE = 14.0
INK_THRESHOLD = 0.1  # share of the strongest stroke that counts as ink when finding the digit
MIN_CONTRAST = 8 / 255  # less than this between ink and background: a blank image


class InvalidInputError(MlflowException):
    """A request the model cannot score; the scoring server answers it with 400 and the message."""

    def __init__(self, message: str) -> None:
        super().__init__(message, error_code=INVALID_PARAMETER_VALUE)


def prepare_batch(model_input: pd.DataFrame) -> np.ndarray:
    """Records (one per image, columns `FIELDS`) -> float32 [N, 28, 28, 1] in [0, 1]."""
    if not isinstance(model_input, pd.DataFrame):
        raise InvalidInputError(
            f"expected a DataFrame of records, got {type(model_input).__name__}"
        )
    if len(model_input) > MAX_BATCH:
        raise InvalidInputError(
            f"batch of {len(model_input)} images is over the limit of {MAX_BATCH} per request; "
            "split it into smaller requests"
        )
    present = [field for field in FIELDS if field in model_input.columns]
    if len(model_input) == 0 or not present:
        # MLflow drops fields the signature does not name, so misspelt fields arrive as nothing.
        raise InvalidInputError(
            "the request holds no images: send a non-empty batch of records, each with exactly "
            f"one of the fields {_names(FIELDS)} (fields with other names are ignored)"
        )
    # to_numpy, not tolist: pandas 3 keeps string columns in Arrow, slow to iterate.
    columns = {field: model_input[field].to_numpy(dtype=object) for field in present}
    images = np.empty((len(model_input), SIDE, SIDE, 1), np.float32)
    for i in range(len(model_input)):
        given = [field for field in present if not _missing(columns[field][i])]
        if len(given) != 1:
            problem = "has none" if not given else f"has {len(given)} ({_names(given)})"
            raise InvalidInputError(
                f"record {i} {problem} of the fields {_names(FIELDS)}; give exactly one"
            )
        field = given[0]
        try:
            images[i, ..., 0] = CONVERTERS[field](columns[field][i])
        except InvalidInputError as err:
            raise InvalidInputError(f"record {i}: {err.message}") from None
    return images


def image_to_array(value: Any) -> np.ndarray:
    """An `image` field: 784 numbers in [0, 1] -> float32 [28, 28]."""
    array = _numeric_array(value, "image")
    _check_finite(array, "image")
    low, high = float(array.min()), float(array.max())
    if low < 0 or high > 1:
        hint = "; raw 0..255 pixels go in 'pixels', as integers" if high <= 255 and low >= 0 else ""
        raise InvalidInputError(f"'image' values must be in [0, 1], found {low:g}..{high:g}{hint}")
    return array.reshape(SIDE, SIDE).astype(np.float32)


def pixels_to_array(value: Any) -> np.ndarray:
    """A `pixels` field: 784 integers 0..255, or base64 of 784 bytes -> float32 [28, 28]."""
    if isinstance(value, str):
        raw = _b64decode(value, "pixels", limit=4 * PIXELS)
        if len(raw) != PIXELS:
            raise InvalidInputError(
                f"'pixels' as base64 must decode to {PIXELS} bytes (28x28 uint8, row-major), "
                f"got {len(raw)} bytes"
            )
        array = np.frombuffer(raw, np.uint8)
    else:
        array = _numeric_array(value, "pixels")
        if array.dtype.kind == "f":
            _check_finite(array, "pixels")
            raise InvalidInputError(
                "'pixels' must be integers 0..255, got floating-point numbers (such as "
                f"{_first_fraction(array)!r}); send [0, 1] floats as 'image'"
            )
        low, high = int(array.min()), int(array.max())
        if low < 0 or high > 255:
            raise InvalidInputError(f"'pixels' must be in 0..255, found {low}..{high}")
    return array.reshape(SIDE, SIDE).astype(np.float32) / 255


def png_to_array(value: Any) -> np.ndarray:
    """A `png` field: base64 PNG of any size and colours -> float32 [28, 28] in MNIST form."""
    if not isinstance(value, str):
        raise InvalidInputError(
            f"'png' must be a base64 string of a PNG file, got {_json_type(value)}"
        )
    return to_mnist(decode_png(_b64decode(value, "png", limit=MAX_PNG_BASE64_CHARS)))


CONVERTERS = {"image": image_to_array, "pixels": pixels_to_array, "png": png_to_array}


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> float32 [H, W] luminance 0..255, transparent areas filled with background."""
    if not data.startswith(PNG_SIGNATURE):
        raise InvalidInputError(
            f"'png' is not a PNG file: it starts with {data[:8]!r}, not the PNG signature"
        )
    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as image:
            if image.width * image.height > MAX_PNG_PIXELS:
                raise InvalidInputError(
                    f"'png' is {image.width}x{image.height}, over the limit of "
                    f"{MAX_PNG_PIXELS:,} pixels"
                )
            image.load()
            if image.mode.startswith("I"):  # 16-bit grayscale
                return np.asarray(image, np.float32) / 257
            if image.mode in ("L", "1"):  # opaque grayscale, the common case: no colour maths
                return np.asarray(image.convert("L"), np.float32)
            rgba = np.asarray(image.convert("RGBA"), np.float32)
    except InvalidInputError:
        raise
    except Exception as err:
        # Pillow reports corrupt or foreign data with many exception types (OSError,
        # SyntaxError, ValueError, zlib and struct errors...); for bytes from a request, all
        # of them mean the same thing to the caller.
        raise InvalidInputError(f"'png' is not a decodable PNG image: {err}") from None
    gray = rgba[..., :3] @ np.array([0.299, 0.587, 0.114], np.float32)  # ITU-R 601 luma
    alpha = rgba[..., 3] / 255
    if alpha.min() < 1:
        # Transparent pixels carry arbitrary colour (canvas exports store black), so lay the
        # image on the background that contrasts with its ink.
        ink = float((gray * alpha).sum() / max(float(alpha.sum()), 1e-6))
        background = 255.0 if ink < 128 else 0.0
        gray = gray * alpha + background * (1 - alpha)
    return gray


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """Any grayscale digit image (0..255) -> float32 [28, 28] in [0, 1] the way MNIST was made.

    The background is the median of the border; a light one is inverted, so the digit is white
    on black. The ink is stretched to full contrast, cropped, scaled so its longer side is 20
    pixels, and placed so that its centre of mass sits at the centre of the 28x28 field (kept
    inside the field when the mass is far off-centre). An already-MNIST image comes back as it
    was, up to a one-pixel shift.
    """
    border = np.concatenate([gray[0], gray[-1], gray[1:-1, 0], gray[1:-1, -1]])
    background = float(np.median(border))
    if background > 127.5:
        gray, background = 255 - gray, 255 - background
    ink = np.clip(gray - background, 0, None) / 255
    peak = float(ink.max())
    canvas = np.zeros((SIDE, SIDE), np.float32)
    if peak < MIN_CONTRAST:
        return canvas
    ink = ink / peak
    rows = np.flatnonzero((ink > INK_THRESHOLD).any(axis=1))
    cols = np.flatnonzero((ink > INK_THRESHOLD).any(axis=0))
    digit = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].astype(np.float32)
    height, width = digit.shape
    if max(height, width) != DIGIT_BOX:
        scale = DIGIT_BOX / max(height, width)
        size = (max(1, round(width * scale)), max(1, round(height * scale)))
        resized = Image.fromarray(digit).resize(size, Image.Resampling.LANCZOS)
        digit = np.clip(np.asarray(resized, np.float32), 0, 1)
        height, width = digit.shape
    mass = float(digit.sum())
    centre_y = float(digit.sum(axis=1) @ np.arange(height)) / mass if mass else height / 2
    centre_x = float(digit.sum(axis=0) @ np.arange(width)) / mass if mass else width / 2
    top = int(np.clip(round(CENTRE - centre_y), 0, SIDE - height))
    left = int(np.clip(round(CENTRE - centre_x), 0, SIDE - width))
    canvas[top : top + height, left : left + width] = digit
    return canvas


def _numeric_array(value: Any, field: str) -> np.ndarray:
    if isinstance(value, str):
        raise InvalidInputError(f"'{field}' must be an array of numbers, got a string")
    if isinstance(value, dict):
        raise InvalidInputError(f"'{field}' must be an array of numbers, got an object")
    try:
        array = np.asarray(value)
    except (ValueError, TypeError) as err:
        raise InvalidInputError(f"'{field}' is not a rectangular array of numbers: {err}") from None
    if array.ndim == 0:
        raise InvalidInputError(f"'{field}' must be an array of {PIXELS} numbers, got one value")
    kind = array.dtype.kind
    if kind in "US":
        raise InvalidInputError(
            f"'{field}' holds strings where numbers belong (such as {_non_number(array)!r}); "
            "send JSON numbers, not quoted ones"
        )
    if kind == "b":
        raise InvalidInputError(f"'{field}' holds booleans where numbers belong")
    if kind not in "iuf":
        raise InvalidInputError(
            f"'{field}' holds nulls, objects, out-of-range integers or rows of different "
            f"lengths (numpy dtype {array.dtype}); send a rectangular array of numbers"
        )
    if array.shape not in IMAGE_SHAPES:
        batch = array.ndim > 1 and any(array.shape[1:] == shape for shape in IMAGE_SHAPES)
        hint = " (a batch? send one image per record)" if batch else ""
        raise InvalidInputError(
            f"'{field}' has shape {list(array.shape)}, expected one 28x28 image as "
            f"{_names([list(shape) for shape in IMAGE_SHAPES])}{hint}"
        )
    return array


def _non_number(array: np.ndarray) -> str:
    """The first string in a numpy string array that is not a quoted number, else the first."""
    for text in array.flat:
        try:
            float(text)
        except ValueError:
            return str(text)
    return str(array.flat[0])


def _check_finite(array: np.ndarray, field: str) -> None:
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        where = np.argwhere(~np.isfinite(array))[0].tolist()
        raise InvalidInputError(
            f"'{field}' holds NaN or infinity (first at index {where}); only finite numbers"
        )


def _first_fraction(array: np.ndarray) -> float:
    fractions = array[array != np.round(array)]
    return float(fractions.flat[0]) if fractions.size else float(array.flat[0])


def _b64decode(text: str, field: str, limit: int) -> bytes:
    if not text.strip():
        raise InvalidInputError(f"'{field}' is an empty string")
    if len(text) > limit:
        raise InvalidInputError(
            f"'{field}' is {len(text):,} characters of base64, over the limit of {limit:,}"
        )
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error:
        pass
    # Also accept what browsers and shells produce: data URLs, line-wrapped or URL-safe base64.
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    text = "".join(text.split()).translate(_URLSAFE)
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error as err:
        raise InvalidInputError(f"'{field}' is not valid base64: {err}") from None


_URLSAFE = str.maketrans("-_", "+/")


def _missing(value: Any) -> bool:
    """Whether a cell is empty: pandas fills fields a record lacks with NaN (or None/NA)."""
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _json_type(value: Any) -> str:
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list | tuple | np.ndarray):
        return "an array"
    return type(value).__name__


def _names(items: Any) -> str:
    return ", ".join(f"'{item}'" if isinstance(item, str) else str(item) for item in items)
