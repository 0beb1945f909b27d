"""Logging for the pipeline's processes: one format, the level from `MNIST_MLOPS_LOG_LEVEL`.

Stages log under their own name (`logging.getLogger("tune")`), modules under theirs
(`mnist_mlops.tuning`). Keras keeps its own progress output (`training.progress_verbosity`).
"""

from __future__ import annotations

import logging
import os

LEVEL_VARIABLE = "MNIST_MLOPS_LOG_LEVEL"
DEFAULT_LEVEL = "INFO"
FORMAT = "%(asctime)s %(levelname)s [%(name)s] %(message)s"
DATE_FORMAT = "%H:%M:%S"


def configure() -> None:
    """Send every logger's records to stderr in one format, at the level the environment asks."""
    name = os.environ.get(LEVEL_VARIABLE, DEFAULT_LEVEL).upper()
    level = logging.getLevelNamesMapping().get(name)
    # basicConfig adds no handler where one exists (pytest's, say); the level applies regardless.
    logging.basicConfig(format=FORMAT, datefmt=DATE_FORMAT)
    logging.getLogger().setLevel(level or DEFAULT_LEVEL)
    # TensorFlow prints its INFO records itself; passed on, each would show twice.
    logging.getLogger("tensorflow").setLevel(max(level or logging.INFO, logging.WARNING))
    if level is None:
        logging.getLogger(__name__).warning(
            "%s=%r is not a logging level (DEBUG, INFO, WARNING, ERROR); using %s",
            LEVEL_VARIABLE,
            name,
            DEFAULT_LEVEL,
        )
