"""tune: a Keras Tuner search on the training split, scored on the validation split.

Reads: data/prepared/{train,val}.npz and summary.json. Writes: tuning/best_hparams.json,
tuning/trials.json, tuning/metrics.json. Keeps its resumable search state in tuning/state/
(no DVC output: DVC leaves it alone, so a killed search continues where it stopped on the next
`dvc repro`, and a fresh clone lacks nothing DVC expects).

With `tune.workers` > 1 this process is the search's chief (`distributed.py`): it starts that many
`python -m mnist_mlops.stages.tune --worker` processes, which train the trials, and serves them
the oracle until the search is over. Workers started by hand on other machines join the same way.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any

import keras
import mlflow
import pandas as pd

from mnist_mlops import distributed, lineage, plots, tracking, tuning
from mnist_mlops.config import Params, TuneParams, load_params
from mnist_mlops.data import load_split, one_hot, stratified_subset, to_model_input
from mnist_mlops.errors import PipelineError, exit_on_pipeline_error
from mnist_mlops.files import read_json, write_json
from mnist_mlops.paths import ProjectPaths
from mnist_mlops.stage_process import single_stage_process, worker_process
from mnist_mlops.tracking import stage_run
from mnist_mlops.training import progress_verbosity, seed_everything

STAGE = "tune"
log = logging.getLogger(STAGE)


def run(params: TuneParams, paths: ProjectPaths, *, seed: int, run_id: str) -> dict[str, Any]:
    """Run or continue the search, logging into tune run `run_id`; return the best config."""
    seed_everything(seed)
    # Taken before the tuner is made: the chief's own tuner keeps a local oracle.
    address = distributed.take_chief_address() if params.workers > 1 else None
    tuner = tuning.make_tuner(params, seed, paths.tuning_state, run_id)
    tuner.search_space_summary()
    started, started_ms = time.monotonic(), int(time.time() * 1000)
    if address is None:
        train_examples = _search(tuner, params, paths, seed)
        epochs_trained = tuner.epochs_trained
    else:
        train_examples = _serve_workers(tuner, params, paths, run_id, address)
        epochs_trained = tuning.epochs_trained_since(run_id, started_ms)
    seconds = time.monotonic() - started
    try:
        best = tuning.best_configuration(tuner)
    except tuning.SearchFailedError as err:
        raise PipelineError(f"the search failed: {err}") from None
    rows = tuning.trials_table(tuner)
    statuses = [row["status"] for row in rows]
    summary = {
        f"best_{tuning.OBJECTIVE}": best[tuning.OBJECTIVE],
        "trials": len(rows),
        **{f"trials_{s.lower()}": statuses.count(s) for s in ("COMPLETED", "FAILED", "INVALID")},
        "tuning_seconds": seconds,
        "epochs_trained": epochs_trained,
        "train_examples": train_examples,
    }
    if best_run_id := tuning.trial_run_id(run_id, best["trial_id"]):
        mlflow.set_tag("best_trial_run_id", best_run_id)
    write_json(paths.best_hparams, best)
    write_json(paths.tuning / "trials.json", rows)
    write_json(paths.tuning / "metrics.json", summary)
    _log_summary(best, rows, summary)
    return best


def _search(
    tuner: tuning.MlflowTrialsMixin, params: TuneParams, paths: ProjectPaths, seed: int
) -> int:
    """Train trials until the oracle stops (in this process, or as a worker); return the
    number of training examples."""
    x_train, y_train = load_split(paths.require(paths.split("train")))
    x_val, y_val = load_split(paths.require(paths.split("val")))
    if params.search_subset is not None:
        x_train, y_train = stratified_subset(
            x_train, y_train, params.search_subset, seed, name="tune.search_subset"
        )
    tuner.search(
        to_model_input(x_train),
        one_hot(y_train),
        validation_data=(to_model_input(x_val), one_hot(y_val)),
        epochs=params.epochs,
        callbacks=[
            keras.callbacks.EarlyStopping(
                monitor=tuning.OBJECTIVE, patience=params.early_stopping_patience
            )
        ],
        verbose=progress_verbosity(),
    )
    return len(y_train)


def _serve_workers(
    tuner: tuning.MlflowTrialsMixin,
    params: TuneParams,
    paths: ProjectPaths,
    run_id: str,
    address: distributed.ChiefAddress,
) -> int:
    """Be the chief of `params.workers` local workers (and any started elsewhere) until the
    search is over; return the number of training examples."""
    tuning.declare_search_space(tuner)
    # What Keras Tuner's chief does first: the tuner's file (tuner0.json, the chief keeping the
    # single process's default id) is what makes a restarted tuner reload the oracle, so a
    # killed search resumes whether it ran in one process or with workers, before and after.
    tuner.save()
    oracle = distributed.LeasedOracle(tuner.oracle, params.trial_lease_s, run_id)
    with distributed.oracle_server(oracle, address.listen) as port:
        mlflow.set_tag(distributed.ORACLE_PORT_TAG, str(port))
        log.info("chief of the search on %s, port %d", address.listen, port)
        with distributed.local_workers(params.workers, address.local_host, port, run_id) as workers:
            distributed.serve_until_finished(oracle, workers)
    available = len(load_split(paths.require(paths.split("train")))[1])
    return min(params.search_subset or available, available)


def _log_summary(best: dict[str, Any], rows: list[dict[str, Any]], summary: dict) -> None:
    mlflow.log_metrics(summary)
    mlflow.log_params({f"best.{k}": v for k, v in best["hyperparameters"].items()})
    mlflow.log_dict(best, "best_hparams.json")
    mlflow.log_table(pd.DataFrame(rows), "trials.json")
    scored = [row for row in rows if row[tuning.OBJECTIVE] is not None]
    numbers = [int(row["trial_id"]) + 1 for row in scored]
    scores = [row[tuning.OBJECTIVE] for row in scored]
    mlflow.log_figure(
        plots.score_per_trial(numbers, scores, best[tuning.OBJECTIVE]), "score_per_trial.png"
    )
    names = {name for row in scored for name in row} - {"trial_id", "status", tuning.OBJECTIVE}
    values = {name: [row.get(name) for row in scored] for name in names}
    mlflow.log_figure(plots.hyperparameter_scores(values, scores), "hyperparameter_scores.png")


@exit_on_pipeline_error(STAGE)
@single_stage_process(STAGE)
def stage_main() -> None:
    paths = ProjectPaths.cwd()
    params = load_params(paths.params)
    data_digest = read_json(paths.require(paths.data_summary))["sha256"]
    fingerprint = tuning.search_fingerprint(params.tune, params.seed, str(data_digest))
    resume_id = tuning.resumable_run_id(paths.tuning_state, fingerprint)
    with stage_run(STAGE, params, (STAGE,), resume_run_id=resume_id) as active:
        run_id = active.info.run_id
        if resume_id:
            log.info("resuming the interrupted search of run %s", run_id)
        lineage.log_splits(paths, {"train": "training", "val": "validation"})
        tuning.save_state(paths.tuning_state, fingerprint, run_id, finished=False)
        best = run(params.tune, paths, seed=params.seed, run_id=run_id)
        tuning.save_state(paths.tuning_state, fingerprint, run_id, finished=True)
    log.info(
        "best %s %.4f (trial %s): %s",
        tuning.OBJECTIVE,
        best[tuning.OBJECTIVE],
        best["trial_id"],
        best["hyperparameters"],
    )


@exit_on_pipeline_error(STAGE)
def worker_main() -> None:
    """A worker of a distributed search: trains the trials a chief hands it, until it stops."""
    chief = os.environ.get(distributed.CHIEF_PID_VARIABLE)
    with worker_process(int(chief) if chief else None):
        paths = ProjectPaths.cwd()
        params: Params = load_params(paths.params)
        tracking.configure()
        run_id = distributed.tune_run_id(tracking.experiment(params.mlflow.experiment))
        seed_everything(params.seed)
        tuner = tuning.make_tuner(params.tune, params.seed, paths.tuning_state, run_id)
        tuner.oracle = distributed.PatientOracleClient(tuner.oracle)
        log.info("worker %s of tune run %s", tuner.tuner_id, run_id)
        _search(tuner, params.tune, paths, params.seed)
        log.info("worker %s: the chief says the search is over", tuner.tuner_id)


def main() -> None:
    if sys.argv[1:] == ["--worker"]:
        worker_main()
    else:
        stage_main()


if __name__ == "__main__":
    main()
