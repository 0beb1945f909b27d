"""Base64 text from a request -> bytes, accepting what browsers and shells produce."""

from __future__ import annotations

import binascii

from mnist_serving.errors import InvalidInputError

_URLSAFE = str.maketrans("-_", "+/")


def decode_base64(text: str, field: str, limit: int) -> bytes:
    """Standard, URL-safe or line-wrapped base64, or a data URL -> bytes; at most `limit` chars."""
    if not text.strip():
        raise InvalidInputError(f"'{field}' is an empty string")
    if len(text) > limit:
        raise InvalidInputError(
            f"'{field}' is {len(text):,} characters of base64, over the limit of {limit:,}"
        )
    if not text.isascii():
        # binascii refuses non-ASCII text with a ValueError of its own; name the character
        # (by code point: the character itself may be invisible, such as U+00A0).
        index, char = next((i, c) for i, c in enumerate(text) if not c.isascii())
        raise InvalidInputError(
            f"'{field}' is not valid base64: character {index} is U+{ord(char):04X}, and base64 "
            "is ASCII only (letters, digits, '+', '/', '=')"
        )
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error:
        pass
    if text.startswith("data:") and "," in text:
        text = text.split(",", 1)[1]
    text = "".join(text.split()).translate(_URLSAFE)
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error as err:
        raise InvalidInputError(f"'{field}' is not valid base64: {err}") from None
