"""Request validation and conversion: what MLflow hands the model -> float32 images [N, 28, 28, 1].

A request is a batch of at most `MAX_BATCH` images. The served model has no input signature, so
MLflow's scoring server casts and drops nothing; after parsing the JSON it passes

    dataframe_records, dataframe_split, CSV   a DataFrame: one row per image, a column per field
    inputs / instances with named fields      a dict: field -> one value per image (numpy arrays)
    inputs / instances with a bare array      one array [N, 28, 28, 1], [N, 28, 28] or [N, 784],
                                              read as a column of `image`

and each image is given by exactly one field (docs/serving.md has the curl and Python versions):

    image   28x28 floats in [0, 1], white digit on black, as [28, 28, 1], [28, 28] or [784]
    pixels  28x28 raw pixels, JSON integers 0..255, as [28, 28], [28, 28, 1] or [784]; or a
            base64 string of the 784 bytes (row-major uint8), the compact form for bulk scoring
    png     a base64 PNG file of any size, grayscale or colour, any background (see `png`)

Plain functions, unit-tested without a server; every bad input raises `InvalidInputError`,
which the scoring server answers with HTTP 400 and the message (naming record, field, problem).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import pandas as pd

from mnist_serving import png
from mnist_serving.base64_text import decode_base64
from mnist_serving.errors import InvalidInputError

SIDE = png.SIDE
PIXELS = SIDE * SIDE
IMAGE_SHAPES = ((SIDE, SIDE, 1), (SIDE, SIDE), (PIXELS,))
FIELDS = ("image", "pixels", "png")
# Images per request. Bounds one request's memory and time (1024 images: 1 MiB as base64
# pixels, 40-150 ms of inference on 2 cores); throughput stops growing well before it.
MAX_BATCH = 1024
# What each field's numbers must be, for messages about integers numpy cannot hold.
_RANGES = {"image": "values are in [0, 1]", "pixels": "pixels are integers 0..255"}


def prepare_batch(model_input: Any) -> np.ndarray:
    """What MLflow passes the model (module docstring) -> float32 [N, 28, 28, 1] in [0, 1]."""
    columns = _columns(model_input)
    count = len(next(iter(columns.values()))) if columns else 0
    if count > MAX_BATCH:
        raise InvalidInputError(
            f"batch of {count} images is over the limit of {MAX_BATCH} per request; "
            "split it into smaller requests"
        )
    if count == 0:
        raise InvalidInputError(
            "the request holds no images: send a non-empty batch of records, each with exactly "
            f"one of the fields {_names(FIELDS)}, or an array [N, 28, 28, 1] of 'image's"
        )
    chosen = [_given_field(columns, index) for index in range(count)]
    values = [_cell(columns[field], index) for index, field in enumerate(chosen)]
    # PNG headers first: a request over the pixel budget is refused before any decoding.
    pngs = {
        index: _convert(index, png.read_png_file, values[index])
        for index, field in enumerate(chosen)
        if field == "png"
    }
    png.check_pixel_budget(pngs)
    images = np.empty((count, SIDE, SIDE, 1), np.float32)
    for index, field in enumerate(chosen):
        value = pngs.get(index, values[index])
        images[index, ..., 0] = _convert(index, CONVERTERS[field], value)
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
        raw = decode_base64(value, "pixels", limit=4 * PIXELS)
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


CONVERTERS: dict[str, Callable[[Any], np.ndarray]] = {
    "image": image_to_array,
    "pixels": pixels_to_array,
    "png": png.png_to_array,
}


def _columns(model_input: Any) -> dict[str, Any]:
    """Field -> one value per image, whichever request form MLflow passed on."""
    if isinstance(model_input, pd.DataFrame):
        _check_field_names(model_input.columns)
        # to_numpy, not tolist: pandas 3 keeps string columns in Arrow, slow to iterate.
        return {field: model_input[field].to_numpy(dtype=object) for field in model_input.columns}
    if isinstance(model_input, dict):
        _check_field_names(model_input)
        lengths = {field: _column_length(field, value) for field, value in model_input.items()}
        if len(set(lengths.values())) > 1:
            counts = ", ".join(f"'{field}' {length}" for field, length in lengths.items())
            raise InvalidInputError(
                f"the fields hold different numbers of images ({counts}); give each the same"
            )
        return model_input
    if isinstance(model_input, list) and model_input and isinstance(model_input[0], dict):
        return _columns(pd.DataFrame(model_input))  # `inputs` as a list of records
    if isinstance(model_input, list | np.ndarray):
        return {"image": _image_tensor(model_input)}
    raise InvalidInputError(
        f"expected records, named columns or an array of images, got {type(model_input).__name__}"
    )


def _check_field_names(names: Iterable[Any]) -> None:
    unknown = [name for name in names if name not in FIELDS]
    if unknown:
        shown = _names(unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5 else "")
        raise InvalidInputError(
            f"unknown field {shown}: each image is given by exactly one of {_names(FIELDS)}"
        )


def _column_length(field: str, column: Any) -> int:
    """How many images a named column holds; refuses one image given without a batch around it."""
    if isinstance(column, list | tuple):
        return len(column)
    if not isinstance(column, np.ndarray):
        raise InvalidInputError(
            f"'{field}' as a column must be a list with one value per image, got "
            f"{type(column).__name__}"
        )
    if column.ndim == 0 or (column.dtype.kind in "biuf" and column.ndim == 1):
        raise InvalidInputError(
            f"'{field}' as a column holds one value per image, such as [N, 28, 28] numbers or N "
            f"strings; got shape {list(column.shape)} (one image? wrap it in a list)"
        )
    return len(column)


def _image_tensor(tensor: Any) -> np.ndarray:
    """A bare array of images [N, 28, 28, 1], [N, 28, 28] or [N, 784], read as `image`s."""
    try:
        array = np.asarray(tensor)
    except (ValueError, TypeError) as err:
        raise InvalidInputError(f"the images are not a rectangular array: {err}") from None
    if array.size and (array.ndim < 2 or array.shape[1:] not in IMAGE_SHAPES):
        got = f"shape {list(array.shape)}" if array.ndim else "a single value"
        hint = " (one image? wrap it in a list)" if array.shape in IMAGE_SHAPES else ""
        raise InvalidInputError(
            f"an array of images must have shape [N, 28, 28, 1], [N, 28, 28] or [N, 784], "
            f"got {got}{hint}"
        )
    return array


def _given_field(columns: dict[str, Any], index: int) -> str:
    given = [field for field, column in columns.items() if not _missing(_cell(column, index))]
    if len(given) != 1:
        problem = "has none" if not given else f"has {len(given)} ({_names(given)})"
        raise InvalidInputError(
            f"record {index} {problem} of the fields {_names(FIELDS)}; give exactly one"
        )
    return given[0]


def _convert(index: int, convert: Callable[[Any], Any], value: Any) -> Any:
    """`convert(value)` for record `index`, its errors named after the record."""
    try:
        return convert(value)
    except InvalidInputError as err:
        raise InvalidInputError(f"record {index}: {err.reason}") from None


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
    if isinstance(value, list):
        _check_json_numbers(value, array, field)
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
            f"'{field}' holds nulls, objects or rows of different lengths (numpy dtype "
            f"{array.dtype}); send a rectangular array of numbers"
        )
    if array.shape not in IMAGE_SHAPES:
        batch = array.ndim > 1 and any(array.shape[1:] == shape for shape in IMAGE_SHAPES)
        hint = " (a batch? send one image per record)" if batch else ""
        raise InvalidInputError(
            f"'{field}' has shape {list(array.shape)}, expected one 28x28 image as "
            f"{_names([list(shape) for shape in IMAGE_SHAPES])}{hint}"
        )
    return array


def _check_json_numbers(value: list, array: np.ndarray, field: str) -> None:
    """What numpy hides when it reads JSON numbers: a `true` among numbers becomes 1, and
    integers beyond 64 bits become floats or objects."""
    types = set(map(type, _flat(value, array.ndim)))
    if bool in types:
        raise InvalidInputError(f"'{field}' holds booleans where numbers belong")
    if types == {int} and array.dtype.kind != "i":
        outlier = next(n for n in _flat(value, array.ndim) if not -(2**63) <= n < 2**63)
        raise InvalidInputError(
            f"'{field}' holds an integer out of range ({outlier}); {_RANGES[field]}"
        )


def _flat(value: list, depth: int) -> Iterable[Any]:
    """The elements of a list nested `depth` deep."""
    items: Iterable[Any] = value
    for _ in range(depth - 1):
        items = itertools.chain.from_iterable(items)
    return items


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


def _cell(column: Any, index: int) -> Any:
    """One image's value; MLflow wraps each value of `inputs` records in a numpy array."""
    value = column[index]
    return value.item() if isinstance(value, np.ndarray) and value.ndim == 0 else value


def _missing(value: Any) -> bool:
    """Whether a cell is empty: pandas fills fields a record lacks with NaN (or None/NA)."""
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _names(items: Any) -> str:
    return ", ".join(f"'{item}'" if isinstance(item, str) else str(item) for item in items)
