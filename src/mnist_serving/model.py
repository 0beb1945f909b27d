"""The registered model as `mlflow models serve` runs it: fast, and strict about its input.

`DigitClassifier` is an MLflow pyfunc model that loads the `.keras` model once and predicts with
`predict_on_batch` (the traced graph, about 1 ms for one image) instead of the `mlflow.keras`
flavor's `model.predict` (60-80 ms per request). Requests are validated by `inputs`. It is logged
from code (`model_code.py`), not pickled, so it loads with MLFLOW_ALLOW_PICKLE_DESERIALIZATION
set to false.

Records go as `{"dataframe_records": [{"pixels": [...]}, {"png": "..."}]}`, a batch of one form
as columns (`{"inputs": {"image": x.tolist()}}`), or MLflow's tensor form
(`{"inputs": x.tolist()}`) for x of shape [N, 28, 28, 1]. Each answer is
`{"digit": d, "probabilities": [p0, ..., p9], "digit_found": true}`: `digit_found` is false for
an image that holds no digit (blank, uniform, noise; `presence`), whose `digit` means nothing.

The signature describes the output only. An input signature makes MLflow cast the request
before the model sees it, which hides integer/float/string mix-ups and NaN from validation (a
tensor signature), or drops every field it does not name, including the columns of the tensor
forms (a column signature). Without one, every check lives in `inputs`, and every bad input gets
a 400 that names the record, the field and the problem; `REQUEST_FORMS` documents the input in
the MLmodel file.
"""

from __future__ import annotations

import logging
from typing import Any

import keras
import mlflow
import numpy as np
import pandas as pd
from mlflow.models import ModelSignature
from mlflow.types import ColSpec, DataType, Schema
from mlflow.types.schema import Array

from mnist_serving.errors import InvalidInputError, ModelFailure
from mnist_serving.inputs import MAX_BATCH, SIDE, prepare_batch
from mnist_serving.layers import BackgroundNormalization
from mnist_serving.memory import release_freed_memory
from mnist_serving.png import MAX_PNG_PIXELS
from mnist_serving.presence import digits_found

KERAS_ARTIFACT = "keras_model"
# Images per predict_on_batch call. A call's activations are allocated per image and the
# allocator keeps its high-water mark: 1024 images in one call left the process 183 MiB larger
# for good, 128 per call 15 MiB, at no loss of speed (measured on the baseline CNN, 2 cores).
PREDICT_CHUNK = 128

SIGNATURE = ModelSignature(
    outputs=Schema(
        [
            ColSpec(DataType.long, "digit"),
            ColSpec(Array(DataType.float), "probabilities"),
            ColSpec(DataType.boolean, "digit_found"),
        ]
    ),
)
# The input, which MLflow's signature cannot express (see above); stored in the MLmodel file.
REQUEST_FORMS = {
    "image": "28x28 floats in [0, 1], white digit on black: [28, 28, 1], [28, 28] or [784]",
    "pixels": (
        "28x28 raw pixels, JSON integers 0..255: [28, 28], [28, 28, 1] or [784]; "
        "or a base64 string of the 784 bytes (uint8, row-major)"
    ),
    "png": "base64 PNG, any size, grayscale or colour; converted to the MNIST convention",
    "tensor": "a bare array under inputs/instances: [N, 28, 28, 1], [N, 28, 28] or [N, 784] images",
    "max_batch": str(MAX_BATCH),
    "max_png_pixels_per_request": str(MAX_PNG_PIXELS),
}

logger = logging.getLogger(__name__)


class DigitClassifier(mlflow.pyfunc.PythonModel):
    """The MNIST classifier behind `mlflow models serve`: validated records in, digits out."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        # A .keras file is a zip of JSON config and weights; safe_mode refuses the one part
        # that would run code from the file (lambda layers), so nothing here unpickles.
        self.model = keras.models.load_model(
            context.artifacts[KERAS_ARTIFACT],
            custom_objects={"BackgroundNormalization": BackgroundNormalization},
            compile=False,
            safe_mode=True,
        )
        # Two batch sizes make TensorFlow retrace once with a dynamic batch dimension; without
        # this the first requests of each new size pay 50-70 ms of tracing.
        for size in (1, 2):
            self.model.predict_on_batch(np.zeros((size, SIDE, SIDE, 1), np.float32))

    def predict(
        self,
        context: mlflow.pyfunc.PythonModelContext,
        model_input: pd.DataFrame,
        params: dict[str, Any] | None = None,
    ) -> list[dict[str, Any]]:
        """Score a request; `prepare_batch` says what `model_input` may be besides a DataFrame.

        MLflow passes a DataFrame for records, a dict or an array for `inputs` and `instances`.
        The hint names the DataFrame only: MLflow reads it, uses it as no signature (which this
        model wants), and warns at every load about any other hint, a union included.
        """
        try:
            images = prepare_batch(model_input)
        except InvalidInputError:
            raise
        except Exception:
            # A request no check foresaw: a 400 all the same, with the traceback in the
            # server's log only (MLflow would put it, with the server's paths, in the answer).
            logger.exception("reading a request failed")
            raise InvalidInputError(
                "the request could not be read as images; docs/serving.md lists the forms"
            ) from None
        try:
            probabilities = predict_in_chunks(self.model, images)
        except Exception:
            logger.exception("the model failed on a batch of %d images", len(images))
            raise ModelFailure("the model failed on this batch; the server log has why") from None
        finally:
            release_freed_memory()
        return format_predictions(probabilities, digits_found(images))


def predict_in_chunks(model: keras.Model, images: np.ndarray) -> np.ndarray:
    """`model.predict_on_batch` over `PREDICT_CHUNK` images at a time -> [N, 10]."""
    # predict_on_batch runs the traced graph; model(x) costs ~5 ms of eager dispatch and
    # model.predict ~60 ms of per-call setup, for one image.
    return np.concatenate(
        [
            model.predict_on_batch(images[start : start + PREDICT_CHUNK])
            for start in range(0, len(images), PREDICT_CHUNK)
        ]
    )


def format_predictions(probabilities: np.ndarray, found: np.ndarray) -> list[dict[str, Any]]:
    """[N, 10] probabilities and [N] digit found -> per image
    `{"digit": d, "probabilities": [p0, ..., p9], "digit_found": bool}`."""
    # A list, not a DataFrame: the scoring server turns a DataFrame into these same records
    # first, which doubles the cost of the response (10 of 20 ms for 1024 images).
    digits = probabilities.argmax(axis=1).tolist()
    return [
        {"digit": digit, "probabilities": row, "digit_found": found_one}
        for digit, row, found_one in zip(
            digits, probabilities.tolist(), found.tolist(), strict=True
        )
    ]
