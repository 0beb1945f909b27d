"""Tests for mnist_mlops.data: IDX reading, verification, download, splits (no internet)."""

import gzip
import hashlib
import http.server
import io
import os
import socket
import threading
from pathlib import Path

import numpy as np
import pytest

from mnist_mlops import data
from mnist_mlops.data import DataError, MnistArrays
from mnist_mlops.errors import PipelineError
from mnist_mlops.paths import ProjectPaths

TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def write_idx(path: Path, array: np.ndarray, compress: bool) -> Path:
    raw = data.encode_idx(array)
    path.write_bytes(gzip.compress(raw, mtime=0) if compress else raw)
    return path


def images(n: int = 5) -> np.ndarray:
    return rng().integers(0, 256, size=(n, 28, 28), dtype=np.uint8)


# --- IDX reading -------------------------------------------------------------------------------


@pytest.mark.parametrize("compress", [True, False])
@pytest.mark.parametrize("shape", [(5, 28, 28), (7,)])
def test_read_idx_round_trip(tmp_path, compress, shape):
    array = rng().integers(0, 256, size=shape, dtype=np.uint8)
    result = data.read_idx(write_idx(tmp_path / "f", array, compress))
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, array)


@pytest.mark.parametrize(("name", "compress"), [("looks-raw", True), ("looks.gz", False)])
def test_read_idx_detects_gzip_by_magic_not_extension(tmp_path, name, compress):
    array = images()
    np.testing.assert_array_equal(data.read_idx(write_idx(tmp_path / name, array, compress)), array)


def test_encode_idx_rejects_bad_arrays():
    with pytest.raises(ValueError, match="uint8"):
        data.encode_idx(np.zeros((2, 28, 28), np.float32))
    with pytest.raises(ValueError, match="rank"):
        data.encode_idx(np.zeros((2, 28), np.uint8))


@pytest.mark.parametrize("compress", [True, False])
def test_read_idx_truncated(tmp_path, compress):
    raw = data.encode_idx(images())[:-100]
    path = tmp_path / ("train-images-idx3-ubyte.gz" if compress else "train-images-idx3-ubyte")
    path.write_bytes(gzip.compress(raw) if compress else raw)
    with pytest.raises(DataError, match=r"truncated: header declares 5x28x28 = 3920 bytes.*3820"):
        data.read_idx(path)


def test_read_idx_trailing_bytes(tmp_path):
    path = tmp_path / "labels"
    path.write_bytes(data.encode_idx(np.arange(10, dtype=np.uint8)) + b"\0\0")
    with pytest.raises(DataError, match=r"trailing bytes.*declares 10 = 10 bytes.*found 12"):
        data.read_idx(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x01\x00\x08\x01\0\0\0\x01\0", "not an IDX file"),
        (b"\x00\x00\x0d\x01\0\0\0\x01\0", "type code 0x0d"),
        (b"\x00\x00\x08\x02\0\0\0\x01\0", "rank 2"),
        (b"\x00\x00\x08\x03\0\0\0\x01\0", "truncated: header needs 16 bytes"),
        (b"", "not an IDX file"),
    ],
)
def test_read_idx_bad_header(tmp_path, content, message):
    path = tmp_path / "bad-idx"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message) as info:
        data.read_idx(path)
    assert "bad-idx" in str(info.value)


@pytest.mark.parametrize("damage", ["flip", "cut"])
def test_read_idx_corrupted_gzip(tmp_path, damage):
    blob = bytearray(gzip.compress(data.encode_idx(images(50)), mtime=0))
    if damage == "flip":
        middle = len(blob) // 2
        blob[middle : middle + 8] = bytes(b ^ 0xFF for b in blob[middle : middle + 8])
    else:
        del blob[len(blob) // 2 :]
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: cannot read"):
        data.read_idx(path)


def test_read_idx_missing_file(tmp_path):
    with pytest.raises(DataError, match="nope"):
        data.read_idx(tmp_path / "nope")


# --- finding files and verification ------------------------------------------------------------


def test_find_idx_files(tmp_path):
    assert data.find_idx_files(tmp_path) is None
    names = list(data.IDX_FILES.values())
    (tmp_path / f"{names[0]}.gz").write_bytes(b"")
    (tmp_path / names[1]).write_bytes(b"")
    with pytest.raises(DataError, match=f"missing: {names[2]}, {names[3]}"):
        data.find_idx_files(tmp_path)
    (tmp_path / names[2]).write_bytes(b"")
    (tmp_path / f"{names[3]}.gz").write_bytes(b"")
    assert data.find_idx_files(tmp_path) == {
        names[0]: tmp_path / f"{names[0]}.gz",
        names[1]: tmp_path / names[1],
        names[2]: tmp_path / names[2],
        names[3]: tmp_path / f"{names[3]}.gz",
    }


def synthetic_arrays(**overrides: np.ndarray) -> MnistArrays:
    fields = {
        field: np.zeros(shape, np.uint8) for field, shape in data.EXPECTED_SHAPES.items()
    } | overrides
    return MnistArrays(**fields)


def test_verify_arrays_rejects_wrong_digest():
    with pytest.raises(DataError) as info:
        data.verify_arrays(synthetic_arrays(), "synthetic source")
    message = str(info.value)
    assert "synthetic source" in message
    assert "train-images-idx3-ubyte" in message
    assert data.KNOWN_SHA256["train-images-idx3-ubyte"] in message


def test_verify_arrays_rejects_wrong_shape_and_labels():
    small = synthetic_arrays(x_train=np.zeros((10, 28, 28), np.uint8))
    with pytest.raises(DataError, match=r"x_train \(train-images-idx3-ubyte\): expected uint8"):
        data.verify_arrays(small, "src")
    with pytest.raises(DataError, match=r"y_test \(t10k-labels-idx1-ubyte\): labels outside"):
        data.verify_arrays(synthetic_arrays(y_test=np.full(10000, 10, np.uint8)), "src")


# --- load_mnist ---------------------------------------------------------------------------------


def test_load_mnist_mnist_dir_without_files_does_not_fall_back(tmp_path):
    (tmp_path / "raw").mkdir()
    np.savez(tmp_path / "raw" / "mnist.npz", **vars(synthetic_arrays()))
    with pytest.raises(DataError, match=r"MNIST_DIR=.*no MNIST IDX files"):
        data.load_mnist(tmp_path / "empty", tmp_path / "raw", download=False)


def test_load_mnist_without_data_or_download(tmp_path):
    with pytest.raises(DataError, match=r"no MNIST data found.*MNIST_DIR"):
        data.load_mnist(None, tmp_path, download=False)


def test_load_mnist_downloads_missing_npz_then_verifies(tmp_path, monkeypatch):
    calls = []

    def fake_download(dest: Path) -> Path:
        calls.append(dest)
        np.savez(dest, **vars(synthetic_arrays(x_train=np.zeros((3, 28, 28), np.uint8))))
        return dest

    monkeypatch.setattr(data, "download_keras_npz", fake_download)
    with pytest.raises(DataError, match=r"mnist\.npz.*x_train"):
        data.load_mnist(None, tmp_path)
    assert calls == [tmp_path / "mnist.npz"]


def shared_mnist_dir() -> Path:
    env = os.environ.get("MNIST_DIR")
    return Path(env) if env else Path(__file__).resolve().parents[1].parent / "shared/data/mnist"


@pytest.fixture(scope="module")
def real_mnist() -> tuple[MnistArrays, str]:
    directory = shared_mnist_dir()
    if data.find_idx_files(directory) is None:
        pytest.skip(f"real MNIST IDX files not found in {directory} (set MNIST_DIR to run)")
    return data.load_mnist(directory, Path("/nonexistent"), download=False)


def test_load_real_mnist(real_mnist):
    arrays, source = real_mnist
    assert source == f"IDX files in {shared_mnist_dir()}"
    assert data.class_counts(arrays.y_train) == TRAIN_COUNTS
    assert data.class_counts(arrays.y_test) == TEST_COUNTS


def test_load_real_mnist_from_raw_dir_npz(real_mnist, tmp_path):
    np.savez(tmp_path / "mnist.npz", **vars(real_mnist[0]))
    arrays, source = data.load_mnist(None, tmp_path, download=False)
    assert source == f"Keras mnist.npz at {tmp_path / 'mnist.npz'}"
    np.testing.assert_array_equal(arrays.y_test, real_mnist[0].y_test)


# --- download (local HTTP server only) ---------------------------------------------------------


@pytest.fixture
def http_server():
    """Serve a dict of path -> bytes on 127.0.0.1; anything else is a 404."""
    files: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = files.get(self.path)
            if body is None:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", files
    server.shutdown()
    server.server_close()
    thread.join()


def small_npz() -> bytes:
    buffer = io.BytesIO()
    arrays = {field: np.arange(12, dtype=np.uint8) for field in data.IDX_FILES}
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def test_download_saves_verified_file(http_server, tmp_path, capsys):
    base, files = http_server
    payload = small_npz()
    files["/mnist.npz"] = payload
    dest = tmp_path / "mnist.npz"
    dest.write_bytes(b"stale partial download")  # wrong checksum: must be replaced
    sha = hashlib.sha256(payload).hexdigest()
    assert data.download_keras_npz(dest, f"{base}/mnist.npz", sha, timeout=10) == dest
    assert dest.read_bytes() == payload
    assert os.listdir(tmp_path) == ["mnist.npz"]
    assert f"{len(payload):,} bytes" in capsys.readouterr().err
    np.testing.assert_array_equal(data.read_keras_npz(dest).y_test, np.arange(12))


def test_download_skips_when_file_already_good(tmp_path, http_server):
    dest = tmp_path / "mnist.npz"
    dest.write_bytes(small_npz())
    sha = hashlib.sha256(dest.read_bytes()).hexdigest()
    base, _ = http_server  # serves nothing: a request would 404
    assert data.download_keras_npz(dest, f"{base}/mnist.npz", sha, timeout=10) == dest


def test_download_wrong_checksum_leaves_nothing(http_server, tmp_path):
    base, files = http_server
    files["/mnist.npz"] = small_npz()
    with pytest.raises(DataError, match="SHA-256 mismatch"):
        data.download_keras_npz(tmp_path / "mnist.npz", f"{base}/mnist.npz", "0" * 64, timeout=10)
    assert os.listdir(tmp_path) == []


def test_download_http_404(http_server, tmp_path):
    base, _ = http_server
    with pytest.raises(DataError, match=r"could not download.*404.*MNIST_DIR"):
        data.download_keras_npz(tmp_path / "mnist.npz", f"{base}/missing.npz", "0" * 64, timeout=10)
    assert os.listdir(tmp_path) == []


def test_download_unreachable(tmp_path):
    with socket.socket() as sock:  # bind then close: nothing listens on this port
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(DataError, match=r"could not download.*data/raw"):
        data.download_keras_npz(tmp_path / "mnist.npz", f"http://127.0.0.1:{port}/m.npz", timeout=5)
    assert os.listdir(tmp_path) == []


def test_read_keras_npz_errors(tmp_path):
    missing_key = tmp_path / "missing.npz"
    np.savez(missing_key, x_train=np.zeros(1, np.uint8))
    with pytest.raises(DataError, match="missing arrays"):
        data.read_keras_npz(missing_key)
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not a zip file at all")
    with pytest.raises(DataError, match=r"garbage\.npz"):
        data.read_keras_npz(garbage)
    npy = tmp_path / "array.npy"
    np.save(npy, np.zeros(3, np.uint8))
    with pytest.raises(DataError, match=r"not an \.npz archive"):
        data.read_keras_npz(npy)


# --- splits -------------------------------------------------------------------------------------

COUNTS = [100, 120, 90, 110, 95, 105, 80, 130, 85, 85]  # 1000 examples, uneven classes


@pytest.fixture
def labelled():
    """ids 0..N-1 as x (so membership is checkable) and shuffled labels with COUNTS per class."""
    y = rng().permutation(np.repeat(np.arange(10, dtype=np.uint8), COUNTS))
    return np.arange(len(y)), y


def assert_stratified(y_part: np.ndarray, n_total: int) -> None:
    expected = np.array(COUNTS) * len(y_part) / n_total
    assert np.all(np.abs(np.array(data.class_counts(y_part)) - expected) <= 1)


def test_stratified_split(labelled):
    x, y = labelled
    x_tr, y_tr, x_val, y_val = data.stratified_split(x, y, val_size=200, seed=1)
    assert len(x_val) == len(y_val) == 200 and len(x_tr) == len(y_tr) == 800
    np.testing.assert_array_equal(np.sort(np.concatenate([x_tr, x_val])), x)  # disjoint, covering
    np.testing.assert_array_equal(y[x_tr], y_tr)  # pairs kept together
    np.testing.assert_array_equal(y[x_val], y_val)
    assert_stratified(y_val, len(y))
    assert_stratified(y_tr, len(y))


def test_stratified_split_is_seeded(labelled):
    first = data.stratified_split(*labelled, val_size=200, seed=1)
    again = data.stratified_split(*labelled, val_size=200, seed=1)
    other = data.stratified_split(*labelled, val_size=200, seed=2)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[2], other[2])


@pytest.mark.parametrize("val_size", [0, -1, 5, 995, 1000, 2000])
def test_stratified_split_bad_val_size(labelled, val_size):
    with pytest.raises(ValueError, match="val_size"):
        data.stratified_split(*labelled, val_size=val_size, seed=0)


def test_stratified_subset(labelled):
    x, y = labelled
    x_sub, y_sub = data.stratified_subset(x, y, 100, seed=3)
    assert len(x_sub) == len(y_sub) == 100
    assert len(np.unique(x_sub)) == 100
    np.testing.assert_array_equal(y[x_sub], y_sub)
    assert_stratified(y_sub, len(y))
    np.testing.assert_array_equal(data.stratified_subset(x, y, 100, seed=3)[0], x_sub)
    same_x, same_y = data.stratified_subset(x, y, len(y), seed=3)
    assert same_x is x and same_y is y
    with pytest.raises(ValueError, match="n = 5"):
        data.stratified_subset(x, y, 5, seed=3)


def test_an_impossible_split_size_is_a_one_line_pipeline_error(labelled):
    # A stage turns PipelineError into one line; scikit-learn's own error would be a traceback.
    x, y = labelled
    with pytest.raises(PipelineError, match=r"^prepare\.val_size = 99999: must be between"):
        data.stratified_split(x, y, 99999, seed=0, name="prepare.val_size")


def test_class_counts():
    assert data.class_counts(np.array([0, 3, 3, 9], np.uint8)) == [1, 0, 0, 2, 0, 0, 0, 0, 0, 1]


# --- save_split / load_split --------------------------------------------------------------------


def test_save_load_split_round_trip(tmp_path):
    x, y = images(20), rng().integers(0, 10, 20, dtype=np.uint8)
    path = tmp_path / "splits" / "train.npz"
    data.save_split(path, x, y)
    data.save_split(path, x, y)  # overwriting is fine too
    x2, y2 = data.load_split(path)
    assert x2.dtype == y2.dtype == np.uint8
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(y2, y)
    assert os.listdir(path.parent) == ["train.npz"]  # no temp files left


def test_save_split_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "val.npz"
    x, y = images(3), np.zeros(3, np.uint8)
    data.save_split(path, x, y)
    before = path.read_bytes()

    def fail(file, **arrays):
        file.write(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez_compressed", fail)
    with pytest.raises(OSError, match="disk full"):
        data.save_split(path, x, y)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["val.npz"]


def test_save_split_rejects_non_uint8(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        data.save_split(tmp_path / "x.npz", np.zeros((1, 28, 28)), np.zeros(1, np.uint8))


def test_load_split_missing_or_corrupt(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    paths = ProjectPaths.cwd()
    with pytest.raises(
        PipelineError, match=r"not found; run the prepare stage first \(dvc repro prepare\)"
    ):
        data.load_split(paths.require(paths.split("train")))
    path = paths.split("test")
    data.save_split(path, images(20), np.zeros(20, np.uint8))
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(DataError, match=r"test\.npz: cannot read.*dvc repro -f prepare"):
        data.load_split(path)
