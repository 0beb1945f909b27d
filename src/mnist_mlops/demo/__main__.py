"""`python -m mnist_mlops.demo` (`make demo`): the draw-a-digit page at a printed 127.0.0.1
address, in front of the registered champion served by `mlflow models serve`.

The command starts the model server itself (models:/<mlflow.registered_model>@champion, the
name from params.yaml, in the store `store.tracking_uri()` names) and stops it on exit (Ctrl-C
or SIGTERM), unless `--model-url` points at a scoring server that is already running.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from mnist_mlops.config import load_params
from mnist_mlops.demo.app import create_app
from mnist_mlops.errors import PipelineError, exit_on_pipeline_error
from mnist_mlops.paths import ProjectPaths
from mnist_mlops.scoring_server import SERVER_HOST, ScoringServer
from mnist_mlops.store import tracking_uri

NAME = "demo"
DEFAULT_PORT = 8000
log = logging.getLogger(NAME)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (`argv`, default sys.argv[1:])."""
    parser = argparse.ArgumentParser(
        prog="python -m mnist_mlops.demo",
        description="Serve a page where you draw a digit and see what the served model reads.",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=DEFAULT_PORT,
        help=f"port of the page on {SERVER_HOST} (default {DEFAULT_PORT}; 0: any free port)",
    )
    parser.add_argument(
        "--model-url",
        help="a scoring server that is already running, e.g. http://127.0.0.1:5001 (default: "
        "start one for models:/<mlflow.registered_model>@champion, and stop it on exit)",
    )
    return parser.parse_args(argv)


@exit_on_pipeline_error(NAME)
def main() -> None:
    args = parse_args()
    # SIGTERM stops the demo the way Ctrl-C does, so the model server is stopped either way.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        with listening_socket(args.port) as sock, contextlib.ExitStack() as stack:
            model_url = args.model_url or stack.enter_context(champion_server())
            port = sock.getsockname()[1]
            log.info("draw a digit at http://%s:%d (Ctrl-C stops the demo)", SERVER_HOST, port)
            # log_config=None: uvicorn logs through the root logger's handler and format.
            config = uvicorn.Config(
                create_app(model_url), log_config=None, log_level="warning", access_log=False
            )
            uvicorn.Server(config).run(sockets=[sock])
    except KeyboardInterrupt:
        # uvicorn shuts down on the signal, then raises it again once it has finished.
        pass
    log.info("demo stopped")


@contextlib.contextmanager
def listening_socket(port: int) -> Iterator[socket.socket]:
    """The page's socket, listening before the model server starts: a busy port fails at once,
    and the printed address takes connections (queued until uvicorn runs)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((SERVER_HOST, port))
        sock.listen()
    except OSError as err:
        sock.close()
        raise PipelineError(
            f"cannot listen on {SERVER_HOST}:{port} ({err.strerror}); choose another --port"
        ) from None
    with sock:
        yield sock


@contextlib.contextmanager
def champion_server() -> Iterator[str]:
    """A `mlflow models serve` process for the champion; yields its URL."""
    store = tracking_uri()
    uri = champion_uri(store)
    with tempfile.TemporaryDirectory(prefix="mnist-demo-") as tmp:
        server = ScoringServer(uri, store, Path(tmp) / "model-server.log")
        log.info("starting the model server for %s (store %s)", uri, store)
        try:
            server.start()
        except RuntimeError as err:  # it exited or never answered; the message holds its log
            raise PipelineError(str(err)) from None
        except BaseException:  # Ctrl-C while it loads
            server.stop()
            raise
        log.info("model server for %s at %s", uri, server.url)
        try:
            yield server.url
        finally:
            server.stop()
            log.info("model server stopped")


def champion_uri(store: str) -> str:
    """models:/<registered model>@champion, after checking that some version holds the alias."""
    # registry imports Keras and TensorFlow, which only the path that starts a model server needs.
    from mnist_mlops.registry import CHAMPION_ALIAS

    name = load_params(ProjectPaths.cwd().params).mlflow.registered_model
    database = store.removeprefix("sqlite:///")
    if store.startswith("sqlite:///") and not Path(database).exists():
        # MLflow would create an empty store there; say what is missing instead.
        raise PipelineError(f"no MLflow store at {database}; run the pipeline first (make run)")
    try:
        MlflowClient(store).get_model_version_by_alias(name, CHAMPION_ALIAS)
    except MlflowException:
        raise PipelineError(
            f"no version of {name!r} holds @{CHAMPION_ALIAS} in the MLflow store {store}; "
            "run the pipeline first (make run), or pass --model-url"
        ) from None
    return f"models:/{name}@{CHAMPION_ALIAS}"


if __name__ == "__main__":
    main()
