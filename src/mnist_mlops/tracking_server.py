"""A team's MLflow tracking server on one machine: PostgreSQL holds the runs, params, metrics and
the Model Registry; `mlflow server` stores the artifacts that clients upload through it in a
folder of its own, so the clients share no filesystem with it. Both run in the background and
are stopped by PID.

Everything lives in one state folder (`.mlflow-server/` at the project root for
`scripts/tracking_server.py`, a temporary folder in the tests):

    pgdata/      the PostgreSQL cluster, created on the first start and reused after
    postgres/    its unix socket and log (PostgreSQL listens on no TCP port)
    artifacts/   the server's --artifacts-destination
    mlflow.log   the server's output
    mlflow.json  the running server's PID and URL

PostgreSQL refuses to run as root; as root, its commands run as the `postgres` user (the one the
Debian package creates), which then owns pgdata/ and postgres/.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from mnist_mlops.errors import PipelineError
from mnist_mlops.files import read_json, write_json
from mnist_mlops.scoring_server import ping
from mnist_mlops.stage_process import start_time

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 5000
DATABASE = "mlflow"  # the database, and the PostgreSQL superuser that owns it
POSTGRES_USER = "postgres"  # runs PostgreSQL when we are root
DEBIAN_ROOT = Path("/usr/lib/postgresql")  # <version>/bin/ of each installed major version
# The Debian package otherwise creates and starts a cluster of its own on port 5432.
NO_DEFAULT_CLUSTER = Path("/etc/postgresql-common/createcluster.d/no-main-cluster.conf")
# A unix socket path longer than this (sun_path, with room for the name) cannot be bound.
MAX_SOCKET_DIR = 90
log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ServerState:
    """The folders and files of one server under `root` (see the module docstring)."""

    root: Path

    @property
    def pgdata(self) -> Path:
        return self.root / "pgdata"

    @property
    def postgres_dir(self) -> Path:
        """PostgreSQL's unix socket and its log."""
        return self.root / "postgres"

    @property
    def artifacts(self) -> Path:
        return self.root / "artifacts"

    @property
    def server_log(self) -> Path:
        return self.root / "mlflow.log"

    @property
    def pid_file(self) -> Path:
        return self.root / "mlflow.json"

    @property
    def backend_uri(self) -> str:
        # psycopg2 (the `+psycopg2` the pinned SQLAlchemy needs) connects through the socket.
        return f"postgresql+psycopg2://{DATABASE}@/{DATABASE}?host={self.postgres_dir}"


# --- PostgreSQL -----------------------------------------------------------------------------


def postgres_bin_dir() -> Path | None:
    """The folder of initdb and pg_ctl: Debian's newest major version, else the ones on PATH."""
    found = sorted(DEBIAN_ROOT.glob("*/bin/initdb"), key=lambda p: _version(p.parent.parent.name))
    if found:
        return found[-1].parent
    initdb = shutil.which("initdb")
    return Path(initdb).resolve().parent if initdb else None


def _version(name: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", name))


def ensure_postgres() -> Path:
    """The folder of PostgreSQL's programs, installed first where missing."""
    return postgres_bin_dir() or _install_postgres()


def _install_postgres() -> Path:
    """Install Debian's PostgreSQL (as root, with apt-get) without its default cluster."""
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise PipelineError(
            "PostgreSQL not found (no initdb under /usr/lib/postgresql/*/bin or on PATH): install "
            "it, e.g. `sudo apt-get install postgresql` (Debian, Ubuntu) or "
            "`brew install postgresql` (macOS), then start the server again"
        )
    log.info("installing PostgreSQL with apt-get (once)")
    NO_DEFAULT_CLUSTER.parent.mkdir(parents=True, exist_ok=True)
    NO_DEFAULT_CLUSTER.write_text("create_main_cluster = false\n")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "postgresql"]):
        if subprocess.run(command, env=env, stdout=subprocess.DEVNULL).returncode != 0:
            raise PipelineError(f"`{' '.join(command)}` failed (its errors are above)")
    found = postgres_bin_dir()
    if found is None:
        raise PipelineError("apt-get installed postgresql, but initdb is still not found")
    return found


class Postgres:
    """The cluster in `state.pgdata`, reached only through the socket in `state.postgres_dir`."""

    def __init__(self, state: ServerState, bin_dir: Path) -> None:
        self.state = state
        self.bin_dir = bin_dir

    def ensure_cluster(self) -> bool:
        """Create the cluster and its database unless pgdata/ holds one; True if created."""
        if (self.state.pgdata / "PG_VERSION").exists():
            return False
        self._prepare_folders()
        self._run(
            "initdb",
            "-D", self.state.pgdata,
            "-U", DATABASE,
            # Only the socket, in a folder only its owner (and root) can enter.
            "--auth-local=trust", "--auth-host=reject",
            "-E", "UTF8", "--locale=C",
        )  # fmt: skip
        with (self.state.pgdata / "postgresql.conf").open("a") as conf:
            conf.write(
                "\n# mnist-mlops: no TCP port; the socket beside the cluster\n"
                "listen_addresses = ''\n"
                f"unix_socket_directories = '{self.state.postgres_dir}'\n"
            )
        self.start()
        self._run("createdb", "-h", self.state.postgres_dir, "-U", DATABASE, DATABASE)
        return True

    def running(self) -> bool:
        return self._run("pg_ctl", "status", "-D", self.state.pgdata, check=False) == 0

    def start(self) -> None:
        if self.running():
            return
        self._run(
            "pg_ctl", "start", "-D", self.state.pgdata, "-w", "-t", "60",
            "-l", self.state.postgres_dir / "postgres.log",
        )  # fmt: skip

    def stop(self) -> bool:
        """Stop the postmaster whose PID pgdata/postmaster.pid holds (pg_ctl's fast shutdown);
        True if one ran."""
        if not (self.state.pgdata / "PG_VERSION").exists() or not self.running():
            return False
        self._run("pg_ctl", "stop", "-D", self.state.pgdata, "-m", "fast", "-w", "-t", "60")
        return True

    def _prepare_folders(self) -> None:
        if len(str(self.state.postgres_dir)) > MAX_SOCKET_DIR:
            raise PipelineError(
                f"{self.state.postgres_dir}: too long for PostgreSQL's unix socket; choose a "
                "shorter --state-dir"
            )
        for folder in (self.state.pgdata, self.state.postgres_dir):
            folder.mkdir(parents=True, exist_ok=True)
            folder.chmod(0o700)
            if os.geteuid() == 0:
                account = _postgres_account()
                os.chown(folder, account.pw_uid, account.pw_gid)
        reachable = self._run("test", "-w", self.state.postgres_dir, check=False, tool=False) == 0
        if not reachable:
            raise PipelineError(
                f"the {POSTGRES_USER} user cannot reach {self.state.root} (a private folder above "
                "it, such as /root?); choose a --state-dir it can reach"
            )

    def _run(self, name: str, *args: object, check: bool = True, tool: bool = True) -> int:
        """Run PostgreSQL tool `name` (or a plain command, tool=False) as the cluster's owner."""
        command = [str(self.bin_dir / name) if tool else name, *map(str, args)]
        if os.geteuid() == 0:
            command = ["runuser", "-u", POSTGRES_USER, "--", *command]
        result = subprocess.run(command, capture_output=True, text=True, cwd="/")
        if check and result.returncode != 0:
            output = (result.stderr or result.stdout)[-2000:]
            raise PipelineError(f"{name} failed (exit {result.returncode}): {output}")
        return result.returncode


def _postgres_account() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(POSTGRES_USER)
    except KeyError:
        raise PipelineError(
            f"running as root, but there is no {POSTGRES_USER} user to run PostgreSQL as "
            "(PostgreSQL refuses root): create one, or start the server as another user"
        ) from None


# --- mlflow server --------------------------------------------------------------------------


@dataclass(frozen=True)
class RunningServer:
    pid: int
    url: str


ALL_INTERFACES = ("0.0.0.0", "::")


def server_url(host: str, port: int) -> str:
    """The URL clients use: a server on all interfaces is reached by this machine's name."""
    return _http(os.uname().nodename if host in ALL_INTERFACES else host, port)


def _http(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def port_free(host: str, port: int) -> bool:
    """Whether `host:port` can be bound (else /health would reach whoever holds it)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        # As the server binds: connections of an earlier server in TIME_WAIT do not count.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


def running_server(state: ServerState) -> RunningServer | None:
    """The server that `state.pid_file` names, if that process is still this server."""
    if not state.pid_file.exists():
        return None
    recorded = read_json(state.pid_file)
    try:
        process = psutil.Process(recorded["pid"])
        # The PID of a server that died may since belong to another process.
        if start_time(process) != recorded["create_time"]:
            return None
    except psutil.NoSuchProcess:
        return None
    return RunningServer(recorded["pid"], recorded["url"])


def _start_server(
    state: ServerState,
    host: str,
    port: int,
    *,
    workers: int = 2,
    allowed_hosts: str | None = None,
    timeout: float = 180.0,
) -> RunningServer:
    """Start `mlflow server` in a session of its own and wait for /health; record its PID."""
    if importlib.util.find_spec("psycopg2") is None:
        raise PipelineError(
            "psycopg2 is not installed (the server's PostgreSQL driver): "
            "pip install -r requirements.txt"
        )
    state.artifacts.mkdir(parents=True, exist_ok=True)
    url = server_url(host, port)
    command = [
        sys.executable, "-m", "mlflow", "server",
        "--backend-store-uri", state.backend_uri,
        "--artifacts-destination", str(state.artifacts.resolve()),
        "--host", host, "--port", str(port), "--workers", str(workers),
    ]  # fmt: skip
    if allowed_hosts:
        command += ["--allowed-hosts", allowed_hosts]
    # The server's job runner serves GenAI features (trace scorers); this project has none.
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with state.server_log.open("ab") as output:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=output,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # outlives this command, and stops as one process group
        )
    server = RunningServer(process.pid, url)
    create_time = start_time(psutil.Process(process.pid))
    write_json(state.pid_file, {"pid": process.pid, "create_time": create_time, "url": url})
    local_url = _http(DEFAULT_HOST if host in ALL_INTERFACES else host, port)
    deadline = time.monotonic() + timeout
    while not ping(local_url, path="/health"):
        problem = None
        if process.poll() is not None:
            problem = f"exited with code {process.returncode}"
        elif time.monotonic() > deadline:
            problem = f"did not answer {local_url}/health within {timeout:.0f} s"
        if problem:
            _stop_server(state)
            tail = state.server_log.read_text(errors="replace")[-3000:]
            raise PipelineError(f"mlflow server {problem}; the end of {state.server_log}:\n{tail}")
        time.sleep(0.5)
    return server


def _stop_server(state: ServerState, timeout: float = 30.0) -> bool:
    """Stop the server `state.pid_file` names (its whole process group); True if one ran."""
    server = running_server(state)
    state.pid_file.unlink(missing_ok=True)
    if server is None:
        return False
    group = _group_members(server.pid)
    _signal_group(server.pid, signal.SIGTERM)
    _gone, alive = psutil.wait_procs(group, timeout=timeout)
    if alive:
        log.warning("mlflow server did not stop within %.0f s: killing it", timeout)
        _signal_group(server.pid, signal.SIGKILL)
        psutil.wait_procs(alive, timeout=timeout)
    return True


def _group_members(pgid: int) -> list[psutil.Process]:
    members = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, ProcessLookupError):
            if os.getpgid(process.pid) == pgid:
                members.append(process)
    return members


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


# --- both -----------------------------------------------------------------------------------


def start(
    state: ServerState,
    host: str = DEFAULT_HOST,
    port: int = DEFAULT_PORT,
    *,
    workers: int = 2,
    allowed_hosts: str | None = None,
) -> RunningServer:
    """PostgreSQL (installed and its cluster created where missing), then `mlflow server`.

    A server already running from `state` is returned as it is.
    """
    if server := running_server(state):
        log.info("already running (PID %d)", server.pid)
        return server
    if not port_free(host, port):
        raise PipelineError(
            f"port {port} on {host} is in use (another server?); choose another with --port"
        )
    postgres = Postgres(state, ensure_postgres())
    if postgres.ensure_cluster():
        log.info("created the PostgreSQL cluster in %s", state.pgdata)
    postgres.start()
    return _start_server(state, host, port, workers=workers, allowed_hosts=allowed_hosts)


def stop(state: ServerState) -> None:
    """Stop `mlflow server`, then PostgreSQL; either may already be stopped."""
    if _stop_server(state):
        log.info("stopped mlflow server")
    if (bin_dir := postgres_bin_dir()) and Postgres(state, bin_dir).stop():
        log.info("stopped PostgreSQL")
