"""The evaluate stage against a throwaway MLflow store: a whole run on tiny untrained models and a
few hundred synthetic digits, and the export's answer when no version holds the alias."""

from __future__ import annotations

import json
import re
from pathlib import Path

import mlflow
import numpy as np
import pytest
import yaml
from mlflow.tracking import MlflowClient
from support import merged_params

from mnist_mlops import export, registry
from mnist_mlops.data import load_split, save_split, to_model_input
from mnist_mlops.files import write_json
from mnist_mlops.models import build_model
from mnist_mlops.robustness import BENCHMARK
from mnist_mlops.stages import evaluate
from mnist_mlops.training import save_model

NAME = merged_params()["mlflow"]["registered_model"]


@pytest.fixture
def pipeline_outputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_store: str) -> dict:
    """What prepare, baseline and retrain leave behind, in a fresh working directory.

    The test labels are the tuned model's own predictions, so it scores 1.0 and passes the
    gate whatever its random weights.
    """
    monkeypatch.chdir(tmp_path)
    # A MNIST-C gate any model passes: switched on, to see it in the decision.
    overrides = {
        "evaluate": {"latency_images": 5, "gallery_size": 8, "champion_min_mnistc_accuracy": 0.01}
    }
    Path("params.yaml").write_text(yaml.safe_dump(merged_params(overrides)))
    rng = np.random.default_rng(0)
    images = (rng.random((300, 28, 28)) > 0.8).astype(np.uint8) * 255
    baseline = build_model(conv_filters=(4, 8), dense_units=(16,), padding="valid", seed=0)
    tuned = build_model(family="mlp", dense_units=(16,), seed=0)  # no conv: no feature maps
    labels = tuned.predict(to_model_input(images), verbose=0).argmax(axis=1).astype(np.uint8)
    save_split(Path("data/prepared/test.npz"), images, labels)
    save_split(Path("data/prepared/val.npz"), images[:40], labels[:40])
    write_json(
        Path("data/prepared/summary.json"), {"sha256": {"train": "a", "val": "b", "test": "c"}}
    )
    history = {"loss": [1.0, 0.8], "accuracy": [0.5, 0.6]}
    save_model(
        baseline,
        Path("models/baseline"),
        {},
        history | {"val_loss": [1.1, 0.9], "val_accuracy": [0.4, 0.5]},
    )
    config = {  # what retrain writes, in brief
        "seed": 42,
        "fit": merged_params()["retrain"],
        "tuned_from": {"hyperparameters": {"family": "mlp", "mlp_units_0": 16}},
    }
    save_model(tuned, Path("models/tuned"), config, history)

    client = MlflowClient()
    experiment = client.create_experiment("retrain-runs")
    run = client.create_run(experiment, tags={"git_commit": "abc123"})
    client.create_registered_model(NAME)
    version = client.create_model_version(NAME, source="models/tuned", run_id=run.info.run_id)
    registered = {"name": NAME, "version": str(version.version), "run_id": run.info.run_id}
    write_json(Path("models/tuned/registered.json"), registered)
    return registered


# The untrained models were saved before their optimizers built any state.
@pytest.mark.filterwarnings("ignore:Skipping variable loading for optimizer")
def test_evaluate_stage_writes_logs_and_promotes(pipeline_outputs, caplog):
    evaluate.main()
    registered = pipeline_outputs
    out = Path("evaluation")

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["tuned_test_accuracy"] == 1.0 and metrics["tuned_promoted"] is True
    assert 0 <= metrics["baseline_test_ece"] <= 1
    for model in ("baseline", "tuned"):
        accuracies = [metrics[f"{model}_mnistc_{name}_accuracy"] for name in BENCHMARK]
        assert all(0 <= accuracy <= 1 for accuracy in accuracies)
        assert metrics[f"{model}_mnistc_mean_accuracy"] == pytest.approx(np.mean(accuracies))
        assert metrics[f"{model}_mnistc_worst_accuracy"] == min(accuracies)
    exported = json.loads((out / "export.json").read_text())
    assert exported["exported"] and exported["version"] == registered["version"]
    assert (out / "export" / exported["file"]).stat().st_size == exported["tflite_bytes"]
    assert exported["tflite_accuracy"] > 0.9

    figures = {p.name for p in (out / "figures").iterdir()}
    assert "baseline_feature_maps.png" in figures and "tuned_feature_maps.png" not in figures
    assert {"reliability_diagram.png", "mnistc_accuracy.png", "mnistc_gallery.png"} <= figures
    confusion = json.loads((out / "plots" / "confusion_tuned.json").read_text())
    assert len(confusion) == 300 and set(confusion[0]) == {"actual", "predicted"}
    mnistc_plot = json.loads((out / "plots" / "mnistc_tuned.json").read_text())
    assert [row["test_set"] for row in mnistc_plot] == ["clean", *BENCHMARK]

    report = Path("reports/evaluate/report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", report)
    assert len(links) == len(figures)
    assert all((Path("reports/evaluate") / link).is_file() for link in links)
    assert "the tuned model has no convolutional layer" in report
    assert "corrupted sets: generated from the test set with seed 42" in report
    assert "| worst corruption |" in report
    assert "| mnistc_mean_accuracy |" in report and "| mnistc_fog_accuracy |" not in report

    client = MlflowClient()
    version = client.get_model_version_by_alias(NAME, "champion")
    assert str(version.version) == registered["version"]
    tags = version.tags
    assert float(tags["test_accuracy"]) == 1.0 and tags["git_commit"] == "abc123"
    assert tags["data_sha256.test"] == "c" and tags["hparams.family"] == "mlp"
    assert tags["params.retrain.epochs"] == "1" and "promoted" in tags["champion_gate"]
    mnistc_mean = metrics["tuned_mnistc_mean_accuracy"]
    assert (
        f"mean MNIST-C accuracy {mnistc_mean:.4f} reaches the MNIST-C gate 0.0100"
        in (tags["champion_gate"])
    )

    run = client.search_runs(
        [client.get_experiment_by_name(merged_params()["mlflow"]["experiment"]).experiment_id],
        "tags.stage = 'evaluate'",
    )[0]
    assert run.data.metrics["tuned_test_accuracy"] == 1.0
    assert run.data.metrics["tuned_mnistc_mean_accuracy"] == metrics["tuned_mnistc_mean_accuracy"]
    assert run.data.tags["mnistc_source"] == "generated from the test set with seed 42"
    assert float(tags["test_mnistc_mean_accuracy"]) == metrics["tuned_mnistc_mean_accuracy"]
    assert run.data.metrics["export_tflite_accuracy"] == exported["tflite_accuracy"]
    logged = {a.path for a in client.list_artifacts(run.info.run_id, "figures")}
    assert logged == {f"figures/{name}" for name in figures}
    report_files = {a.path for a in client.list_artifacts(run.info.run_id, "report")}
    assert "report/report.md" in report_files
    assert "promoted to @champion" in caplog.text


def write_published_mnistc(directory: Path, broken: str) -> None:
    """MNIST-C's released layout for the 15 corruptions, each holding the clean test digits;
    `broken` gets no images file."""
    images, labels = load_split(Path("data/prepared/test.npz"))
    for name in BENCHMARK:
        (directory / name).mkdir(parents=True)
        np.save(directory / name / "test_labels.npy", labels.astype(np.int64))
        if name != broken:
            np.save(directory / name / "test_images.npy", images[..., None])


def test_a_broken_mnistc_dir_stops_evaluate_with_one_line(pipeline_outputs, monkeypatch, caplog):
    write_published_mnistc(Path("published"), broken="zigzag")
    monkeypatch.setenv("MNISTC_DIR", "published")
    with pytest.raises(SystemExit) as stopped:
        evaluate.main()
    assert stopped.value.code == 1
    missing = Path.cwd() / "published" / "zigzag" / "test_images.npy"
    assert caplog.records[-1].getMessage() == (
        f"MNISTC_DIR: {missing}: not found (expected the published layout "
        "<dir>/<corruption>/test_images.npy and test_labels.npy)"
    )
    assert not Path("evaluation/metrics.json").exists()


def test_no_champion_means_no_export_and_says_why(mlflow_store, ci_params, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    decision = registry.champion_gate(
        "1", 0.4, 0.3, 0.5, current=None, mnistc_accuracy=0.2, min_mnistc_accuracy=0.0
    )
    registered = {"name": NAME, "version": "1"}
    with mlflow.start_run():
        summary = export.export_champion(
            decision, registered, None, None, None, ci_params.evaluate, Path("evaluation")
        )
    assert summary == {"exported": False, "reason": f"no version of {NAME} holds @champion"}
    assert json.loads(Path("evaluation/export.json").read_text()) == summary
    assert list(Path("evaluation/export").iterdir()) == []  # still there: a DVC output
