"""The quantised TFLite export round-trips: it predicts what the Keras model predicts."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from mnist_mlops import export
from mnist_mlops.models import build_model

pytestmark = pytest.mark.skipif(
    keras.backend.backend() != "tensorflow", reason="the TFLite converter needs TensorFlow"
)


@pytest.fixture(scope="module")
def model() -> keras.Model:
    keras.utils.set_random_seed(0)
    return build_model(
        conv_filters=(4, 8),
        dense_units=(16,),
        batch_norm=True,
        background_normalization=True,  # as the champion: its top_k must convert
        seed=0,
    )


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    """Digit-like inputs: mostly background, some bright strokes; the last two blank (the
    normalisation layer's divisor must not round to zero in int8, which stops the interpreter)."""
    rng = np.random.default_rng(0)
    images = (rng.random((24, 28, 28, 1)) > 0.8).astype(np.float32)
    images[-2:] = 0.0
    return images


@pytest.mark.parametrize(("mode", "tolerance"), [("float16", 1e-3), ("int8", 0.05)])
def test_quantised_model_predicts_like_the_keras_model(model, images, mode, tolerance):
    flatbuffer = export.quantize(model, mode, representative=images[:16])
    keras_probs = model.predict(images[16:], verbose=0)
    tflite_probs = export.TFLiteClassifier(flatbuffer).predict(images[16:])
    assert tflite_probs.shape == keras_probs.shape == (8, 10)
    np.testing.assert_allclose(tflite_probs, keras_probs, atol=tolerance)


def test_classifier_batches_any_number_of_images(model, images, monkeypatch):
    monkeypatch.setattr(export, "_BATCH", 5)  # 24 images: batches of 5, 5, 5, 5 and 4
    flatbuffer = export.quantize(model, "float16", representative=images)
    classifier = export.TFLiteClassifier(flatbuffer)
    np.testing.assert_allclose(
        classifier.predict(images), model.predict(images, verbose=0), atol=1e-3
    )


def test_compare_reports_sizes_accuracies_and_latencies(model, images):
    flatbuffer = export.quantize(model, "int8", representative=images)
    labels = model.predict(images, verbose=0).argmax(axis=1)  # the Keras model is right always
    result = export.compare(model, flatbuffer, images, labels, latency_images=3)
    assert result.keras_accuracy == 1.0
    assert result.tflite_accuracy == result.agreement >= 0.75
    assert result.tflite_bytes == len(flatbuffer) < result.keras_bytes
    assert result.keras_latency_ms > 0 and result.tflite_latency_ms > 0
    metrics = result.metrics()
    assert metrics["size_ratio"] == pytest.approx(result.tflite_bytes / result.keras_bytes)


def test_unknown_mode_and_unavailable_backend(model, images, monkeypatch):
    with pytest.raises(ValueError, match="'int4'"):
        export.quantize(model, "int4", images)
    assert export.unavailable_reason() is None
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    assert "TensorFlow backend" in export.unavailable_reason()
