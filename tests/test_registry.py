"""The Model Registry's champion gate: the pure decision, and the alias it moves in a real store."""

from __future__ import annotations

import mlflow
import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from support import merged_params

from mnist_mlops import registry
from mnist_mlops.registry import Champion

NAME = merged_params()["mlflow"]["registered_model"]
# The MNIST-C part of the gate switched off (its default), for the tests about the other parts.
MNISTC_OFF = {"mnistc_accuracy": 0.5, "min_mnistc_accuracy": 0.0}


# --- the champion gate --------------------------------------------------------------------------


def test_gate_first_model_ever_passes():
    decision = registry.champion_gate("1", 0.991, 0.985, 0.99, current=None, **MNISTC_OFF)
    assert decision.champion == "1" and decision.promoted
    assert "no version held @champion before" in decision.reason


def test_gate_first_model_ever_fails_and_no_one_holds_the_alias():
    decision = registry.champion_gate("1", 0.98, 0.97, 0.99, current=None, **MNISTC_OFF)
    assert decision.champion is None and not decision.promoted
    assert "below the gate 0.9900" in decision.reason
    assert "no version holds @champion yet" in decision.reason


def test_gate_pass_takes_the_alias_from_the_previous_champion():
    decision = registry.champion_gate("3", 0.992, 0.985, 0.99, Champion("2", 0.995), **MNISTC_OFF)
    assert decision.champion == "3" and decision.promoted
    assert "replaces v2 (test accuracy 0.9950)" in decision.reason


@pytest.mark.parametrize(
    ("accuracy", "baseline", "gate", "why"),
    [
        (0.989, 0.98, 0.99, "below the gate 0.9900"),
        (0.991, 0.993, 0.99, "below the baseline's 0.9930"),
    ],
)
def test_gate_fail_leaves_the_previous_champion(accuracy, baseline, gate, why):
    decision = registry.champion_gate(
        "3", accuracy, baseline, gate, Champion("2", 0.995), **MNISTC_OFF
    )
    assert decision.champion == "2" and not decision.promoted
    assert why in decision.reason
    assert "v2 (test accuracy 0.9950) keeps @champion" in decision.reason


@pytest.mark.parametrize(
    ("baseline", "gate", "tied"),
    [
        (0.99, 0.95, "ties the baseline"),
        (0.98, 0.99, "ties the gate"),
        (0.99, 0.99, "ties the gate and the baseline"),
    ],
)
def test_gate_ties_are_enough(baseline, gate, tied):
    # 9900 of 10000 right: exactly 0.99, as scores() computes it.
    accuracy = float(np.mean(np.arange(10000) < 9900))
    decision = registry.champion_gate(
        "2", accuracy, baseline, gate, Champion("1", None), **MNISTC_OFF
    )
    assert decision.champion == "2" and decision.promoted
    assert tied in decision.reason and "a tie is enough" in decision.reason
    assert decision.reason.endswith("it replaces v1")  # no accuracy tag, no accuracy shown


def test_gate_re_evaluating_the_champion():
    kept = registry.champion_gate("4", 0.995, 0.99, 0.99, Champion("4", 0.995), **MNISTC_OFF)
    assert kept.champion == "4" and kept.promoted and "already held" in kept.reason
    # The gate was raised since: the version no longer earns the alias it holds.
    lost = registry.champion_gate("4", 0.995, 0.99, 0.996, Champion("4", 0.995), **MNISTC_OFF)
    assert lost.champion is None and not lost.promoted
    assert "loses the @champion it held" in lost.reason


@pytest.mark.parametrize(
    ("mnistc", "gate", "promoted", "why"),
    [
        (
            0.70,
            0.75,
            False,
            "mean MNIST-C accuracy 0.7000 is below the gate 0.7500 "
            "(evaluate.champion_min_mnistc_accuracy)",
        ),
        (0.80, 0.75, True, "and its mean MNIST-C accuracy 0.8000 reaches the MNIST-C gate 0.7500"),
        (0.75, 0.75, True, "(ties the MNIST-C gate; a tie is enough)"),
    ],
)
def test_gate_on_mean_mnistc_accuracy(mnistc, gate, promoted, why):
    decision = registry.champion_gate(
        "3",
        0.992,
        0.985,
        0.99,
        Champion("2", 0.995),
        mnistc_accuracy=mnistc,
        min_mnistc_accuracy=gate,
    )
    assert decision.promoted is promoted and why in decision.reason
    assert decision.champion == ("3" if promoted else "2")


def test_gate_off_ignores_mnistc_accuracy_and_says_nothing_of_it():
    decision = registry.champion_gate(
        "3", 0.992, 0.985, 0.99, None, mnistc_accuracy=0.1, min_mnistc_accuracy=0.0
    )
    assert decision.promoted and "MNIST-C" not in decision.reason


def alias_holder(client: MlflowClient) -> str | None:
    holder = client.get_registered_model(NAME).aliases.get("champion")
    return None if holder is None else str(holder)


def test_gate_moves_the_champion_alias_in_the_registry(mlflow_store, tmp_path):
    client = MlflowClient()
    client.create_registered_model(NAME)
    for _ in range(3):
        client.create_model_version(NAME, source=str(tmp_path))

    def gate(version: str, accuracy: float, baseline: float, minimum: float) -> str | None:
        registry.apply_champion_gate(
            client, NAME, version, accuracy, baseline, minimum, **MNISTC_OFF
        )
        return alias_holder(client)

    assert gate("1", 0.80, 0.70, 0.90) is None  # first model ever, below the gate: nobody
    assert gate("1", 0.95, 0.94, 0.90) == "1"  # first model ever to pass
    assert gate("2", 0.92, 0.93, 0.90) == "1"  # below the baseline: v1 keeps it
    assert gate("3", 0.95, 0.95, 0.95) == "3"  # ties with baseline and gate: enough
    assert gate("3", 0.95, 0.95, 0.96) is None  # re-evaluated under a stricter gate: lost


class _Constant(mlflow.pyfunc.PythonModel):
    def predict(self, model_input: list[str]) -> list[int]:
        return [0] * len(model_input)


def test_a_retrain_marks_the_unevaluated_version_of_its_project(mlflow_store):
    with mlflow.start_run():
        uri = mlflow.pyfunc.log_model(
            name="model", python_model=_Constant(), pip_requirements=[]
        ).model_uri
    first = registry.register_candidate(uri, "m", "host:/project")
    elsewhere = registry.register_candidate(uri, "m", "host:/other-project")
    second = registry.register_candidate(uri, "m", "host:/project")
    client = MlflowClient()

    def status(version: str) -> str:
        return client.get_model_version("m", version).tags[registry.EVALUATION_STATUS]

    assert (
        status(first) == f"never evaluated (superseded by v{second}, retrained in the same project)"
    )
    assert status(elsewhere) == status(second) == registry.PENDING
