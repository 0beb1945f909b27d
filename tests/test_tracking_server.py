"""`scripts/tracking_server.py` for real: a PostgreSQL cluster and `mlflow server` started, reused
after a restart and stopped by PID, in a throwaway state folder on a free loopback port."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from mlflow.tracking import MlflowClient
from support import REPO_ROOT, server_state_dir

from mnist_mlops.scoring_server import free_port, ping
from mnist_mlops.tracking_server import postgres_bin_dir, server_url

SCRIPT = REPO_ROOT / "scripts" / "tracking_server.py"


def _script(*args: object) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run(
        [sys.executable, str(SCRIPT), *map(str, args)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def state_dir() -> Iterator[Path]:
    if postgres_bin_dir() is None:
        pytest.skip("PostgreSQL is not installed (no initdb): `make postgres` installs it")
    root = server_state_dir()
    yield root
    _script("stop", "--state-dir", root)
    shutil.rmtree(root, ignore_errors=True)


def _alive(pgid: int) -> list[psutil.Process]:
    """Processes of the server's group that still run (an unreaped zombie does not)."""
    members = []
    for process in psutil.process_iter(["status"]):
        try:
            if os.getpgid(process.pid) == pgid and process.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(process)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


@pytest.mark.slow
def test_the_server_starts_keeps_its_data_across_a_restart_and_stops(state_dir):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    first = _script("start", "--state-dir", state_dir, "--port", port)
    assert first.returncode == 0, first.stderr
    assert f"MLflow tracking server at {url}" in first.stderr
    assert "created the PostgreSQL cluster" in first.stderr
    MlflowClient(url).create_experiment("kept across restarts")
    pid = json.loads((state_dir / "mlflow.json").read_text())["pid"]

    again = _script("start", "--state-dir", state_dir, "--port", port)
    assert again.returncode == 0 and f"already running (PID {pid})" in again.stderr

    stopped = _script("stop", "--state-dir", state_dir)
    assert stopped.returncode == 0, stopped.stderr
    assert "stopped mlflow server" in stopped.stderr and "stopped PostgreSQL" in stopped.stderr
    assert not ping(url, path="/health")
    assert not _alive(pid)
    assert not (state_dir / "pgdata" / "postmaster.pid").exists()
    assert not (state_dir / "mlflow.json").exists()

    second = _script("start", "--state-dir", state_dir, "--port", port)
    assert second.returncode == 0, second.stderr
    assert "created the PostgreSQL cluster" not in second.stderr
    assert MlflowClient(url).get_experiment_by_name("kept across restarts") is not None


def test_a_busy_port_is_refused_in_one_line(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = _script("start", "--state-dir", tmp_path, "--port", port)
    assert result.returncode == 1
    assert f"port {port} on 127.0.0.1 is in use" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "mlflow.json").exists()


def test_the_printed_url_is_one_clients_can_use():
    assert server_url("127.0.0.1", 5000) == "http://127.0.0.1:5000"
    # Bound to every interface: reached by this machine's name, not by 0.0.0.0.
    assert server_url("0.0.0.0", 5000) == f"http://{os.uname().nodename}:5000"
    assert server_url("::1", 5000) == "http://[::1]:5000"
