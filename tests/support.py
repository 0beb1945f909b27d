"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import keras
import mlflow
import numpy as np
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]


def merged_params(*overrides: dict) -> dict:
    """params.yaml with the CI profile (and any further overrides) merged over it, key by key."""
    raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    layers = [yaml.safe_load((REPO_ROOT / "profiles" / "ci.yaml").read_text()), *overrides]
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict):
                raw[key] = {**raw[key], **value}
            else:
                raw[key] = value
    return raw


def server_state_dir() -> Path:
    """An empty folder for a tracking server's state that the postgres user can enter (pytest's
    own temporary folders are private to the user running the tests, root in CI)."""
    root = Path(tempfile.mkdtemp(prefix="mlflow-server-"))
    root.chmod(0o755)
    return root


def register_small_champion(
    images: np.ndarray, labels: np.ndarray, store: Path, experiment: str, name: str
) -> tuple[keras.Model, str, str]:
    """Train the baseline CNN for one epoch on uint8 (images, labels) and register it, as the
    served model, as `name`@champion in a new sqlite store in `store`.

    Returns the model, the store's URI and the experiment id. MLflow's tracking URI is left on
    that store: callers restore it when they are done with it.
    """
    from mnist_mlops import registry
    from mnist_mlops.data import one_hot, to_model_input
    from mnist_mlops.models import BASELINE_ARCHITECTURE, build_model

    keras.utils.set_random_seed(0)
    model = build_model(**BASELINE_ARCHITECTURE, seed=0)
    model.fit(to_model_input(images), one_hot(labels), epochs=1, verbose=0)
    tracking_uri = f"sqlite:///{store / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    experiment_id = mlflow.create_experiment(
        experiment, artifact_location=(store / "mlartifacts").as_uri()
    )
    with mlflow.start_run(experiment_id=experiment_id):
        info = registry.log_serving_model(model, registered_model_name=name)
    mlflow.MlflowClient().set_registered_model_alias(
        name, registry.CHAMPION_ALIAS, info.registered_model_version
    )
    return model, tracking_uri, experiment_id
