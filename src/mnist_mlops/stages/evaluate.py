"""evaluate: the first and only look at the test set, for the baseline and the tuned model.

Reads: data/prepared/{test,val}.npz and summary.json, models/{baseline,tuned}/model.keras and
history.json, models/tuned/{config,registered}.json.
Writes, and logs to the stage's MLflow run:
  evaluation/metrics.json   dvc metrics: test scores, calibration, robustness, the gate
  evaluation/export.json    dvc metrics: the quantised export against Keras (kept apart: its
                            latencies vary from run to run, and metrics.json must not)
  evaluation/plots/         data of the `dvc plots` defined at the end of dvc.yaml
  evaluation/figures/       static PNGs (`dvc plots show` embeds them: no CDN needed)
  evaluation/tables/        per-digit report, confused pairs, misclassified digits
  evaluation/export/        the champion's quantised TFLite file
  reports/evaluate/         report.md, with its figures beside it
Moves the registry alias `champion` to the tuned model version when it earns it.
"""

from __future__ import annotations

import shutil
import sys
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import matplotlib.pyplot as plt
import mlflow
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnist_mlops import evaluation, export, plots, robustness, serving
from mnist_mlops.config import Params, load_params
from mnist_mlops.data import load_split
from mnist_mlops.errors import PipelineError, exit_on_pipeline_error
from mnist_mlops.report import Report
from mnist_mlops.tracking import flatten, stage_run, tracking_uri
from mnist_mlops.training import read_json, to_model_input, write_json

STAGE = "evaluate"
PREPARED_DIR = Path("data/prepared")
MODELS_DIR = Path("models")
OUT_DIR = Path("evaluation")
REPORT_DIR = Path("reports/evaluate")
PRODUCERS = {"baseline": "baseline", "tuned": "retrain"}  # model -> the stage that trains it
TOP_PAIRS = 10
SAMPLE_DIGITS = 32  # the first test digits, shown with their predictions
FEATURE_MAP_LAYERS = 2
PREDICT_BATCH = 1000


@dataclass
class Figures:
    """Saves figures under evaluation/figures/, logs them, and remembers them for the report."""

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


@dataclass(frozen=True)
class ModelResult:
    """What the stage learned about one model on the test set."""

    name: str
    scores: dict[str, float]
    per_digit: list[dict[str, Any]]
    pairs: list[dict[str, Any]]
    calibration: evaluation.Calibration
    robustness: dict[str, float]  # test-set condition ("clean", "rotation", ..) -> accuracy
    feature_maps_note: str | None  # why there are no feature maps, when there are none

    def metrics(self) -> dict[str, float]:
        """Flat metric names, the same in metrics.json and MLflow."""
        return {
            **{f"{self.name}_test_{k}": v for k, v in self.scores.items()},
            f"{self.name}_test_ece": self.calibration.ece,
            **{
                f"{self.name}_robustness_{condition}_accuracy": value
                for condition, value in self.robustness.items()
                if condition != "clean"
            },
        }


def analyse(
    name: str,
    model: keras.Model,
    test: tuple[np.ndarray, np.ndarray],
    corrupted: dict[str, np.ndarray],
    history: list[dict[str, float]],
    params: Params,
    figures: Figures,
) -> ModelResult:
    """Score one model on the test set and its corrupted copies; draw, write and log it all."""
    images, labels = test
    probabilities = _predict(model, images)
    y_pred = probabilities.argmax(axis=1)
    matrix = evaluation.confusion(labels, y_pred)
    mistakes = evaluation.misclassified(labels, probabilities, params.evaluate.gallery_size)
    per_digit = evaluation.per_digit_report(labels, y_pred)
    pairs = evaluation.confused_pairs(matrix, TOP_PAIRS)
    calibration = evaluation.calibration(labels, probabilities, params.evaluate.calibration_bins)
    accuracies = {"clean": evaluation.accuracy(labels, probabilities)} | {
        kind: evaluation.accuracy(labels, _predict(model, copy)) for kind, copy in corrupted.items()
    }

    plot_data = {
        f"confusion_{name}": [
            {"actual": int(a), "predicted": int(p)} for a, p in zip(labels, y_pred, strict=True)
        ],
        f"per_digit_{name}": per_digit,
        f"calibration_{name}": calibration.bins,
        f"robustness_{name}": [{"condition": c, "accuracy": a} for c, a in accuracies.items()],
    }
    for file_name, rows in plot_data.items():
        write_json(OUT_DIR / "plots" / f"{file_name}.json", rows)
        mlflow.log_artifact(str(OUT_DIR / "plots" / f"{file_name}.json"), "plots")
    tables = {
        f"per_digit_{name}": per_digit,
        f"confused_pairs_{name}": pairs,
        f"misclassified_{name}": mistakes,
    }
    for table_name, rows in tables.items():
        write_json(OUT_DIR / "tables" / f"{table_name}.json", rows)
        mlflow.log_table(pd.DataFrame(rows), f"tables/{table_name}.json")
    mlflow.log_dict(
        {"labels": list(range(10)), "matrix": matrix.tolist()}, f"{name}/confusion_matrix.json"
    )
    mlflow.log_metrics({f"{name}_test_f1_digit_{row['digit']}": row["f1"] for row in per_digit})

    _draw(name, test, probabilities, matrix, mistakes, history, figures)
    return ModelResult(
        name=name,
        scores=evaluation.scores(labels, probabilities),
        per_digit=per_digit,
        pairs=pairs,
        calibration=calibration,
        robustness=accuracies,
        feature_maps_note=_draw_feature_maps(name, model, test, figures),
    )


def _draw(
    name: str,
    test: tuple[np.ndarray, np.ndarray],
    probabilities: np.ndarray,
    matrix: np.ndarray,
    mistakes: list[dict[str, Any]],
    history: list[dict[str, float]],
    figures: Figures,
) -> None:
    images, labels = test
    for normalize, kind in ((False, "counts"), (True, "normalised")):
        figures.add(
            plots.confusion_heatmap(
                matrix, f"{name} model: test confusion matrix ({kind})", normalize=normalize
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
    figures.add(
        plots.training_curves(_columns(history), f"{name} model: training curves"),
        f"{name}_training_curves",
        f"{name}: loss and accuracy per epoch",
    )


def _draw_feature_maps(
    name: str, model: keras.Model, test: tuple[np.ndarray, np.ndarray], figures: Figures
) -> str | None:
    """Draw the first conv layers' activations; without conv layers, say why there are none."""
    images, labels = test
    picks = evaluation.first_of_each_digit(labels)
    activations = evaluation.conv_activations(
        model, to_model_input(images[picks]), FEATURE_MAP_LAYERS
    )
    if not activations:
        note = f"the {name} model has no convolutional layer: no feature maps"
        print(f"[{STAGE}] {note}", file=sys.stderr)
        return note
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
    return None


def compare(
    results: list[ModelResult],
    test_images: np.ndarray,
    corrupted: dict[str, np.ndarray],
    picks: np.ndarray,
    figures: Figures,
) -> None:
    """The figures that put the models side by side."""
    figures.add(
        plots.reliability_diagram({r.name: r.calibration for r in results}),
        "reliability_diagram",
        "Reliability diagram: accuracy against confidence (below the diagonal: overconfident)",
    )
    figures.add(
        plots.robustness_bars({r.name: r.robustness for r in results}),
        "robustness",
        "Accuracy on the clean test set and on its deterministic corrupted copies",
    )
    figures.add(
        plots.image_rows(
            {"clean": test_images[picks], **{k: v[picks] for k, v in corrupted.items()}},
            "The corrupted test sets: one digit of each class",
        ),
        "corruption_examples",
        "What each corruption does to the same digits",
    )


def current_champion(client: MlflowClient, name: str) -> evaluation.Champion | None:
    """The version of `name` that holds `champion` now, if any."""
    version = client.get_registered_model(name).aliases.get(evaluation.CHAMPION_ALIAS)
    if version is None:
        return None
    accuracy = client.get_model_version(name, version).tags.get("test_accuracy")
    return evaluation.Champion(str(version), float(accuracy) if accuracy else None)


def check_registered(client: MlflowClient, registered: dict[str, Any]) -> None:
    """Fail before any work when registered.json names a version the store does not hold."""
    try:
        client.get_model_version(registered["name"], registered["version"])
    except MlflowException:
        raise PipelineError(
            f"models/tuned/registered.json names {registered['name']} "
            f"v{registered['version']}, which the MLflow store at {tracking_uri()} does not "
            "hold (a different or reset store?); re-register with `dvc repro -f retrain`"
        ) from None


def apply_champion_gate(
    client: MlflowClient,
    name: str,
    version: str,
    accuracy: float,
    baseline_accuracy: float,
    min_accuracy: float,
) -> evaluation.GateDecision:
    """Decide who holds `champion` after version `version` was evaluated, and move the alias."""
    current = current_champion(client, name)
    decision = evaluation.champion_gate(version, accuracy, baseline_accuracy, min_accuracy, current)
    holder = current.version if current else None
    if decision.champion is None and holder is not None:
        client.delete_registered_model_alias(name, evaluation.CHAMPION_ALIAS)
    elif decision.champion is not None and decision.champion != holder:
        client.set_registered_model_alias(name, evaluation.CHAMPION_ALIAS, decision.champion)
    return decision


def version_tags(
    params: Params,
    tuned: ModelResult,
    tuned_config: dict[str, Any],
    data_digests: dict[str, str],
    commit: str,
    decision: evaluation.GateDecision,
) -> dict[str, str]:
    """What a registry version carries: test results, code, params and data it was made from."""
    tags = {
        **{f"test_{k}": v for k, v in tuned.scores.items()},
        "test_ece": tuned.calibration.ece,
        "git_commit": commit,
        **{f"data_sha256.{split}": digest for split, digest in data_digests.items()},
        **flatten(
            "params",
            {
                "seed": params.seed,
                "prepare": params.section("prepare"),
                "retrain": params.section("retrain"),
            },
        ),
        **flatten("hparams", tuned_config["tuned_from"]["hyperparameters"]),
        "champion_gate": decision.reason,
    }
    return {key: str(value) for key, value in tags.items()}


def export_champion(
    decision: evaluation.GateDecision,
    registered: dict[str, Any],
    tuned_model: keras.Model,
    test: tuple[np.ndarray, np.ndarray],
    representative: np.ndarray,
    params: Params,
) -> dict[str, Any]:
    """Quantise whichever version holds `champion` and compare it with its Keras form.

    Returns what was exported and how it compares, or why nothing was; also written to
    evaluation/export.json and logged as MLflow metrics `export_*`.
    """
    reason = export.unavailable_reason()
    if reason is None and decision.champion is None:
        reason = f"no version of {registered['name']} holds @{evaluation.CHAMPION_ALIAS}"
    if reason is not None:
        summary: dict[str, Any] = {"exported": False, "reason": reason}
        print(f"[{STAGE}] no quantised export: {reason}", file=sys.stderr)
    else:
        version = decision.champion
        model = (
            tuned_model
            if version == registered["version"]
            else serving.load_keras_model(f"models:/{registered['name']}/{version}")
        )
        mode = params.evaluate.quantization
        flatbuffer = export.quantize(model, mode, to_model_input(representative))
        path = OUT_DIR / "export" / f"{registered['name']}-v{version}-{mode}.tflite"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(flatbuffer)
        mlflow.log_artifact(str(path), "export")
        comparison = export.compare(
            model,
            flatbuffer,
            to_model_input(test[0]),
            test[1],
            params.evaluate.latency_images,
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
    (OUT_DIR / "export").mkdir(parents=True, exist_ok=True)  # a DVC output, even when empty
    write_json(OUT_DIR / "export.json", summary)
    mlflow.log_dict(summary, "export.json")
    return summary


def build_report(
    results: list[ModelResult],
    decision: evaluation.GateDecision,
    exported: dict[str, Any],
    registered: dict[str, Any],
    run_info: dict[str, str],
    figures: Figures,
) -> Report:
    """The page a person reads after a run: the numbers first, then every figure."""
    names = [r.name for r in results]
    report = Report(
        f"Evaluation: {registered['name']} v{registered['version']} against the baseline"
    )
    report.text(" · ".join(f"{k}: `{v}`" for k, v in run_info.items()))
    report.heading("Test-set summary")
    keys = [key.removeprefix(f"{names[0]}_") for key in results[0].metrics()]
    report.table(
        [
            {"metric": key, **{r.name: r.metrics()[f"{r.name}_{key}"] for r in results}}
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
    for result in results:
        figures.link(report, f"{result.name}_confusion_counts")
        figures.link(report, f"{result.name}_confusion_normalised")
        report.text(f"{result.name}: most confused pairs (both directions counted)")
        report.table(result.pairs, ["pair", "a_as_b", "b_as_a", "total"])
    report.heading("Per-digit report")
    report.table(
        [
            {
                "digit": row["digit"],
                "support": row["support"],
                **{
                    f"{r.name} {metric}": r.per_digit[i][metric]
                    for r in results
                    for metric in ("precision", "recall", "f1")
                },
            }
            for i, row in enumerate(results[0].per_digit)
        ]
    )
    report.heading("Mistakes and sample predictions")
    for name in names:
        figures.link(report, f"{name}_misclassified")
        figures.link(report, f"{name}_predictions")
    report.heading("Calibration")
    report.text(", ".join(f"{r.name} ECE {r.calibration.ece:.4f}" for r in results) + ".")
    figures.link(report, "reliability_diagram")
    report.heading("Robustness")
    report.table(
        [
            {"test set": condition, **{r.name: r.robustness[condition] for r in results}}
            for condition in results[0].robustness
        ]
    )
    figures.link(report, "robustness")
    figures.link(report, "corruption_examples")
    report.heading("Feature maps")
    for result in results:
        if result.feature_maps_note:
            report.text(f"_{result.feature_maps_note}._")
        else:
            figures.link(report, f"{result.name}_feature_maps")
    return report


def run(
    params: Params,
    registered: dict[str, Any],
    tuned_config: dict[str, Any],
    data_digests: dict[str, str],
    run_info: dict[str, str],
) -> tuple[dict[str, Any], evaluation.GateDecision]:
    """Everything evaluate does inside its MLflow run; returns metrics.json and the decision."""
    client = MlflowClient()
    check_registered(client, registered)
    shutil.rmtree(OUT_DIR, ignore_errors=True)  # no figure of an earlier run may linger
    test = load_split(PREPARED_DIR / "test.npz")
    val_images, _ = load_split(PREPARED_DIR / "val.npz")
    severities = {
        "rotation": params.evaluate.rotation_degrees,
        "shift": params.evaluate.shift_pixels,
        "noise": params.evaluate.noise_std,
        "blur": params.evaluate.blur_radius,
    }
    corrupted = robustness.corrupted_sets(test[0], severities, params.seed)
    figures = Figures(OUT_DIR / "figures")
    models = {name: _load_model(name) for name in PRODUCERS}
    results = [
        analyse(
            name,
            model,
            test,
            corrupted,
            read_json(MODELS_DIR / name / "history.json", PRODUCERS[name]),
            params,
            figures,
        )
        for name, model in models.items()
    ]
    compare(results, test[0], corrupted, evaluation.first_of_each_digit(test[1]), figures)
    baseline, tuned = results
    decision = apply_champion_gate(
        client,
        registered["name"],
        registered["version"],
        tuned.scores["accuracy"],
        baseline.scores["accuracy"],
        params.evaluate.champion_min_accuracy,
    )
    commit = client.get_run(registered["run_id"]).data.tags.get("git_commit", "unknown")
    for key, value in version_tags(
        params, tuned, tuned_config, data_digests, commit, decision
    ).items():
        client.set_model_version_tag(registered["name"], registered["version"], key, value)
    mlflow.set_tag("champion_gate", decision.reason)

    exported = export_champion(decision, registered, models["tuned"], test, val_images, params)
    metrics: dict[str, Any] = {k: v for r in results for k, v in r.metrics().items()}
    metrics["tuned_promoted"] = decision.promoted
    write_json(OUT_DIR / "metrics.json", metrics)
    mlflow.log_metrics({k: float(v) for k, v in metrics.items()})

    build_report(results, decision, exported, registered, run_info, figures).write(REPORT_DIR)
    mlflow.log_artifacts(str(REPORT_DIR), "report")
    return metrics, decision


def _load_model(name: str) -> keras.Model:
    path = MODELS_DIR / name / "model.keras"
    if not path.is_file():
        raise PipelineError(
            f"{path}: not found; run the {PRODUCERS[name]} stage first "
            f"(dvc repro {PRODUCERS[name]})"
        )
    return keras.saving.load_model(path)


def _predict(model: keras.Model, images: np.ndarray) -> np.ndarray:
    return model.predict(to_model_input(images), batch_size=PREDICT_BATCH, verbose=0)


def _columns(history: list[dict[str, float]]) -> dict[str, list[float]]:
    """history.json's one-row-per-epoch layout -> one list per metric, as Keras returns it."""
    return {key: [row[key] for row in history] for key in history[0] if key != "epoch"}


@exit_on_pipeline_error(STAGE)
def main() -> None:
    params = load_params()
    registered = read_json(MODELS_DIR / "tuned" / "registered.json", "retrain")
    tuned_config = read_json(MODELS_DIR / "tuned" / "config.json", "retrain")
    data_digests = read_json(PREPARED_DIR / "summary.json", "prepare")["sha256"]
    with stage_run(STAGE, params, (STAGE,)) as active:
        run_info = {
            "MLflow run": active.info.run_id,
            "git commit": active.data.tags.get("git_commit", "unknown"),
            "pipeline run": active.data.tags.get("pipeline_run_id", "unknown"),
            "evaluated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        }
        metrics, decision = run(params, registered, tuned_config, data_digests, run_info)
    for name in PRODUCERS:
        print(
            f"[{STAGE}] {name} test accuracy {metrics[f'{name}_test_accuracy']:.4f}, "
            f"loss {metrics[f'{name}_test_loss']:.4f}, ECE {metrics[f'{name}_test_ece']:.4f}"
        )
    print(f"[{STAGE}] {decision.reason}")
    print(f"[{STAGE}] report: {REPORT_DIR / 'report.md'}")


if __name__ == "__main__":
    main()
