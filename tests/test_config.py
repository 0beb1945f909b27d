from pathlib import Path

import pytest
import yaml
from support import REPO_ROOT, merged_params

from mnist_mlops.config import ConfigError, load_params, parse_params


def problems_in(path: Path) -> list[str]:
    """The problem lines load_params reports for a params file (one line per problem)."""
    with pytest.raises(ConfigError) as err:
        load_params(path)
    header, *lines = str(err.value).splitlines()
    assert header == f"{path}: invalid parameters:"
    return [line.strip() for line in lines]


def write_params(tmp_path: Path, raw: dict) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


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


def test_a_search_needs_a_worker_and_a_positive_lease():
    raw = merged_params({"tune": {"workers": 0, "trial_lease_s": 0}})
    with pytest.raises(ConfigError) as err:
        parse_params(raw)
    assert "tune.workers" in str(err.value) and "tune.trial_lease_s" in str(err.value)


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


@pytest.mark.parametrize(
    ("section", "key", "value", "problem"),
    [
        ("tune", "epochs", "3", "tune.epochs: expected an integer, got '3' (a string)"),
        ("tune", "epochs", True, "tune.epochs: expected an integer, got true (a boolean)"),
        (
            "baseline",
            "epochs",
            3.0,
            "baseline.epochs: expected an integer, got 3.0 (a decimal number)",
        ),
        ("tune", "epochs", None, "tune.epochs: expected an integer, got null"),
        (
            "prepare",
            "train_subset",
            "3000",
            "prepare.train_subset: expected an integer or null, got '3000' (a string)",
        ),
        (
            "baseline",
            "learning_rate",
            "0.001",
            "baseline.learning_rate: expected a number, got '0.001' (a string)",
        ),
        (
            "tune",
            "max_conv_mmacs",
            True,
            "tune.max_conv_mmacs: expected a number or null, got true (a boolean)",
        ),
        ("tune", "augment", "no", "tune.augment: expected true or false, got 'no' (a string)"),
        ("retrain", "augment", 1, "retrain.augment: expected true or false, got 1 (an integer)"),
    ],
)
def test_values_of_the_wrong_type_are_refused_not_converted(
    tmp_path: Path, section: str, key: str, value: object, problem: str
):
    path = write_params(tmp_path, merged_params({section: {key: value}}))
    assert problems_in(path) == [problem]


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("baseline", "learning_rate", 1),
        ("tune", "max_conv_mmacs", 8),
        ("tune", "max_conv_mmacs", None),
        ("prepare", "train_subset", None),
        ("evaluate", "champion_min_mnistc_accuracy", 0),
    ],
)
def test_integers_count_as_numbers_and_null_stays_valid_where_allowed(
    tmp_path: Path, section: str, key: str, value: object
):
    params = load_params(write_params(tmp_path, merged_params({section: {key: value}})))
    assert getattr(getattr(params, section), key) == value


def test_an_exponent_without_a_dot_is_a_number(tmp_path: Path):
    # `dvc exp run -S baseline.learning_rate=1e-5` writes `1e-05`, which YAML 1.1 reads as a string.
    text = yaml.safe_dump(merged_params())
    assert text.count("learning_rate: 0.001\n") == 1
    path = tmp_path / "params.yaml"
    path.write_text(text.replace("learning_rate: 0.001\n", "learning_rate: 1e-05\n"))
    assert load_params(path).baseline.learning_rate == 1e-05
    path.write_text(text.replace("learning_rate: 0.001\n", "learning_rate: '1e-05'\n"))
    assert problems_in(path) == [
        "baseline.learning_rate: expected a number, got '1e-05' (a string)"
    ]


SEED_RANGE = (
    "must be from 1 to 4294967295 (2**32 - 1): numpy and scikit-learn take seeds below 2**32, "
    "and Keras Tuner takes 0 as no seed at all"
)


@pytest.mark.parametrize(
    ("seed", "problems"),
    [
        (1, []),
        (2**32 - 1, []),
        (0, [f"seed: {SEED_RANGE} (got 0)"]),
        (2**32, [f"seed: {SEED_RANGE} (got 4294967296)"]),
        (-1, [f"seed: {SEED_RANGE} (got -1)"]),
        ("42", ["seed: expected an integer, got '42' (a string)"]),
    ],
)
def test_seed_is_within_numpys_range(tmp_path: Path, seed: object, problems: list[str]):
    path = write_params(tmp_path, merged_params({"seed": seed}))
    if problems:
        assert problems_in(path) == problems
    else:
        assert load_params(path).seed == seed


@pytest.mark.parametrize(
    ("key", "problem"),
    [
        ("sede", "sede: unknown key (did you mean 'seed'?)"),
        ("baselien", "baselien: unknown key (did you mean 'baseline'?)"),
        ("learning_rate", "learning_rate: unknown key"),
    ],
)
def test_unknown_top_level_key_in_a_file_is_refused(tmp_path: Path, key: str, problem: str):
    raw = merged_params()
    raw[key] = 1
    assert problems_in(write_params(tmp_path, raw)) == [problem]
