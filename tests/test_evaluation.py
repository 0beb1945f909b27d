"""Test-set analysis on hand-built labels and probabilities, and the champion gate."""

from __future__ import annotations

import numpy as np
import pytest

from mnist_mlops import evaluation
from mnist_mlops.evaluation import Champion
from mnist_mlops.models import average_ensemble, build_model, shift_averaged


def probs(predicted: list[int], confidence: list[float]) -> np.ndarray:
    """Probability rows whose top class is `predicted` with `confidence`, the rest spread evenly."""
    rows = np.empty((len(predicted), 10))
    for row, (digit, top) in enumerate(zip(predicted, confidence, strict=True)):
        rows[row] = (1 - top) / 9
        rows[row, digit] = top
    return rows


def test_scores_on_a_hand_built_example():
    y_true = np.array([0, 1, 2, 3])
    result = evaluation.scores(y_true, probs([0, 1, 2, 0], [0.5, 0.5, 0.5, 0.5]))
    assert result["accuracy"] == 0.75
    # Three right answers at p=0.5, one wrong where the true class got (1 - 0.5) / 9.
    assert result["loss"] == pytest.approx(-(3 * np.log(0.5) + np.log(0.5 / 9)) / 4)
    assert result["macro_recall"] == pytest.approx(0.75)
    assert result["weighted_precision"] == pytest.approx((0.5 + 1 + 1 + 0) / 4)


def test_confusion_matrix_and_confused_pairs_on_a_hand_built_example():
    # 4 read as 9 three times, 9 as 4 twice, 2<->7 once each way, 3 as 5 twice.
    y_true = np.array([4, 4, 4, 4, 9, 9, 9, 2, 7, 3, 3, 1])
    y_pred = np.array([9, 9, 9, 4, 4, 4, 9, 7, 2, 5, 5, 1])
    matrix = evaluation.confusion(y_true, y_pred)
    assert matrix.shape == (10, 10)
    assert matrix[4, 9] == 3 and matrix[9, 4] == 2 and matrix[4, 4] == 1 and matrix[9, 9] == 1
    assert matrix[2, 7] == matrix[7, 2] == 1 and matrix[3, 5] == 2 and matrix[1, 1] == 1
    assert matrix.sum() == len(y_true)

    pairs = evaluation.confused_pairs(matrix, top=10)
    assert pairs[0] == {"pair": "4↔9", "a": 4, "b": 9, "a_as_b": 3, "b_as_a": 2, "total": 5}
    # 2<->7 and 3<->5 tie at 2: lower digits first, every run.
    assert [p["pair"] for p in pairs] == ["4↔9", "2↔7", "3↔5"]
    assert pairs[2]["a_as_b"] == 2 and pairs[2]["b_as_a"] == 0
    assert [p["pair"] for p in evaluation.confused_pairs(matrix, top=1)] == ["4↔9"]
    assert evaluation.confused_pairs(np.diag(np.arange(10)), top=5) == []


def test_calibration_on_a_hand_built_example():
    # Two digits at 0.95 confidence, both right (gap 0.05); two at 0.55, one right (gap 0.05).
    y_true = np.array([1, 2, 3, 4])
    result = evaluation.calibration(y_true, probs([1, 2, 3, 0], [0.95, 0.95, 0.55, 0.55]), 10)
    assert result.ece == pytest.approx(0.05)
    assert [(b["lower"], b["upper"], b["count"]) for b in result.bins] == [
        (0.5, 0.6, 2),
        (0.9, 1.0, 2),
    ]
    assert [b["accuracy"] for b in result.bins] == [0.5, 1.0]
    assert [b["confidence"] for b in result.bins] == pytest.approx([0.55, 0.95])


def test_calibration_bin_edges_and_a_calibrated_model():
    # Confidence 1.0 falls in the last bin and 0.5 in (0.4, 0.5]: bins are closed on the right.
    result = evaluation.calibration(np.array([0, 1]), probs([0, 1], [1.0, 0.5]), 10)
    assert [(b["lower"], b["count"]) for b in result.bins] == [(0.4, 1), (0.9, 1)]
    # Right half of the time at 0.5 confidence, always right at 1.0: perfectly calibrated.
    y_true = np.array([0, 1, 2])
    calibrated = evaluation.calibration(y_true, probs([0, 1, 5], [1.0, 0.5, 0.5]), 2)
    assert calibrated.ece == pytest.approx(0.0)


def test_misclassified_puts_the_most_confident_mistakes_first():
    y_true = np.array([0, 1, 2, 3, 4])
    p = probs([0, 7, 8, 9, 5], [0.9, 0.6, 0.8, 0.6, 0.7])
    rows = evaluation.misclassified(y_true, p, limit=3)
    assert [r["index"] for r in rows] == [2, 4, 1]  # 0.8, 0.7, then the first of the 0.6 tie
    assert rows[0] == {"index": 2, "true": 2, "predicted": 8, "confidence": pytest.approx(0.8)}
    assert len(evaluation.misclassified(y_true, p, limit=10)) == 4


def test_first_of_each_digit():
    labels = np.array([3, 1, 3, 0, 1, 2])
    np.testing.assert_array_equal(evaluation.first_of_each_digit(labels), [3, 1, 5, 0])


def test_conv_activations_of_a_cnn_and_of_an_mlp():
    images = np.random.default_rng(0).random((3, 28, 28, 1), dtype=np.float32)
    cnn = build_model(conv_filters=(4, 8), dense_units=(8,), seed=0)
    maps = evaluation.conv_activations(cnn, images, max_layers=2)
    assert {name: out.shape for name, out in maps.items()} == {
        "conv_0": (3, 28, 28, 4),
        "conv_1": (3, 14, 14, 8),
    }
    assert list(evaluation.conv_activations(cnn, images, max_layers=1)) == ["conv_0"]
    mlp = build_model(family="mlp", dense_units=(8,), seed=0)
    assert evaluation.conv_activations(mlp, images, max_layers=2) == {}
    # Wrappers show their first sub-model's maps for the unmoved image.
    other = build_model(conv_filters=(4, 8), dense_units=(8,), seed=1)
    for wrapper in (shift_averaged(cnn, 1), shift_averaged(average_ensemble([cnn, other]), 1)):
        wrapped = evaluation.conv_activations(wrapper, images, max_layers=2)
        assert list(wrapped) == ["conv_0", "conv_1"]
        np.testing.assert_allclose(wrapped["conv_0"], maps["conv_0"], rtol=1e-5, atol=1e-6)


# --- the champion gate --------------------------------------------------------------------------


def test_gate_first_model_ever_passes():
    decision = evaluation.champion_gate("1", 0.991, 0.985, 0.99, current=None)
    assert decision.champion == "1" and decision.promoted
    assert "no version held @champion before" in decision.reason


def test_gate_first_model_ever_fails_and_no_one_holds_the_alias():
    decision = evaluation.champion_gate("1", 0.98, 0.97, 0.99, current=None)
    assert decision.champion is None and not decision.promoted
    assert "below the gate 0.9900" in decision.reason
    assert "no version holds @champion yet" in decision.reason


def test_gate_pass_takes_the_alias_from_the_previous_champion():
    decision = evaluation.champion_gate("3", 0.992, 0.985, 0.99, Champion("2", 0.995))
    assert decision.champion == "3" and decision.promoted
    assert "replaces v2 (test accuracy 0.9950)" in decision.reason


@pytest.mark.parametrize(
    ("accuracy", "baseline", "gate", "why"),
    [
        (0.989, 0.98, 0.99, "below the gate 0.9900"),
        (0.991, 0.993, 0.99, "below the baseline's 0.9930"),
    ],
)
def test_gate_fail_leaves_the_previous_champion(accuracy, baseline, gate, why):
    decision = evaluation.champion_gate("3", accuracy, baseline, gate, Champion("2", 0.995))
    assert decision.champion == "2" and not decision.promoted
    assert why in decision.reason
    assert "v2 (test accuracy 0.9950) keeps @champion" in decision.reason


@pytest.mark.parametrize(
    ("baseline", "gate", "tied"),
    [
        (0.99, 0.95, "ties the baseline"),
        (0.98, 0.99, "ties the gate"),
        (0.99, 0.99, "ties the gate and the baseline"),
    ],
)
def test_gate_ties_are_enough(baseline, gate, tied):
    # 9900 of 10000 right: exactly 0.99, as scores() computes it.
    accuracy = float(np.mean(np.arange(10000) < 9900))
    decision = evaluation.champion_gate("2", accuracy, baseline, gate, Champion("1", None))
    assert decision.champion == "2" and decision.promoted
    assert tied in decision.reason and "a tie is enough" in decision.reason
    assert decision.reason.endswith("it replaces v1")  # no accuracy tag, no accuracy shown


def test_gate_re_evaluating_the_champion():
    kept = evaluation.champion_gate("4", 0.995, 0.99, 0.99, Champion("4", 0.995))
    assert kept.champion == "4" and kept.promoted and "already held" in kept.reason
    # The gate was raised since: the version no longer earns the alias it holds.
    lost = evaluation.champion_gate("4", 0.995, 0.99, 0.996, Champion("4", 0.995))
    assert lost.champion is None and not lost.promoted
    assert "loses the @champion it held" in lost.reason
