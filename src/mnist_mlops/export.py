"""The champion's quantised TensorFlow Lite export: convert, write, compare with Keras, report.

TF-specific by nature: the TFLite converter traces the model through TensorFlow, so it needs
Keras on the TensorFlow backend. `unavailable_reason` says why an export cannot run instead of
failing halfway.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import keras
import mlflow
import numpy as np

from mnist_mlops.config import EvaluateParams
from mnist_mlops.data import to_model_input
from mnist_mlops.files import write_bytes, write_json
from mnist_mlops.models import inference_copy
from mnist_mlops.registry import CHAMPION_ALIAS, GateDecision, load_keras_model

Quantization = Literal["int8", "float16"]
# Enough images for the int8 converter to see each activation's range; more only adds time.
REPRESENTATIVE_IMAGES = 200
_BATCH = 256
_WARMUP_CALLS = 5

log = logging.getLogger(__name__)


def unavailable_reason() -> str | None:
    """None when a TFLite export can run here, else why not."""
    if keras.backend.backend() != "tensorflow":
        return (
            f"the TFLite converter needs Keras on the TensorFlow backend, "
            f"but KERAS_BACKEND is {keras.backend.backend()!r}"
        )
    return None


def quantize(model: keras.Model, mode: Quantization, representative: np.ndarray) -> bytes:
    """Convert `model` to a TFLite flatbuffer.

    int8: weights and activations in 8-bit integers, their ranges calibrated on
    `representative` (model inputs, never the test set); inputs and outputs stay float32 so
    callers feed the same arrays as to the Keras model. float16: weights stored as float16.
    """
    if mode not in ("int8", "float16"):
        raise ValueError(f"quantization must be 'int8' or 'float16', got {mode!r}")
    import tensorflow as tf  # here, not at the top: only the TF backend has (and needs) it

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    if mode == "int8":
        samples = representative[:REPRESENTATIVE_IMAGES].astype(np.float32)
        converter.representative_dataset = lambda: ([sample[np.newaxis]] for sample in samples)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    else:
        converter.target_spec.supported_types = [tf.float16]
    with warnings.catch_warnings():
        # About statistics for integer inputs; this model's inputs stay float32.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs")
        return converter.convert()


class TFLiteClassifier:
    """Runs a TFLite flatbuffer with the Keras model's calling convention: float32 in, probs out."""

    def __init__(self, flatbuffer: bytes) -> None:
        # LiteRT, the runtime TFLite files run on in apps, not tf.lite.Interpreter (deprecated
        # in its favour): the check measures what a deployment would run.
        from ai_edge_litert.interpreter import Interpreter

        self._interpreter = Interpreter(model_content=flatbuffer)
        self._input = self._interpreter.get_input_details()[0]["index"]
        self._output = self._interpreter.get_output_details()[0]["index"]
        self._batch = 0

    def predict(self, inputs: np.ndarray) -> np.ndarray:
        """Probabilities for float32 inputs [N, 28, 28, 1], in batches of up to 256."""
        parts = [self._run(inputs[i : i + _BATCH]) for i in range(0, len(inputs), _BATCH)]
        return np.concatenate(parts)

    def _run(self, batch: np.ndarray) -> np.ndarray:
        if len(batch) != self._batch:  # resizing reallocates: only when the batch size changes
            self._interpreter.resize_tensor_input(self._input, [len(batch), *batch.shape[1:]])
            self._interpreter.allocate_tensors()
            self._batch = len(batch)
        self._interpreter.set_tensor(self._input, batch.astype(np.float32))
        self._interpreter.invoke()
        return self._interpreter.get_tensor(self._output).copy()


def latency_seconds(predict: Callable[[np.ndarray], Any], inputs: np.ndarray) -> float:
    """Median wall time of `predict` on one image at a time, over every image of `inputs`.

    The median, after a few warm-up calls, keeps one-off costs (graph tracing, allocation) and
    the scheduler's hiccups out of the number.
    """
    for _ in range(_WARMUP_CALLS):
        predict(inputs[:1])
    times = []
    for i in range(len(inputs)):
        started = time.perf_counter()
        predict(inputs[i : i + 1])
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def keras_file_bytes(model: keras.Model) -> int:
    """Size of the model as a `.keras` file holding what inference needs.

    Saved from `models.inference_copy`: the pipeline's `.keras` files, Keras's weight files and
    `clone_model` copies all carry Adam's state, which would triple the Keras side of the
    comparison.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.keras"
        inference_copy(model).save(path)
        return path.stat().st_size


@dataclass(frozen=True)
class ExportComparison:
    """The quantised export against the Keras model it came from, on the same test images."""

    keras_accuracy: float
    tflite_accuracy: float
    agreement: float  # share of images on which both predict the same digit
    keras_bytes: int
    tflite_bytes: int
    keras_latency_ms: float
    tflite_latency_ms: float

    def metrics(self) -> dict[str, float]:
        return {
            **vars(self),
            "size_ratio": self.tflite_bytes / self.keras_bytes,
            "speedup": self.keras_latency_ms / self.tflite_latency_ms,
        }


def compare(
    model: keras.Model,
    flatbuffer: bytes,
    inputs: np.ndarray,
    labels: np.ndarray,
    latency_images: int,
) -> ExportComparison:
    """Accuracy on (inputs, labels), file size and per-image latency of both forms of a model."""
    exported = TFLiteClassifier(flatbuffer)
    keras_pred = model.predict(inputs, batch_size=1000, verbose=0).argmax(axis=1)
    tflite_pred = exported.predict(inputs).argmax(axis=1)
    timed = inputs[:latency_images]
    return ExportComparison(
        keras_accuracy=float(np.mean(keras_pred == labels)),
        tflite_accuracy=float(np.mean(tflite_pred == labels)),
        agreement=float(np.mean(keras_pred == tflite_pred)),
        keras_bytes=keras_file_bytes(model),
        tflite_bytes=len(flatbuffer),
        # predict_on_batch: Keras's compiled single-call path, what a server would use.
        keras_latency_ms=1000 * latency_seconds(model.predict_on_batch, timed),
        tflite_latency_ms=1000 * latency_seconds(exported.predict, timed),
    )


def export_champion(
    decision: GateDecision,
    registered: dict[str, Any],
    tuned_model: keras.Model,
    test: tuple[np.ndarray, np.ndarray],
    representative: np.ndarray,
    params: EvaluateParams,
    out_dir: Path,
) -> dict[str, Any]:
    """Quantise whichever version holds `champion` and compare it with its Keras form.

    `tuned_model` is the version just evaluated (`registered`); another champion is loaded from
    the registry. `representative` (uint8 images, never the test set) calibrates int8 ranges.
    Writes `out_dir/export/<model>-v<version>-<mode>.tflite` and `out_dir/export.json` (what was
    exported and how it compares, or why nothing was), logs both and the `export_*` metrics to
    the active MLflow run, and returns the summary.
    """
    reason = unavailable_reason()
    if reason is None and decision.champion is None:
        reason = f"no version of {registered['name']} holds @{CHAMPION_ALIAS}"
    export_dir = out_dir / "export"
    export_dir.mkdir(parents=True, exist_ok=True)  # a DVC output, even when empty
    if reason is not None:
        summary: dict[str, Any] = {"exported": False, "reason": reason}
        log.warning("no quantised export: %s", reason)
    else:
        version = decision.champion
        model = (
            tuned_model
            if version == registered["version"]
            else load_keras_model(f"models:/{registered['name']}/{version}")
        )
        mode = params.quantization
        flatbuffer = quantize(model, mode, to_model_input(representative))
        path = export_dir / f"{registered['name']}-v{version}-{mode}.tflite"
        write_bytes(path, flatbuffer)
        mlflow.log_artifact(str(path), "export")
        comparison = compare(
            model, flatbuffer, to_model_input(test[0]), test[1], params.latency_images
        )
        summary = {
            "exported": True,
            "model": registered["name"],
            "version": version,
            "quantization": mode,
            "file": path.name,
            **comparison.metrics(),
        }
        mlflow.log_metrics(
            {f"export_{key}": float(value) for key, value in comparison.metrics().items()}
        )
    write_json(out_dir / "export.json", summary)
    mlflow.log_dict(summary, "export.json")
    return summary
