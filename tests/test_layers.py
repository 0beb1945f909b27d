"""BackgroundNormalization: a digit on any paper, in light or dark ink, reaches the classifier
as the MNIST digit it is; saved models that hold it load wherever `mnist_serving` is imported."""

from __future__ import annotations

import subprocess
import sys

import keras
import numpy as np
import pytest

from mnist_mlops.data import read_idx, to_model_input
from mnist_serving.layers import BACKGROUND_QUANTILE, BackgroundNormalization


@pytest.fixture(scope="module")
def digits(mnist_dir) -> np.ndarray:
    return to_model_input(read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")[:200])


def _normalize(images: np.ndarray) -> np.ndarray:
    return keras.ops.convert_to_numpy(BackgroundNormalization()(images))


def test_clean_digits_pass_unchanged(digits):
    peaks = digits.max(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(_normalize(digits), digits / peaks, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "paper", "ink"),
    [("dark ink on white", 1.0, 0.0), ("dark ink on grey", 0.5, 0.1), ("faint on grey", 0.5, 0.8)],
)
def test_a_digit_on_paper_becomes_the_mnist_digit(digits, name, paper, ink):
    # The paper is read at the lower quartile: dark ink must cover under a quarter of the image
    # (87% of MNIST's test digits do, counting faint edge pixels; the rest may flip polarity).
    digits = digits[(digits > 0).mean(axis=(1, 2, 3)) < BACKGROUND_QUANTILE]
    shown = paper + (ink - paper) * digits  # the stroke's darkness/lightness as MNIST's ink
    peaks = digits.max(axis=(1, 2, 3), keepdims=True)
    np.testing.assert_allclose(_normalize(shown), digits / peaks, atol=1e-4, err_msg=name)


def test_a_blank_page_stays_blank():
    for level in (0.0, 0.5, 1.0):
        assert _normalize(np.full((2, 28, 28, 1), level, np.float32)).max() == 0.0


def test_a_saved_model_with_the_layer_loads_through_mnist_serving(tmp_path):
    inputs = keras.Input((28, 28, 1))
    outputs = keras.layers.Flatten()(BackgroundNormalization()(inputs))
    keras.Model(inputs, outputs).save(tmp_path / "model.keras")
    path = str(tmp_path / "model.keras")
    loads = (
        "import keras, mnist_serving.model; "
        f"print(type(keras.saving.load_model({path!r}).layers[1]).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", loads], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("BackgroundNormalization")
