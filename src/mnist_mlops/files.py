"""Writing hand-over files atomically, and reading them back with a clear error.

Every write goes to a temporary name in the same folder and is renamed into place, so a killed
stage never leaves a half-written file (or folder) where the next stage, or DVC, would read it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

from mnist_mlops.errors import PipelineError


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, with its suffix, for a writer that takes a file name
    (e.g. Keras's `model.save`); it becomes `path` only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=path.suffix)
    os.close(fd)
    try:
        yield Path(tmp_name)
        os.replace(tmp_name, path)
    finally:
        Path(tmp_name).unlink(missing_ok=True)


@contextmanager
def atomic_file(path: Path) -> Iterator[IO[bytes]]:
    """A binary file object whose content appears at `path` only if the block succeeds."""
    with atomic_path(path) as tmp, tmp.open("wb") as file:
        yield file
        file.flush()
        os.fsync(file.fileno())


@contextmanager
def atomic_dir(path: Path) -> Iterator[Path]:
    """A staging folder that replaces `path` (as a whole) only if the block succeeds."""
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}-", dir=path.parent))
    try:
        yield staging
        shutil.rmtree(path, ignore_errors=True)
        staging.rename(path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_bytes(path: Path, data: bytes) -> None:
    with atomic_file(path) as file:
        file.write(data)


def write_json(path: Path, payload: Any) -> None:
    """Pretty, key-sorted JSON (stable diffs, stable DVC hashes), written atomically."""
    write_bytes(path, (json.dumps(payload, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: Path) -> Any:
    """Read a JSON file; a missing or broken one is a PipelineError naming the file."""
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PipelineError(f"{path}: not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise PipelineError(
            f"{path}: not valid JSON ({err}); re-run the stage that writes it (dvc repro -f)"
        ) from None
