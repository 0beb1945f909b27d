"""Test-set analysis as pure functions of labels and predicted probabilities (no Keras).

`analyse` gathers everything evaluate reports about one model; the functions it calls are
usable on their own.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.metrics import classification_report, confusion_matrix

from mnist_mlops.data import NUM_CLASSES

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


@dataclass(frozen=True)
class ModelAnalysis:
    """What the test set says about one model: computed by `analyse`, written and logged by the
    evaluate stage."""

    name: str
    probabilities: np.ndarray  # [N, 10] on the clean test set
    scores: dict[str, float]
    matrix: np.ndarray
    per_digit: list[dict[str, Any]]
    pairs: list[dict[str, Any]]
    mistakes: list[dict[str, Any]]
    calibration: Calibration
    mnistc: dict[str, float]  # MNIST-C corruption -> accuracy on the test set so corrupted

    @property
    def mnistc_mean(self) -> float:
        """Mean accuracy over the corruptions (MNIST-C's headline number, as accuracy)."""
        return float(np.mean(list(self.mnistc.values())))

    @property
    def mnistc_worst(self) -> str:
        """The corruption with the lowest accuracy (the first of a tie, in MNIST-C's order)."""
        return min(self.mnistc, key=self.mnistc.__getitem__)

    def metrics(self) -> dict[str, float]:
        """Flat metric names, the same in metrics.json and MLflow."""
        return {
            **{f"{self.name}_test_{k}": v for k, v in self.scores.items()},
            f"{self.name}_test_ece": self.calibration.ece,
            **{f"{self.name}_mnistc_{c}_accuracy": value for c, value in self.mnistc.items()},
            f"{self.name}_mnistc_mean_accuracy": self.mnistc_mean,
            f"{self.name}_mnistc_worst_accuracy": self.mnistc[self.mnistc_worst],
        }


def analyse(
    name: str,
    labels: np.ndarray,
    probabilities: np.ndarray,
    corrupted_probabilities: dict[str, np.ndarray],
    *,
    gallery_size: int,
    calibration_bins: int,
    top_pairs: int,
) -> ModelAnalysis:
    """Everything evaluate reports about one model, from its predicted probabilities on the test
    set and on each (one or more) corrupted copy of it."""
    y_pred = probabilities.argmax(axis=1)
    matrix = confusion(labels, y_pred)
    return ModelAnalysis(
        name=name,
        probabilities=probabilities,
        scores=scores(labels, probabilities),
        matrix=matrix,
        per_digit=per_digit_report(labels, y_pred),
        pairs=confused_pairs(matrix, top_pairs),
        mistakes=misclassified(labels, probabilities, gallery_size),
        calibration=calibration(labels, probabilities, calibration_bins),
        mnistc={name: accuracy(labels, p) for name, p in corrupted_probabilities.items()},
    )
