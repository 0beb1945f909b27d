"""Keras Tuner searches that log every trial to MLflow as a nested run, and resume after a crash.

Keras Tuner has no MLflow integration (keras-tuner#494). `MlflowTrialsMixin` hooks the tuner's
trial life cycle: each trial opens a child run of the tune stage's run, streams its epoch
metrics there while it trains, and closes it with the trial's status, score, epochs and cost.

The same mixin runs in a single process and on the workers of a distributed search
(`distributed.py`), where the oracle is Keras Tuner's `OracleClient`: it asks the oracle only
through calls the client forwards to the chief (`get_trial`, never `oracle.trials`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import keras
import keras_tuner as kt
import mlflow
from keras_tuner.src import config as kt_config
from mlflow.tracking import MlflowClient
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from mnist_mlops import models
from mnist_mlops.config import TuneParams
from mnist_mlops.files import read_json, write_json
from mnist_mlops.stage_process import ProcessIdentity
from mnist_mlops.tracking import EpochMetricsLogger, dvc_experiment_tags, end_killed

OBJECTIVE = "val_accuracy"
PROJECT = "search"
STATE_FILE = "search.json"
# Keras Tuner's own "tuner/..." values: Hyperband's bookkeeping, not hyperparameters.
TUNER_KEYS = "tuner/"
# The last line of a failed trial's error, on its MLflow run.
ERROR_TAG = "error"
log = logging.getLogger(__name__)
_RUN_STATUS = {"COMPLETED": "FINISHED", "FAILED": "FAILED", "INVALID": "FAILED"}
# Params that say how the search runs, not what it finds: changing them keeps a resumable search.
EXECUTION_PARAMS = frozenset({"workers", "trial_lease_s"})


class MlflowTrialsMixin:
    """Mixed into a Keras Tuner tuner class; `parent_run_id` is the tune stage's run."""

    parent_run_id: str
    expected_trials: int | None
    tuner_id: str  # Keras Tuner's: KERASTUNER_TUNER_ID, "tuner0" in a single process
    # Epochs trained by this process (a resumed search counts only its own), for throughput.
    epochs_trained: int = 0

    def on_trial_begin(self, trial: kt.engine.trial.Trial) -> None:
        super().on_trial_begin(trial)  # type: ignore[misc]
        client = MlflowClient()
        parent = client.get_run(self.parent_run_id)
        number = int(trial.trial_id) + 1
        # A run of this trial still RUNNING is an earlier attempt's: its worker died and was
        # restarted under the same id, or the chief took the trial back when its lease expired.
        for stale in running_trial_runs(self.parent_run_id, trial.trial_id):
            end_killed(stale, f"trial {number} was handed to {self.tuner_id} again")
        run = client.create_run(
            parent.info.experiment_id,
            run_name=f"trial_{trial.trial_id}",
            tags={
                MLFLOW_PARENT_RUN_ID: self.parent_run_id,
                "stage": "tune",
                "trial_id": trial.trial_id,
                "worker": self.tuner_id,
                **ProcessIdentity.current().tags(),
                "pipeline_run_id": parent.data.tags.get("pipeline_run_id", ""),
                **dvc_experiment_tags(),
                **_hyperband_tags(trial.hyperparameters.values),
            },
        )
        # Values known before the build; the build registers the rest (logged at the end).
        params = active_hyperparameters(trial.hyperparameters)
        _log_params(run.info.run_id, params)
        trial.mlflow_run_id = run.info.run_id
        trial.lease_expired = False
        trial.started_at = time.monotonic()
        total = f"/{self.expected_trials}" if self.expected_trials else ""
        log.info("trial %d%s: %s", number, total, json.dumps(params))

    def _try_run_and_update_trial(
        self, trial: kt.engine.trial.Trial, *args: Any, **kwargs: Any
    ) -> None:
        # Keras Tuner prints the traceback of every failing trial (its config.DEBUG). A trial
        # refused on purpose (FailedTrialError: the conv-cost cap) gets one line instead; any
        # other error still prints its whole traceback.
        debug, kt_config.DEBUG = kt_config.DEBUG, False
        try:
            super()._try_run_and_update_trial(trial, *args, **kwargs)  # type: ignore[misc]
        finally:
            kt_config.DEBUG = debug
        if trial.lease_expired:
            return
        if trial.message:
            # Now, before the result goes to the oracle: a chief reads a failed trial's error
            # from this tag (`Trial.to_proto` drops the message on its way over gRPC).
            _record_error(trial.mlflow_run_id, trial.message)
            number = int(trial.trial_id) + 1
            refused = trial.status == kt.engine.trial.TrialStatus.FAILED
            report = trial.message.strip().splitlines()[-1] if refused else trial.message
            log.warning("trial %d failed: %s", number, report)

    def run_trial(self, trial: kt.engine.trial.Trial, *args: Any, **kwargs: Any) -> Any:
        callbacks = [*kwargs.pop("callbacks", []), EpochMetricsLogger(trial.mlflow_run_id)]
        results = super().run_trial(trial, *args, callbacks=callbacks, **kwargs)  # type: ignore[misc]
        if MlflowClient().get_run(trial.mlflow_run_id).info.status != "RUNNING":
            # The chief ended this run when the trial's lease expired and handed the trial to
            # another worker: this late result must not count twice.
            trial.lease_expired = True
            raise LeaseExpiredError(f"trial {trial.trial_id}: the chief took it back")
        return results

    def on_trial_end(self, trial: kt.engine.trial.Trial) -> None:
        if trial.lease_expired:
            log.warning(
                "trial %d: its lease expired while it trained; result discarded",
                int(trial.trial_id) + 1,
            )
            return
        try:
            super().on_trial_end(trial)  # type: ignore[misc]
        finally:
            # The oracle owns the final status (it turns retries-exhausted INVALID into FAILED).
            ended = self.oracle.get_trial(trial.trial_id)  # type: ignore[attr-defined]
            seconds = time.monotonic() - trial.started_at
            self.epochs_trained += _close_trial_run(trial.mlflow_run_id, ended, seconds)


class LeaseExpiredError(Exception):
    """A worker's trial finished after the chief had given up on it."""


def _log_params(run_id: str, params: dict[str, Any]) -> None:
    MlflowClient().log_batch(
        run_id, params=[mlflow.entities.Param(k, str(v)) for k, v in params.items()]
    )


def _close_trial_run(run_id: str, trial: kt.engine.trial.Trial, seconds: float) -> int:
    """Log the trial's outcome and end its run; return the epochs it trained."""
    client = MlflowClient()
    logged = client.get_run(run_id).data.params
    _log_params(
        run_id,
        {k: v for k, v in active_hyperparameters(trial.hyperparameters).items() if k not in logged},
    )
    status = str(trial.status)
    epochs_run = len(client.get_metric_history(run_id, "loss"))
    metrics = {"wall_seconds": seconds, "epochs_run": epochs_run}
    if trial.score is not None and math.isfinite(trial.score):
        metrics[f"final_{OBJECTIVE}"] = trial.score
    now = mlflow.utils.time.get_current_time_millis()
    client.log_batch(
        run_id,
        metrics=[mlflow.entities.Metric(k, float(v), now, 0) for k, v in metrics.items()],
        tags=[mlflow.entities.RunTag("trial_status", status)],
    )
    client.set_terminated(run_id, _RUN_STATUS.get(status, "FAILED"))
    return epochs_run


def _record_error(run_id: str, message: str) -> None:
    client = MlflowClient()
    client.set_tag(run_id, ERROR_TAG, message.strip().splitlines()[-1][:4000])
    client.log_text(run_id, message, "error.txt")


def _hyperband_tags(values: dict[str, Any]) -> dict[str, str]:
    keys = {
        "tuner/bracket": "hyperband_bracket",
        "tuner/round": "hyperband_round",
        "tuner/epochs": "hyperband_epochs",
        "tuner/initial_epoch": "hyperband_initial_epoch",
        "tuner/trial_id": "continues_trial",
    }
    return {tag: str(values[key]) for key, tag in keys.items() if key in values}


def active_hyperparameters(hp: kt.HyperParameters) -> dict[str, Any]:
    """The values that shaped this trial's model: conditional ones only where active."""
    return {
        name: value
        for name, value in hp.values.items()
        if not name.startswith(TUNER_KEYS) and hp.is_active(name)
    }


class RandomSearch(MlflowTrialsMixin, kt.RandomSearch):
    pass


class Hyperband(MlflowTrialsMixin, kt.Hyperband):
    pass


class BayesianOptimization(MlflowTrialsMixin, kt.BayesianOptimization):
    pass


def make_tuner(
    params: TuneParams,
    seed: int,
    state_dir: Path,
    parent_run_id: str,
    hypermodel: kt.HyperModel | None = None,
) -> MlflowTrialsMixin:
    """The tuner named in params, keeping its oracle state under `state_dir` for resumes.

    `hypermodel` defaults to the project's search space.
    """
    common: dict[str, Any] = {
        "hypermodel": hypermodel
        or models.MnistHyperModel(
            seed,
            max_conv_mmacs=params.max_conv_mmacs,
            augment=params.augment,
            degradation_rate=params.degradation_rate,
            label_smoothing=params.label_smoothing,
        ),
        "objective": OBJECTIVE,
        "executions_per_trial": params.executions_per_trial,
        "seed": seed,
        "directory": str(state_dir),
        "project_name": PROJECT,
        "overwrite": False,
        # Failed trials are logged and skipped; the stage fails only if none completes.
        "max_consecutive_failed_trials": sys.maxsize,
    }
    if params.tuner == "random":
        tuner = RandomSearch(max_trials=params.max_trials, **common)
        expected = params.max_trials
    elif params.tuner == "bayesian":
        tuner = BayesianOptimization(
            max_trials=params.max_trials, num_initial_points=params.initial_points, **common
        )
        expected = params.max_trials
    else:
        tuner = Hyperband(
            max_epochs=params.max_epochs,
            factor=params.factor,
            hyperband_iterations=params.hyperband_iterations,
            **common,
        )
        expected = _hyperband_trials(params) * params.hyperband_iterations
    tuner.parent_run_id = parent_run_id
    tuner.expected_trials = expected
    return tuner


def _hyperband_trials(params: TuneParams) -> int:
    """How many trials one Hyperband iteration runs (the oracle's own bracket arithmetic).

    Asked of an oracle of its own: a worker's tuner holds an `OracleClient`, which has none.
    """
    oracle = kt.oracles.HyperbandOracle(
        objective=OBJECTIVE, max_epochs=params.max_epochs, factor=params.factor
    )
    return sum(
        oracle._get_size(bracket, round_num)
        for bracket in range(oracle._get_num_brackets())
        for round_num in range(oracle._get_num_rounds(bracket))
    )


def declare_search_space(tuner: kt.Tuner) -> None:
    """Register on the oracle the hyperparameters that the hypermodel only draws in fit().

    Keras Tuner registers those when the first trial ends. With several workers that moment
    depends on timing, and so would the values drawn before it; declared up front, the
    sequence of trials depends on the seed alone.
    """
    hp = tuner.oracle.get_space()
    models.sample_batch_size(hp)
    tuner.oracle.update_space(hp)


def search_fingerprint(params: TuneParams, seed: int, data_digest: str) -> str:
    """What the saved oracle state depends on: budget, tuner, seed, data and the space's code.

    Any change starts a fresh search instead of silently continuing an incompatible one; a
    change of how it runs (`EXECUTION_PARAMS`: the number of workers, the lease) does not.
    """
    space_code = "".join(
        inspect.getsource(fn)
        for fn in (
            models.build_model,
            models.sample_architecture,
            models._filters,
            models._mlp_units,
            models.sample_batch_size,
        )
    )
    payload = json.dumps(
        {
            "tune": params.model_dump(exclude=EXECUTION_PARAMS),
            "seed": seed,
            "data": data_digest,
            "space": space_code,
            "keras_tuner": kt.__version__,
            "backend": keras.backend.backend(),
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()


def resumable_run_id(state_dir: Path, fingerprint: str) -> str | None:
    """The tune run of an interrupted search with the same fingerprint, else None.

    Any other saved state (finished, or for other params or data) is wiped, so the search
    starts fresh.
    """
    state_file = state_dir / STATE_FILE
    run_id = None
    if state_file.exists():
        state = read_json(state_file)
        if state.get("fingerprint") == fingerprint and not state.get("finished"):
            run_id = state["run_id"]
            try:
                status = MlflowClient().get_run(run_id).info.status
            except mlflow.exceptions.MlflowException:
                status = None  # the store was reset: the old trials' runs are gone
            if status in (None, "FINISHED"):
                run_id = None
        if run_id is None:
            log.info("discarding saved search state in %s", state_dir)
    if run_id is None:
        shutil.rmtree(state_dir, ignore_errors=True)
    return run_id


def save_state(state_dir: Path, fingerprint: str, run_id: str, finished: bool) -> None:
    # Atomic: a search killed while writing must still find readable state on resume.
    state = {"fingerprint": fingerprint, "run_id": run_id, "finished": finished}
    write_json(state_dir / STATE_FILE, state)


def trial_run_id(parent_run_id: str, trial_id: str) -> str | None:
    """The MLflow run in which trial `trial_id` of search run `parent_run_id` completed."""
    runs = _trial_runs(parent_run_id, trial_id, "tags.trial_status = 'COMPLETED'", max_results=1)
    return runs[0] if runs else None


def running_trial_runs(parent_run_id: str, trial_id: str) -> list[str]:
    """The MLflow runs of trial `trial_id` of search run `parent_run_id` still RUNNING."""
    return _trial_runs(parent_run_id, trial_id, "attributes.status = 'RUNNING'")


def _trial_runs(
    parent_run_id: str, trial_id: str, condition: str, max_results: int = 1000
) -> list[str]:
    """The ids of the runs of trial `trial_id` under search run `parent_run_id` that meet
    `condition` (an MLflow filter clause)."""
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}' "
        f"and tags.trial_id = '{trial_id}' and {condition}",
        max_results=max_results,
    )
    return [run.info.run_id for run in runs]


def epochs_trained_since(parent_run_id: str, started_ms: int) -> int:
    """Epochs trained by the trials of search run `parent_run_id` that started at or after
    `started_ms` (a resumed search counts only its own), whichever worker trained them."""
    client = MlflowClient()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`{MLFLOW_PARENT_RUN_ID}` = '{parent_run_id}' "
        f"and attributes.start_time >= {started_ms}",
    )
    return sum(int(run.data.metrics.get("epochs_run", 0)) for run in runs)


def trials_table(tuner: kt.Tuner) -> list[dict[str, Any]]:
    """One row per trial in the order they ran: id, status, score, active hyperparameters."""
    rows = []
    for trial_id, trial in sorted(tuner.oracle.trials.items(), key=lambda item: int(item[0])):
        rows.append(
            {
                "trial_id": trial_id,
                "status": str(trial.status),
                OBJECTIVE: trial.score,
                **active_hyperparameters(trial.hyperparameters),
            }
        )
    return rows


def best_configuration(tuner: kt.Tuner) -> dict[str, Any]:
    """The hand-over to retrain: the best trial's hyperparameters and the builder arguments."""
    completed = [t for t in tuner.oracle.trials.values() if str(t.status) == "COMPLETED"]
    if not completed:
        statuses = sorted({str(t.status) for t in tuner.oracle.trials.values()})
        first_error = next(
            (t.message.strip().splitlines()[-1] for t in tuner.oracle.trials.values() if t.message),
            "no error recorded",
        )
        raise SearchFailedError(
            f"no trial completed ({len(tuner.oracle.trials)} trials, statuses {statuses}); "
            f"first error: {first_error}"
        )
    best = tuner.oracle.get_best_trials(1)[0]
    hp = best.hyperparameters.copy()
    return {
        "trial_id": best.trial_id,
        OBJECTIVE: best.score,
        "hyperparameters": active_hyperparameters(hp),
        "architecture": models.sample_architecture(hp),
        "batch_size": models.sample_batch_size(hp),
    }


class SearchFailedError(RuntimeError):
    """Every trial of a search failed."""
