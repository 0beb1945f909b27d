"""Loading, verifying and splitting MNIST, and turning it into model inputs (numpy only).

Sources, in order: ``MNIST_DIR`` (IDX files), IDX files in ``data/raw``, Keras's ``mnist.npz``
in ``data/raw`` (downloaded if missing). Whatever the source, the arrays are re-encoded as IDX
and checked against the SHA-256 digests of the original distribution, so every source is held
to the same standard.
"""

import gzip
import hashlib
import http.client
import math
import struct
import sys
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from sklearn.model_selection import train_test_split

from mnist_mlops.errors import PipelineError
from mnist_mlops.files import atomic_file
from mnist_mlops.paths import ProjectPaths

NUM_CLASSES = 10
PIXEL_MAX = 255.0

# MnistArrays field -> standard IDX file name.
IDX_FILES = {
    "x_train": "train-images-idx3-ubyte",
    "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte",
    "y_test": "t10k-labels-idx1-ubyte",
}

# SHA-256 of the decompressed IDX files of the original distribution.
KNOWN_SHA256 = {
    "t10k-images-idx3-ubyte": "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
    "t10k-labels-idx1-ubyte": "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
    "train-images-idx3-ubyte": "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
    "train-labels-idx1-ubyte": "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
}

EXPECTED_SHAPES = {
    "x_train": (60000, 28, 28),
    "y_train": (60000,),
    "x_test": (10000, 28, 28),
    "y_test": (10000,),
}

KERAS_MNIST_URL = "https://storage.googleapis.com/tensorflow/tf-keras-datasets/mnist.npz"
KERAS_MNIST_SHA256 = "731c5ac602752760c8e48fbffcf8c3b850d9dc2a2aedcf2cc48468fc17b673d1"

_IDX_NAMES = ", ".join(IDX_FILES.values())
_IDX_UINT8 = 0x08
_GZIP_MAGIC = b"\x1f\x8b"


class DataError(PipelineError):
    """A problem with input data; the message names the file and the problem."""


@dataclass(frozen=True)
class MnistArrays:
    """MNIST as uint8 arrays: images [N, 28, 28], labels [N]."""

    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray


def read_idx(path: Path) -> np.ndarray:
    """Read a uint8 IDX file (gzip-compressed or raw) into an array of its declared shape."""
    try:
        data = path.read_bytes()
        if data.startswith(_GZIP_MAGIC):
            data = gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as err:
        # BadGzipFile (bad CRC/header) is an OSError; a cut-off stream gives EOFError.
        raise DataError(f"{path}: cannot read: {err}") from err

    if len(data) < 4 or data[:2] != b"\0\0":
        raise DataError(f"{path}: not an IDX file (magic bytes {data[:4].hex() or 'missing'})")
    type_code, ndim = data[2], data[3]
    if type_code != _IDX_UINT8:
        raise DataError(f"{path}: unsupported IDX type code 0x{type_code:02x} (need 0x08 = uint8)")
    if ndim not in (1, 3):
        raise DataError(f"{path}: unsupported IDX rank {ndim} (need 1 or 3)")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated: header needs {header} bytes, found {len(data)}")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected, found = math.prod(dims), len(data) - header
    if found != expected:
        problem = "truncated" if found < expected else "trailing bytes"
        shape = "x".join(map(str, dims))
        raise DataError(
            f"{path}: {problem}: header declares {shape} = {expected} bytes of data, found {found}"
        )
    # Copy so callers get an ordinary writable array, as np.load gives.
    return np.frombuffer(data, np.uint8, offset=header).reshape(dims).copy()


def encode_idx(array: np.ndarray) -> bytes:
    """Encode a uint8 array of rank 1 or 3 as IDX bytes (the inverse of read_idx)."""
    if array.dtype != np.uint8 or array.ndim not in (1, 3):
        raise ValueError(f"need a uint8 array of rank 1 or 3, got {array.dtype} {array.shape}")
    header = struct.pack(f">BBBB{array.ndim}I", 0, 0, _IDX_UINT8, array.ndim, *array.shape)
    return header + array.tobytes()


def verify_arrays(arrays: MnistArrays, source: str) -> None:
    """Check shapes, label range and SHA-256 against the original MNIST; raise DataError."""
    # Structure first, for all arrays: a wrong shape explains more than a digest mismatch.
    for field, name in IDX_FILES.items():
        array, shape, what = getattr(arrays, field), EXPECTED_SHAPES[field], f"{field} ({name})"
        if array.dtype != np.uint8 or array.shape != shape:
            raise DataError(
                f"{source}: {what}: expected uint8 {shape}, got {array.dtype} {array.shape}"
            )
        if field.startswith("y") and array.max() >= NUM_CLASSES:
            raise DataError(
                f"{source}: {what}: labels outside 0..{NUM_CLASSES - 1} (max {array.max()})"
            )
    for field, name in IDX_FILES.items():
        actual = hashlib.sha256(encode_idx(getattr(arrays, field))).hexdigest()
        if actual != KNOWN_SHA256[name]:
            raise DataError(
                f"{source}: {field} ({name}): SHA-256 mismatch, not the standard MNIST data: "
                f"expected {KNOWN_SHA256[name]}, got {actual}"
            )


def find_idx_files(directory: Path) -> dict[str, Path] | None:
    """Map each standard IDX name to ``<name>.gz`` or ``<name>`` in directory.

    Returns None if none of the four exist; raises DataError if only some do.
    """
    found: dict[str, Path] = {}
    for name in IDX_FILES.values():
        for candidate in (directory / f"{name}.gz", directory / name):
            if candidate.is_file():
                found[name] = candidate
                break
    if not found:
        return None
    missing = [name for name in IDX_FILES.values() if name not in found]
    if missing:
        raise DataError(
            f"{directory}: incomplete MNIST IDX files, missing: {', '.join(missing)} "
            "(each may be raw or .gz)"
        )
    return found


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def download_keras_npz(
    dest: Path,
    url: str = KERAS_MNIST_URL,
    sha256: str = KERAS_MNIST_SHA256,
    timeout: float = 60,
) -> Path:
    """Download Keras's mnist.npz to dest, verifying its SHA-256; skip if dest is already good."""
    if dest.is_file() and _sha256_file(dest) == sha256:
        return dest
    try:
        digest = hashlib.sha256()
        with atomic_file(dest) as out, urllib.request.urlopen(url, timeout=timeout) as response:
            done = 0
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                print(f"\rdownloading {url}: {done:,} bytes", end="", file=sys.stderr, flush=True)
            print(file=sys.stderr)
            if digest.hexdigest() != sha256:
                raise DataError(
                    f"{url}: SHA-256 mismatch: expected {sha256}, got {digest.hexdigest()}"
                )
    except (OSError, ValueError, http.client.HTTPException) as err:
        # URLError/HTTPError and socket timeouts are OSErrors; a malformed URL is a ValueError.
        raise DataError(
            f"could not download {url}: {err}. Without network, put the four MNIST IDX files "
            f"(or mnist.npz) in data/raw/, or set MNIST_DIR to a directory holding the IDX files"
        ) from err
    return dest


def _read_npz(path: Path, keys: tuple[str, ...], hint: str = "") -> dict[str, np.ndarray]:
    """Read the named arrays from an .npz archive, raising DataError (plus hint) on any problem."""
    try:
        npz = np.load(path, allow_pickle=False)
        if not isinstance(npz, np.lib.npyio.NpzFile):
            raise DataError(f"{path}: not an .npz archive{hint}")
        with npz:
            missing = [key for key in keys if key not in npz.files]
            if missing:
                raise DataError(f"{path}: missing arrays {missing} (has {npz.files}){hint}")
            return {key: npz[key] for key in keys}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as err:
        raise DataError(f"{path}: cannot read: {err}{hint}") from err


def read_keras_npz(path: Path) -> MnistArrays:
    """Read Keras's mnist.npz (keys x_train, y_train, x_test, y_test)."""
    return MnistArrays(**_read_npz(path, tuple(IDX_FILES)))


def load_mnist(
    mnist_dir: Path | None, raw_dir: Path, download: bool = True
) -> tuple[MnistArrays, str]:
    """Load and verify MNIST; return the arrays and a description of where they came from.

    Order: IDX files in mnist_dir (if given, it must hold them), IDX files in raw_dir,
    raw_dir/mnist.npz (downloaded first if missing and download is true).
    """
    if mnist_dir is not None:
        idx_dir, files = mnist_dir, find_idx_files(mnist_dir)
        if files is None:
            raise DataError(
                f"MNIST_DIR={mnist_dir}: no MNIST IDX files found "
                f"(expected {_IDX_NAMES}, raw or .gz)"
            )
    else:
        idx_dir, files = raw_dir, find_idx_files(raw_dir)

    if files is not None:
        arrays = MnistArrays(**{field: read_idx(files[name]) for field, name in IDX_FILES.items()})
        source = f"IDX files in {idx_dir}"
    else:
        npz = raw_dir / "mnist.npz"
        if not npz.is_file():
            if not download:
                raise DataError(
                    f"no MNIST data found: put the four IDX files ({_IDX_NAMES}, raw or .gz)"
                    f" or Keras's mnist.npz in {raw_dir}, or set MNIST_DIR to a "
                    "directory holding the IDX files"
                )
            download_keras_npz(npz)
        arrays = read_keras_npz(npz)
        source = f"Keras mnist.npz at {npz}"
    verify_arrays(arrays, source)
    return arrays, source


class SplitSizeError(PipelineError, ValueError):
    """A requested split or subset size that the data cannot satisfy."""


def _check_size(name: str, size: int, y: np.ndarray) -> None:
    # train_test_split(stratify=...) needs at least one example per class on both sides.
    n_classes = len(np.unique(y))
    if not n_classes <= size <= len(y) - n_classes:
        raise SplitSizeError(
            f"{name} = {size}: must be between the number of classes ({n_classes}) and the "
            f"number of examples minus that ({len(y)} - {n_classes} = {len(y) - n_classes})"
        )


def stratified_split(
    x: np.ndarray, y: np.ndarray, val_size: int, seed: int, name: str = "val_size"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seeded stratified split into (x_train, y_train, x_val, y_val) with val_size examples.

    `name` is the parameter that asked for `val_size`, for the error message.
    """
    _check_size(name, val_size, y)
    x_tr, x_val, y_tr, y_val = train_test_split(
        x, y, test_size=val_size, stratify=y, random_state=seed
    )
    return x_tr, y_tr, x_val, y_val


def stratified_subset(
    x: np.ndarray, y: np.ndarray, n: int, seed: int, name: str = "n"
) -> tuple[np.ndarray, np.ndarray]:
    """Seeded stratified subsample of n examples; the input itself if n >= len(y)."""
    if n >= len(y):
        return x, y
    _check_size(name, n, y)
    _, x_sub, _, y_sub = train_test_split(x, y, test_size=n, stratify=y, random_state=seed)
    return x_sub, y_sub


def class_counts(y: np.ndarray) -> list[int]:
    """Number of examples of each class 0..9."""
    return np.bincount(y, minlength=NUM_CLASSES).tolist()


def save_split(path: Path, x: np.ndarray, y: np.ndarray) -> None:
    """Write x and y (uint8) to a compressed .npz atomically: never a partial file at path."""
    if x.dtype != np.uint8 or y.dtype != np.uint8:
        raise ValueError(f"{path}: x and y must be uint8, got {x.dtype} and {y.dtype}")
    with atomic_file(path) as file:
        np.savez_compressed(file, x=x, y=y)


def load_split(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read a split written by save_split."""
    if not path.is_file():
        raise DataError(f"{path}: not found")
    hint = ProjectPaths.cwd().rerun_hint(path)
    arrays = _read_npz(path, ("x", "y"), hint)
    x, y = arrays["x"], arrays["y"]
    if len(x) != len(y):
        raise DataError(f"{path}: {len(x)} images but {len(y)} labels{hint}")
    return x, y


def to_model_input(images: np.ndarray) -> np.ndarray:
    """uint8 images [N, 28, 28] -> float32 [N, 28, 28, 1] in [0, 1], the models' input."""
    return (images.astype(np.float32) / PIXEL_MAX)[..., np.newaxis]


def one_hot(labels: np.ndarray) -> np.ndarray:
    """Digit labels [N] -> float32 one-hot targets [N, 10], what the models' loss takes."""
    return np.eye(NUM_CLASSES, dtype=np.float32)[labels]
