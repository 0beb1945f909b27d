"""The pipeline's parameters: `params.yaml` parsed into typed, frozen objects.

`params.yaml` is the only place defaults live. Every key is required and unknown keys are
errors, so a typo (`tune.max_trails`) stops a stage instead of silently training with a default.
Values are strictly typed: `epochs: "3"` or `epochs: true` is an error, not 3 or 1 epochs, and
`augment: "no"` is an error, not False. An integer is accepted where a number is expected
(`learning_rate: 1`), and null only by keys typed `| None` (e.g. `prepare.train_subset`).
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from mnist_mlops.errors import PipelineError

SEED_MAX = 2**32 - 1  # numpy's and scikit-learn's seeds are unsigned 32-bit integers


class ConfigError(PipelineError):
    """params.yaml is missing, unreadable or holds invalid values."""


class _Section(BaseModel):
    # strict: no string or boolean read as a number, no string or number read as a boolean
    # (pydantic's strict mode still takes an int for a float).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class MlflowParams(_Section):
    experiment: str = Field(min_length=1)
    registered_model: str = Field(min_length=1)


class PrepareParams(_Section):
    val_size: PositiveInt
    train_subset: PositiveInt | None


class BaselineParams(_Section):
    epochs: PositiveInt
    batch_size: PositiveInt
    learning_rate: float = Field(gt=0)
    label_smoothing: float = Field(ge=0, lt=1)


class TuneParams(_Section):
    tuner: Literal["random", "hyperband", "bayesian"]
    max_trials: PositiveInt
    epochs: PositiveInt
    max_epochs: PositiveInt
    factor: int = Field(ge=2)
    hyperband_iterations: PositiveInt
    initial_points: PositiveInt
    executions_per_trial: PositiveInt
    early_stopping_patience: PositiveInt
    search_subset: PositiveInt | None
    max_conv_mmacs: float | None = Field(gt=0)
    augment: bool
    degradation_rate: float = Field(ge=0, le=1)
    label_smoothing: float = Field(ge=0, lt=1)
    workers: PositiveInt
    trial_lease_s: PositiveInt


class RetrainParams(_Section):
    ensemble_size: PositiveInt
    epochs: PositiveInt
    augment: bool
    degradation_rate: float = Field(ge=0, le=1)
    degradation_schedule: Literal["constant", "cosine"]
    lr_schedule: Literal["constant", "cosine"]
    label_smoothing: float = Field(ge=0, lt=1)
    test_time_shift: int = Field(ge=0, le=14)


class EvaluateParams(_Section):
    champion_min_accuracy: float = Field(ge=0, le=1)
    champion_min_mnistc_accuracy: float = Field(ge=0, le=1)
    calibration_bins: int = Field(ge=2)
    gallery_size: PositiveInt
    quantization: Literal["int8", "float16"]
    latency_images: PositiveInt


class Params(_Section):
    seed: int
    mlflow: MlflowParams
    prepare: PrepareParams
    baseline: BaselineParams
    tune: TuneParams
    retrain: RetrainParams
    evaluate: EvaluateParams

    @field_validator("seed")
    @classmethod
    def _seed_in_range(cls, seed: int) -> int:
        # 1, not 0: Keras Tuner's oracle takes a seed of 0 as "no seed" and draws a random one,
        # so the search would not repeat.
        if not 1 <= seed <= SEED_MAX:
            raise PydanticCustomError(
                "seed_range",
                "must be from 1 to {max} (2**32 - 1): numpy and scikit-learn take seeds below "
                "2**32, and Keras Tuner takes 0 as no seed at all",
                {"max": SEED_MAX},
            )
        return seed

    def section(self, name: str) -> dict[str, Any]:
        """One section as a plain dict (what a stage logs and saves beside its model)."""
        return getattr(self, name).model_dump()


def parse_params(raw: Any, source: str = "params.yaml") -> Params:
    """Validate a parsed params mapping, raising ConfigError that lists every bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        problems = [_describe(error) for error in err.errors()]
        raise ConfigError(f"{source}: invalid parameters:\n  " + "\n  ".join(problems)) from None


def load_params(path: Path) -> Params:
    """Read and validate params.yaml (`ProjectPaths.params`)."""
    try:
        raw = yaml.load(path.read_text(), Loader=_Loader)  # _Loader is a SafeLoader
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (run stages from the repository root)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_params(raw, str(path))


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader that also reads `1e-05` as a number, not a string.

    PyYAML follows YAML 1.1, whose floats need a dot (`1.0e-05`); DVC writes YAML 1.2, so
    `dvc exp run -S baseline.learning_rate=1e-5` leaves `learning_rate: 1e-05` in params.yaml.
    With strict types that string would be refused, where lax parsing used to convert it.
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)[eE][-+]?[0-9]+$"),
    list("-+.0123456789"),
)

# What a strict type error expected, and what YAML calls the value it got instead.
_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
}
_KINDS = {
    bool: "a boolean",
    int: "an integer",
    float: "a decimal number",
    str: "a string",
    list: "a list",
    dict: "a mapping",
}


def _describe(error: dict[str, Any]) -> str:
    loc = error["loc"]
    location = ".".join(str(part) for part in loc)
    if error["type"] == "extra_forbidden":
        return f"{location}: unknown key{_suggestion(loc)}"
    if error["type"] == "missing":
        return f"{location}: missing (every key is required; see the README)"
    if error["type"] in _EXPECTED:
        expected = _EXPECTED[error["type"]]
        if _allows_none(loc):
            expected += " or null"
        return f"{location}: expected {expected}, got {_as_given(error['input'])}"
    return f"{location}: {error['msg']} (got {error['input']!r})"


def _as_given(value: Any) -> str:
    """A value as params.yaml spells it, with what YAML read it as: `'3' (a string)`."""
    if value is None:
        return "null"
    shown = str(value).lower() if isinstance(value, bool) else repr(value)
    return f"{shown} ({_KINDS.get(type(value), 'a ' + type(value).__name__)})"


def _model_at(path: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model holding the key at `path + (key,)`, or None where `path` is no section."""
    model: type[BaseModel] = Params
    for part in path:
        field = model.model_fields.get(str(part))
        annotation = field.annotation if field else None
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _allows_none(loc: tuple[Any, ...]) -> bool:
    model = _model_at(loc[:-1])
    field = model.model_fields.get(str(loc[-1])) if model else None
    return field is not None and type(None) in get_args(field.annotation)


def _suggestion(loc: tuple[Any, ...]) -> str:
    model = _model_at(loc[:-1])
    if model is None:
        return ""
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
