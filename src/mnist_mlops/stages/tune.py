"""tune: a Keras Tuner search on the training split, scored on the validation split.

Reads: data/prepared/{train,val}.npz and summary.json. Writes: tuning/best_hparams.json,
tuning/trials.json, tuning/metrics.json. Keeps its resumable search state in tuning/state/
(a persistent DVC output: a killed search continues where it stopped on the next `dvc repro`).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import keras
import mlflow
import pandas as pd

from mnist_mlops import plots, tuning
from mnist_mlops.config import Params, load_params
from mnist_mlops.data import load_split, stratified_subset
from mnist_mlops.errors import PipelineError, exit_on_pipeline_error
from mnist_mlops.tracking import stage_run
from mnist_mlops.training import (
    one_hot,
    progress_verbosity,
    read_json,
    seed_everything,
    to_model_input,
    write_json,
)

STAGE = "tune"
PREPARED_DIR = Path("data/prepared")
OUT_DIR = Path("tuning")
STATE_DIR = OUT_DIR / "state"


def run(params: Params, prepared_dir: Path, out_dir: Path, state_dir: Path, run_id: str) -> dict:
    """Run or continue the search, logging into tune run `run_id`; return the best config."""
    seed_everything(params.seed)
    x_train, y_train = load_split(prepared_dir / "train.npz")
    x_val, y_val = load_split(prepared_dir / "val.npz")
    if params.tune.search_subset is not None:
        x_train, y_train = stratified_subset(
            x_train, y_train, params.tune.search_subset, params.seed
        )
    tuner = tuning.make_tuner(params.tune, params.seed, state_dir, run_id)
    tuner.search_space_summary()
    started = time.monotonic()
    tuner.search(
        to_model_input(x_train),
        one_hot(y_train),
        validation_data=(to_model_input(x_val), one_hot(y_val)),
        epochs=params.tune.epochs,
        callbacks=[
            keras.callbacks.EarlyStopping(
                monitor=tuning.OBJECTIVE, patience=params.tune.early_stopping_patience
            )
        ],
        verbose=progress_verbosity(),
    )
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
        "epochs_trained": tuner.epochs_trained,
        "train_examples": len(y_train),
    }
    write_json(out_dir / "best_hparams.json", best)
    write_json(out_dir / "trials.json", rows)
    write_json(out_dir / "metrics.json", summary)
    _log_summary(best, rows, summary)
    return best


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
def main() -> None:
    params = load_params()
    data_digest = read_json(PREPARED_DIR / "summary.json", "prepare")["sha256"]
    fingerprint = tuning.search_fingerprint(params.tune, params.seed, str(data_digest))
    resume_id = tuning.resumable_run_id(STATE_DIR, fingerprint)
    with stage_run(STAGE, params, (STAGE,), resume_run_id=resume_id) as active:
        run_id = active.info.run_id
        if resume_id:
            killed = tuning.kill_orphaned_trial_runs(run_id)
            print(
                f"[{STAGE}] resuming the interrupted search of run {run_id} "
                f"({killed} interrupted trial run(s) marked KILLED)"
            )
        tuning.save_state(STATE_DIR, fingerprint, run_id, finished=False)
        best = run(params, PREPARED_DIR, OUT_DIR, STATE_DIR, run_id)
        tuning.save_state(STATE_DIR, fingerprint, run_id, finished=True)
    print(
        f"[{STAGE}] best {tuning.OBJECTIVE} {best[tuning.OBJECTIVE]:.4f} (trial "
        f"{best['trial_id']}): {best['hyperparameters']}"
    )


if __name__ == "__main__":
    main()
