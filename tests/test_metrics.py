"""Test-set analysis on hand-built labels and probabilities."""

from __future__ import annotations

import numpy as np
import pytest

from mnist_mlops import metrics


def probs(predicted: list[int], confidence: list[float]) -> np.ndarray:
    """Probability rows whose top class is `predicted` with `confidence`, the rest spread evenly."""
    rows = np.empty((len(predicted), 10))
    for row, (digit, top) in enumerate(zip(predicted, confidence, strict=True)):
        rows[row] = (1 - top) / 9
        rows[row, digit] = top
    return rows


def test_scores_on_a_hand_built_example():
    y_true = np.array([0, 1, 2, 3])
    result = metrics.scores(y_true, probs([0, 1, 2, 0], [0.5, 0.5, 0.5, 0.5]))
    assert result["accuracy"] == 0.75
    # Three right answers at p=0.5, one wrong where the true class got (1 - 0.5) / 9.
    assert result["loss"] == pytest.approx(-(3 * np.log(0.5) + np.log(0.5 / 9)) / 4)
    assert result["macro_recall"] == pytest.approx(0.75)
    assert result["weighted_precision"] == pytest.approx((0.5 + 1 + 1 + 0) / 4)


def test_confusion_matrix_and_confused_pairs_on_a_hand_built_example():
    # 4 read as 9 three times, 9 as 4 twice, 2<->7 once each way, 3 as 5 twice.
    y_true = np.array([4, 4, 4, 4, 9, 9, 9, 2, 7, 3, 3, 1])
    y_pred = np.array([9, 9, 9, 4, 4, 4, 9, 7, 2, 5, 5, 1])
    matrix = metrics.confusion(y_true, y_pred)
    assert matrix.shape == (10, 10)
    assert matrix[4, 9] == 3 and matrix[9, 4] == 2 and matrix[4, 4] == 1 and matrix[9, 9] == 1
    assert matrix[2, 7] == matrix[7, 2] == 1 and matrix[3, 5] == 2 and matrix[1, 1] == 1
    assert matrix.sum() == len(y_true)

    pairs = metrics.confused_pairs(matrix, top=10)
    assert pairs[0] == {"pair": "4↔9", "a": 4, "b": 9, "a_as_b": 3, "b_as_a": 2, "total": 5}
    # 2<->7 and 3<->5 tie at 2: lower digits first, every run.
    assert [p["pair"] for p in pairs] == ["4↔9", "2↔7", "3↔5"]
    assert pairs[2]["a_as_b"] == 2 and pairs[2]["b_as_a"] == 0
    assert [p["pair"] for p in metrics.confused_pairs(matrix, top=1)] == ["4↔9"]
    assert metrics.confused_pairs(np.diag(np.arange(10)), top=5) == []


def test_calibration_on_a_hand_built_example():
    # Two digits at 0.95 confidence, both right (gap 0.05); two at 0.55, one right (gap 0.05).
    y_true = np.array([1, 2, 3, 4])
    result = metrics.calibration(y_true, probs([1, 2, 3, 0], [0.95, 0.95, 0.55, 0.55]), 10)
    assert result.ece == pytest.approx(0.05)
    assert [(b["lower"], b["upper"], b["count"]) for b in result.bins] == [
        (0.5, 0.6, 2),
        (0.9, 1.0, 2),
    ]
    assert [b["accuracy"] for b in result.bins] == [0.5, 1.0]
    assert [b["confidence"] for b in result.bins] == pytest.approx([0.55, 0.95])


def test_calibration_bin_edges_and_a_calibrated_model():
    # Confidence 1.0 falls in the last bin and 0.5 in (0.4, 0.5]: bins are closed on the right.
    result = metrics.calibration(np.array([0, 1]), probs([0, 1], [1.0, 0.5]), 10)
    assert [(b["lower"], b["count"]) for b in result.bins] == [(0.4, 1), (0.9, 1)]
    # Right half of the time at 0.5 confidence, always right at 1.0: perfectly calibrated.
    y_true = np.array([0, 1, 2])
    calibrated = metrics.calibration(y_true, probs([0, 1, 5], [1.0, 0.5, 0.5]), 2)
    assert calibrated.ece == pytest.approx(0.0)


def test_misclassified_puts_the_most_confident_mistakes_first():
    y_true = np.array([0, 1, 2, 3, 4])
    p = probs([0, 7, 8, 9, 5], [0.9, 0.6, 0.8, 0.6, 0.7])
    rows = metrics.misclassified(y_true, p, limit=3)
    assert [r["index"] for r in rows] == [2, 4, 1]  # 0.8, 0.7, then the first of the 0.6 tie
    assert rows[0] == {"index": 2, "true": 2, "predicted": 8, "confidence": pytest.approx(0.8)}
    assert len(metrics.misclassified(y_true, p, limit=10)) == 4


def test_first_of_each_digit():
    labels = np.array([3, 1, 3, 0, 1, 2])
    np.testing.assert_array_equal(metrics.first_of_each_digit(labels), [3, 1, 5, 0])


def test_mnistc_accuracy_per_corruption_its_mean_and_the_worst():
    y_true = np.array([0, 1, 2, 3])
    confident = [0.9] * 4
    analysis = metrics.analyse(
        "tuned",
        y_true,
        probs([0, 1, 2, 3], confident),
        {
            "fog": probs([1, 1, 2, 3], confident),
            "stripe": probs([1, 0, 3, 3], confident),
            "zigzag": probs([1, 0, 3, 2], confident),
        },
        gallery_size=4,
        calibration_bins=5,
        top_pairs=3,
    )
    found = analysis.metrics()
    assert found["tuned_test_accuracy"] == 1.0
    assert [found[f"tuned_mnistc_{name}_accuracy"] for name in ("fog", "stripe", "zigzag")] == [
        0.75,
        0.25,
        0.0,
    ]
    assert found["tuned_mnistc_mean_accuracy"] == pytest.approx(1 / 3)
    assert found["tuned_mnistc_worst_accuracy"] == 0.0 and analysis.mnistc_worst == "zigzag"
