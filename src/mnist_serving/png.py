"""PNG records: base64 -> PNG file (size read from its header) -> MNIST-style 28x28 image.

A PNG of any size, grayscale or colour, any background, is converted the way MNIST was made
(white digit on black, fitted into 20x20, centred by mass). Decoding costs CPU and memory in
proportion to the pixels, so a request's PNGs may hold `MAX_PNG_PIXELS` in all; the sizes come
from the PNG headers, so an over-budget request is refused before any pixel is decoded.
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

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
INK_THRESHOLD = 0.1  # share of the strongest stroke that counts as ink when finding the digit
MIN_CONTRAST = 8 / 255  # less than this between ink and background: a blank image


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
