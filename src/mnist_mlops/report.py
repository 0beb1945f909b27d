"""evaluate's report: the figures (saved, logged, captioned) and the one-page Markdown report
that links them.

`Figures` saves each figure once as a PNG under evaluation/figures/ and logs those bytes to
MLflow, so MLflow, `dvc plots` and the report show the same image. `Report.write` puts
`report.md` in a folder with copies of the figures beside it and links them by file name, so
the folder opens the same anywhere (a browser, an editor, MLflow's artifact view) without
network or the pipeline's other outputs. A figure whose file does not exist is named, not
linked, so the page never holds a broken link.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import mlflow
import numpy as np
from matplotlib.figure import Figure

from mnist_mlops import plots
from mnist_mlops.files import atomic_dir
from mnist_mlops.metrics import ModelAnalysis, first_of_each_digit
from mnist_mlops.registry import GateDecision

REPORT_FILE = "report.md"


class Report:
    """Markdown assembled section by section, then written once with `write`."""

    def __init__(self, title: str) -> None:
        self._parts: list[str | tuple[Path, str]] = [f"# {title}\n"]

    def heading(self, text: str) -> None:
        self._parts.append(f"## {text}\n")

    def text(self, text: str) -> None:
        self._parts.append(f"{text}\n")

    def table(
        self, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None
    ) -> None:
        """A Markdown table of `rows`; `columns` picks and orders them (default: row 1's keys)."""
        if not rows:
            self._parts.append("_(none)_\n")
            return
        columns = list(columns or rows[0])
        lines = [
            "| " + " | ".join(columns) + " |",
            "|" + "|".join("---" for _ in columns) + "|",
            *("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |" for row in rows),
        ]
        self._parts.append("\n".join(lines) + "\n")

    def figure(self, path: Path, caption: str) -> None:
        """Link the image at `path` (copied beside the page on `write`), if it exists by then."""
        taken = {part[0].name for part in self._parts if isinstance(part, tuple)}
        if path.name in taken:
            raise ValueError(f"two figures named {path.name}: their copies would overwrite")
        self._parts.append((path, caption))

    def write(self, directory: Path) -> Path:
        """Write the page and copies of its existing figures into `directory`, replacing it whole
        (never a half-written report)."""
        blocks = []
        with atomic_dir(directory) as staging:
            for part in self._parts:
                if isinstance(part, str):
                    blocks.append(part)
                    continue
                path, caption = part
                if path.is_file():
                    shutil.copy2(path, staging / path.name)
                    blocks.append(f"![{caption}]({path.name})\n\n_{caption}_\n")
                else:
                    blocks.append(f"_{caption}: not produced ({path.name} does not exist)._\n")
            (staging / REPORT_FILE).write_text("\n".join(blocks))
        return directory / REPORT_FILE


@dataclass
class Figures:
    """Saves figures under `directory`, logs them, and remembers their captions for the report."""

    directory: Path
    captions: dict[str, tuple[Path, str]] = field(default_factory=dict)

    def add(self, figure: Figure, name: str, caption: str) -> None:
        # The saved PNG is logged as is (mlflow.log_figure would render the figure a second
        # time), so MLflow, DVC and the report hold the same bytes.
        path = self.directory / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=100)
        plt.close(figure)
        mlflow.log_artifact(str(path), "figures")
        self.captions[name] = (path, caption)

    def link(self, report: Report, name: str) -> None:
        report.figure(*self.captions[name])


SAMPLE_DIGITS = 32  # the first test digits, shown with their predictions
GALLERY_DIGITS = 4  # the first test digit of classes 0-3, shown under every corruption


def draw_model_figures(
    analysis: ModelAnalysis,
    test: tuple[np.ndarray, np.ndarray],
    history: list[dict[str, float]],
    activations: dict[str, np.ndarray],
    figures: Figures,
) -> None:
    """One model's figures: confusion, mistakes, predictions, training curves, feature maps
    (`activations` of one test digit per class; none for a model without conv layers)."""
    name, probabilities, mistakes = analysis.name, analysis.probabilities, analysis.mistakes
    images, labels = test
    for normalize, kind in ((False, "counts"), (True, "normalised")):
        figures.add(
            plots.confusion_heatmap(
                analysis.matrix,
                f"{name} model: test confusion matrix ({kind})",
                normalize=normalize,
            ),
            f"{name}_confusion_{kind}",
            f"{name}: confusion matrix, {kind} (rows: true digit, columns: prediction)",
        )
    figures.add(
        plots.digit_gallery(
            images[[m["index"] for m in mistakes]],
            [m["true"] for m in mistakes],
            [m["predicted"] for m in mistakes],
            [m["confidence"] for m in mistakes],
            f"{name} model: the most confident mistakes",
        ),
        f"{name}_misclassified",
        f"{name}: misclassified test digits, the most confident mistakes first",
    )
    sample = slice(0, SAMPLE_DIGITS)
    figures.add(
        plots.digit_gallery(
            images[sample],
            labels[sample],
            probabilities[sample].argmax(axis=1),
            probabilities[sample].max(axis=1),
            f"{name} model: predictions on the first {SAMPLE_DIGITS} test digits",
        ),
        f"{name}_predictions",
        f"{name}: predicted against actual digit, the first {SAMPLE_DIGITS} test digits",
    )
    columns = {key: [row[key] for row in history] for key in history[0] if key != "epoch"}
    figures.add(
        plots.training_curves(columns, f"{name} model: training curves"),
        f"{name}_training_curves",
        f"{name}: loss and accuracy per epoch",
    )
    if activations:
        picks = first_of_each_digit(labels)
        figures.add(
            plots.feature_maps(
                images[picks],
                activations,
                [f"digit {d}" for d in labels[picks]],
                f"{name} model: first convolutional feature maps",
            ),
            f"{name}_feature_maps",
            f"{name}: activations of the first convolutional layers, one test digit per class",
        )


def draw_comparison(
    analyses: Sequence[ModelAnalysis],
    test: tuple[np.ndarray, np.ndarray],
    corrupted: Mapping[str, np.ndarray],
    figures: Figures,
) -> None:
    """The figures that put the models side by side, and what the corrupted test sets look like
    (`corrupted`: name -> the test images so corrupted)."""
    figures.add(
        plots.reliability_diagram({a.name: a.calibration for a in analyses}),
        "reliability_diagram",
        "Reliability diagram: accuracy against confidence (below the diagonal: overconfident)",
    )
    figures.add(
        plots.robustness_bars({a.name: robustness_rows(a) for a in analyses}),
        "mnistc_accuracy",
        "Accuracy on the clean test set and on each MNIST-C corruption of it",
    )
    images, labels = test
    columns = {"clean": images, **corrupted}
    figures.add(
        plots.image_rows(
            {
                f"digit {labels[i]}": np.stack([column[i] for column in columns.values()])
                for i in first_of_each_digit(labels)[:GALLERY_DIGITS]
            },
            "MNIST-C: the same test digits under each corruption",
            column_titles=list(columns),
        ),
        "mnistc_gallery",
        "What each MNIST-C corruption does to the same digits (one column per corruption)",
    )


def robustness_rows(analysis: ModelAnalysis) -> dict[str, float]:
    """Accuracy per test set: the clean one first, then each corruption (plot and table rows)."""
    return {"clean": analysis.scores["accuracy"], **analysis.mnistc}


def evaluation_report(
    analyses: Sequence[ModelAnalysis],
    decision: GateDecision,
    exported: Mapping[str, Any],
    registered: Mapping[str, Any],
    run_info: Mapping[str, str],
    mnistc_source: str,
    figures: Figures,
) -> Report:
    """The page a person reads after a run: the numbers first, then every figure.
    `mnistc_source` says where the corrupted test sets came from."""
    names = [a.name for a in analyses]
    report = Report(
        f"Evaluation: {registered['name']} v{registered['version']} against the baseline"
    )
    report.text(" · ".join(f"{k}: `{v}`" for k, v in run_info.items()))
    report.heading("Test-set summary")
    # The accuracy per MNIST-C corruption has a table of its own (Robustness); the mean and the
    # worst stay here.
    per_corruption = {f"mnistc_{name}_accuracy" for name in analyses[0].mnistc}
    keys = [key.removeprefix(f"{names[0]}_") for key in analyses[0].metrics()]
    keys = [key for key in keys if key not in per_corruption]
    report.table(
        [
            {"metric": key, **{a.name: a.metrics()[f"{a.name}_{key}"] for a in analyses}}
            for key in keys
        ]
    )
    report.heading("Champion gate")
    report.text(decision.reason)
    report.heading("Quantised export of the champion")
    if exported["exported"]:
        report.text(
            f"{exported['model']} v{exported['version']}, {exported['quantization']} TFLite "
            f"(`{exported['file']}`), on the whole test set; latency: median over single images."
        )
        report.table(
            [
                {
                    "form": form,
                    "test accuracy": exported[f"{prefix}_accuracy"],
                    "size (KiB)": exported[f"{prefix}_bytes"] / 1024,
                    "latency per image (ms)": exported[f"{prefix}_latency_ms"],
                }
                for form, prefix in (("Keras", "keras"), ("TFLite", "tflite"))
            ]
        )
        report.text(
            f"Both predict the same digit for {exported['agreement']:.2%} of the test digits."
        )
    else:
        report.text(f"Not exported: {exported['reason']}.")
    report.heading("Training curves")
    for name in names:
        figures.link(report, f"{name}_training_curves")
    report.heading("Confusion")
    for analysis in analyses:
        figures.link(report, f"{analysis.name}_confusion_counts")
        figures.link(report, f"{analysis.name}_confusion_normalised")
        report.text(f"{analysis.name}: most confused pairs (both directions counted)")
        report.table(analysis.pairs, ["pair", "a_as_b", "b_as_a", "total"])
    report.heading("Per-digit report")
    report.table(
        [
            {
                "digit": row["digit"],
                "support": row["support"],
                **{
                    f"{a.name} {metric}": a.per_digit[i][metric]
                    for a in analyses
                    for metric in ("precision", "recall", "f1")
                },
            }
            for i, row in enumerate(analyses[0].per_digit)
        ]
    )
    report.heading("Mistakes and sample predictions")
    for name in names:
        figures.link(report, f"{name}_misclassified")
        figures.link(report, f"{name}_predictions")
    report.heading("Calibration")
    report.text(", ".join(f"{a.name} ECE {a.calibration.ece:.4f}" for a in analyses) + ".")
    figures.link(report, "reliability_diagram")
    report.heading("Robustness: MNIST-C")
    report.text(
        f"Accuracy on the {len(analyses[0].mnistc)} corruptions of the MNIST-C benchmark "
        f"(Mu & Gilmer 2019) applied to the test set; corrupted sets: {mnistc_source}."
    )
    rows = {a.name: robustness_rows(a) for a in analyses}
    report.table(
        [
            {"test set": test_set, **{n: r[test_set] for n, r in rows.items()}}
            for test_set in rows[names[0]]
        ]
        + [
            {"test set": "mean over the corruptions", **{a.name: a.mnistc_mean for a in analyses}},
            {
                "test set": "worst corruption",
                **{a.name: f"{a.mnistc[a.mnistc_worst]:.4g} ({a.mnistc_worst})" for a in analyses},
            },
        ]
    )
    figures.link(report, "mnistc_accuracy")
    figures.link(report, "mnistc_gallery")
    report.heading("Feature maps")
    for name in names:
        if f"{name}_feature_maps" in figures.captions:
            figures.link(report, f"{name}_feature_maps")
        else:
            report.text(f"_the {name} model has no convolutional layer: no feature maps._")
    return report


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value).replace("|", "\\|")
