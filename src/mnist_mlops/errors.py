"""The errors a user can cause (bad params, missing or corrupt data, a stage run out of order),
and the guard that turns them into a one-line message instead of a traceback."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable


class PipelineError(Exception):
    """A problem with the pipeline's inputs that the user can fix; the message says how."""


def exit_on_pipeline_error(stage: str) -> Callable[[Callable[[], None]], Callable[[], None]]:
    """Decorate a stage's main(): print `<stage>: error: <message>` and exit 1 on PipelineError."""

    def decorate(main: Callable[[], None]) -> Callable[[], None]:
        @functools.wraps(main)
        def guarded() -> None:
            try:
                main()
            except PipelineError as err:
                print(f"{stage}: error: {err}", file=sys.stderr)
                sys.exit(1)

        return guarded

    return decorate
