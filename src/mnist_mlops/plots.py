"""Figures. Each function returns a matplotlib Figure; callers decide where it goes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")  # pipeline stages and servers have no display

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.figure import Figure

from mnist_mlops.metrics import Calibration

_RIGHT, _WRONG = "tab:green", "tab:red"


def sample_grid(images: np.ndarray, labels: np.ndarray, per_class: int = 8) -> Figure:
    """The first `per_class` images of each digit, one row per digit."""
    fig, axes = plt.subplots(10, per_class, figsize=(per_class, 10.5))
    for digit in range(10):
        picks = np.flatnonzero(labels == digit)[:per_class]
        for col in range(per_class):
            ax = axes[digit, col]
            ax.set_axis_off()
            if col < len(picks):
                ax.imshow(images[picks[col]], cmap="gray_r")
        axes[digit, 0].set_title(str(digit), loc="left", fontsize=9)
    fig.suptitle("Training samples by digit")
    fig.tight_layout()
    return fig


def training_curves(history: Mapping[str, Sequence[float]], title: str) -> Figure:
    """Loss and accuracy per epoch, training and (when present) validation.

    An ensemble's history (a `member` entry per epoch, members one after another) gets a dashed
    line where each next member starts.
    """
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(1, len(history["loss"]) + 1)
    member_starts = np.flatnonzero(np.diff(history.get("member", []))) + 1.5
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.plot(epochs, history[metric], marker="o", label="train")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], marker="o", label="validation")
        for start in member_starts:
            ax.axvline(start, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def confusion_heatmap(matrix: np.ndarray, title: str, normalize: bool = False) -> Figure:
    """Confusion matrix (rows: true digit, columns: prediction) as an annotated heatmap."""
    values = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1) if normalize else matrix
    fig, ax = plt.subplots(figsize=(8, 7))
    sns.heatmap(
        values,
        annot=True,
        fmt=".2f" if normalize else "d",
        cmap="Blues",
        cbar=True,
        square=True,
        ax=ax,
        annot_kws={"fontsize": 7},
    )
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def score_per_trial(trial_numbers: Sequence[int], scores: Sequence[float], best: float) -> Figure:
    """Each trial's objective in the order the trials ran, with the running best."""
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(trial_numbers, scores, "o", label="trial")
    ax.plot(trial_numbers, np.fmax.accumulate(np.asarray(scores, dtype=float)), label="best so far")
    ax.axhline(best, color="gray", linestyle=":", linewidth=1)
    ax.set_xlabel("trial")
    ax.set_ylabel("val_accuracy")
    ax.set_title("Tuning: score per trial")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


def hyperparameter_scores(
    values: Mapping[str, Sequence[object]], scores: Sequence[float]
) -> Figure:
    """One panel per hyperparameter: its value in each trial against that trial's score."""
    names = sorted(values)
    cols = min(4, max(1, len(names)))
    rows = -(-len(names) // cols) or 1
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, name in zip(axes.flat, names, strict=False):
        pairs = [(v, s) for v, s in zip(values[name], scores, strict=True) if v is not None]
        if pairs and all(isinstance(v, int | float) and not isinstance(v, bool) for v, _ in pairs):
            ax.plot([v for v, _ in pairs], [s for _, s in pairs], "o")
            if name.endswith("learning_rate"):
                ax.set_xscale("log")
        else:
            labels = sorted({str(v) for v, _ in pairs})
            ax.plot([labels.index(str(v)) for v, _ in pairs], [s for _, s in pairs], "o")
            ax.set_xticks(range(len(labels)), labels)
        ax.set_title(name, fontsize=9)
        ax.set_ylabel("val_accuracy", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(names) :]:
        ax.set_axis_off()
    fig.tight_layout()
    return fig


def digit_gallery(
    images: np.ndarray,
    true: Sequence[int],
    predicted: Sequence[int],
    confidence: Sequence[float],
    title: str,
    columns: int = 8,
) -> Figure:
    """Digits with their true label, prediction and confidence; green right, red wrong."""
    count = len(images)
    rows = max(1, -(-count // columns))
    fig, axes = plt.subplots(
        rows, columns, figsize=(1.4 * columns, 1.6 * rows + 0.6), squeeze=False
    )
    for i, ax in enumerate(axes.flat):
        ax.set_axis_off()
        if i >= count:
            continue
        ax.imshow(images[i], cmap="gray_r")
        ax.set_title(
            f"true {true[i]} pred {predicted[i]}\n{confidence[i]:.0%}",
            fontsize=8,
            color=_RIGHT if true[i] == predicted[i] else _WRONG,
        )
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def reliability_diagram(calibrations: Mapping[str, Calibration]) -> Figure:
    """Accuracy against mean confidence per confidence bin, one line per model.

    Points below the diagonal are overconfident bins. The lower panel shows how many images
    fall in each bin, which says how much each point can be trusted.
    """
    fig, (curve_ax, count_ax) = plt.subplots(
        2, 1, figsize=(6, 7), sharex=True, gridspec_kw={"height_ratios": [3, 1]}
    )
    curve_ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="perfectly calibrated")
    for name, result in calibrations.items():
        confidence = [row["confidence"] for row in result.bins]
        curve_ax.plot(
            confidence,
            [row["accuracy"] for row in result.bins],
            marker="o",
            label=f"{name} (ECE {result.ece:.4f})",
        )
        count_ax.plot(confidence, [row["count"] for row in result.bins], marker="o", label=name)
    curve_ax.set_ylabel("accuracy")
    curve_ax.set_title("Reliability diagram")
    curve_ax.grid(alpha=0.3)
    curve_ax.legend()
    count_ax.set_yscale("log")
    count_ax.set_xlabel("confidence")
    count_ax.set_ylabel("images")
    count_ax.grid(alpha=0.3)
    fig.tight_layout()
    return fig


def robustness_bars(accuracies: Mapping[str, Mapping[str, float]]) -> Figure:
    """Accuracy of each model (one bar colour each) on each test set (one group of bars per
    row, top to bottom in the given order)."""
    conditions = list(next(iter(accuracies.values())))
    height = 0.8 / len(accuracies)
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(conditions) * len(accuracies) + 1.5))
    for i, (name, by_condition) in enumerate(accuracies.items()):
        positions = np.arange(len(conditions)) + (i - (len(accuracies) - 1) / 2) * height
        bars = ax.barh(positions, [by_condition[c] for c in conditions], height, label=name)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    ax.set_yticks(range(len(conditions)), conditions)
    ax.invert_yaxis()  # the first test set on top
    ax.set_xlim(0, 1.1)
    ax.set_xlabel("accuracy")
    ax.set_ylabel("test set")
    ax.set_title("Robustness: accuracy on corrupted copies of the test set")
    ax.grid(alpha=0.3, axis="x")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def image_rows(
    rows: Mapping[str, np.ndarray], title: str, column_titles: Sequence[str] = ()
) -> Figure:
    """One row of uint8 images per entry (e.g. one digit clean and under each corruption), with
    optional titles over the columns. Every image spans the same 0..255 grey scale, so a
    brighter background shows as one."""
    columns = max(len(images) for images in rows.values())
    fig, axes = plt.subplots(
        len(rows), columns, figsize=(1.1 * columns + 1, 1.2 * len(rows) + 0.5), squeeze=False
    )
    for ax_row, (name, images) in zip(axes, rows.items(), strict=True):
        for ax, image in zip(ax_row, images, strict=False):
            ax.imshow(image, cmap="gray_r", vmin=0, vmax=255)
        for ax in ax_row:
            ax.set_xticks([])
            ax.set_yticks([])
            ax.spines[:].set_visible(False)
        ax_row[0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=9)
    for ax, column_title in zip(axes[0], column_titles, strict=False):
        ax.set_title(column_title, fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def feature_maps(
    images: np.ndarray,
    activations: Mapping[str, np.ndarray],
    labels: Sequence[Any],
    title: str,
    channels: int = 6,
) -> Figure:
    """Each input image beside the first `channels` feature maps of each layer, one row each."""
    shown = {name: min(channels, maps.shape[-1]) for name, maps in activations.items()}
    columns = 1 + sum(shown.values())
    fig, axes = plt.subplots(
        len(images), columns, figsize=(1.0 * columns, 1.05 * len(images) + 0.6), squeeze=False
    )
    for row, image in enumerate(images):
        axes[row, 0].imshow(image, cmap="gray_r")
        axes[row, 0].set_ylabel(str(labels[row]), rotation=0, ha="right", va="center")
        col = 1
        for name, maps in activations.items():
            for channel in range(shown[name]):
                axes[row, col].imshow(maps[row, :, :, channel], cmap="viridis")
                if row == 0:
                    axes[0, col].set_title(f"{name}\n#{channel}", fontsize=7)
                col += 1
    axes[0, 0].set_title("input", fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(title)
    fig.tight_layout()
    return fig
