"""Digits as a person sends them: photograph-like PNGs built from real MNIST test digits (grey
paper, uneven light, thick and thin strokes, off-centre, a large canvas, noise; tests/
photo_cases.py), read by a real registered model through its own PNG conversion; and images
with no digit, which the answer must say hold none."""

from __future__ import annotations

import base64
import io
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from photo_cases import NO_DIGIT_CASES, PHOTO_CASES
from PIL import Image
from support import register_small_champion

from mnist_mlops.data import load_mnist, to_model_input

MODEL_NAME = "mnist-photos-test"
TRAIN_IMAGES = 3000
DIGITS = 10  # test digits per case
RIGHT = 8  # of DIGITS, read right in every case
NO_DIGIT_IMAGES = 20  # per kind of image without a digit


def png_record(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def served_model(
    mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[mlflow.pyfunc.PyFuncModel, np.ndarray, np.ndarray]]:
    """The registered @champion as `mlflow models serve` loads it (from code), with DIGITS test
    digits and their labels that it reads right as MNIST sent them: a wrong answer on a photo
    of one is the conversion's doing."""
    arrays, _ = load_mnist(mnist_dir, mnist_dir, download=False)
    previous_uri = mlflow.get_tracking_uri()
    try:
        model, _, _ = register_small_champion(
            arrays.x_train[:TRAIN_IMAGES],
            arrays.y_train[:TRAIN_IMAGES],
            tmp_path_factory.mktemp("mlflow"),
            "photos-test",
            MODEL_NAME,
        )
        served = mlflow.pyfunc.load_model(f"models:/{MODEL_NAME}@champion")
        candidates, labels = arrays.x_test[:100], arrays.y_test[:100]
        read = model.predict_on_batch(to_model_input(candidates)).argmax(axis=1)
        chosen = np.flatnonzero(read == labels)[:DIGITS]
        yield served, candidates[chosen], labels[chosen]
    finally:
        mlflow.set_tracking_uri(previous_uri)


def answers(model: mlflow.pyfunc.PyFuncModel, images: list[np.ndarray]) -> pd.DataFrame:
    """The served model's answers for uint8 images sent as `png` records."""
    return pd.DataFrame(model.predict(pd.DataFrame({"png": [png_record(i) for i in images]})))


@pytest.mark.parametrize("case", list(PHOTO_CASES))
def test_photographed_digits_are_read_right(served_model, case):
    model, digits, labels = served_model
    rng = np.random.default_rng(0)
    answer = answers(model, [PHOTO_CASES[case](digit, rng) for digit in digits])
    assert answer["digit_found"].all()
    right = int((answer["digit"].to_numpy() == labels).sum())
    assert right >= RIGHT, f"{case}: {right} of {DIGITS} read right"


@pytest.mark.parametrize("case", list(NO_DIGIT_CASES))
def test_images_without_a_digit_are_answered_so(served_model, case):
    model, _, _ = served_model
    rng = np.random.default_rng(0)
    answer = answers(model, [NO_DIGIT_CASES[case](rng) for _ in range(NO_DIGIT_IMAGES)])
    assert not answer["digit_found"].any()
