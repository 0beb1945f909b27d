"""Whether an image in MNIST form holds a digit at all: `digit_found` in every answer.

A classifier answers one of ten digits for anything, a blank page included. An image holds a
digit when, all four:

  contrast     its brightest pixel stands at least MIN_CONTRAST above its median (the ground);
  quiet ground the ground is flat: its spread (1.4826 x the median absolute deviation, a
               standard deviation that the strokes do not move) is at most MAX_GROUND_SPREAD
               of the contrast; MNIST's ground is exactly 0, noise spreads everywhere;
  ink share    its ink (pixels at least halfway from the ground to the brightest) covers
               INK_SHARE_RANGE of the 28x28 field: a digit is strokes in a 20x20 box, not a dot
               scaled up to fill it (over 0.36) nor a speck (under 0.02);
  compactness  the largest 8-connected piece of its strokes holds at least MIN_COMPACTNESS of it,
               counted on the faint edges of the strokes too (pixels above a tenth of the way),
               which join the pieces of a broken stroke: noise is many small pieces.

The `png` field's conversion (`png.to_mnist`) already leaves noise and specks out; these checks
judge the 28x28 image the model reads, so `image` and `pixels` get them too. All 10,000 MNIST
test digits pass; docs/serving.md has the figures, and what is wrongly found.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

MIN_CONTRAST = 0.2
MAX_GROUND_SPREAD = 0.1
INK_LEVEL = 0.5  # ink: at least this share of the way from the median to the brightest pixel
INK_SHARE_RANGE = (0.02, 0.36)
MIN_COMPACTNESS = 0.4  # MNIST test digits: 0.46 at the least (broken strokes)
STROKE_LEVEL = 0.1  # the strokes with their faint edges, for compactness
# 8-connected within each image of a batch [N, 28, 28], never across images.
_EIGHT_NEIGHBOURS_EACH = np.zeros((3, 3, 3), bool)
_EIGHT_NEIGHBOURS_EACH[1] = True


def digits_found(images: np.ndarray) -> np.ndarray:
    """float32 images [N, 28, 28, 1] (or [N, 28, 28]) in [0, 1] -> bool [N]: holds a digit.

    All images at once (~20 ms for a batch of 1024 here); the module docstring says what counts.
    """
    batch = images.reshape(len(images), -1)
    ground = np.median(batch, axis=1, keepdims=True)
    contrast = batch.max(axis=1, keepdims=True) - ground
    spread = 1.4826 * np.median(np.abs(batch - ground), axis=1, keepdims=True)
    ink_share = (batch >= ground + INK_LEVEL * contrast).mean(axis=1, keepdims=True)
    low, high = INK_SHARE_RANGE
    found = (
        (contrast >= MIN_CONTRAST)
        & (spread <= MAX_GROUND_SPREAD * contrast)
        & (ink_share >= low)
        & (ink_share <= high)
    )[:, 0]
    strokes = (batch > ground + STROKE_LEVEL * contrast).reshape(len(images), *images.shape[1:3])
    return found & (_largest_piece_share(strokes) >= MIN_COMPACTNESS)


def _largest_piece_share(strokes: np.ndarray) -> np.ndarray:
    """bool [N, H, W] -> [N]: the share of each image's pixels in its largest 8-connected piece
    (0 for an image without any)."""
    pieces, count = ndimage.label(strokes, structure=_EIGHT_NEIGHBOURS_EACH)
    sizes = np.bincount(pieces.ravel(), minlength=count + 1)
    image_of_piece = np.zeros(count + 1, np.intp)
    labelled = pieces > 0
    image_of_piece[pieces[labelled]] = np.nonzero(labelled)[0]
    largest = np.zeros(len(strokes))
    np.maximum.at(largest, image_of_piece[1:], sizes[1:])
    totals = strokes.sum(axis=(1, 2))
    return np.divide(largest, totals, out=np.zeros(len(strokes)), where=totals > 0)


def digit_found(image: np.ndarray) -> bool:
    """Whether one 28x28 image in [0, 1] (white digit on black) holds a digit."""
    return bool(digits_found(image[np.newaxis])[0])
