"""One search across many worker processes and machines, on Keras Tuner's chief/worker engine.

The chief (the tune stage's process) serves the oracle over gRPC with Keras Tuner's own
`OracleServicer`; each worker (`python -m mnist_mlops.stages.tune --worker`, started by the
stage or by hand on another machine) asks it for trials through Keras Tuner's `OracleClient`,
trains them and logs each into its own MLflow run. Keras Tuner leaves faults to its user; the
two small wrappers here add what a search needs to outlive them:

`LeasedOracle` (the chief):
- a lease per trial: a trial without a result `lease_s` after it was handed out is handed out
  once more, then FAILED, and its MLflow run ends KILLED (keras-tuner#915: a worker that dies
  mid-trial leaves the chief waiting for it forever);
- IDLE instead of STOPPED while trials are leased, so that a live worker is there to take one
  that comes back;
- the chief stops serving only once every live worker has been told to stop (keras-tuner#645: a
  worker calling a chief that is gone retries for up to an hour);
- a restarted chief keeps the trials in flight for the workers that hold them (Keras Tuner's
  reload re-queues them, then accepts the re-run's result and the original worker's too);
- results for a trial no worker holds are ignored: each trial counts once;
- a failed trial's error is logged on the chief (`Trial.to_proto` drops the message; the worker
  puts it on the trial's MLflow run first).

`PatientOracleClient` (a worker): backs off while the chief answers IDLE, where Keras Tuner asks
again at once (10,515 requests in 30 s from one idle worker on Hyperband).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from concurrent import futures
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, NamedTuple

import grpc
import keras_tuner as kt
from keras_tuner.src import protos
from keras_tuner.src.distribute.oracle_chief import OracleServicer
from mlflow.tracking import MlflowClient

from mnist_mlops import tuning
from mnist_mlops.errors import PipelineError
from mnist_mlops.files import read_json
from mnist_mlops.tracking import end_killed

# Keras Tuner's own configuration of its distributed engine.
TUNER_ID_VARIABLE = "KERASTUNER_TUNER_ID"
ORACLE_IP_VARIABLE = "KERASTUNER_ORACLE_IP"
ORACLE_PORT_VARIABLE = "KERASTUNER_ORACLE_PORT"
# Set by the chief for the workers it starts itself; a worker started by hand finds the tune run
# by the chief's port (the tune run's ORACLE_PORT_TAG).
TUNE_RUN_VARIABLE = "MNIST_TUNE_RUN_ID"
CHIEF_PID_VARIABLE = "MNIST_TUNE_CHIEF_PID"
ORACLE_PORT_TAG = "oracle_port"
# A trial whose lease expired is handed out this many more times before it is FAILED.
LEASE_RETRIES = 1
BACKOFF_START_S = 0.1
BACKOFF_MAX_S = 5.0
# A worker that has not asked for this long is gone: an idle one asks every BACKOFF_MAX_S.
SILENT_WORKER_S = 3 * BACKOFF_MAX_S
POLL_S = 0.5
# How long finished workers get to exit before their process groups are killed.
WORKER_EXIT_S = 60.0
_Status = kt.engine.trial.TrialStatus
log = logging.getLogger(__name__)


class LeasedOracle:
    """The chief's oracle as `OracleServicer` calls it, with trial leases (see the module)."""

    def __init__(self, oracle: kt.Oracle, lease_s: float, parent_run_id: str) -> None:
        self.oracle = oracle
        self.lease_s = lease_s
        self.parent_run_id = parent_run_id
        self.idle_answers = 0
        self._lock = threading.Lock()
        self._leased_at: dict[str, float] = {}
        self._expiries: Counter[str] = Counter()
        self._last_request: dict[str, float] = {}
        self._told_to_stop: set[str] = set()
        self._keep_in_flight()

    def get_space(self) -> kt.HyperParameters:
        return self.oracle.get_space()

    def update_space(self, hyperparameters: kt.HyperParameters) -> None:
        with self._lock:
            self.oracle.update_space(hyperparameters)

    def get_trial(self, trial_id: str) -> kt.engine.trial.Trial:
        return self.oracle.get_trial(trial_id)

    def get_best_trials(self, num_trials: int = 1) -> list[kt.engine.trial.Trial]:
        return self.oracle.get_best_trials(num_trials)

    def create_trial(self, tuner_id: str) -> kt.engine.trial.Trial:
        with self._lock:
            now = time.monotonic()
            self._last_request[tuner_id] = now
            self._told_to_stop.discard(tuner_id)
            # A restarted worker gets back the trial its id holds, with a fresh lease.
            trial = self.oracle.create_trial(tuner_id)
            if trial.status == _Status.RUNNING:
                self._leased_at[trial.trial_id] = now
            elif trial.status == _Status.STOPPED and self.oracle.ongoing_trials:
                # Keras Tuner stops a worker once every trial is handed out; a leased one may
                # still come back and need it.
                self.oracle.tuner_ids.add(tuner_id)
                trial = kt.engine.trial.Trial(self.oracle.get_space(), status=_Status.IDLE)
            elif trial.status == _Status.STOPPED:
                self._told_to_stop.add(tuner_id)
            if trial.status == _Status.IDLE:
                self.idle_answers += 1
            return trial

    def update_trial(
        self, trial_id: str, metrics: dict[str, float], step: int = 0
    ) -> kt.engine.trial.Trial:
        with self._lock:
            if self._holder(trial_id) is None:
                log.warning(
                    "trial %d: a result no worker holds the trial for; ignored", _n(trial_id)
                )
                return self.oracle.get_trial(trial_id)
            return self.oracle.update_trial(trial_id, metrics, step=step)

    def end_trial(self, trial: kt.engine.trial.Trial) -> None:
        with self._lock:
            holder = self._holder(trial.trial_id)
            if holder is None:
                log.warning("trial %d: ended again; ignored", _n(trial.trial_id))
                return
            self._last_request[holder] = time.monotonic()
            if trial.status != _Status.COMPLETED:
                trial.message = self._error_of(trial.trial_id)
            self.oracle.end_trial(trial)
            self._leased_at.pop(trial.trial_id, None)
            ended = self.oracle.get_trial(trial.trial_id)
            if ended.status != _Status.COMPLETED:
                log.warning("trial %d failed on %s: %s", _n(trial.trial_id), holder, trial.message)

    def expire_leases(self) -> None:
        """Take back the trials held past their lease: hand them out again, or fail them."""
        with self._lock:
            now = time.monotonic()
            for tuner_id, trial in list(self.oracle.ongoing_trials.items()):
                if now - self._leased_at[trial.trial_id] >= self.lease_s:
                    self._expire(tuner_id, trial)

    def finished(self) -> bool:
        """Every trial has ended, and every worker still asking has been told to stop."""
        with self._lock:
            # _retry_queue: Keras Tuner's queue of trials to hand out again.
            if not self._told_to_stop or self.oracle.ongoing_trials or self.oracle._retry_queue:
                return False
            now = time.monotonic()
            return all(
                tuner_id in self._told_to_stop or now - last > SILENT_WORKER_S
                for tuner_id, last in self._last_request.items()
            )

    def _holder(self, trial_id: str) -> str | None:
        return next(
            (t for t, trial in self.oracle.ongoing_trials.items() if trial.trial_id == trial_id),
            None,
        )

    def _expire(self, tuner_id: str, trial: kt.engine.trial.Trial) -> None:
        del self.oracle.ongoing_trials[tuner_id]
        del self._leased_at[trial.trial_id]
        self._expiries[trial.trial_id] += 1
        reason = f"no result from {tuner_id} within the {self.lease_s:g} s lease"
        for run_id in tuning.running_trial_runs(self.parent_run_id, trial.trial_id):
            end_killed(run_id, reason)
        if self._expiries[trial.trial_id] <= LEASE_RETRIES:
            self.oracle._retry_queue.append(trial.trial_id)
            self.oracle.save()
            log.warning("trial %d: %s; handed out again", _n(trial.trial_id), reason)
        else:
            trial.status = _Status.FAILED
            trial.message = reason
            self.oracle.end_trial(trial)
            log.error(
                "trial %d FAILED: %s, %d times", _n(trial.trial_id), reason, LEASE_RETRIES + 1
            )

    def _error_of(self, trial_id: str) -> str:
        """The error the worker put on the trial's run (`tuning.ERROR_TAG`), before reporting."""
        client = MlflowClient()
        for run_id in tuning.running_trial_runs(self.parent_run_id, trial_id):
            if error := client.get_run(run_id).data.tags.get(tuning.ERROR_TAG):
                return error
        return "no error recorded"

    def _keep_in_flight(self) -> None:
        """Undo what Keras Tuner's reload does to the trials in flight when the chief stopped
        (re-queue them for any worker): they stay with the workers that hold them, which report
        to the restarted chief or, restarted under the same id, get them back."""
        state_file = Path(self.oracle._get_oracle_fname())
        if not state_file.exists():
            return
        in_flight: dict[str, str] = read_json(state_file)["ongoing_trials"]
        now = time.monotonic()
        for tuner_id, trial_id in in_flight.items():
            if trial_id in self.oracle._retry_queue:
                self.oracle._retry_queue.remove(trial_id)
            trial = self.oracle.trials[trial_id]
            trial.status = _Status.RUNNING
            self.oracle.ongoing_trials[tuner_id] = trial
            self._leased_at[trial_id] = now
        if in_flight:
            log.info("kept in flight for their workers: %s", in_flight)


class PatientOracleClient:
    """A worker's `OracleClient` that waits while the chief answers IDLE, doubling the pause
    from BACKOFF_START_S to BACKOFF_MAX_S, where Keras Tuner's search loop asks again at once."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def __getattr__(self, name: str) -> Any:
        return getattr(self.client, name)

    def create_trial(self, tuner_id: str) -> kt.engine.trial.Trial:
        pause = BACKOFF_START_S
        while (trial := self.client.create_trial(tuner_id)).status == _Status.IDLE:
            time.sleep(pause)
            pause = min(2 * pause, BACKOFF_MAX_S)
        return trial


@contextmanager
def oracle_server(oracle: LeasedOracle, address: str) -> Iterator[int]:
    """Serve `oracle` with Keras Tuner's servicer at `address` (host:port, port 0: any free
    one); yield the port."""
    # One request at a time, as Keras Tuner's own chief serves.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    protos.get_service_grpc().add_OracleServicer_to_server(OracleServicer(oracle), server)
    port = server.add_insecure_port(address)
    if port == 0:
        raise PipelineError(f"the tune chief cannot listen on {address} (in use?)")
    server.start()
    try:
        yield port
    finally:
        server.stop(grace=1).wait()


class ChiefAddress(NamedTuple):
    listen: str  # host:port, port 0: any free one
    local_host: str  # the host the chief's own workers call


def take_chief_address() -> ChiefAddress:
    """Where the chief listens: KERASTUNER_ORACLE_IP and _PORT (default 127.0.0.1, any free
    port), removed from this process's environment with KERASTUNER_TUNER_ID: seeing them, Keras
    Tuner would make the chief's own tuner a client of itself, or demand a tuner id."""
    host = os.environ.pop(ORACLE_IP_VARIABLE, "127.0.0.1")
    port = os.environ.pop(ORACLE_PORT_VARIABLE, "0")
    os.environ.pop(TUNER_ID_VARIABLE, None)
    local = "127.0.0.1" if host in ("0.0.0.0", "::", "[::]") else host
    return ChiefAddress(f"{host}:{port}", local)


def serve_until_finished(oracle: LeasedOracle, workers: Sequence[subprocess.Popen]) -> None:
    """Expire leases until the search is over; fail if every local worker exited first."""
    while not oracle.finished():
        oracle.expire_leases()
        if workers and all(worker.poll() is not None for worker in workers):
            codes = [worker.returncode for worker in workers]
            raise PipelineError(f"every tune worker exited (codes {codes}) before the search ended")
        time.sleep(POLL_S)
    log.info("search over; %d IDLE answers to waiting workers", oracle.idle_answers)


@contextmanager
def local_workers(
    count: int, host: str, port: int, run_id: str
) -> Iterator[list[subprocess.Popen]]:
    """`count` worker processes of this project, each in its process group with an equal
    share of the cores; on the way out they get WORKER_EXIT_S to end, then their groups are
    killed."""
    threads = str(max(1, (os.cpu_count() or 1) // count))
    started = []
    try:
        for index in range(count):
            env = {
                **os.environ,
                TUNER_ID_VARIABLE: f"tuner{index}",
                ORACLE_IP_VARIABLE: host,
                ORACLE_PORT_VARIABLE: str(port),
                TUNE_RUN_VARIABLE: run_id,
                CHIEF_PID_VARIABLE: str(os.getpid()),
                "TF_NUM_INTRAOP_THREADS": threads,
                "TF_NUM_INTEROP_THREADS": "1",
                "OMP_NUM_THREADS": threads,
            }
            command = [sys.executable, "-m", "mnist_mlops.stages.tune", "--worker"]
            started.append(subprocess.Popen(command, env=env, start_new_session=True))
        log.info("%d workers on 127.0.0.1:%d, %s threads each", count, port, threads)
        yield started
        _wait_for(started, WORKER_EXIT_S)
    finally:
        _kill_groups(started)
    for index, worker in enumerate(started):
        if worker.returncode:
            log.warning("worker tuner%d exited with code %d", index, worker.returncode)


def _wait_for(processes: Sequence[subprocess.Popen], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            return


def _kill_groups(processes: Sequence[subprocess.Popen]) -> None:
    """SIGTERM the groups of the processes still running, then SIGKILL what is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        running = [p for p in processes if p.poll() is None]
        for process in running:
            with suppress(ProcessLookupError):
                os.killpg(process.pid, sig)
        _wait_for(running, 10.0)


def tune_run_id(experiment_id: str) -> str:
    """The tune run a worker logs its trials under: MNIST_TUNE_RUN_ID, else the running tune
    run whose chief listens on KERASTUNER_ORACLE_PORT."""
    if run_id := os.environ.get(TUNE_RUN_VARIABLE):
        return run_id
    port = os.environ[ORACLE_PORT_VARIABLE]
    runs = MlflowClient().search_runs(
        [experiment_id],
        filter_string=f"tags.stage = 'tune' and tags.{ORACLE_PORT_TAG} = '{port}' "
        "and attributes.status = 'RUNNING'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs:
        raise PipelineError(
            f"no running tune run has a chief on port {port} in this experiment "
            f"(set {TUNE_RUN_VARIABLE} to the run id the chief logs)"
        )
    return runs[0].info.run_id


def _n(trial_id: str) -> int:
    """A trial's number as the logs count them (from 1)."""
    return int(trial_id) + 1
