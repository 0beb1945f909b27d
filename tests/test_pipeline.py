"""The real `dvc repro` on a copy of the repository with the CI profile, against a throwaway
sqlite MLflow store; every claim is checked through the MLflow client."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import mlflow
import pytest
import yaml
from mlflow.tracking import MlflowClient
from support import REPO_ROOT, merged_params

pytestmark = pytest.mark.slow

STAGES = ("prepare", "baseline", "tune", "retrain", "evaluate")


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, check=True, capture_output=True, text=True
    ).stdout.strip()


def _ci_repository(root: Path) -> Path:
    """A git repository at `root` holding this project's files, the CI profile as params.yaml."""
    files = _git(REPO_ROOT, "ls-files", "--cached", "--others", "--exclude-standard").splitlines()
    for name in files:
        source = REPO_ROOT / name
        if source.is_file():
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    (root / "params.yaml").write_text(yaml.safe_dump(merged_params(), sort_keys=False))
    _git(root, "init", "-q")
    _commit(root, "ci")
    return root


def _commit(root: Path, message: str, *paths: str) -> None:
    _git(root, "add", *(paths or ("-A",)))
    author = ("-c", "user.name=test", "-c", "user.email=test@example.com")
    _git(root, *author, "commit", "-qm", message)


def _pipeline_env(root: Path, uri: str, mnist_dir: Path, **extra: str) -> dict:
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(root / "src"),  # the copy's code, not the editable install's
        "MLFLOW_TRACKING_URI": uri,
        "MNIST_DIR": str(mnist_dir),
        **extra,
    }
    env.pop("MLFLOW_RUN_ID", None)
    env.pop("PIPELINE_RUN_ID", None)
    return env


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path) -> dict:
    """The CI-profile pipeline, run once, against a throwaway sqlite store."""
    base = tmp_path_factory.mktemp("pipeline")
    root = _ci_repository(base / "repo")
    uri = f"sqlite:///{base / 'store' / 'mlflow.db'}"
    (base / "store").mkdir()
    env = _pipeline_env(root, uri, mnist_dir)
    _repro(root, env)
    return {"root": root, "env": env, "uri": uri}


@pytest.fixture(scope="module")
def server_project(
    tmp_path_factory: pytest.TempPathFactory, mnist_dir: Path, tracking_server: dict
) -> dict:
    """The CI-profile pipeline, run once, against a tracking server on PostgreSQL, with system
    metrics sampled every second (a CI stage lasts seconds; MLflow's default samples every 10)."""
    root = _ci_repository(tmp_path_factory.mktemp("server-pipeline") / "repo")
    env = _pipeline_env(
        root,
        tracking_server["url"],
        mnist_dir,
        MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING="true",
        MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL="1",
    )
    _repro(root, env)
    return {"root": root, "env": env, "uri": tracking_server["url"], "server": tracking_server}


def _dvc(root: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(["dvc", *args], cwd=root, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    return result


def _repro(root: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    return _dvc(root, env, "repro", *args)


CI_PARAMS = merged_params()
CI = CI_PARAMS["mlflow"]
# In git beside dvc.lock (cache: false), not in DVC's cache.
METRICS_FILES = ("evaluation/metrics.json", "evaluation/export.json", "tuning/metrics.json")
# The prepared splits each stage logs as its MLflow input datasets, with their contexts.
STAGE_INPUTS = {
    "prepare": {("train", "output"), ("val", "output"), ("test", "output")},
    "baseline": {("train", "training"), ("val", "validation")},
    "tune": {("train", "training"), ("val", "validation")},
    "retrain": {("train", "training"), ("val", "training")},
    "evaluate": {("test", "test"), ("val", "quantization")},
}


def _runs(uri: str) -> list:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(CI["experiment"])
    return client.search_runs([experiment.experiment_id], max_results=1000)


@pytest.mark.parametrize("store", ["project", "server_project"], ids=["sqlite", "server"])
def test_pipeline_runs_are_tracked_as_described(store, request, tmp_path):
    project = request.getfixturevalue(store)
    client = MlflowClient(project["uri"])
    experiment = client.get_experiment_by_name(CI["experiment"])
    # A model-training experiment: MLflow 3's UI opens it on its runs, not on GenAI traces.
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = _runs(project["uri"])
    stage_runs = {r.info.run_name: r for r in runs if r.info.run_name in STAGES}
    assert sorted(stage_runs) == sorted(STAGES)
    commit = _git(project["root"], "rev-parse", "HEAD")
    pipeline_ids = {r.data.tags["pipeline_run_id"] for r in stage_runs.values()}
    assert len(pipeline_ids) == 1
    for name, run in stage_runs.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["git_commit"] == commit
        assert run.data.tags["dvc_stage"] == name
        assert run.data.params["seed"] == "42"
        assert _input_splits(run, project["root"]) == STAGE_INPUTS[name]

    prepare = stage_runs["prepare"]
    assert prepare.data.params["prepare.train_subset"] == "3000"
    assert prepare.data.metrics["train_size"] == 2500
    assert {"summary.json", "sample_grid.png"} <= _artifacts(client, prepare)

    baseline = stage_runs["baseline"]
    assert baseline.data.params["baseline.epochs"] == "1"
    for metric in ("loss", "accuracy", "val_loss", "val_accuracy"):
        assert len(client.get_metric_history(baseline.info.run_id, metric)) == 1
    assert {"training_curves.png", "config.json"} <= _artifacts(client, baseline)
    assert client.search_logged_models(
        experiment_ids=[baseline.info.experiment_id],
        filter_string=f"source_run_id = '{baseline.info.run_id}'",
    )

    tune = stage_runs["tune"]
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == tune.info.run_id]
    assert len(trials) == 3
    status = {t.data.tags["trial_status"]: t for t in trials if t.data.params["family"] == "cnn"}
    # The profile's one CNN draw costs more than tune.max_conv_mmacs: refused before training.
    assert list(status) == ["FAILED"]
    assert "exceeds tune.max_conv_mmacs" in status["FAILED"].data.tags["error"]
    assert not client.get_metric_history(status["FAILED"].info.run_id, "val_accuracy")
    completed = [t for t in trials if t.data.tags["trial_status"] == "COMPLETED"]
    assert len(completed) == 2 == tune.data.metrics["trials_completed"]
    assert tune.data.metrics["trials_failed"] == 1
    for trial in completed:
        assert client.get_metric_history(trial.info.run_id, "val_accuracy")
    assert all(t.data.tags["pipeline_run_id"] in pipeline_ids for t in trials)
    assert {"best_hparams.json", "trials.json", "score_per_trial.png"} <= _artifacts(client, tune)
    best = json.loads((project["root"] / "tuning/best_hparams.json").read_text())
    best_trial = client.get_run(tune.data.tags["best_trial_run_id"])
    assert best_trial.data.tags["mlflow.parentRunId"] == tune.info.run_id
    assert best_trial.data.tags["trial_id"] == best["trial_id"]

    retrain = stage_runs["retrain"]
    registered = json.loads((project["root"] / "models/tuned/registered.json").read_text())
    version = client.get_model_version(CI["registered_model"], registered["version"])
    assert version.run_id == retrain.info.run_id
    config = json.loads((project["root"] / "models/tuned/config.json").read_text())
    ensemble = CI_PARAMS["retrain"]["ensemble_size"]
    assert len(set(config["member_seeds"])) == ensemble == 2
    history = json.loads((project["root"] / "models/tuned/history.json").read_text())
    assert [row["member"] for row in history] == [0, 1]
    # The saved model averages over shifted copies (retrain.test_time_shift) of the ensemble.
    assert config["fit"]["test_time_shift"] == CI_PARAMS["retrain"]["test_time_shift"] == 1
    with zipfile.ZipFile(project["root"] / "models/tuned/model.keras") as saved:
        layers = json.loads(saved.read("config.json"))["config"]["layers"]
    names = [layer["config"]["name"] for layer in layers]
    assert {"classifier", "shift_up", "shift_down", "shift_left", "shift_right"} <= set(names)
    classifier = next(layer for layer in layers if layer["config"]["name"] == "classifier")
    assert [m["config"]["name"] for m in classifier["config"]["layers"]][1:3] == [
        "member_0",
        "member_1",
    ]
    # The members' epochs continue one axis in MLflow too: steps 0 and 1, not 0 twice.
    steps = [m.step for m in client.get_metric_history(retrain.info.run_id, "accuracy")]
    assert sorted(steps) == [0, 1]

    evaluate = stage_runs["evaluate"]
    metrics = json.loads((project["root"] / "evaluation/metrics.json").read_text())
    for name in ("baseline_test_accuracy", "tuned_test_accuracy", "baseline_test_loss"):
        assert evaluate.data.metrics[name] == pytest.approx(metrics[name])
    assert 0.5 < metrics["tuned_test_accuracy"] <= 1
    artifacts = _artifacts(client, evaluate, recursive=True)
    assert "tuned/confusion_matrix.json" in artifacts
    assert "figures/tuned_confusion_counts.png" in artifacts
    assert {"report/report.md", "export.json"} <= artifacts
    champion = client.get_model_version_by_alias(CI["registered_model"], "champion")
    assert str(champion.version) == registered["version"]
    assert float(champion.tags["test_accuracy"]) == pytest.approx(metrics["tuned_test_accuracy"])

    # What was logged comes back through the store: a report, and the champion model.
    report = mlflow.artifacts.download_artifacts(
        run_id=evaluate.info.run_id,
        artifact_path="report/report.md",
        tracking_uri=project["uri"],
        dst_path=str(tmp_path / "report"),
    )
    local_report = project["root"] / "reports/evaluate/report.md"
    assert Path(report).read_bytes() == local_report.read_bytes()
    # By the logged model's own location: a `models:/` URI would ignore tracking_uri=.
    logged_model = client.get_logged_model(champion.source.removeprefix("models:/"))
    model = mlflow.artifacts.download_artifacts(
        artifact_uri=logged_model.artifact_location,
        tracking_uri=project["uri"],
        dst_path=str(tmp_path / "champion"),
    )
    assert (Path(model) / "MLmodel").is_file()


def _input_splits(run, root: Path) -> set[tuple[str, str]]:
    """(split, context) of each dataset the run logged as input, after checking its digest is
    the one prepare wrote for that split."""
    digests = json.loads((root / "data/prepared/summary.json").read_text())["sha256"]
    found = set()
    for logged in run.inputs.dataset_inputs:
        split = logged.dataset.name.removeprefix("mnist-")
        tags = {tag.key: tag.value for tag in logged.tags}
        assert tags["sha256"] == digests[split]
        assert digests[split].startswith(logged.dataset.digest)
        assert json.loads(logged.dataset.source) == {"uri": f"data/prepared/{split}.npz"}
        found.add((split, tags["mlflow.data.context"]))
    return found


def _artifacts(client: MlflowClient, run, recursive: bool = False, path: str | None = None) -> set:
    found = set()
    for item in client.list_artifacts(run.info.run_id, path):
        found.add(item.path)
        if recursive and item.is_dir:
            found |= _artifacts(client, run, True, item.path)
    return found


def test_second_repro_does_nothing(project):
    before = len(_runs(project["uri"]))
    result = _repro(project["root"], project["env"])
    assert "Data and pipelines are up to date." in result.stdout
    assert len(_runs(project["uri"])) == before


def test_two_runs_of_the_pipeline_give_the_same_results(project, server_project):
    # Two independent runs (other folders, other stores, one sampling system metrics) of the
    # same code, params and data: the same search winner and the same metrics, to the last digit.
    for name in ("tuning/best_hparams.json", "evaluation/metrics.json"):
        first, second = (
            json.loads((p["root"] / name).read_text()) for p in (project, server_project)
        )
        assert first == second, name
    shown = _dvc(project["root"], project["env"], "metrics", "show", "--json")
    assert "tuned_test_accuracy" in shown.stdout


def test_experiment_with_another_tuner_is_compared_by_exp_show(project):
    root, env = project["root"], project["env"]
    result = subprocess.run(
        [
            "dvc",
            "exp",
            "run",
            "-n",
            "hyperband",
            "-S",
            "tune.tuner=hyperband",
            "-S",
            "tune.max_epochs=2",
        ],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    shown = subprocess.run(
        ["dvc", "exp", "show", "--json"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    experiments = [
        exp
        for commit in json.loads(shown.stdout)
        for exp in (commit.get("experiments") or [])
        if exp.get("name") == "hyperband"
    ]
    assert experiments, shown.stdout[:2000]
    # Every run the experiment made says so: the stages it reran and their trials.
    named = {
        r.info.run_name
        for r in _runs(project["uri"])
        if r.data.tags.get("dvc_experiment") == "hyperband"
    }
    assert {"tune", "retrain", "evaluate"} <= named
    assert any(name.startswith("trial_") for name in named)
    data = experiments[0]["revs"][0]["data"]
    assert data["params"]["params.yaml"]["data"]["tune"]["tuner"] == "hyperband"
    assert "tuned_test_accuracy" in data["metrics"]["evaluation/metrics.json"]["data"]
    assert data["metrics"]["tuning/metrics.json"]["data"]["trials"] >= 1


def test_the_server_stores_the_artifacts_clients_upload(server_project):
    client = MlflowClient(server_project["uri"])
    experiment = client.get_experiment_by_name(CI["experiment"])
    # Proxied: clients send artifacts to the server, which keeps them in its own folder.
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    evaluate = next(r for r in _runs(server_project["uri"]) if r.info.run_name == "evaluate")
    stored = server_project["server"]["state"].artifacts / experiment.experiment_id
    assert (stored / evaluate.info.run_id / "artifacts" / "report" / "report.md").is_file()
    root = server_project["root"]
    assert not (root / "mlflow.db").exists() and not (root / "mlartifacts").exists()


def test_system_metrics_are_logged_when_asked(server_project):
    runs = {r.info.run_name: r for r in _runs(server_project["uri"])}
    for stage in ("baseline", "retrain", "evaluate"):
        assert "system/cpu_utilization_percentage" in runs[stage].data.metrics, stage


def test_dvc_push_then_pull_in_a_fresh_clone_needs_no_training(server_project, tmp_path):
    root, env, uri = server_project["root"], server_project["env"], server_project["uri"]
    # The results go into git: dvc.lock and the metrics; every other output stays ignored.
    _commit(root, "results", "dvc.lock", *METRICS_FILES)
    assert _git(root, "status", "--porcelain") == ""
    _dvc(root, env, "remote", "add", "-d", "shared", str(tmp_path / "remote"))
    _commit(root, "shared DVC remote", ".dvc/config")
    _dvc(root, env, "push")

    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(root), str(clone))
    runs_before = len(_runs(uri))
    # Metrics come with git, before any pull.
    assert "tuned_test_accuracy" in _dvc(clone, env, "metrics", "show", "--json").stdout
    _dvc(clone, env, "pull")
    assert "Data and pipelines are up to date." in _dvc(clone, env, "status").stdout
    assert "Data and pipelines are up to date." in _repro(clone, env).stdout
    for name in (
        "data/prepared/train.npz",
        "models/baseline/model.keras",
        "models/tuned/model.keras",
        "models/tuned/registered.json",
        "evaluation/tables/per_digit_tuned.json",
        "evaluation/figures",
        "reports/evaluate/report.md",
    ):
        original, pulled = root / name, clone / name
        if original.is_dir():
            assert sorted(p.name for p in pulled.iterdir()) == sorted(
                p.name for p in original.iterdir()
            )
        else:
            assert pulled.read_bytes() == original.read_bytes(), name
    assert len(_runs(uri)) == runs_before  # no stage ran
