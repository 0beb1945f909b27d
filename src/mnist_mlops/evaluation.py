"""Test-set analysis as pure functions of labels and predicted probabilities, and the
Model Registry gate that decides which model version holds the `champion` alias."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from sklearn.metrics import classification_report, confusion_matrix

from mnist_mlops.models import NUM_CLASSES

CHAMPION_ALIAS = "champion"
_EPS = 1e-7


def scores(y_true: np.ndarray, probabilities: np.ndarray) -> dict[str, float]:
    """Accuracy, cross-entropy loss and macro/weighted precision, recall and F1."""
    y_pred = probabilities.argmax(axis=1)
    picked = probabilities[np.arange(len(y_true)), y_true]
    report = classification_report(y_true, y_pred, output_dict=True, zero_division=0)
    result = {
        "accuracy": accuracy(y_true, probabilities),
        "loss": float(-np.mean(np.log(np.clip(picked, _EPS, 1.0)))),
    }
    for average in ("macro", "weighted"):
        for metric in ("precision", "recall", "f1-score"):
            result[f"{average}_{metric.replace('-score', '')}"] = float(
                report[f"{average} avg"][metric]
            )
    return result


def accuracy(y_true: np.ndarray, probabilities: np.ndarray) -> float:
    """Share of images whose most probable digit is the true one."""
    return float(np.mean(probabilities.argmax(axis=1) == y_true))


def per_digit_report(y_true: np.ndarray, y_pred: np.ndarray) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support of each digit, one row per digit."""
    labels = list(range(NUM_CLASSES))
    report = classification_report(y_true, y_pred, labels=labels, output_dict=True, zero_division=0)
    return [
        {
            "digit": digit,
            "precision": report[str(digit)]["precision"],
            "recall": report[str(digit)]["recall"],
            "f1": report[str(digit)]["f1-score"],
            "support": int(report[str(digit)]["support"]),
        }
        for digit in labels
    ]


def confusion(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """10x10 counts: rows are true digits, columns predictions."""
    return confusion_matrix(y_true, y_pred, labels=list(range(NUM_CLASSES)))


def confused_pairs(matrix: np.ndarray, top: int) -> list[dict[str, Any]]:
    """The `top` pairs of digits mistaken for each other most often, in either direction.

    A pair is unordered (4 read as 9 and 9 read as 4 both count for 4<->9) because the
    question a reader asks is which digits look alike; the two directions stay visible as
    columns. Ties keep the lower digits first, so the table is the same on every run.
    """
    rows = [
        {
            "pair": f"{a}↔{b}",
            "a": a,
            "b": b,
            "a_as_b": int(matrix[a, b]),
            "b_as_a": int(matrix[b, a]),
            "total": int(matrix[a, b] + matrix[b, a]),
        }
        for a in range(len(matrix))
        for b in range(a + 1, len(matrix))
        if matrix[a, b] + matrix[b, a] > 0
    ]
    return sorted(rows, key=lambda row: -row["total"])[:top]


@dataclass(frozen=True)
class Calibration:
    """Expected calibration error and the reliability diagram's bins (non-empty ones only)."""

    ece: float
    bins: list[dict[str, float]]


def calibration(y_true: np.ndarray, probabilities: np.ndarray, n_bins: int) -> Calibration:
    """Bin the images by confidence (top probability) into `n_bins` equal-width bins.

    A bin covers (lower, upper]; the first also takes a confidence of exactly 0. The ECE is the
    mean gap between a bin's accuracy and its mean confidence, weighted by the bin's share of
    the images: 0 for a model whose 0.8-confident answers are right 80% of the time.
    """
    confidence = probabilities.max(axis=1)
    correct = probabilities.argmax(axis=1) == y_true
    index = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    bins: list[dict[str, float]] = []
    ece = 0.0
    for b in range(n_bins):
        members = index == b
        count = int(members.sum())
        if count == 0:
            continue
        mean_confidence = float(confidence[members].mean())
        bin_accuracy = float(correct[members].mean())
        ece += count / len(y_true) * abs(bin_accuracy - mean_confidence)
        bins.append(
            {
                "lower": b / n_bins,
                "upper": (b + 1) / n_bins,
                "confidence": mean_confidence,
                "accuracy": bin_accuracy,
                "count": count,
            }
        )
    return Calibration(ece=float(ece), bins=bins)


def misclassified(
    y_true: np.ndarray, probabilities: np.ndarray, limit: int
) -> list[dict[str, Any]]:
    """Up to `limit` wrongly classified images, the most confident mistakes first."""
    y_pred = probabilities.argmax(axis=1)
    confidence = probabilities.max(axis=1)
    wrong = np.flatnonzero(y_pred != y_true)
    # Stable sort: equally confident mistakes stay in test-set order.
    ranked = wrong[np.argsort(-confidence[wrong], kind="stable")][:limit]
    return [
        {
            "index": int(i),
            "true": int(y_true[i]),
            "predicted": int(y_pred[i]),
            "confidence": float(confidence[i]),
        }
        for i in ranked
    ]


def first_of_each_digit(labels: np.ndarray) -> np.ndarray:
    """The index of the first image of each digit 0..9 that occurs in `labels`."""
    return np.array([np.flatnonzero(labels == d)[0] for d in range(NUM_CLASSES) if d in labels])


def conv_activations(
    model: keras.Model, inputs: np.ndarray, max_layers: int
) -> dict[str, np.ndarray]:
    """Outputs of the model's first `max_layers` Conv2D layers for `inputs`, by layer name.

    A wrapper's (an ensemble's, a shift-averaged model's) are those of its first sub-model, for
    the unmoved image. Empty for a model without convolutions (the search may pick an MLP).
    """
    while not _convs(model) and (nested := _sub_models(model)):
        model = nested[0]
    convs = _convs(model)[:max_layers]
    if not convs:
        return {}
    probe = keras.Model(model.inputs, [layer.output for layer in convs])
    outputs = probe.predict(inputs, verbose=0)
    if len(convs) == 1:
        outputs = [outputs]
    return {layer.name: np.asarray(out) for layer, out in zip(convs, outputs, strict=True)}


def _convs(model: keras.Model) -> list[keras.layers.Layer]:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


def _sub_models(model: keras.Model) -> list[keras.Model]:
    return [layer for layer in model.layers if isinstance(layer, keras.Model)]


@dataclass(frozen=True)
class Champion:
    """The model version that holds `champion`, with the test accuracy it was tagged with."""

    version: str
    accuracy: float | None


@dataclass(frozen=True)
class GateDecision:
    """`champion`: the version that holds the alias after the gate (None: no version does)."""

    champion: str | None
    promoted: bool
    reason: str


def champion_gate(
    candidate: str,
    candidate_accuracy: float,
    baseline_accuracy: float,
    min_accuracy: float,
    current: Champion | None,
) -> GateDecision:
    """Decide who holds `champion` once version `candidate` has been evaluated.

    The candidate earns the alias by reaching the gate and the baseline; a tie with either
    counts as reaching it. Otherwise the current champion keeps the alias, unless the current
    champion is this very version re-evaluated against a stricter gate: then it loses the alias
    and no version holds it.
    """
    accuracy_text = f"test accuracy {candidate_accuracy:.4f}"
    if candidate_accuracy < min_accuracy:
        failure = (
            f"{accuracy_text} is below the gate {min_accuracy:.4f} (evaluate.champion_min_accuracy)"
        )
    elif candidate_accuracy < baseline_accuracy:
        failure = f"{accuracy_text} is below the baseline's {baseline_accuracy:.4f}"
    else:
        failure = None

    if failure is None:
        ties = [
            name
            for name, value in (("gate", min_accuracy), ("baseline", baseline_accuracy))
            if candidate_accuracy == value
        ]
        reason = (
            f"v{candidate} promoted to @{CHAMPION_ALIAS}: {accuracy_text} reaches the gate "
            f"{min_accuracy:.4f} and the baseline's {baseline_accuracy:.4f}"
        )
        if ties:
            reason += f" (ties the {' and the '.join(ties)}; a tie is enough)"
        if current is None:
            reason += f"; no version held @{CHAMPION_ALIAS} before"
        elif current.version == candidate:
            reason += f"; it already held @{CHAMPION_ALIAS}"
        else:
            reason += f"; it replaces v{current.version}{_accuracy_note(current)}"
        return GateDecision(champion=candidate, promoted=True, reason=reason)

    reason = f"v{candidate} not promoted: {failure}"
    if current is None:
        return GateDecision(None, False, f"{reason}; no version holds @{CHAMPION_ALIAS} yet")
    if current.version == candidate:
        return GateDecision(None, False, f"{reason}; it loses the @{CHAMPION_ALIAS} it held")
    return GateDecision(
        current.version,
        False,
        f"{reason}; v{current.version}{_accuracy_note(current)} keeps @{CHAMPION_ALIAS}",
    )


def _accuracy_note(champion: Champion) -> str:
    return f" (test accuracy {champion.accuracy:.4f})" if champion.accuracy is not None else ""
