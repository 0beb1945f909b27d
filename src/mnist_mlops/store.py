"""The MLflow store: where it is, and a check, before any stage work, that it is usable and
belongs to this project folder.

Left to MLflow, a broken store shows late and loudly: an unreachable tracking server after
minutes of retries, a damaged or read-only mlflow.db as an SQLAlchemy traceback, both once the
stage has started (and `dvc repro` has already deleted the stage's previous outputs). `check`
says what is wrong in one line (a PipelineError naming the store), in seconds.

A sqlite store records absolute artifact locations (`<folder>/mlartifacts`). After the project
folder is moved, they name a folder that is gone; in a copy, they name the original's folder,
where the copy would write. `check` refuses such a store and `python -m mnist_mlops.store
--relocate` (`make relocate-store`) points it at the folder it is in.

Run as `python -m mnist_mlops.store`, it checks the store the stages will use (`make run` does,
before `dvc repro`).
"""

from __future__ import annotations

import argparse
import fcntl
import logging
import os
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import sqlalchemy
from mlflow import MlflowClient
from mlflow.entities import ViewType
from mlflow.exceptions import MlflowException
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request

from mnist_mlops.errors import PipelineError, exit_on_pipeline_error
from mnist_mlops.paths import project_root

ARTIFACTS_DIR = "mlartifacts"
RELOCATE_COMMAND = "make relocate-store"
# A tracking server answers /health at once; a longer wait means it is down or unreachable.
HEALTH_TIMEOUT_S = 5
# Where MLflow 3.17's sqlite schema keeps the locations of artifacts: what a relocation rewrites.
LOCATION_COLUMNS = (
    ("experiments", "artifact_location"),
    ("runs", "artifact_uri"),
    ("logged_models", "artifact_location"),
    ("model_versions", "source"),
    ("model_versions", "storage_location"),
)
log = logging.getLogger("mnist_mlops.store")  # not __main__ under `python -m`


def tracking_uri() -> str:
    """MLFLOW_TRACKING_URI if set, else an absolute sqlite store at the repository root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{project_root() / 'mlflow.db'}"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite store, absolute; None for other stores and in-memory ones."""
    if urlparse(uri).scheme != "sqlite":
        return None
    database = sqlalchemy.engine.make_url(uri).database
    if not database or database == ":memory:":
        return None
    return Path(database).resolve()


def artifact_location(uri: str) -> str | None:
    """Where a new experiment keeps its artifacts: `mlartifacts/` beside a sqlite database (not
    MLflow's default `./mlartifacts` under whatever directory a process runs in); None (MLflow's
    choice) for other stores."""
    database = sqlite_file(uri)
    return (database.parent / ARTIFACTS_DIR).as_uri() if database else None


def check(uri: str) -> None:
    """Raise PipelineError, one line naming `uri`, unless a stage can use the store now.

    A tracking server must answer /health within HEALTH_TIMEOUT_S. A sqlite database must be
    intact, writable, an MLflow store of this MLflow's schema version (created here, once, if
    new) and keep its artifacts in the folder it is in. Other stores are left to MLflow.
    """
    if urlparse(uri).scheme in ("http", "https"):
        _check_server(uri)
    elif database := sqlite_file(uri):
        with _opened(uri, database):
            if moved_from := _foreign_homes(uri, database):
                raise PipelineError(
                    f"{uri}: the store keeps its artifacts in {_path(moved_from[0])}/"
                    f"{ARTIFACTS_DIR}, not in this folder's {database.parent}/{ARTIFACTS_DIR} "
                    f"(the project was moved or copied); run `{RELOCATE_COMMAND}` to point "
                    "it at this folder"
                )


def relocate(uri: str) -> int:
    """Point a sqlite store's artifact locations that name another folder's `mlartifacts/` (the
    folder the project was moved or copied from) at the folder the database is in; returns how
    many locations changed.

    MLflow has no API to change a recorded artifact location, so this rewrites the columns of
    LOCATION_COLUMNS, in one transaction, under the store's lock.
    """
    database = sqlite_file(uri)
    if database is None:
        raise PipelineError(f"{uri}: only a sqlite store records folders to relocate")
    here = database.parent
    changed = 0
    with _opened(uri, database):
        homes = _foreign_homes(uri, database)
        with closing(sqlite3.connect(database)) as connection, connection:
            for home in homes:
                # Locations are file: URIs, except the Default experiment's plain path.
                for old, new in ((home, here.as_uri()), (str(_path(home)), str(here))):
                    for table, column in LOCATION_COLUMNS:
                        changed += connection.execute(
                            f"UPDATE {table} SET {column} = ? || substr({column}, ?) "
                            f"WHERE substr({column}, 1, ?) = ?",
                            (new + "/", len(old) + 2, len(old) + 1, old + "/"),
                        ).rowcount
                log.info("%s: artifact locations under %s now under %s", uri, _path(home), here)
    return changed


def _check_server(uri: str) -> None:
    try:
        response = http_request(
            get_default_host_creds(uri),
            "/health",
            "GET",
            max_retries=0,
            timeout=HEALTH_TIMEOUT_S,
            raise_on_status=False,
        )
    except MlflowException as err:
        raise PipelineError(
            f"{uri}: the MLflow tracking server does not answer ({_reason(err)}); start it, or "
            "unset MLFLOW_TRACKING_URI to use the project's own store"
        ) from None
    if response.status_code != 200:
        raise PipelineError(
            f"{uri}: GET /health answered {response.status_code} {response.reason}, not 200: "
            "is this an MLflow tracking server?"
        )


def _reason(err: BaseException) -> str:
    """The innermost cause of a failed request ('[Errno 111] Connection refused'), or that it
    timed out."""
    while err.__cause__ or err.__context__:
        err = err.__cause__ or err.__context__
        if isinstance(err, TimeoutError) or "timed out" in str(err).lower():
            return f"no answer within {HEALTH_TIMEOUT_S} s"
    return str(err)


@contextmanager
def _locked(uri: str, database: Path) -> Iterator[None]:
    """Hold an exclusive lock on `<database>.lock`: two processes opening a new store at once
    would both run MLflow's schema migrations on it (and one would crash)."""
    try:
        database.parent.mkdir(parents=True, exist_ok=True)
        lock = database.with_name(f"{database.name}.lock").open("a")
    except OSError as err:
        raise PipelineError(
            f"{uri}: cannot write in {database.parent} ({err.strerror}); a stage must write to "
            "the store"
        ) from None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


@contextmanager
def _opened(uri: str, database: Path) -> Iterator[None]:
    """Hold the store's lock, with the database checked and opened by MLflow."""
    with _locked(uri, database):
        _check_database(uri, database)
        _open_with_mlflow(uri)
        yield


def _check_database(uri: str, database: Path) -> None:
    """An existing database must be intact, an MLflow store (or empty) and writable."""
    if not database.exists() or database.stat().st_size == 0:
        return  # a new store; MLflow creates its tables
    try:
        with closing(sqlite3.connect(database, isolation_level=None)) as connection:
            problems = [row[0] for row in connection.execute("PRAGMA quick_check")]
            if problems != ["ok"]:
                raise sqlite3.DatabaseError(problems[0])
            tables = {row[0] for row in connection.execute("SELECT name FROM sqlite_master")}
            if tables and "experiments" not in tables:
                raise PipelineError(
                    f"{uri}: {database} is an SQLite database but not an MLflow store (it has "
                    "no experiments table)"
                )
            # Opening a read-only file succeeds and BEGIN IMMEDIATE does too: only a write fails.
            connection.execute("BEGIN IMMEDIATE")
            connection.execute("CREATE TABLE mnist_mlops_write_probe (x)")
            connection.execute("ROLLBACK")
    except sqlite3.OperationalError as err:
        raise PipelineError(
            f"{uri}: {database} cannot be written ({err}); a stage must write to the store"
        ) from None
    except sqlite3.DatabaseError as err:
        raise PipelineError(
            f"{uri}: {database} is damaged ({err}); restore it from a backup, or move it "
            "away to start an empty store"
        ) from None


def _open_with_mlflow(uri: str) -> None:
    """Open the tracking and registry stores as MLflow does, which creates a new store's tables
    and verifies an existing one's schema version."""
    try:
        client = MlflowClient(uri, registry_uri=uri)
        client.search_experiments(max_results=1)
        client.search_registered_models(max_results=1)
    except (MlflowException, sqlalchemy.exc.SQLAlchemyError) as err:
        raise PipelineError(f"{uri}: {' '.join(str(err).split())}") from None


def _foreign_homes(uri: str, database: Path) -> list[str]:
    """The folders (as file: URIs, spelled as stored) whose `mlartifacts/` hold the artifacts of
    some experiment, other than the folder the database is in."""
    client = MlflowClient(uri)
    homes: set[str] = set()
    page_token = None
    while True:
        page = client.search_experiments(view_type=ViewType.ALL, page_token=page_token)
        for found in page:
            location = found.artifact_location.rstrip("/")
            home, _, name = location.rpartition("/")
            if location.startswith("file:") and name == ARTIFACTS_DIR:
                homes.add(home)
        if not (page_token := page.token):
            break
    here = database.parent
    return sorted(home for home in homes if not _same_folder(_path(home), here))


def _path(file_uri: str) -> Path:
    return Path(url2pathname(urlparse(file_uri).path))


def _same_folder(a: Path, b: Path) -> bool:
    return a == b or (a.exists() and b.exists() and os.path.samefile(a, b))


@exit_on_pipeline_error("store")
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--relocate",
        action="store_true",
        help="point a moved or copied project's sqlite store at this folder's mlartifacts/",
    )
    uri = tracking_uri()
    if parser.parse_args().relocate:
        changed = relocate(uri)
        log.info("%s: %d artifact location(s) rewritten", uri, changed)
    check(uri)
    log.info("%s: usable", uri)


if __name__ == "__main__":
    main()
