"""Shared fixtures: the real MNIST files, a throwaway MLflow store, a throwaway tracking server
on PostgreSQL, validated params."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from support import REPO_ROOT, merged_params, server_state_dir

from mnist_mlops import tracking_server as server
from mnist_mlops.config import Params, parse_params
from mnist_mlops.scoring_server import free_port


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The real MNIST IDX files: $MNIST_DIR, else ../shared/data/mnist beside the repo."""
    directory = Path(os.environ.get("MNIST_DIR", REPO_ROOT.parent / "shared" / "data" / "mnist"))
    if not (directory / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"real MNIST not found in {directory} (set MNIST_DIR)")
    return directory.resolve()


@pytest.fixture
def ci_params() -> Params:
    return parse_params(merged_params())


@pytest.fixture
def mlflow_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A fresh sqlite MLflow store under tmp_path, used by every MLflow call in the test."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(uri)
    # Artifacts under tmp_path too: the default experiment would put them in ./mlruns.
    experiment = mlflow.MlflowClient().create_experiment(
        "tests", artifact_location=(tmp_path / "artifacts").as_uri()
    )
    mlflow.set_experiment(experiment_id=experiment)
    yield uri
    while mlflow.active_run():
        mlflow.end_run()


@pytest.fixture(scope="session")
def tracking_server() -> Iterator[dict]:
    """A real `mlflow server` on a throwaway PostgreSQL cluster, as `make tracking-server` runs
    it, on a free loopback port: {"url": ..., "state": ServerState}. Stopped by PID after."""
    if server.postgres_bin_dir() is None:
        pytest.skip("PostgreSQL is not installed (no initdb): `make postgres` installs it")
    state = server.ServerState(server_state_dir())
    try:
        running = server.start(state, port=free_port())
        yield {"url": running.url, "state": state}
    finally:
        server.stop(state)
        shutil.rmtree(state.root, ignore_errors=True)
