from pathlib import Path

import pytest
import yaml
from support import REPO_ROOT, merged_params

from mnist_mlops.config import ConfigError, load_params, parse_params


def test_repository_params_and_ci_profile_are_valid():
    params = load_params(REPO_ROOT / "params.yaml")
    assert params.tune.tuner in ("random", "hyperband", "bayesian")
    assert parse_params(merged_params()).prepare.train_subset == 3000


def test_unknown_key_is_named_with_a_suggestion():
    with pytest.raises(
        ConfigError, match=r"tune\.max_trails: unknown key \(did you mean 'max_trials'\?\)"
    ):
        raw = merged_params()
        raw["tune"]["max_trails"] = raw["tune"].pop("max_trials")
        parse_params(raw)


def test_missing_key_wrong_type_and_bad_choice_are_all_reported():
    raw = merged_params({"baseline": {"epochs": "three"}, "tune": {"tuner": "grid"}})
    del raw["retrain"]["augment"]
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    message = str(err.value)
    assert "baseline.epochs" in message and "'three'" in message
    assert "tune.tuner" in message and "'grid'" in message
    assert "retrain.augment: missing" in message


def test_unknown_section_and_non_positive_values():
    raw = merged_params({"prepare": {"val_size": 0}})
    raw["trian"] = {}
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert "trian: unknown key" in str(err.value)
    assert "prepare.val_size" in str(err.value)


def test_missing_and_malformed_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="not found"):
        load_params(tmp_path / "params.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    bad.write_text(yaml.safe_dump([1, 2]))
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_params(bad)
