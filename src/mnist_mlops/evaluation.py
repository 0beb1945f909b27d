"""Test-set analysis as pure functions of labels and predicted probabilities, and the
Model Registry gate that decides which model version earns the `champion` alias."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
        "accuracy": float(np.mean(y_pred == y_true)),
        "loss": float(-np.mean(np.log(np.clip(picked, _EPS, 1.0)))),
    }
    for average in ("macro", "weighted"):
        for metric in ("precision", "recall", "f1-score"):
            result[f"{average}_{metric.replace('-score', '')}"] = float(
                report[f"{average} avg"][metric]
            )
    return result


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


@dataclass(frozen=True)
class GateDecision:
    promote: bool
    reason: str


def champion_gate(
    candidate_accuracy: float, baseline_accuracy: float, min_accuracy: float
) -> GateDecision:
    """A model version earns `champion` only by reaching the gate and matching the baseline."""
    if candidate_accuracy < min_accuracy:
        return GateDecision(
            False,
            f"test accuracy {candidate_accuracy:.4f} is below the gate {min_accuracy:.4f} "
            "(evaluate.champion_min_accuracy)",
        )
    if candidate_accuracy < baseline_accuracy:
        return GateDecision(
            False,
            f"test accuracy {candidate_accuracy:.4f} is below the baseline's "
            f"{baseline_accuracy:.4f}",
        )
    return GateDecision(
        True,
        f"test accuracy {candidate_accuracy:.4f} reaches the gate {min_accuracy:.4f} and the "
        f"baseline's {baseline_accuracy:.4f}",
    )
