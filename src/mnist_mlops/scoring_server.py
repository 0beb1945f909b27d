"""A local `mlflow models serve` process, started and stopped by PID: for tests, benchmarks and
anything else that needs the registered model behind real HTTP on this machine.

Not part of the served model (that is `mnist_serving`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

SERVER_HOST = "127.0.0.1"


class ScoringServer:
    """`mlflow models serve --env-manager local` on 127.0.0.1, started and stopped by PID.

    The command runs uvicorn from the interpreter's bin directory, which therefore goes first
    on PATH. Output goes to `log_path`, so a failed start can show why. `env` adds to (or
    overrides) the environment the server inherits.
    """

    def __init__(
        self,
        model_uri: str,
        tracking_uri: str,
        log_path: Path,
        port: int | None = None,
        startup_timeout: float = 180.0,
        env: dict[str, str] | None = None,
    ) -> None:
        self.model_uri = model_uri
        self.extra_env = env or {}
        self.tracking_uri = tracking_uri
        self.log_path = log_path
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self.url = f"http://{SERVER_HOST}:{self.port}"
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> ScoringServer:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        bin_dir = str(Path(sys.executable).parent)
        env = {
            **os.environ,
            "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
            "MLFLOW_TRACKING_URI": self.tracking_uri,
            "TF_CPP_MIN_LOG_LEVEL": "2",
            **self.extra_env,
        }
        command = [
            sys.executable, "-m", "mlflow", "models", "serve",
            "-m", self.model_uri, "--env-manager", "local",
            "--host", SERVER_HOST, "--port", str(self.port),
        ]  # fmt: skip
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                command, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
            )
        deadline = time.monotonic() + self.startup_timeout
        while not self.ping():
            problem = None
            if self.process.poll() is not None:
                problem = f"exited with code {self.process.returncode} before answering /ping"
            elif time.monotonic() > deadline:
                problem = f"did not answer /ping within {self.startup_timeout:.0f} s"
            if problem:
                self.stop()
                raise RuntimeError(f"model server {problem}; its log:\n{self.log()}")
            time.sleep(0.25)

    def ping(self) -> bool:
        return ping(self.url)

    def pids(self) -> list[int]:
        """The `mlflow models serve` process and the uvicorn process it runs."""
        return _process_tree(self.process.pid) if self.process else []

    def stop(self, timeout: float = 15.0) -> None:
        """Stop uvicorn first, so that the mlflow process reaps it and exits; force if stuck."""
        if self.process is None:
            return
        process, self.process = self.process, None
        tree = _process_tree(process.pid)
        # Signalling the mlflow process first would orphan uvicorn, and an orphan may never be
        # reaped (in a container whose init does not reap, it stays a zombie).
        _signal(tree[1:] or tree, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _signal(tree, signal.SIGKILL)
            process.wait(timeout=timeout)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def ping(url: str, timeout: float = 2.0, path: str = "/ping") -> bool:
    """Whether the server at `url` answers its health check with 200: `/ping` for a scoring
    server, `/health` for an MLflow tracking server."""
    try:
        with urllib.request.urlopen(f"{url}{path}", timeout=timeout) as response:
            return response.status == 200
    except OSError:  # URLError, refused connections and timeouts alike
        return False


def _process_tree(pid: int) -> list[int]:
    # psutil is imported here so that serving the model does not need it.
    import psutil

    try:
        return [pid, *(child.pid for child in psutil.Process(pid).children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def _signal(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((SERVER_HOST, 0))
        return sock.getsockname()[1]
