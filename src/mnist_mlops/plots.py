"""Figures. Each function returns a matplotlib Figure; callers decide where it goes."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # pipeline stages and servers have no display

import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.figure import Figure


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
    """Loss and accuracy per epoch, training and (when present) validation."""
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = np.arange(1, len(history["loss"]) + 1)
    for ax, metric in ((loss_ax, "loss"), (acc_ax, "accuracy")):
        ax.plot(epochs, history[metric], marker="o", label="train")
        if f"val_{metric}" in history:
            ax.plot(epochs, history[f"val_{metric}"], marker="o", label="validation")
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
