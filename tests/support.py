"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import tempfile
from pathlib import Path

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
