"""The MLflow store check: real sqlite files (moved, copied, damaged, read-only, created by two
processes at once), real closed ports and real HTTP servers, real subprocesses."""

from __future__ import annotations

import hashlib
import http.server
import os
import random
import shutil
import socket
import sqlite3
import subprocess
import sys
import threading
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from support import REPO_ROOT

from mnist_mlops import store, tracking
from mnist_mlops.errors import PipelineError

MODEL_NAME = "digits"
ENV = {**os.environ, "PYTHONPATH": str(REPO_ROOT / "src")}


class _Identity(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        return model_input


@pytest.fixture(autouse=True)
def _tracking_uri_restored():
    previous = mlflow.get_tracking_uri()
    yield
    mlflow.set_tracking_uri(previous)


def _uri(folder: Path) -> str:
    return f"sqlite:///{folder / 'mlflow.db'}"


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A project folder with a store built as the pipeline builds it (from the folder, by
    tracking.configure and tracking.experiment): a run with an artifact and a model version
    with the champion alias."""
    folder = tmp_path / "project"
    folder.mkdir()
    monkeypatch.chdir(folder)  # stages run in the project root: the Default experiment's home
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _uri(folder))
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    tracking.configure()
    with mlflow.start_run(experiment_id=tracking.experiment("mnist")):
        mlflow.log_dict({"sizes": 1}, "summary.json")
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=_Identity(),
            registered_model_name=MODEL_NAME,
            pip_requirements=["mlflow"],
        )
    MlflowClient().set_registered_model_alias(MODEL_NAME, "champion", info.registered_model_version)
    monkeypatch.chdir(tmp_path)
    return folder


def _locations(database: Path) -> list[str]:
    """Every artifact location the store records (and the Default experiment's)."""
    with sqlite3.connect(database) as connection:
        return [
            value
            for table, column in store.LOCATION_COLUMNS
            for (value,) in connection.execute(f"SELECT {column} FROM {table}")
            if value and not value.startswith("models:/")
        ]


def _snapshot(folder: Path) -> dict[str, str]:
    """Every file under `folder` with a digest of its content."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


def _download_champion(uri: str, destination: Path) -> Path:
    mlflow.set_tracking_uri(uri)
    return Path(
        mlflow.artifacts.download_artifacts(
            f"models:/{MODEL_NAME}@champion", dst_path=str(destination)
        )
    )


def test_a_moved_project_is_refused_until_its_store_is_relocated(project, tmp_path, monkeypatch):
    moved = tmp_path / "moved"
    subprocess.run(["mv", str(project), str(moved)], check=True)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _uri(moved))

    with pytest.raises(PipelineError) as refused:
        tracking.configure()
    message = str(refused.value)
    assert message.startswith(_uri(moved))
    assert f"{project}/mlartifacts" in message and "moved or copied" in message
    assert store.RELOCATE_COMMAND in message

    assert store.relocate(_uri(moved)) == 5  # experiment, Default experiment, run, model, version
    assert not [where for where in _locations(moved / "mlflow.db") if str(project) in where]
    assert store.relocate(_uri(moved)) == 0
    tracking.configure()
    assert (_download_champion(_uri(moved), tmp_path / "served") / "MLmodel").is_file()


def test_a_copy_never_writes_into_the_original(project, tmp_path, monkeypatch):
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(project), str(copy)], check=True)
    original = _snapshot(project)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _uri(copy))

    with pytest.raises(PipelineError, match="moved or copied"):
        tracking.configure()
    store.relocate(_uri(copy))
    tracking.configure()
    with mlflow.start_run(experiment_id=tracking.experiment("mnist")) as run:
        mlflow.log_dict({"in": "copy"}, "copy.json")

    assert _snapshot(project) == original
    assert (copy / "mlartifacts" / run.info.run_id / "artifacts" / "copy.json").is_file()
    served = _download_champion(_uri(copy), tmp_path / "served")
    assert (served / "MLmodel").is_file()
    assert all(str(copy) in where for where in _locations(copy / "mlflow.db"))


def test_a_folder_reached_through_a_symlink_is_the_same_folder(tmp_path):
    real = tmp_path / "real"
    real.mkdir()
    (tmp_path / "link").symlink_to(real)
    uri = _uri(real)
    store.check(uri)
    # As MLflow users (and this project before store.py) record it: the path as spelled.
    MlflowClient(uri).create_experiment(
        "linked", artifact_location=f"file://{tmp_path / 'link' / 'mlartifacts'}"
    )
    store.check(uri)


def _not_a_database(database: Path) -> None:
    database.write_text("a config file saved under the wrong name\n")


def _garbage_pages(database: Path) -> None:
    content = bytearray(database.read_bytes())
    noise = random.Random(0)
    for i in range(4096, len(content) // 2):  # the header page stays: sqlite opens the file
        content[i] = noise.randrange(256)
    database.write_bytes(bytes(content))


def _truncated(database: Path) -> None:
    os.truncate(database, database.stat().st_size // 2)


def _other_application(database: Path) -> None:
    database.unlink()
    with sqlite3.connect(database) as connection:
        connection.execute("CREATE TABLE notes (text)")


def _older_schema(database: Path) -> None:
    with sqlite3.connect(database) as connection:
        connection.execute("UPDATE alembic_version SET version_num = '451aebb31d03'")


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (_not_a_database, "is damaged (file is not a database)"),
        (_garbage_pages, "is damaged (database disk image is malformed)"),
        (_truncated, "is damaged (database disk image is malformed)"),
        (_other_application, "is an SQLite database but not an MLflow store"),
        (_older_schema, "run 'mlflow db upgrade <database_uri>'"),
    ],
)
def test_a_broken_database_is_named_in_one_line(tmp_path, damage, problem):
    uri = _uri(tmp_path)
    database = tmp_path / "mlflow.db"
    store.check(uri)
    client = MlflowClient(uri)
    client.create_run(client.create_experiment("e"))  # a store with content, pages to damage
    damage(database)
    before = database.read_bytes()

    # A new process, as a stage is: MLflow verifies a store's schema once per process.
    result = _check_in_new_process(uri)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"ERROR [store] {uri}: " in lines[0] and problem in lines[0]
    assert database.read_bytes() == before


def _check_in_new_process(uri: str, *prefix: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "mnist_mlops.store"],
        env={**ENV, "MLFLOW_TRACKING_URI": uri},
        capture_output=True,
        text=True,
        timeout=120,
    )


def _read_only_mount_available() -> bool:
    try:
        probe = subprocess.run(
            ["unshare", "--map-root-user", "--mount", "true"], capture_output=True, timeout=30
        )
    except OSError:
        return False
    return probe.returncode == 0


@pytest.mark.skipif(not _read_only_mount_available(), reason="needs unshare (user namespaces)")
@pytest.mark.parametrize(
    ("read_only", "problem"),
    [
        ("", "cannot write in {folder} (Read-only file system)"),
        ("mlflow.db", "{folder}/mlflow.db cannot be written (attempt to write a readonly"),
    ],
    ids=["folder", "database-file"],
)
def test_a_read_only_store_is_refused_in_one_line(tmp_path, read_only, problem):
    """A read-only mount stops root too (tests run as root, where chmod does not)."""
    folder = tmp_path / "store"
    store.check(_uri(folder))
    target = folder / read_only
    mount = f"mount --bind {target} {target} && mount -o remount,ro,bind {target}"
    unshared = ("unshare", "--map-root-user", "--mount", "sh", "-c", f'{mount} && exec "$0" "$@"')
    result = _check_in_new_process(_uri(folder), *unshared)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert f"{_uri(folder)}: {problem.format(folder=folder)}" in lines[0]


def test_permission_bits_are_judged_by_writing_as_mlflow_does(tmp_path):
    """chmod a-w does not stop root: the check passes exactly when MLflow can still write."""
    uri = _uri(tmp_path / "store")
    store.check(uri)
    (tmp_path / "store" / "mlflow.db").chmod(0o444)
    (tmp_path / "store").chmod(0o555)
    try:
        try:
            store.check(uri)
            check_passed = True
        except PipelineError:
            check_passed = False
        try:
            MlflowClient(uri).create_experiment("written")
            mlflow_wrote = True
        except MlflowException:
            mlflow_wrote = False
    finally:
        (tmp_path / "store").chmod(0o755)
    assert check_passed == mlflow_wrote


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_server_is_named_in_one_line():
    uri = f"http://127.0.0.1:{_closed_port()}"
    with pytest.raises(PipelineError) as refused:
        store.check(uri)
    assert str(refused.value) == (
        f"{uri}: the MLflow tracking server does not answer ([Errno 111] Connection refused); "
        "start it, or unset MLFLOW_TRACKING_URI to use the project's own store"
    )


def test_a_server_that_never_answers_is_given_up_on(monkeypatch):
    monkeypatch.setattr(store, "HEALTH_TIMEOUT_S", 1)
    with socket.socket() as silent:  # accepts connections (the backlog), never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        with pytest.raises(PipelineError, match=r"does not answer \(no answer within 1 s\)"):
            store.check(uri)


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):
        self.send_response(self.status if self.path == "/health" else 404)
        self.end_headers()
        self.wfile.write(b"OK")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status", [200, 404])
def test_a_server_must_answer_health_with_200(status):
    handler = type("Handler", (_Health,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    uri = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        if status == 200:
            store.check(uri)
        else:
            with pytest.raises(PipelineError, match="GET /health answered 404 Not Found"):
                store.check(uri)
    finally:
        server.shutdown()
        thread.join(timeout=10)


# Each process imports MLflow, waits for the go file, then opens the store as a stage does.
_OPEN_AT_ONCE = """
import sys, time
from pathlib import Path
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mnist_mlops import store
uri, go = sys.argv[1], Path(sys.argv[2])
while not go.exists():
    time.sleep(0.01)
store.check(uri)
MlflowClient(uri).search_experiments()
"""


@pytest.mark.parametrize("attempt", range(3))
def test_two_processes_create_a_new_store_once(tmp_path, attempt):
    uri, go = _uri(tmp_path), tmp_path / "go"
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", _OPEN_AT_ONCE, uri, str(go)],
            env=ENV,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    go.touch()
    for process in processes:
        _, stderr = process.communicate(timeout=120)
        assert process.returncode == 0, stderr[-2000:]
    store.check(uri)


def test_the_stage_stops_before_its_run_when_the_store_is_down(tmp_path, mnist_dir):
    """One line, exit 1, nothing written: `dvc repro` then shows the stage as failed."""
    (tmp_path / "params.yaml").write_text((REPO_ROOT / "params.yaml").read_text())
    uri = f"http://127.0.0.1:{_closed_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "mnist_mlops.stages.prepare"],
        cwd=tmp_path,
        env={**ENV, "MLFLOW_TRACKING_URI": uri, "MNIST_DIR": str(mnist_dir)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "ERROR" in line]
    assert errors == [line for line in errors if "[prepare]" in line and uri in line]
    assert len(errors) == 1 and "Traceback" not in result.stderr
    assert not (tmp_path / "data" / "prepared").exists()


def test_make_run_checks_the_store_before_dvc_repro():
    """`dvc repro` deletes a stage's outputs before running it: the check must come first."""
    planned = subprocess.run(
        ["make", "-n", "run"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert planned.index("python -m mnist_mlops.store") < planned.index("dvc repro")


@pytest.mark.parametrize("built_in", ["elsewhere", "here"])
def test_a_venv_moved_with_the_project_is_rebuilt(tmp_path, built_in):
    """A venv runs the code of the folder it was built in: after `mv`/`cp -r` make rebuilds it."""
    for name in ("Makefile", "requirements.txt", "pyproject.toml"):
        shutil.copy2(REPO_ROOT / name, tmp_path / name)
        os.utime(tmp_path / name, (0, 0))  # older than the stamp: only a move triggers a build
    venv = tmp_path / ".venv"
    (venv / "bin").mkdir(parents=True)
    home = "/elsewhere/.venv" if built_in == "elsewhere" else str(venv)
    (venv / ".installed").write_text(home + "\n")
    planned = subprocess.run(
        ["make", "-n", "lint"], cwd=tmp_path, capture_output=True, text=True, check=True
    ).stdout
    assert ("rm -rf .venv" in planned) is (built_in == "elsewhere")
