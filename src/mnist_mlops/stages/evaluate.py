"""evaluate: the first and only look at the test set, for the baseline and the tuned model.

Reads: data/prepared/{test,val}.npz and summary.json, models/{baseline,tuned}/model.keras and
history.json, models/tuned/{config,registered}.json; with $MNISTC_DIR set, the published
MNIST-C test sets there (`<dir>/<corruption>/test_images.npy`, `test_labels.npy`) instead of
generating them (DVC does not track that folder: `dvc repro -f evaluate` after changing it).
Writes, and logs to the stage's MLflow run:
  evaluation/metrics.json   dvc metrics: test scores, calibration, MNIST-C accuracy, the gate
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

import logging
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import keras
import mlflow
import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from mnist_mlops import export, lineage, metrics, models, registry, report, robustness
from mnist_mlops.config import EvaluateParams, PrepareParams, load_params
from mnist_mlops.data import load_split, to_model_input
from mnist_mlops.errors import exit_on_pipeline_error
from mnist_mlops.files import read_json, write_json
from mnist_mlops.paths import ProjectPaths, project_root
from mnist_mlops.stage_process import single_stage_process
from mnist_mlops.tracking import stage_run

STAGE = "evaluate"
MODEL_NAMES = ("baseline", "tuned")  # models/<name>/, compared in this order
TOP_PAIRS = 10
FEATURE_MAP_LAYERS = 2
PREDICT_BATCH = 1000
log = logging.getLogger(STAGE)


def run(
    params: EvaluateParams,
    paths: ProjectPaths,
    *,
    seed: int,
    prepare_params: PrepareParams,
    run_info: dict[str, str],
    mnistc_dir: Path | None = None,
) -> tuple[dict[str, Any], registry.GateDecision]:
    """Everything evaluate does inside its MLflow run; returns metrics.json and the decision.

    `mnistc_dir`: the published MNIST-C files, used instead of generating the corruptions."""
    registered = read_json(paths.require(paths.registered))
    tuned_config = read_json(paths.require(paths.model_config("tuned")))
    data_digests = read_json(paths.require(paths.data_summary))["sha256"]
    client = MlflowClient()
    registry.check_registered(client, registered, paths.registered)
    shutil.rmtree(paths.evaluation, ignore_errors=True)  # no figure of an earlier run may linger
    test = load_split(paths.require(paths.split("test")))
    val_images, _ = load_split(paths.require(paths.split("val")))
    corrupted, mnistc_source = robustness.benchmark_sets(test, seed, mnistc_dir)
    mlflow.set_tag("mnistc_source", mnistc_source)
    figures = report.Figures(paths.evaluation / "figures")
    loaded = {name: _load_model(paths, name) for name in MODEL_NAMES}
    analyses = [
        _evaluate_model(name, model, test, corrupted, params, paths, figures)
        for name, model in loaded.items()
    ]
    report.draw_comparison(analyses, test, corrupted, figures)

    baseline, tuned = analyses
    name, version = registered["name"], registered["version"]
    decision = registry.apply_champion_gate(
        client,
        name,
        version,
        tuned.scores["accuracy"],
        baseline.scores["accuracy"],
        params.champion_min_accuracy,
        mnistc_accuracy=tuned.mnistc_mean,
        min_mnistc_accuracy=params.champion_min_mnistc_accuracy,
    )
    commit = client.get_run(registered["run_id"]).data.tags.get("git_commit", "unknown")
    test_metrics = {
        **tuned.scores,
        "ece": tuned.calibration.ece,
        "mnistc_mean_accuracy": tuned.mnistc_mean,
    }
    tags = registry.version_tags(
        test_metrics, tuned_config, prepare_params.model_dump(), data_digests, commit, decision
    )
    registry.tag_version(client, name, version, tags)
    mlflow.set_tag("champion_gate", decision.reason)

    exported = export.export_champion(
        decision, registered, loaded["tuned"], test, val_images, params, paths.evaluation
    )
    summary: dict[str, Any] = {k: v for a in analyses for k, v in a.metrics().items()}
    summary["tuned_promoted"] = decision.promoted
    write_json(paths.evaluation / "metrics.json", summary)
    mlflow.log_metrics({k: float(v) for k, v in summary.items()})

    page = report.evaluation_report(
        analyses, decision, exported, registered, run_info, mnistc_source, figures
    )
    page.write(paths.report)
    mlflow.log_artifacts(str(paths.report), "report")
    return summary, decision


def _evaluate_model(
    name: str,
    model: keras.Model,
    test: tuple[np.ndarray, np.ndarray],
    corrupted: dict[str, np.ndarray],
    params: EvaluateParams,
    paths: ProjectPaths,
    figures: report.Figures,
) -> metrics.ModelAnalysis:
    """Score one model on the test set and its corrupted copies; write, log and draw it."""
    images, labels = test
    analysis = metrics.analyse(
        name,
        labels,
        _predict(model, images),
        {kind: _predict(model, copy) for kind, copy in corrupted.items()},
        gallery_size=params.gallery_size,
        calibration_bins=params.calibration_bins,
        top_pairs=TOP_PAIRS,
    )
    _write_and_log(analysis, labels, paths.evaluation)
    picks = metrics.first_of_each_digit(labels)
    activations = models.conv_activations(model, to_model_input(images[picks]), FEATURE_MAP_LAYERS)
    if not activations:
        log.info("the %s model has no convolutional layer: no feature maps", name)
    history = read_json(paths.require(paths.model_history(name)))
    report.draw_model_figures(analysis, test, history, activations, figures)
    return analysis


def _write_and_log(analysis: metrics.ModelAnalysis, labels: np.ndarray, out_dir: Path) -> None:
    """One model's plot data (for `dvc plots`) and tables, as files and MLflow artifacts."""
    name = analysis.name
    predicted = analysis.probabilities.argmax(axis=1)
    plot_data = {
        f"confusion_{name}": [
            {"actual": int(a), "predicted": int(p)} for a, p in zip(labels, predicted, strict=True)
        ],
        f"per_digit_{name}": analysis.per_digit,
        f"calibration_{name}": analysis.calibration.bins,
        f"mnistc_{name}": [
            {"test_set": test_set, "accuracy": accuracy}
            for test_set, accuracy in report.robustness_rows(analysis).items()
        ],
    }
    for file_name, rows in plot_data.items():
        write_json(out_dir / "plots" / f"{file_name}.json", rows)
        mlflow.log_artifact(str(out_dir / "plots" / f"{file_name}.json"), "plots")
    tables = {
        f"per_digit_{name}": analysis.per_digit,
        f"confused_pairs_{name}": analysis.pairs,
        f"misclassified_{name}": analysis.mistakes,
    }
    for table_name, rows in tables.items():
        write_json(out_dir / "tables" / f"{table_name}.json", rows)
        mlflow.log_table(pd.DataFrame(rows), f"tables/{table_name}.json")
    mlflow.log_dict(
        {"labels": list(range(10)), "matrix": analysis.matrix.tolist()},
        f"{name}/confusion_matrix.json",
    )
    mlflow.log_metrics(
        {f"{name}_test_f1_digit_{row['digit']}": row["f1"] for row in analysis.per_digit}
    )


def _load_model(paths: ProjectPaths, name: str) -> keras.Model:
    return keras.saving.load_model(paths.require(paths.model_file(name)))


def _predict(model: keras.Model, images: np.ndarray) -> np.ndarray:
    return model.predict(to_model_input(images), batch_size=PREDICT_BATCH, verbose=0)


@exit_on_pipeline_error(STAGE)
@single_stage_process(STAGE)
def main() -> None:
    paths = ProjectPaths.cwd()
    params = load_params(paths.params)
    paths.require(paths.registered)  # before a run is opened for nothing
    mnistc_dir = os.environ.get("MNISTC_DIR")
    with stage_run(STAGE, params, (STAGE,)) as active:
        # val: the representative images of the int8 export's calibration.
        lineage.log_splits(paths, {"test": "test", "val": "quantization"})
        run_info = {
            "MLflow run": active.info.run_id,
            "git commit": active.data.tags.get("git_commit", "unknown"),
            "pipeline run": active.data.tags.get("pipeline_run_id", "unknown"),
            "evaluated": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        }
        summary, decision = run(
            params.evaluate,
            paths,
            seed=params.seed,
            prepare_params=params.prepare,
            run_info=run_info,
            # Relative to the repository, also when `dvc exp run --temp` runs us in a copy.
            mnistc_dir=project_root() / mnistc_dir if mnistc_dir else None,
        )
    for name in MODEL_NAMES:
        log.info(
            "%s test accuracy %.4f, loss %.4f, ECE %.4f, mean MNIST-C accuracy %.4f",
            name,
            summary[f"{name}_test_accuracy"],
            summary[f"{name}_test_loss"],
            summary[f"{name}_test_ece"],
            summary[f"{name}_mnistc_mean_accuracy"],
        )
    log.info("%s", decision.reason)
    log.info("report: %s", paths.report / report.REPORT_FILE)


if __name__ == "__main__":
    main()
