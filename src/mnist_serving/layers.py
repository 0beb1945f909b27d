"""Keras layers that saved models contain, registered so that any loader of a `.keras` file
(serving, export, evaluation) rebuilds them: import this module before loading a model."""

from __future__ import annotations

from typing import Any

import keras
import numpy as np

# Which quantile of an image's pixels is its paper. MNIST digits cover under half the field, so
# the median would do for clean digits; the lower quartile also holds when more than half is
# light (inverted side stripes, a large blot) and sits on the paper under a uniform or smoothly
# varying tint (a grey page, fog, uneven light). Dark ink on light paper takes the upper
# quartile, the same distance from the paper's side.
BACKGROUND_QUANTILE = 0.25
# The smallest ink-to-paper contrast stretched to 1: a flat image (no ink) stays flat instead of
# amplifying rounding noise. Large enough to stay nonzero after int8 quantisation, where a
# divisor that rounds to zero stops the TFLite interpreter (a blank image did, at 1e-3).
_MIN_CONTRAST = 0.05


@keras.saving.register_keras_serializable(package="mnist_serving")
class BackgroundNormalization(keras.layers.Layer):
    """Each image made white ink on a black background: background 0, strongest ink 1.

    The background is the image's lower-quartile level (the dominant level of the image seen
    from below) and the ink is whatever departs farthest from it: above it (light ink, as in
    MNIST) or below it (dark ink on light paper, which is then inverted). So a digit on grey or
    tinted paper, under fog or uneven light, in faint or dark ink reaches the classifier as the
    digit it was trained on, and clean MNIST digits (background 0, ink up to 1) pass unchanged.
    Dark ink that covers more than a quarter of the image may be read as light paper.
    Part of the model, so serving, export and evaluation all get it.
    """

    def call(self, images: Any) -> Any:
        count = int(np.prod(images.shape[1:]))
        pixels = keras.ops.reshape(images, (-1, count))
        lower = _quantile(pixels, BACKGROUND_QUANTILE)
        lightest = keras.ops.max(pixels, axis=-1)
        darkest = keras.ops.min(pixels, axis=-1)
        dark_ink = (lower - darkest) > (lightest - lower)
        background = keras.ops.where(
            dark_ink, 1.0 - _quantile(pixels, 1.0 - BACKGROUND_QUANTILE), lower
        )
        peak = keras.ops.where(dark_ink, 1.0 - darkest, lightest)
        dark_ink, background, peak = (
            keras.ops.reshape(v, (-1, 1, 1, 1)) for v in (dark_ink, background, peak)
        )
        light_ink = keras.ops.where(dark_ink, 1.0 - images, images)
        normalized = (light_ink - background) / keras.ops.maximum(peak - background, _MIN_CONTRAST)
        return keras.ops.clip(normalized, 0.0, 1.0)

    def compute_output_shape(self, input_shape: tuple) -> tuple:
        return input_shape


def _quantile(pixels: Any, q: float) -> Any:
    """Each row's q-quantile (nearest rank), as the smallest of its largest values: top_k
    converts to every backend and to LiteRT, where a sort or quantile op may not."""
    count = pixels.shape[-1]
    return keras.ops.min(keras.ops.top_k(pixels, count - int(q * count), sorted=False)[0], axis=-1)
