"""Model Registry work: register the served model, load a registered Keras model, and the
champion gate that decides which version holds the `champion` alias.

`champion_gate` is a pure function of accuracies; the functions around it read and move the
alias and tag versions through the MLflow client.
"""

from __future__ import annotations

import logging
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import keras
import mlflow
from mlflow.exceptions import MlflowException
from mlflow.models.model import ModelInfo
from mlflow.tracking import MlflowClient

import mnist_serving
from mnist_mlops.errors import PipelineError
from mnist_mlops.store import tracking_uri
from mnist_mlops.tracking import flatten, model_requirements
from mnist_serving import model_code
from mnist_serving.model import KERAS_ARTIFACT, REQUEST_FORMS, SIGNATURE

CHAMPION_ALIAS = "champion"
# A version's progress, shown in `mlflow ui`: `pending` from birth (retrain), `evaluated` once
# evaluate has scored it, `never evaluated (...)` when its project retrained before evaluating.
EVALUATION_STATUS = "evaluation_status"
PENDING = "pending"
EVALUATED = "evaluated"
# Where a version was trained, host:folder: a later retrain there supersedes its files.
ORIGIN = "origin"
log = logging.getLogger(__name__)


def log_serving_model(
    model: keras.Model | Path, registered_model_name: str | None = None
) -> ModelInfo:
    """Log `DigitClassifier` around a Keras model (or a `.keras` file) as artifact `model`.

    Logs into the active run, registering a new version of `registered_model_name` if given.
    The model is logged from code (`mnist_serving/model_code.py`), not pickled, and the
    `mnist_serving` package goes with it, so a served version keeps the validation it was
    logged with and loads with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false.
    """
    with tempfile.TemporaryDirectory() as tmp:
        if isinstance(model, keras.Model):
            path = Path(tmp) / "model.keras"
            model.save(path)
        else:
            path = Path(model)
        # input_example= crashes on mlflow 3.17 (mlflow#16183); the metadata documents the
        # input, so MLflow's warning about the missing example is noise.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*input example was not provided")
            return mlflow.pyfunc.log_model(
                name="model",
                python_model=model_code.__file__,
                artifacts={KERAS_ARTIFACT: str(path)},
                code_paths=[str(Path(mnist_serving.__file__).parent)],
                signature=SIGNATURE,
                metadata={"request_forms": REQUEST_FORMS},
                pip_requirements=model_requirements(),
                registered_model_name=registered_model_name,
            )


def register_candidate(model_uri: str, name: str, origin: str) -> str:
    """Register `model_uri` as a new version of `name`, `pending` evaluation; return its number.

    The status is set as the version is created, so a retrain killed right after registering
    leaves no version without one. An earlier version from the same `origin` still pending is
    marked never evaluated: this retrain has replaced the files its evaluate would have read
    (its pipeline was killed, or its evaluate failed and was not rerun).
    """
    version = str(
        mlflow.register_model(
            model_uri, name, tags={EVALUATION_STATUS: PENDING, ORIGIN: origin}
        ).version
    )
    client = MlflowClient()
    for stale in client.search_model_versions(
        f"name = '{name}' and tags.{EVALUATION_STATUS} = '{PENDING}'"
    ):
        if str(stale.version) != version and stale.tags.get(ORIGIN) == origin:
            status = f"never evaluated (superseded by v{version}, retrained in the same project)"
            client.set_model_version_tag(name, stale.version, EVALUATION_STATUS, status)
            log.warning("%s v%s: %s", name, stale.version, status)
    return version


def load_keras_model(model_uri: str) -> keras.Model:
    """The Keras model of a version logged by `log_serving_model` or by `mlflow.keras`.

    For code that needs the Keras model itself (evaluation, export) whichever way a registered
    version was logged; a serving version's model comes back uncompiled.
    """
    if "keras" in mlflow.models.get_model_info(model_uri).flavors:
        return mlflow.keras.load_model(model_uri)
    return mlflow.pyfunc.load_model(model_uri).unwrap_python_model().model


def check_registered(client: MlflowClient, registered: dict[str, Any], source: Path) -> None:
    """Fail before any work when `source` (registered.json) names a version the store lacks."""
    try:
        client.get_model_version(registered["name"], registered["version"])
    except MlflowException:
        raise PipelineError(
            f"{source} names {registered['name']} v{registered['version']}, which the MLflow "
            f"store at {tracking_uri()} does not hold (a different or reset store?); "
            "re-register with `dvc repro -f retrain`"
        ) from None


@dataclass(frozen=True)
class Champion:
    """The model version that holds `champion`, with the test accuracy it was tagged with."""

    version: str
    accuracy: float | None


@dataclass(frozen=True)
class GateDecision:
    """`champion`: the version that holds the alias after the gate (None: no version does)."""

    champion: str | None
    promoted: bool
    reason: str


def champion_gate(
    candidate: str,
    candidate_accuracy: float,
    baseline_accuracy: float,
    min_accuracy: float,
    current: Champion | None,
    *,
    mnistc_accuracy: float,
    min_mnistc_accuracy: float,
) -> GateDecision:
    """Decide who holds `champion` once version `candidate` has been evaluated.

    The candidate earns the alias by reaching the gate and the baseline on the test set and,
    when `min_mnistc_accuracy` is above 0, that mean accuracy over the MNIST-C corruptions; a
    tie counts as reaching it. Otherwise the current champion keeps the alias, unless the
    current champion is this very version re-evaluated against a stricter gate: then it loses
    the alias and no version holds it.
    """
    accuracy_text = f"test accuracy {candidate_accuracy:.4f}"
    mnistc_text = f"mean MNIST-C accuracy {mnistc_accuracy:.4f}"
    # (what is compared, its value, the bar, why the candidate fails below it)
    checks = [
        (
            "gate",
            candidate_accuracy,
            min_accuracy,
            f"{accuracy_text} is below the gate {min_accuracy:.4f} "
            "(evaluate.champion_min_accuracy)",
        ),
        (
            "baseline",
            candidate_accuracy,
            baseline_accuracy,
            f"{accuracy_text} is below the baseline's {baseline_accuracy:.4f}",
        ),
    ]
    if min_mnistc_accuracy > 0:  # 0: the robustness gate is off
        checks.append(
            (
                "MNIST-C gate",
                mnistc_accuracy,
                min_mnistc_accuracy,
                f"{mnistc_text} is below the gate {min_mnistc_accuracy:.4f} "
                "(evaluate.champion_min_mnistc_accuracy)",
            )
        )
    failure = next((why for _, value, bar, why in checks if value < bar), None)

    if failure is None:
        ties = [name for name, value, bar, _ in checks if value == bar]
        reason = (
            f"v{candidate} promoted to @{CHAMPION_ALIAS}: {accuracy_text} reaches the gate "
            f"{min_accuracy:.4f} and the baseline's {baseline_accuracy:.4f}"
        )
        if min_mnistc_accuracy > 0:
            reason += f", and its {mnistc_text} reaches the MNIST-C gate {min_mnistc_accuracy:.4f}"
        if ties:
            reason += f" (ties the {' and the '.join(ties)}; a tie is enough)"
        if current is None:
            reason += f"; no version held @{CHAMPION_ALIAS} before"
        elif current.version == candidate:
            reason += f"; it already held @{CHAMPION_ALIAS}"
        else:
            reason += f"; it replaces v{current.version}{_accuracy_note(current)}"
        return GateDecision(champion=candidate, promoted=True, reason=reason)

    reason = f"v{candidate} not promoted: {failure}"
    if current is None:
        return GateDecision(None, False, f"{reason}; no version holds @{CHAMPION_ALIAS} yet")
    if current.version == candidate:
        return GateDecision(None, False, f"{reason}; it loses the @{CHAMPION_ALIAS} it held")
    return GateDecision(
        current.version,
        False,
        f"{reason}; v{current.version}{_accuracy_note(current)} keeps @{CHAMPION_ALIAS}",
    )


def _accuracy_note(champion: Champion) -> str:
    return f" (test accuracy {champion.accuracy:.4f})" if champion.accuracy is not None else ""


def current_champion(client: MlflowClient, name: str) -> Champion | None:
    """The version of `name` that holds `champion` now, if any."""
    version = client.get_registered_model(name).aliases.get(CHAMPION_ALIAS)
    if version is None:
        return None
    accuracy = client.get_model_version(name, version).tags.get("test_accuracy")
    return Champion(str(version), float(accuracy) if accuracy else None)


def apply_champion_gate(
    client: MlflowClient,
    name: str,
    version: str,
    accuracy: float,
    baseline_accuracy: float,
    min_accuracy: float,
    *,
    mnistc_accuracy: float,
    min_mnistc_accuracy: float,
) -> GateDecision:
    """Decide who holds `champion` after version `version` was evaluated, and move the alias."""
    current = current_champion(client, name)
    decision = champion_gate(
        version,
        accuracy,
        baseline_accuracy,
        min_accuracy,
        current,
        mnistc_accuracy=mnistc_accuracy,
        min_mnistc_accuracy=min_mnistc_accuracy,
    )
    holder = current.version if current else None
    if decision.champion is None and holder is not None:
        client.delete_registered_model_alias(name, CHAMPION_ALIAS)
    elif decision.champion is not None and decision.champion != holder:
        client.set_registered_model_alias(name, CHAMPION_ALIAS, decision.champion)
    return decision


def version_tags(
    test_metrics: dict[str, float],
    model_config: dict[str, Any],
    prepare_params: dict[str, Any],
    data_digests: dict[str, str],
    commit: str,
    decision: GateDecision,
) -> dict[str, str]:
    """What a registry version carries: test results, code, params and data it was made from.

    `model_config` is the config.json saved with the model: the seed, retrain params and tuned
    hyperparameters it was actually trained with.
    """
    tags = {
        **{f"test_{k}": v for k, v in test_metrics.items()},
        "git_commit": commit,
        **{f"data_sha256.{split}": digest for split, digest in data_digests.items()},
        **flatten(
            "params",
            {
                "seed": model_config["seed"],
                "prepare": prepare_params,
                "retrain": model_config["fit"],
            },
        ),
        **flatten("hparams", model_config["tuned_from"]["hyperparameters"]),
        "champion_gate": decision.reason,
        EVALUATION_STATUS: EVALUATED,
    }
    return {key: str(value) for key, value in tags.items()}


def tag_version(client: MlflowClient, name: str, version: str, tags: dict[str, str]) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
