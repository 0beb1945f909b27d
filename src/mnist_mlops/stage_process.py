"""A stage's process: one at a time per stage and project, stopped cleanly by a signal or by the
death of the `dvc` process that started it, and recognisable afterwards as alive or gone.

`single_stage_process(stage)` wraps a stage's `main()`:
- it takes `.locks/<stage>.lock` under the project (`fcntl.flock`; the OS lets go of it when the
  process ends, however it ends): a second process of the same stage in the same project is
  refused with a PipelineError naming the first one's PID, instead of both writing the same
  outputs;
- SIGTERM, SIGINT and SIGHUP raise `StageInterrupted` in the main thread, so the stage's MLflow
  run ends KILLED (`tracking.stage_run`) and the stage prints one line;
- under `dvc`, a watchdog thread stops the stage when that `dvc` process is gone: DVC leaves its
  running stage behind when it is killed itself (kill -9, or a CI timeout that signals one PID).

`worker_process(parent_pid)` does the same for a process that a stage starts to help it (tune's
workers): the stop signals, and a stop when that stage's process is gone; no lock.

`ProcessIdentity` (PID, host, start time) is recorded on every stage run, so that a later run of
the stage can tell the run of a process that died from the run of one still working.
"""

from __future__ import annotations

import fcntl
import functools
import logging
import os
import signal
import socket
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import psutil

from mnist_mlops.errors import PipelineError, StageInterrupted
from mnist_mlops.paths import ProjectPaths

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# How often the watchdog looks at the dvc process: the delay between its death and the stop.
WATCH_INTERVAL_S = 1.0
# /proc/<pid>/stat counts a process's start in clock ticks after boot.
_CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
log = logging.getLogger(__name__)


def start_time(process: psutil.Process) -> float:
    """When `process` started, in seconds after boot: the same value every time it is read.

    psutil's `create_time()` adds the boot time, which Linux derives from the wall clock on each
    read of /proc/stat, so it moves when the clock is adjusted. On the CI machine the stages of
    one `dvc repro` got two pipeline ids from one `dvc` process, which is what that gives.
    """
    try:
        stat = Path(f"/proc/{process.pid}/stat").read_text()
    except FileNotFoundError:
        if Path("/proc/self/stat").exists():
            raise psutil.NoSuchProcess(process.pid) from None
        return process.create_time()  # no procfs (macOS): psutil's own, from the kernel
    # The command name (field 2, in parentheses) may hold spaces; starttime is field 22.
    return int(stat.rsplit(")", 1)[1].split()[19]) / _CLOCK_TICKS


@dataclass(frozen=True)
class ProcessIdentity:
    """Which process a stage run belongs to: a PID alone may be reused by another process."""

    pid: int
    host: str
    started: float

    TAGS = ("process.pid", "process.host", "process.started")

    @classmethod
    def current(cls) -> ProcessIdentity:
        return cls(os.getpid(), socket.gethostname(), start_time(psutil.Process()))

    def tags(self) -> dict[str, str]:
        return dict(zip(self.TAGS, (str(self.pid), self.host, repr(self.started)), strict=True))

    @classmethod
    def from_tags(cls, tags: Mapping[str, str]) -> ProcessIdentity | None:
        """The identity recorded in a run's tags; None on runs that predate these tags."""
        try:
            pid, host, started = (tags[name] for name in cls.TAGS)
            return cls(int(pid), host, float(started))
        except (KeyError, ValueError):
            return None

    def is_gone(self) -> bool | None:
        """Whether the process has ended; None when it ran on another host (no way to tell)."""
        if self.host != socket.gethostname():
            return None
        try:
            process = psutil.Process(self.pid)
            return (
                start_time(process) != self.started  # the PID now names another process
                or process.status() == psutil.STATUS_ZOMBIE
            )
        except psutil.NoSuchProcess:
            return True
        except psutil.AccessDenied:
            return False  # someone else's process, alive


def dvc_ancestor() -> psutil.Process | None:
    """The nearest `dvc` process above this one (`dvc repro`, `dvc exp run`), if any."""
    for parent in psutil.Process().parents():
        try:
            # `dvc ...` or `python .../bin/dvc ...`
            if any(Path(arg).name == "dvc" for arg in parent.cmdline()[:2]):
                return parent
        except psutil.Error:
            continue
    return None


def single_stage_process(stage: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Decorate a stage's main() (under `errors.exit_on_pipeline_error`, which prints what it
    raises): the stage lock, stop signals and the dvc watchdog, for the whole of main()."""

    def decorate(main: Callable[[], None]) -> Callable[[], None]:
        @functools.wraps(main)
        def guarded() -> None:
            with (
                _stage_lock(ProjectPaths.cwd(), stage),
                _stop_on_signals(),
                _stop_with_dvc(),
            ):
                main()

        return guarded

    return decorate


@contextmanager
def worker_process(parent_pid: int | None) -> Iterator[None]:
    """Stop signals raise `StageInterrupted`; with `parent_pid`, so does that process's end (a
    SIGKILLed chief cannot stop its workers itself)."""
    with _stop_on_signals():
        if parent_pid is None or not psutil.pid_exists(parent_pid):
            yield
            return
        with _stop_when_gone(psutil.Process(parent_pid), f"its chief (PID {parent_pid})"):
            yield


@contextmanager
def _stage_lock(paths: ProjectPaths, stage: str) -> Iterator[None]:
    path = paths.stage_lock(stage)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as file:
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            holder = file.read().strip() or "unknown"
            raise PipelineError(
                f"another {stage} process (PID {holder}) is running in this project "
                f"({paths.root.resolve()}); wait for it to end or stop it (kill {holder})"
            ) from None
        file.seek(0)
        file.truncate()
        file.write(f"{os.getpid()}\n")
        file.flush()
        yield


# Why the next stop signal arrives, when this process sends it to itself (the watchdog).
_stop_reason: str | None = None


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    # A second signal ends the process at once (the default action), should the clean stop hang.
    signal.signal(signum, signal.SIG_DFL)
    reason = _stop_reason or f"{signal.Signals(signum).name} received"
    raise StageInterrupted(reason, signum)


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    previous = {signum: signal.getsignal(signum) for signum in STOP_SIGNALS}
    for signum, handler in previous.items():
        if handler is not signal.SIG_IGN:  # e.g. SIGHUP under nohup stays ignored
            signal.signal(signum, _raise_interrupted)
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


@contextmanager
def _stop_with_dvc() -> Iterator[None]:
    dvc = dvc_ancestor()
    if dvc is None:
        yield
        return
    with _stop_when_gone(dvc, f"its dvc process (PID {dvc.pid})"):
        yield


@contextmanager
def _stop_when_gone(process: psutil.Process, what: str) -> Iterator[None]:
    done = threading.Event()
    watchdog = threading.Thread(
        target=_watch, args=(process, os.getppid(), what, done), name="watchdog", daemon=True
    )
    watchdog.start()
    try:
        yield
    finally:
        done.set()


def _watch(process: psutil.Process, parent_pid: int, what: str, done: threading.Event) -> None:
    """Send this process SIGTERM once `process` is gone (or the direct parent changed: orphaned
    processes are adopted by another), unless the stage finished first."""
    while not done.wait(WATCH_INTERVAL_S):
        if os.getppid() != parent_pid or not _running(process):
            global _stop_reason
            _stop_reason = f"{what} is gone"
            os.kill(os.getpid(), signal.SIGTERM)
            return


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
