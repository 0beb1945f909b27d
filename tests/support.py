"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

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
