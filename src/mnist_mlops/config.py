"""The pipeline's parameters: `params.yaml` parsed into typed, frozen objects.

`params.yaml` is the only place defaults live. Every key is required and unknown keys are
errors, so a typo (`tune.max_trails`) stops a stage instead of silently training with a default.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, ValidationError

from mnist_mlops.errors import PipelineError

PARAMS_FILE = Path("params.yaml")


class ConfigError(PipelineError):
    """params.yaml is missing, unreadable or holds invalid values."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


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
    label_smoothing: float = Field(ge=0, lt=1)


class RetrainParams(_Section):
    ensemble_size: PositiveInt
    epochs: PositiveInt
    augment: bool
    lr_schedule: Literal["constant", "cosine"]
    label_smoothing: float = Field(ge=0, lt=1)
    test_time_shift: int = Field(ge=0, le=14)


class EvaluateParams(_Section):
    champion_min_accuracy: float = Field(ge=0, le=1)
    calibration_bins: int = Field(ge=2)
    rotation_degrees: float = Field(gt=0, le=180)
    shift_pixels: int = Field(ge=1, le=14)
    noise_std: float = Field(gt=0)
    blur_radius: float = Field(gt=0)
    gallery_size: PositiveInt
    quantization: Literal["int8", "float16"]
    latency_images: PositiveInt


class Params(_Section):
    seed: int = Field(ge=0)
    mlflow: MlflowParams
    prepare: PrepareParams
    baseline: BaselineParams
    tune: TuneParams
    retrain: RetrainParams
    evaluate: EvaluateParams

    def section(self, name: str) -> dict[str, Any]:
        """One section as a plain dict (what a stage logs and saves beside its model)."""
        return getattr(self, name).model_dump()


def parse_params(raw: Any, source: str = str(PARAMS_FILE)) -> Params:
    """Validate a parsed params mapping, raising ConfigError that lists every bad key."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        problems = [_describe(error) for error in err.errors()]
        raise ConfigError(f"{source}: invalid parameters:\n  " + "\n  ".join(problems)) from None


def load_params(path: Path = PARAMS_FILE) -> Params:
    """Read and validate params.yaml."""
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (run stages from the repository root)") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    return parse_params(raw, str(path))


def _describe(error: dict[str, Any]) -> str:
    location = ".".join(str(part) for part in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{location}: unknown key{_suggestion(error['loc'])}"
    if error["type"] == "missing":
        return f"{location}: missing (every key is required; see the README)"
    return f"{location}: {error['msg']} (got {error['input']!r})"


def _suggestion(loc: tuple[Any, ...]) -> str:
    model: type[BaseModel] = Params
    for part in loc[:-1]:
        annotation = model.model_fields[part].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return ""
        model = annotation
    close = difflib.get_close_matches(str(loc[-1]), list(model.model_fields), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""
