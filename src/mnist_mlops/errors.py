"""The errors a user can cause (bad params, missing or corrupt data, a stage run out of order),
a stage stopped on request, and the entry-point guard that turns both into one line instead of
a traceback."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable

from mnist_mlops import logs


class PipelineError(Exception):
    """A problem with the pipeline's inputs that the user can fix; the message says how."""


class StageInterrupted(BaseException):
    """A stop signal, raised in the stage's main thread (`stage_process`).

    A BaseException, like KeyboardInterrupt: no `except Exception` on the way (Keras Tuner's
    around each trial, say) may swallow it and carry on.
    """

    def __init__(self, reason: str, signum: int) -> None:
        super().__init__(reason)
        self.signum = signum


def exit_on_pipeline_error(stage: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Decorate a stage's main(): set up logging, then log `<message>` and exit 1 on
    PipelineError; log `stopped: <reason>` and exit 128 + the signal's number (as a shell
    reports a process killed by it) on StageInterrupted."""

    def decorate(main: Callable[[], None]) -> Callable[[], None]:
        @functools.wraps(main)
        def guarded() -> None:
            logs.configure()
            try:
                main()
            except PipelineError as err:
                logging.getLogger(stage).error("%s", err)
                sys.exit(1)
            except StageInterrupted as stop:
                logging.getLogger(stage).error("stopped: %s", stop)
                sys.exit(128 + stop.signum)

        return guarded

    return decorate
