"""Each plotting function returns a Figure showing what it was given."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pytest
from matplotlib.figure import Figure

from mnist_mlops import plots
from mnist_mlops.metrics import Calibration


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


def image_axes(fig: Figure) -> list:
    return [ax for ax in fig.axes if ax.images]


def test_confusion_heatmap_counts_and_normalised():
    matrix = np.zeros((10, 10), int)
    np.fill_diagonal(matrix, 10)
    matrix[4, 9], matrix[4, 4] = 5, 5
    fig = plots.confusion_heatmap(matrix, "counts")
    ax = fig.axes[0]
    assert ax.get_xlabel() == "predicted digit" and ax.get_ylabel() == "true digit"
    assert ax.get_title() == "counts"
    annotations = [t.get_text() for t in ax.texts]
    assert len(annotations) == 100
    assert annotations[4 * 10 + 9] == "5" and annotations[0] == "10"

    normalised = plots.confusion_heatmap(matrix, "rows", normalize=True).axes[0]
    texts = [t.get_text() for t in normalised.texts]
    assert texts[4 * 10 + 9] == "0.50" and texts[0] == "1.00" and texts[1] == "0.00"


def test_digit_gallery_titles_and_colours():
    images = np.zeros((3, 28, 28), np.uint8)
    fig = plots.digit_gallery(
        images, [4, 7, 2], [9, 7, 3], [0.91, 0.5, 0.333], "gallery", columns=2
    )
    shown = image_axes(fig)
    assert len(shown) == 3 and len(fig.axes) == 4  # a 2x2 grid, the fourth cell empty
    titles = [ax.get_title() for ax in shown]
    assert titles == ["true 4 pred 9\n91%", "true 7 pred 7\n50%", "true 2 pred 3\n33%"]
    assert [ax.title.get_color() for ax in shown] == ["tab:red", "tab:green", "tab:red"]
    assert fig.texts[0].get_text() == "gallery"


def test_digit_gallery_with_nothing_to_show():
    fig = plots.digit_gallery(np.zeros((0, 28, 28)), [], [], [], "no mistakes")
    assert image_axes(fig) == []


def test_reliability_diagram_lines_and_legend():
    bins = [
        {"lower": 0.5, "upper": 0.6, "confidence": 0.55, "accuracy": 0.5, "count": 2},
        {"lower": 0.9, "upper": 1.0, "confidence": 0.95, "accuracy": 1.0, "count": 3},
    ]
    fig = plots.reliability_diagram(
        {"baseline": Calibration(0.05, bins), "tuned": Calibration(0.1, bins[:1])}
    )
    curve, counts = fig.axes
    assert curve.get_xlim()[0] <= 0 and curve.get_ylabel() == "accuracy"
    lines = curve.get_lines()
    assert len(lines) == 3  # the diagonal and one line per model
    np.testing.assert_allclose(lines[1].get_xydata(), [[0.55, 0.5], [0.95, 1.0]])
    labels = [t.get_text() for t in curve.get_legend().get_texts()]
    assert labels == ["perfectly calibrated", "baseline (ECE 0.0500)", "tuned (ECE 0.1000)"]
    assert counts.get_xlabel() == "confidence"
    np.testing.assert_allclose(counts.get_lines()[0].get_ydata(), [2, 3])


def test_robustness_bars_lengths_one_row_per_test_set_first_on_top():
    accuracies = {
        "baseline": {"clean": 0.99, "fog": 0.8},
        "tuned": {"clean": 0.995, "fog": 0.9},
    }
    ax = plots.robustness_bars(accuracies).axes[0]
    widths = [patch.get_width() for patch in ax.patches]
    assert widths == pytest.approx([0.99, 0.8, 0.995, 0.9])
    assert [t.get_text() for t in ax.get_yticklabels()] == ["clean", "fog"]
    assert ax.yaxis_inverted() and ax.get_xlabel() == "accuracy"
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["baseline", "tuned"]


def test_image_rows_one_row_per_entry_on_one_grey_scale():
    rows = {"digit 0": np.zeros((4, 28, 28)), "digit 1": np.ones((4, 28, 28))}
    fig = plots.image_rows(rows, "corruptions", column_titles=["clean", "fog", "stripe", "zigzag"])
    assert len(fig.axes) == 8 and len(image_axes(fig)) == 8
    assert [fig.axes[0].get_ylabel(), fig.axes[4].get_ylabel()] == ["digit 0", "digit 1"]
    assert [ax.get_title() for ax in fig.axes[:4]] == ["clean", "fog", "stripe", "zigzag"]
    assert fig.axes[4].get_title() == ""
    assert fig.axes[4].images[0].get_clim() == (0, 255)  # not stretched to the image's range


def test_feature_maps_grid():
    images = np.zeros((2, 28, 28))
    activations = {"conv_0": np.zeros((2, 28, 28, 4)), "conv_1": np.zeros((2, 14, 14, 16))}
    fig = plots.feature_maps(images, activations, ["digit 0", "digit 1"], "maps", channels=6)
    # Per row: the input, conv_0's 4 channels, the first 6 of conv_1's 16.
    assert len(image_axes(fig)) == 2 * (1 + 4 + 6)
    assert fig.axes[0].get_title() == "input" and fig.axes[0].get_ylabel() == "digit 0"
    assert fig.axes[5].get_title() == "conv_1\n#0"
    assert fig.axes[5].images[0].get_array().shape == (14, 14)


def test_training_curves_with_and_without_validation():
    fig = plots.training_curves({"loss": [1.0, 0.5], "accuracy": [0.6, 0.8]}, "tuned")
    loss_ax, acc_ax = fig.axes
    assert [line.get_label() for line in loss_ax.get_lines()] == ["train"]
    np.testing.assert_allclose(acc_ax.get_lines()[0].get_ydata(), [0.6, 0.8])
    with_val = plots.training_curves(
        {"loss": [1.0], "accuracy": [0.6], "val_loss": [1.1], "val_accuracy": [0.5]}, "baseline"
    )
    assert len(with_val.axes[0].get_lines()) == 2


def test_training_curves_mark_where_each_ensemble_member_starts():
    history = {"loss": [1.0, 0.5, 0.9, 0.4, 0.8, 0.3], "accuracy": [0.6, 0.8] * 3}
    fig = plots.training_curves({**history, "member": [0, 0, 1, 1, 2, 2]}, "ensemble")
    starts = [line.get_xdata()[0] for line in fig.axes[1].get_lines()[1:]]
    assert starts == [2.5, 4.5]
    assert len(plots.training_curves(history, "one model").axes[1].get_lines()) == 1
