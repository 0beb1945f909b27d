"""The errors a user can cause (bad params, missing or corrupt data, a stage run out of order),
and the entry-point guard that turns them into one line instead of a traceback."""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable

from mnist_mlops import logs


class PipelineError(Exception):
    """A problem with the pipeline's inputs that the user can fix; the message says how."""


def exit_on_pipeline_error(stage: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Decorate a stage's main(): set up logging, then log `<message>` and exit 1 on
    PipelineError."""

    def decorate(main: Callable[[], None]) -> Callable[[], None]:
        @functools.wraps(main)
        def guarded() -> None:
            logs.configure()
            try:
                main()
            except PipelineError as err:
                logging.getLogger(stage).error("%s", err)
                sys.exit(1)

        return guarded

    return decorate
