"""evaluate: the first and only look at the test set, for the baseline and the tuned model.

Reads: data/prepared/test.npz, models/{baseline,tuned}/model.keras, models/tuned/registered.json.
Writes: evaluation/metrics.json (dvc metrics), evaluation/confusion.json and per_digit.json
(dvc plots), evaluation/*.png. Sets the registry alias `champion` when the tuned model earns it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import keras
import mlflow
from matplotlib.figure import Figure
from mlflow.tracking import MlflowClient

from mnist_mlops import evaluation, plots
from mnist_mlops.config import Params, load_params
from mnist_mlops.data import load_split
from mnist_mlops.errors import exit_on_pipeline_error
from mnist_mlops.tracking import flatten, git_commit, stage_run
from mnist_mlops.training import read_json, to_model_input, write_json

STAGE = "evaluate"
PREPARED_DIR = Path("data/prepared")
MODELS_DIR = Path("models")
OUT_DIR = Path("evaluation")
MODELS = ("baseline", "tuned")


def run(params: Params, prepared_dir: Path, models_dir: Path, out_dir: Path) -> dict[str, Any]:
    """Score both models on the test set, write and log the analysis; return the metrics."""
    x_test, y_test = load_split(prepared_dir / "test.npz")
    inputs = to_model_input(x_test)
    metrics: dict[str, float] = {}
    for name in MODELS:
        model = keras.saving.load_model(models_dir / name / "model.keras")
        probabilities = model.predict(inputs, batch_size=1000, verbose=0)
        y_pred = probabilities.argmax(axis=1)
        metrics |= {
            f"{name}_test_{k}": v for k, v in evaluation.scores(y_test, probabilities).items()
        }
        matrix = evaluation.confusion(y_test, y_pred)
        per_digit = evaluation.per_digit_report(y_test, y_pred)
        mlflow.log_dict(
            {"labels": list(range(10)), "matrix": matrix.tolist()}, f"{name}/confusion_matrix.json"
        )
        mlflow.log_table(
            {k: [row[k] for row in per_digit] for k in per_digit[0]}, f"{name}/per_digit.json"
        )
        mlflow.log_metrics({f"{name}_test_f1_digit_{row['digit']}": row["f1"] for row in per_digit})
        figure = plots.confusion_heatmap(matrix, f"{name} model: test confusion matrix")
        _save_and_log(figure, out_dir / f"{name}_confusion_matrix.png")
        if name == "tuned":
            write_json(
                out_dir / "confusion.json",
                [
                    {"actual": int(a), "predicted": int(p)}
                    for a, p in zip(y_test, y_pred, strict=True)
                ],
            )
            write_json(out_dir / "per_digit.json", per_digit)
    write_json(out_dir / "metrics.json", metrics)
    mlflow.log_metrics(metrics)
    return metrics


def _save_and_log(figure: Figure, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    mlflow.log_artifact(str(path))


def apply_champion_gate(
    params: Params, metrics: dict[str, float], registered: dict[str, Any], data_digest: Any
) -> evaluation.GateDecision:
    """Tag the retrained model version with its results and alias it `champion` if it earns it."""
    client = MlflowClient()
    name, version = registered["name"], registered["version"]
    decision = evaluation.champion_gate(
        metrics["tuned_test_accuracy"],
        metrics["baseline_test_accuracy"],
        params.evaluate.champion_min_accuracy,
    )
    tags = {
        "test_accuracy": metrics["tuned_test_accuracy"],
        "test_loss": metrics["tuned_test_loss"],
        "git_commit": git_commit(),
        "data_sha256": data_digest,
        "champion_gate": decision.reason,
        **flatten("params", {"seed": params.seed, "retrain": params.section("retrain")}),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))
    if decision.promote:
        client.set_registered_model_alias(name, evaluation.CHAMPION_ALIAS, version)
    return decision


@exit_on_pipeline_error(STAGE)
def main() -> None:
    params = load_params()
    registered = read_json(MODELS_DIR / "tuned" / "registered.json", "retrain")
    data_digest = read_json(PREPARED_DIR / "summary.json", "prepare")["sha256"]
    with stage_run(STAGE, params, (STAGE,)):
        metrics = run(params, PREPARED_DIR, MODELS_DIR, OUT_DIR)
        decision = apply_champion_gate(params, metrics, registered, data_digest)
        mlflow.set_tag("champion_gate", decision.reason)
    for name in MODELS:
        print(
            f"[{STAGE}] {name} test accuracy {metrics[f'{name}_test_accuracy']:.4f}, "
            f"loss {metrics[f'{name}_test_loss']:.4f}"
        )
    verdict = "promoted to @champion" if decision.promote else "not promoted"
    print(f"[{STAGE}] {registered['name']} v{registered['version']} {verdict}: {decision.reason}")


if __name__ == "__main__":
    main()
