"""Start or stop the team's MLflow tracking server: PostgreSQL as the backend store, artifacts
uploaded through the server (see mnist_mlops.tracking_server). State: .mlflow-server/.

    python scripts/tracking_server.py start [--host 0.0.0.0] [--port 5000] [--allowed-hosts ...]
    python scripts/tracking_server.py stop
    python scripts/tracking_server.py install   # PostgreSQL alone, where missing

The first start installs PostgreSQL where it is missing (as root, with apt-get) and creates the
cluster; later starts reuse it. Point the pipeline at the printed URL with MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import argparse
import logging
import os
import time
from pathlib import Path

from mnist_mlops import tracking_server
from mnist_mlops.errors import exit_on_pipeline_error

PROJECT_ROOT = Path(__file__).resolve().parents[1]
log = logging.getLogger("tracking-server")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("action", choices=("start", "stop", "install"))
    parser.add_argument(
        "--host",
        default=os.environ.get("MNIST_MLOPS_SERVER_HOST", tracking_server.DEFAULT_HOST),
        help="interface to bind (env MNIST_MLOPS_SERVER_HOST; default %(default)s, this machine "
        "only; 0.0.0.0 for the team's machines)",
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(os.environ.get("MNIST_MLOPS_SERVER_PORT", tracking_server.DEFAULT_PORT)),
        help="port (env MNIST_MLOPS_SERVER_PORT; default %(default)s)",
    )
    parser.add_argument(
        "--allowed-hosts",
        default=os.environ.get("MNIST_MLOPS_SERVER_ALLOWED_HOSTS"),
        help="Host headers the server accepts beyond localhost and private IPs, e.g. the name "
        "the team uses for this machine (env MNIST_MLOPS_SERVER_ALLOWED_HOSTS)",
    )
    parser.add_argument("--workers", type=int, default=2, help="server worker processes")
    parser.add_argument(
        "--state-dir",
        type=Path,
        default=Path(os.environ.get("MNIST_MLOPS_SERVER_DIR", PROJECT_ROOT / ".mlflow-server")),
        help="PostgreSQL cluster, artifacts, log and PID file (env MNIST_MLOPS_SERVER_DIR; "
        "default %(default)s)",
    )
    return parser.parse_args()


@exit_on_pipeline_error("tracking-server")
def main() -> None:
    args = arguments()
    state = tracking_server.ServerState(args.state_dir.resolve())
    if args.action == "stop":
        tracking_server.stop(state)
        return
    if args.action == "install":
        log.info("PostgreSQL in %s", tracking_server.ensure_postgres())
        return
    started = time.monotonic()
    server = tracking_server.start(
        state, args.host, args.port, workers=args.workers, allowed_hosts=args.allowed_hosts
    )
    log.info(
        "MLflow tracking server at %s (PID %d, %.1f s)",
        server.url,
        server.pid,
        time.monotonic() - started,
    )
    log.info("point the pipeline at it: export MLFLOW_TRACKING_URI=%s", server.url)
    log.info("stop it: make tracking-server-stop")


if __name__ == "__main__":
    main()
