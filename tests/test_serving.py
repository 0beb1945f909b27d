"""The served model (mnist_serving): input conversion and validation as plain functions, then a
real `mlflow models serve` process, run with pickle refused, scoring every request form and
refusing bad input with a 400 whose message comes first, without a traceback."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import struct
from pathlib import Path
from typing import Any, NamedTuple

import keras
import mlflow
import numpy as np
import pandas as pd
import psutil
import pytest
import yaml
from PIL import Image
from support import register_small_champion

from mnist_mlops import registry
from mnist_mlops.data import load_mnist, to_model_input
from mnist_mlops.scoring_server import ScoringServer
from mnist_serving import inputs, png, presence
from mnist_serving.errors import InvalidInputError, ModelFailure
from mnist_serving.model import DigitClassifier, format_predictions

MNIST_DIR = Path(
    os.environ.get("MNIST_DIR", Path(__file__).resolve().parents[1].parent / "shared/data/mnist")
)
MODEL_NAME = "mnist-serving-test"
TRAIN_IMAGES = 2000
REQUEST_TIMEOUT = 60


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, y_train, x_test, y_test) as uint8, or skip: the tests want real digits."""
    if not MNIST_DIR.is_dir():
        pytest.skip(f"real MNIST not found at {MNIST_DIR} (set MNIST_DIR to the IDX files)")
    arrays, _ = load_mnist(MNIST_DIR, MNIST_DIR, download=False)
    return arrays.x_train, arrays.y_train, arrays.x_test, arrays.y_test


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def png_b64(image: np.ndarray) -> str:
    return b64(png_bytes(image))


def blue_on_yellow(digit: np.ndarray) -> np.ndarray:
    ink = digit[..., np.newaxis] / 255
    return (np.array([255, 230, 40]) * (1 - ink) + np.array([20, 40, 200]) * ink).astype(np.uint8)


def large_dark_on_light(digit: np.ndarray) -> np.ndarray:
    """4x larger, black on white, off-centre on a wide canvas."""
    big = np.asarray(Image.fromarray(255 - digit).resize((112, 112), Image.Resampling.BILINEAR))
    return np.pad(big, ((10, 60), (90, 8)), constant_values=255)


def transparent_black_ink(digit: np.ndarray) -> np.ndarray:
    """A canvas export: black strokes whose alpha is the ink, on a transparent background."""
    return np.dstack([np.zeros_like(digit)] * 3 + [digit])


PNG_VARIANTS = {
    "plain": lambda d: d,
    "inverted": lambda d: 255 - d,
    "colour": blue_on_yellow,
    "large": large_dark_on_light,
    "transparent": transparent_black_ink,
    "16-bit": lambda d: d.astype(np.uint16) * 257,
}


# --- conversion and validation, no server -------------------------------------------------------


def digit_like() -> np.ndarray:
    """A synthetic uint8 28x28 '1'-ish stroke, for tests that need no real digit."""
    image = np.zeros((28, 28), np.uint8)
    image[4:24, 12:16] = 255
    return image


@pytest.mark.parametrize("shape", [(28, 28, 1), (28, 28), (784,)])
def test_image_accepts_every_shape(shape):
    floats = np.linspace(0, 1, 784, dtype=np.float32)
    result = inputs.image_to_array(floats.reshape(shape).tolist())
    assert result.dtype == np.float32
    np.testing.assert_array_equal(result, floats.reshape(28, 28))


def test_image_takes_json_integers_0_and_1():
    result = inputs.image_to_array([[0, 1] * 14] * 28)
    assert set(np.unique(result)) == {0.0, 1.0}


@pytest.mark.parametrize("shape", [(28, 28), (784,), (28, 28, 1)])
def test_pixels_accepts_every_shape_as_lists_and_arrays(shape):
    image = digit_like()
    expected = image.astype(np.float32) / 255
    np.testing.assert_array_equal(inputs.pixels_to_array(image.reshape(shape).tolist()), expected)
    np.testing.assert_array_equal(inputs.pixels_to_array(image.reshape(shape)), expected)


def test_pixels_accepts_base64_of_raw_bytes():
    image = digit_like()
    expected = image.astype(np.float32) / 255
    text = b64(image.tobytes())
    np.testing.assert_array_equal(inputs.pixels_to_array(text), expected)
    wrapped = "\n".join(text[i : i + 76] for i in range(0, len(text), 76))  # `base64` CLI output
    np.testing.assert_array_equal(inputs.pixels_to_array(wrapped), expected)
    urlsafe = base64.urlsafe_b64encode(image.tobytes()).decode()
    np.testing.assert_array_equal(inputs.pixels_to_array(urlsafe), expected)


def nested(value: Any, shape: tuple[int, ...] = (28, 28)) -> list:
    return np.full(shape, 0.5).tolist() if value is None else np.full(shape, value).tolist()


def with_cell(value: Any, fill: float = 0) -> list:
    """28x28 `fill` (integer zeros by default) with `value` at [3][5]."""
    rows = np.full((28, 28), fill).tolist()
    rows[3][5] = value
    return rows


BAD_IMAGES = [
    ("wrong rank", np.zeros((28,)).tolist(), r"shape \[28\], expected one 28x28 image"),
    ("wrong shape", np.zeros((27, 28)).tolist(), r"shape \[27, 28\]"),
    ("a batch in one record", np.zeros((2, 28, 28, 1)).tolist(), r"a batch\?"),
    ("nan", with_cell(float("nan")), r"NaN or infinity \(first at index \[3, 5\]\)"),
    ("inf", with_cell(float("inf")), r"NaN or infinity"),
    ("above 1", with_cell(1.5), r"must be in \[0, 1\], found 0\.\.1\.5"),
    ("negative", with_cell(-0.25), r"must be in \[0, 1\], found -0\.25\.\.0"),
    ("0..255 scale", nested(200.0), r"raw 0\.\.255 pixels go in 'pixels'"),
    ("string", "0.5", r"got a string"),
    ("strings inside", with_cell("0.5"), r"strings where numbers belong \(such as '0'\)"),
    ("a word inside", with_cell("dark"), r"such as 'dark'"),
    ("booleans", np.zeros((28, 28), bool).tolist(), r"booleans"),
    ("a boolean among floats", with_cell(True, fill=0.5), r"booleans"),
    ("null inside", with_cell(None), r"nulls"),
    ("ragged rows", [[0.0] * 28] * 27 + [[0.0] * 27], r"nulls|rectangular"),
    ("one number", 0.5, r"got one value"),
    ("an object", {"data": [0.5]}, r"got an object"),
]


@pytest.mark.parametrize(
    ("value", "message"), [c[1:] for c in BAD_IMAGES], ids=[c[0] for c in BAD_IMAGES]
)
def test_image_rejects(value, message):
    with pytest.raises(InvalidInputError, match=message):
        inputs.image_to_array(value)


BAD_PIXELS = [
    (
        "floats",
        nested(0.5),
        r"must be integers 0\.\.255, got floating-point numbers \(such as 0\.5\)",
    ),
    ("integral floats", nested(12.0), r"must be integers"),
    ("above 255", with_cell(256), r"must be in 0\.\.255, found 0\.\.256"),
    ("negative", with_cell(-1), r"must be in 0\.\.255, found -1\.\.0"),
    ("nan", with_cell(float("nan")), r"NaN or infinity"),
    ("huge integer", with_cell(10**30), r"an integer out of range \(10{30}\); pixels are"),
    ("2**63", with_cell(2**63), r"an integer out of range \(9223372036854775808\)"),
    ("-2**63 - 1", with_cell(-(2**63) - 1), r"an integer out of range \(-9223372036854775809\)"),
    ("a boolean among integers", with_cell(True), r"booleans where numbers belong"),
    ("a false among integers", with_cell(False), r"booleans where numbers belong"),
    ("non-ASCII base64", b64(bytes(784))[:-1] + "\u00a0", r"not valid base64: .* U\+00A0"),
    ("wrong shape", np.zeros((28, 27), int).tolist(), r"shape \[28, 27\]"),
    ("base64 of 783 bytes", b64(bytes(783)), r"decode to 784 bytes .* got 783 bytes"),
    ("malformed base64", "abc$", r"not valid base64"),
    ("empty string", "", r"empty string"),
    ("too much base64", "A" * 5000, r"over the limit"),
]


@pytest.mark.parametrize(
    ("value", "message"), [c[1:] for c in BAD_PIXELS], ids=[c[0] for c in BAD_PIXELS]
)
def test_pixels_rejects(value, message):
    with pytest.raises(InvalidInputError, match=message):
        inputs.pixels_to_array(value)


def png_of_size(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def jpeg_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(digit_like()).save(buffer, format="JPEG")
    return buffer.getvalue()


BAD_PNGS = [
    ("a number", 7, r"must be a base64 string of a PNG file, got a number"),
    ("an array", [1, 2], r"got an array"),
    ("not base64", "%%%%", r"not valid base64"),
    ("bad padding", "iVBORw0KGgo", r"not valid base64"),
    ("not an image", b64(b"hello, world"), r"not a PNG file: it starts with b'hello, w'"),
    ("truncated", b64(png_bytes(digit_like())[:60]), r"not a decodable PNG image"),
    ("a JPEG", b64(jpeg_bytes()), r"not a PNG file"),
    ("broken chunks", b64(png_bytes(digit_like())[:8] + bytes(80)), r"not a decodable PNG image"),
    ("no IHDR", b64(png.PNG_SIGNATURE + bytes(10)), r"IHDR header is missing"),
    ("non-ASCII", b64(png_bytes(digit_like())) + "\u2028", r"not valid base64: .* U\+2028"),
    ("too long", "A" * (png.MAX_PNG_BASE64_CHARS + 4), r"characters of base64, over the limit"),
]


def png_field(value: Any) -> np.ndarray:
    """A `png` field -> its 28x28 image, the way prepare_batch converts it."""
    return png.png_to_array(png.read_png_file(value))


@pytest.mark.parametrize(
    ("value", "message"), [c[1:] for c in BAD_PNGS], ids=[c[0] for c in BAD_PNGS]
)
def test_png_rejects(value, message):
    with pytest.raises(InvalidInputError, match=message):
        png_field(value)


def test_png_accepts_data_urls():
    image = digit_like()
    text = f"data:image/png;base64,{png_b64(image)}"
    np.testing.assert_allclose(png_field(text), png_field(png_b64(image)), atol=0)


def test_to_mnist_keeps_mnist_digits_nearly_as_they_are(mnist):
    digits = mnist[2][:200]
    converted = np.stack([png.to_mnist(png.decode_png(png_bytes(d))) for d in digits])
    assert converted.dtype == np.float32
    assert converted.shape == (200, 28, 28)
    assert np.abs(converted - digits / 255).mean() < 0.002


@pytest.mark.parametrize("variant", list(PNG_VARIANTS))
def test_to_mnist_normalises_every_variant(mnist, variant):
    digits = mnist[2][:50]
    converted = np.stack(
        [png.to_mnist(png.decode_png(png_bytes(PNG_VARIANTS[variant](d)))) for d in digits]
    )
    assert converted.min() >= 0 and converted.max() <= 1
    assert np.abs(converted - digits / 255).mean() < 0.05, "white on black, like MNIST"
    ys, xs = np.mgrid[0:28, 0:28]
    mass = converted.sum(axis=(1, 2))
    centre_y = (converted * ys).sum(axis=(1, 2)) / mass
    centre_x = (converted * xs).sum(axis=(1, 2)) / mass
    assert np.abs(centre_y - 14).max() < 1 and np.abs(centre_x - 14).max() < 1


def test_to_mnist_fits_the_digit_into_20_pixels():
    canvas = np.full((300, 200), 255.0)
    canvas[50:250, 90:110] = 0  # a tall dark bar on white
    result = png.to_mnist(canvas)
    rows, cols = np.flatnonzero(result.any(axis=1)), np.flatnonzero(result.any(axis=0))
    assert rows[-1] - rows[0] + 1 == 20
    assert cols[-1] - cols[0] + 1 <= 3


def test_to_mnist_returns_blank_for_a_blank_image():
    assert not png.to_mnist(np.full((40, 40), 255.0)).any()


@pytest.mark.parametrize("background", [0, 100, 128, 160, 255])
def test_to_mnist_finds_light_and_dark_ink_on_any_background(background):
    """Polarity comes from which side of the paper the ink departs to, not from a threshold."""
    for ink in (background - 90, background + 90):
        if not 0 <= ink <= 255:
            continue
        canvas = np.full((60, 40), float(background))
        canvas[10:50, 18:22] = ink  # a tall bar, light or dark
        result = png.to_mnist(canvas)
        assert result.max() == 1.0
        assert result[:, 14].sum() > 15, f"ink {ink} on {background}: the bar is the digit"
        assert result[:, :10].max() == 0, "the background stays black"


def test_to_mnist_leaves_out_specks_and_dust():
    canvas = np.full((100, 100), 200.0)
    canvas[20:80, 45:52] = 30  # a bar
    canvas[5, 5] = canvas[90, 95] = 30  # two specks of dust
    result = png.to_mnist(canvas)
    cols = np.flatnonzero(result.any(axis=0))
    assert cols[-1] - cols[0] + 1 <= 4, "the specks do not widen the digit's box"
    dust = np.full((100, 100), 200.0)
    dust[np.random.default_rng(0).random(dust.shape) < 0.1] = 30  # 10% pepper noise
    assert not png.to_mnist(dust).any(), "hundreds of specks alike are no digit"


def test_presence_finds_every_mnist_test_digit(mnist):
    """The whole test set, as sent (`pixels`) and through the PNG conversion."""
    x_test = mnist[2]
    assert presence.digits_found(x_test / 255).all()
    converted = np.stack([png.to_mnist(d.astype(np.float32)) for d in x_test[:1000]])
    assert presence.digits_found(converted).all()


def no_digit_images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    noise = np.clip(rng.normal(0.5, 0.15, (28, 28)), 0, 1)
    pepper = np.where(rng.random((28, 28)) < 0.2, 1.0, 0.0)
    disc = (np.hypot(*np.mgrid[-14:14, -14:14]) < 10).astype(float)  # a dot, scaled up
    speck = np.zeros((28, 28))
    speck[14, 14] = 1
    return {
        "black": np.zeros((28, 28)),
        "grey": np.full((28, 28), 0.5),
        "Gaussian noise": noise,
        "salt": pepper,
        "dot": disc,
        "speck": speck,
        "gradient": np.tile(np.linspace(0, 1, 28), (28, 1)),
    }


@pytest.mark.parametrize("name", list(no_digit_images()))
def test_presence_finds_no_digit_in(name):
    assert not presence.digit_found(no_digit_images()[name])


def records(rows: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame(rows)


def test_prepare_batch_mixes_forms_in_order():
    image = digit_like()
    batch = inputs.prepare_batch(
        records(
            [
                {"pixels": image.tolist()},
                {"image": (image / 255)[..., np.newaxis].tolist()},
                {"pixels": b64(image.tobytes())},
                {"png": png_b64(image)},
            ]
        )
    )
    assert batch.shape == (4, 28, 28, 1) and batch.dtype == np.float32
    for i in range(3):
        np.testing.assert_allclose(batch[i, ..., 0], image / 255, atol=1e-7)
    np.testing.assert_allclose(batch[3, ..., 0], png.to_mnist(image.astype(np.float32)), atol=1e-6)


def test_prepare_batch_reads_columns_and_tensors():
    """What MLflow passes for `inputs`/`instances`: a dict of arrays, or one array of images."""
    x = np.stack([digit_like(), 255 - digit_like()])
    expected = (x / 255).astype(np.float32)[..., np.newaxis]
    strings = np.array([b64(i.tobytes()) for i in x])
    for model_input in (
        {"pixels": x},
        {"pixels": strings},
        {"image": x / 255},
        x / 255,
        (x / 255).reshape(2, 784),
        (x / 255)[..., np.newaxis],
        [(i / 255).tolist() for i in x],
    ):
        np.testing.assert_allclose(inputs.prepare_batch(model_input), expected, atol=1e-7)


def png_header_only(width: int, height: int) -> str:
    """Base64 of a PNG signature and IHDR declaring width x height, then no decodable data."""
    ihdr = struct.pack(">I4sII5B", 13, b"IHDR", width, height, 8, 0, 0, 0, 0)
    return b64(png.PNG_SIGNATURE + ihdr + bytes(64))


B64_ZEROS = b64(bytes(784))
SIDE_OF_BUDGET = int(png.MAX_PNG_PIXELS**0.5)

BAD_BATCHES = [
    ("empty", pd.DataFrame(), r"holds no images"),
    ("no field", records([{"pixels": [0] * 784}])[[]], r"holds no images"),
    ("unknown field", records([{"pixel": [0] * 784}]), r"^unknown field 'pixel': each image"),
    ("an extra field", records([{"pixels": [0] * 784, "id": 3}]), r"^unknown field 'id'"),
    ("null field", records([{"pixels": [0] * 784}, {"png": None}]), r"record 1 has none of"),
    (
        "two fields",
        records([{"pixels": [0] * 784, "png": "x"}]),
        r"record 0 has 2 \('pixels', 'png'\) of the fields",
    ),
    ("names the record", records([{"pixels": [0] * 784}, {"pixels": [0.5] * 784}]), r"^record 1:"),
    (
        "too many",
        records([{"pixels": [0] * 784}] * (inputs.MAX_BATCH + 1)),
        rf"^batch of {inputs.MAX_BATCH + 1} images is over the limit of {inputs.MAX_BATCH}",
    ),
    (
        "10,000 base64 strings as a column",
        {"pixels": np.array([B64_ZEROS] * 10_000)},
        r"^batch of 10000 images is over the limit of 1024",
    ),
    (
        "columns of different lengths",
        {"pixels": np.zeros((2, 784), int), "png": np.array(["x"])},
        r"different numbers of images \('pixels' 2, 'png' 1\)",
    ),
    ("one image as a column", {"pixels": np.zeros(784, int)}, r"got shape \[784\] \(one image\?"),
    ("an unknown column", {"img": np.zeros((1, 784))}, r"^unknown field 'img'"),
    ("a tensor of one image", np.zeros((28, 28)), r"got shape \[28, 28\] \(one image\?"),
    ("a tensor of wrong shape", np.zeros((2, 28, 27)), r"must have shape .* \[2, 28, 27\]"),
    ("a tensor of 0..255", np.full((1, 784), 255.0), r"^record 0: 'image' values must be in"),
    ("a tensor with NaN", np.full((1, 28, 28, 1), np.nan), r"^record 0: 'image' holds NaN"),
    ("a tensor over the batch", np.zeros((1025, 784)), r"^batch of 1025 images is over the limit"),
    ("a scalar", np.array(5.0), r"got a single value"),
    (
        "one PNG over the pixel budget",
        records([{"png": png_header_only(SIDE_OF_BUDGET + 1, SIDE_OF_BUDGET)}]),
        rf"^record 0: 'png' is {SIDE_OF_BUDGET + 1}x{SIDE_OF_BUDGET} .* over the limit of "
        rf"{png.MAX_PNG_PIXELS:,} PNG pixels per request",
    ),
    (
        # Header-only PNGs: a decode would fail, so the budget answer shows nothing was decoded.
        "PNGs over the pixel budget together",
        records([{"png": png_header_only(SIDE_OF_BUDGET, SIDE_OF_BUDGET // 2)}] * 3),
        r"^record 2: 'png' is .* which brings the request's PNGs to .* over the limit",
    ),
]


@pytest.mark.parametrize(
    ("model_input", "message"), [c[1:] for c in BAD_BATCHES], ids=[c[0] for c in BAD_BATCHES]
)
def test_prepare_batch_rejects(model_input, message):
    with pytest.raises(InvalidInputError, match=message):
        inputs.prepare_batch(model_input)


def test_invalid_input_is_a_400_with_the_message_alone():
    error = InvalidInputError("record 0: 'png' is an empty string")
    # What MLflow's scoring server does to an MlflowException from the model before answering:
    error.message = f"Failed to predict data '{'x' * 5000}'. \nError: {error.message}"
    assert error.get_http_status_code() == 400
    answer = json.loads(error.serialize_as_json())
    assert answer["message"] == "record 0: 'png' is an empty string"
    assert answer["error_code"] == "INVALID_PARAMETER_VALUE"


def test_unforeseen_failures_answer_without_a_traceback(monkeypatch, caplog):
    """What no check foresaw: a 400 if reading the request fails, a 500 if the model does; the
    traceback goes to the log only."""

    def broken(value: Any) -> np.ndarray:
        raise ValueError("/somewhere/on/the/server.py went wrong")

    class FailingModel:
        def predict_on_batch(self, images: np.ndarray) -> np.ndarray:
            raise RuntimeError("out of memory")

    classifier = DigitClassifier()
    classifier.model = FailingModel()
    monkeypatch.setitem(inputs.CONVERTERS, "image", broken)
    with pytest.raises(InvalidInputError) as refused:
        classifier.predict(None, {"image": np.zeros((1, 784))})
    assert refused.value.get_http_status_code() == 400
    assert "/somewhere" not in refused.value.serialize_as_json()
    monkeypatch.undo()
    with pytest.raises(ModelFailure) as failed:
        classifier.predict(None, {"image": np.zeros((1, 784))})
    assert failed.value.get_http_status_code() == 500
    assert "out of memory" not in failed.value.serialize_as_json()
    assert "Traceback" in caplog.text and "/somewhere/on/the/server.py" in caplog.text


def test_format_predictions():
    probabilities = np.eye(10, dtype=np.float32)[[3, 7]]
    result = format_predictions(probabilities, np.array([True, False]))
    assert [r["digit"] for r in result] == [3, 7]
    assert result[1]["probabilities"] == probabilities[1].tolist()
    assert [r["digit_found"] for r in result] == [True, False]
    json.dumps(result)  # plain Python types only


# --- a real server ------------------------------------------------------------------------------


class Served(NamedTuple):
    server: ScoringServer
    model: keras.Model  # the Keras model behind the server, for in-process predictions
    x: np.ndarray  # MNIST test images, uint8 [N, 28, 28]
    experiment_id: str


# Every server here runs with pickle refused: the registered model must load from code.
NO_PICKLE = {"MLFLOW_ALLOW_PICKLE_DESERIALIZATION": "false"}


@pytest.fixture(scope="module")
def served(mnist, tmp_path_factory):
    """A real server, pickle refused, for a small real model registered as
    models:/<name>@champion."""
    x_train, y_train, x_test, _ = mnist
    store = tmp_path_factory.mktemp("mlflow")
    previous_uri = mlflow.get_tracking_uri()
    try:
        model, tracking_uri, experiment_id = register_small_champion(
            x_train[:TRAIN_IMAGES], y_train[:TRAIN_IMAGES], store, "serving-test", MODEL_NAME
        )
        server = ScoringServer(
            f"models:/{MODEL_NAME}@champion", tracking_uri, store / "server.log", env=NO_PICKLE
        )
        server.start()
        pids = server.pids()
        try:
            yield Served(server, model, x_test, experiment_id)
        finally:
            server.stop()
        leaked = [pid for pid in pids if psutil.pid_exists(pid)]
        assert not leaked, f"server processes still exist after stop(): {leaked}"
    finally:
        mlflow.set_tracking_uri(previous_uri)


def post(
    server: ScoringServer, payload: Any, content_type: str = "application/json"
) -> tuple[int, Any]:
    body = payload if isinstance(payload, bytes | str) else json.dumps(payload)
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=REQUEST_TIMEOUT)
    try:
        connection.request("POST", "/invocations", body, {"Content-Type": content_type})
        response = connection.getresponse()
        raw = response.read()
    finally:
        connection.close()
    try:
        return response.status, json.loads(raw)
    except json.JSONDecodeError:
        return response.status, raw.decode(errors="replace")


def predictions(
    server: ScoringServer, payload: Any, content_type: str = "application/json"
) -> tuple[np.ndarray, np.ndarray]:
    status, answer = post(server, payload, content_type)
    assert status == 200, answer
    rows = answer["predictions"]
    return np.array([r["digit"] for r in rows]), np.array([r["probabilities"] for r in rows])


def assert_matches_in_process(
    server: ScoringServer,
    model: keras.Model,
    payload: Any,
    images: np.ndarray,
    content_type: str = "application/json",
) -> None:
    """The server's answers equal predict_on_batch on the same float32 [N, 28, 28, 1] images."""
    digits, probabilities = predictions(server, payload, content_type)
    expected = model.predict_on_batch(images)
    np.testing.assert_allclose(probabilities, expected, atol=1e-5)
    np.testing.assert_array_equal(digits, expected.argmax(axis=1))


@pytest.mark.slow
def test_signature_and_metadata_document_the_forms(served):
    server = served.server
    info = mlflow.models.get_model_info(server.model_uri)
    assert info.signature.inputs is None, "an input signature would cast or drop fields"
    assert info.signature.outputs.input_names() == ["digit", "probabilities", "digit_found"]
    assert set(info.metadata["request_forms"]) == {
        *inputs.FIELDS,
        "tensor",
        "max_batch",
        "max_png_pixels_per_request",
    }


@pytest.mark.slow
def test_the_model_is_logged_as_code_not_pickled(served):
    model_dir = Path(mlflow.artifacts.download_artifacts(served.server.model_uri))
    pyfunc = yaml.safe_load((model_dir / "MLmodel").read_text())["flavors"]["python_function"]
    assert Path(pyfunc["model_code_path"]).name == "model_code.py"
    assert not list(model_dir.rglob("*.pkl")), "nothing in the model is a pickle"
    # The server runs with MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false and answers.
    assert served.server.extra_env == NO_PICKLE
    digits, _ = predictions(served.server, {"dataframe_records": [{"pixels": B64_ZEROS}]})
    assert digits.shape == (1,)


def float_forms(x: np.ndarray) -> dict[str, Any]:
    floats = to_model_input(x)
    return {
        "records [28,28,1]": {"dataframe_records": [{"image": i.tolist()} for i in floats]},
        "records [28,28]": {"dataframe_records": [{"image": i[..., 0].tolist()} for i in floats]},
        "records [784]": {"dataframe_records": [{"image": i.ravel().tolist()} for i in floats]},
        "columns [N,28,28,1]": {"inputs": {"image": floats.tolist()}},
        "columns [N,28,28]": {"inputs": {"image": floats[..., 0].tolist()}},
        "tensor inputs [N,28,28,1]": {"inputs": floats.tolist()},
        "tensor inputs [N,28,28]": {"inputs": floats[..., 0].tolist()},
        "tensor inputs [N,784]": {"inputs": floats.reshape(len(floats), -1).tolist()},
        "tensor instances [N,28,28,1]": {"instances": floats.tolist()},
        "tensor instances [N,28,28]": {"instances": floats[..., 0].tolist()},
        "split": {
            "dataframe_split": {"columns": ["image"], "data": [[i.tolist()] for i in floats]}
        },
    }


def pixel_forms(x: np.ndarray) -> dict[str, Any]:
    return {
        "records [28,28]": {"dataframe_records": [{"pixels": i.tolist()} for i in x]},
        "records [784]": {"dataframe_records": [{"pixels": i.ravel().tolist()} for i in x]},
        "records base64": {"dataframe_records": [{"pixels": b64(i.tobytes())} for i in x]},
        "columns [N,28,28]": {"inputs": {"pixels": x.tolist()}},
        "columns [N,784]": {"inputs": {"pixels": x.reshape(len(x), -1).tolist()}},
        "columns base64": {"inputs": {"pixels": [b64(i.tobytes()) for i in x]}},
        "instances": {"instances": [{"pixels": i.tolist()} for i in x]},
    }


@pytest.mark.slow
@pytest.mark.parametrize("form", list(float_forms(np.zeros((1, 28, 28), np.uint8))))
def test_float_images_over_http(served, form):
    server, model, x, _ = served
    images = x[:16]
    assert_matches_in_process(server, model, float_forms(images)[form], to_model_input(images))


@pytest.mark.slow
@pytest.mark.parametrize("form", list(pixel_forms(np.zeros((1, 28, 28), np.uint8))))
def test_raw_pixels_over_http(served, form):
    server, model, x, _ = served
    images = x[16:32]
    assert_matches_in_process(server, model, pixel_forms(images)[form], to_model_input(images))


@pytest.mark.slow
def test_a_single_image(served):
    server, model, x, _ = served
    payload = {"dataframe_records": [{"pixels": x[100].tolist()}]}
    assert_matches_in_process(server, model, payload, to_model_input(x[100:101]))


@pytest.mark.slow
@pytest.mark.parametrize("variant", list(PNG_VARIANTS))
def test_png_images_over_http(served, variant):
    server, model, x, _ = served
    images = x[32:64]
    pngs = [png_bytes(PNG_VARIANTS[variant](image)) for image in images]
    converted = np.stack([png.to_mnist(png.decode_png(p)) for p in pngs])[..., None]
    payload = {"dataframe_records": [{"png": b64(p)} for p in pngs]}
    assert_matches_in_process(server, model, payload, converted)
    digits, _ = predictions(server, payload)
    raw_digits = model.predict_on_batch(to_model_input(images)).argmax(axis=1)
    # A 1-epoch model is unsure of some digits, so resampling may flip a few of them.
    assert np.sum(digits == raw_digits) >= 26, "PNGs are read as the same digits as the arrays"


@pytest.mark.slow
def test_every_answer_says_whether_it_found_a_digit(served):
    server, _, x, _ = served
    blank_png = png_b64(np.full((50, 40), 128, np.uint8))
    payload = {
        "dataframe_records": [
            {"png": png_b64(255 - x[0])},
            {"png": blank_png},
            {"pixels": x[1].tolist()},
            {"image": np.zeros((28, 28)).tolist()},
        ]
    }
    status, answer = post(server, payload)
    assert status == 200, answer
    assert [row["digit_found"] for row in answer["predictions"]] == [True, False, True, False]


@pytest.mark.slow
def test_png_columns_and_mixed_records_over_http(served):
    server, model, x, _ = served
    images = x[64:70]
    pngs = [png_b64(i) for i in images]
    columns = {"inputs": {"png": pngs}}
    converted = np.stack([png_field(p) for p in pngs])[..., None]
    assert_matches_in_process(server, model, columns, converted)
    mixed = {
        "dataframe_records": [
            {"image": (images[0] / 255).tolist()},
            {"pixels": images[1].tolist()},
            {"pixels": b64(images[2].tobytes())},
            {"png": pngs[3]},
        ]
    }
    expected = np.concatenate([to_model_input(images[:3]), converted[3:4]])
    assert_matches_in_process(server, model, mixed, expected)


@pytest.mark.slow
def test_a_full_batch_over_http(served):
    server, model, x, _ = served
    images = x[: inputs.MAX_BATCH]
    payload = {"dataframe_records": [{"pixels": b64(i.tobytes())} for i in images]}
    assert_matches_in_process(server, model, payload, to_model_input(images))


def record(**fields: Any) -> dict[str, Any]:
    return {"dataframe_records": [fields]}


def deeply_nested(depth: int) -> str:
    return '{"dataframe_records": [{"image": ' + "[" * depth + "]" * depth + "}]}"


# (id, body, regex the error message must match); every one must get a 4xx, never a 500.
BAD_REQUESTS: list[tuple[str, Any, str]] = [
    ("not JSON", '{"dataframe_records": [', r"valid JSON"),
    ("a JSON list", "[1, 2]", r"must be a JSON dictionary"),
    ("unknown top-level field", {"records": [{"pixels": [0] * 784}]}, r"exactly one of"),
    ("two top-level fields", {"inputs": {}, "instances": []}, r"exactly one of"),
    ("records not a list", {"dataframe_records": {"pixels": [0]}}, r"list of records"),
    ("misspelt field", record(pixel=[0] * 784), r"^unknown field 'pixel': each image is given"),
    ("an extra field", record(pixels=[0] * 784, id=3), r"^unknown field 'id'"),
    ("misspelt column", {"inputs": {"img": [[0.0] * 784]}}, r"^unknown field 'img'"),
    ("empty batch", {"dataframe_records": []}, r"holds no images"),
    ("an empty record", {"dataframe_records": [{}]}, r"holds no images"),
    ("two forms in a record", record(pixels=[0] * 784, png="x"), r"has 2 \('pixels', 'png'\)"),
    (
        "a record without an image",
        {"dataframe_records": [{"pixels": [0] * 784}, {"pixels": None}]},
        r"record 1 has none",
    ),
    ("image of wrong rank", record(image=[0.0] * 28), r"shape \[28\]"),
    ("image of wrong shape", record(image=nested(0.5, (28, 27))), r"shape \[28, 27\]"),
    ("a batch in one record", record(image=nested(0.5, (3, 28, 28))), r"a batch\?"),
    ("NaN", record(image=with_cell(float("nan"))), r"NaN or infinity"),
    ("Infinity", record(image=with_cell(float("inf"))), r"NaN or infinity"),
    ("1e400", '{"dataframe_records": [{"image": [' + "1e400," * 783 + "0]}]}", r"infinity"),
    ("image above 1", record(image=with_cell(1.01)), r"must be in \[0, 1\]"),
    ("image below 0", record(image=with_cell(-0.01)), r"must be in \[0, 1\]"),
    ("0..255 as image", record(image=nested(255.0)), r"go in 'pixels'"),
    ("a string as image", record(image="0.5"), r"got a string"),
    ("strings in an image", record(image=with_cell("x")), r"strings where numbers belong"),
    ("booleans", record(image=np.ones((28, 28), bool).tolist()), r"booleans"),
    ("null in an image", record(image=with_cell(None)), r"nulls"),
    ("ragged rows", record(image=[[0.0] * 28] * 27 + [[0.0] * 20]), r"rectangular|nulls"),
    ("one number as image", record(image=0.5), r"one value"),
    ("an object as image", record(image={"x": 1}), r"got an object"),
    ("float pixels", record(pixels=nested(0.5)), r"must be integers 0\.\.255"),
    ("pixels above 255", record(pixels=with_cell(300)), r"found 0\.\.300"),
    ("negative pixels", record(pixels=with_cell(-3)), r"found -3\.\.0"),
    ("huge integer pixel", record(pixels=with_cell(10**40)), r"an integer out of range \(10{40}\)"),
    (
        "2**63 among pixels",
        record(pixels=with_cell(2**63)),
        r"^record 0: 'pixels' holds an integer out of range \(9223372036854775808\)",
    ),
    ("a true among pixels", record(pixels=with_cell(True)), r"^record 0: 'pixels' holds booleans"),
    (
        "non-ASCII in base64 pixels",
        record(pixels=B64_ZEROS[:-1] + "\u00a0"),
        r"^record 0: 'pixels' is not valid base64: character 1047 is U\+00A0",
    ),
    (
        "non-ASCII in base64 png",
        record(png="\u00a0" + b64(png_bytes(digit_like()))),
        r"^record 0: 'png' is not valid base64: character 0 is U\+00A0",
    ),
    ("pixels of wrong size", record(pixels=[0] * 783), r"shape \[783\]"),
    ("short raw pixels", record(pixels=b64(bytes(700))), r"got 700 bytes"),
    ("malformed base64 pixels", record(pixels="AAA*"), r"not valid base64"),
    ("malformed base64 png", record(png="not base64!"), r"not valid base64"),
    ("undecodable png", record(png=b64(b"\x89PNG\r\n\x1a\n" + bytes(50))), r"not a decodable PNG"),
    ("a JPEG as png", record(png=b64(jpeg_bytes())), r"not a PNG file"),
    ("png too large", record(png=b64(png_of_size(4097, 4097))), r"over the limit"),
    (
        "16 PNGs of 4096x4096",
        {"dataframe_records": [{"png": b64(png_of_size(4096, 4096))}] * 16},
        r"^record 1: 'png' is 4096x4096 .* over the limit of 16,777,216 PNG pixels per request",
    ),
    ("empty png", record(png=""), r"empty string"),
    ("a number as png", record(png=5), r"must be a base64 string"),
    (
        "batch over the limit",
        {"dataframe_records": [{"pixels": b64(bytes(784))}] * (inputs.MAX_BATCH + 1)},
        rf"over the limit of {inputs.MAX_BATCH}",
    ),
    ("mixed instances", {"instances": [{"pixels": [0] * 784}, {"png": "x"}]}, r"has 2"),
    (
        "10,000 base64 strings as a column",
        {"inputs": {"pixels": [B64_ZEROS] * 10_000}},
        r"^batch of 10000 images is over the limit of 1024",
    ),
    ("tensor with NaN", {"inputs": [[float("nan")] * 784]}, r"^record 0: 'image' holds NaN"),
    (
        "tensor above 1",
        {"inputs": np.full((2, 784), 2.0).tolist()},
        r"^record 0: 'image' values must be in \[0, 1\]",
    ),
    (
        "tensor of wrong shape",
        {"instances": np.zeros((2, 28, 27)).tolist()},
        r"^an array of images must have shape .* got shape \[2, 28, 27\]",
    ),
    ("tensor of one image", {"inputs": np.zeros((28, 28)).tolist()}, r"\(one image\? wrap it"),
    (
        "tensor over the batch",
        {"inputs": np.zeros((inputs.MAX_BATCH + 1, 784)).tolist()},
        rf"^batch of {inputs.MAX_BATCH + 1} images is over the limit",
    ),
    ("deep nesting", deeply_nested(100), r"shape|rectangular|nulls"),
]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("body", "message"), [c[1:] for c in BAD_REQUESTS], ids=[c[0] for c in BAD_REQUESTS]
)
def test_bad_requests_get_a_400_that_says_why(served, body, message):
    server = served.server
    status, answer = post(server, body)
    assert status == 400, answer
    assert isinstance(answer, dict) and answer["error_code"] in (
        "BAD_REQUEST",
        "INVALID_PARAMETER_VALUE",
    ), answer
    assert re.search(message, answer["message"]), answer["message"][:500]
    # The message comes first (no echo of the request before it), and no traceback or
    # server path comes with it.
    assert not answer["message"].startswith("Failed to"), answer["message"][:500]
    assert "stack_trace" not in answer and "Traceback" not in answer["message"]
    assert "site-packages" not in json.dumps(answer)
    assert server.ping(), "the server still answers /ping"


@pytest.mark.slow
def test_csv_of_base64_pixels_and_pngs(served):
    server, model, x, _ = served
    images = x[:3]
    body = "pixels\n" + "".join(f"{b64(i.tobytes())}\n" for i in images)
    assert_matches_in_process(server, model, body, to_model_input(images), "text/csv")
    body = "png\n" + "".join(f"{png_b64(i)}\n" for i in images)
    converted = np.stack([png_field(png_b64(i)) for i in images])[..., None]
    assert_matches_in_process(server, model, body, converted, "text/csv")


@pytest.mark.slow
def test_wrong_content_type_is_a_415(served):
    server = served.server
    status, _ = post(server, "pixels=0", content_type="text/plain")
    assert status == 415
    assert server.ping()


@pytest.mark.slow
def test_server_still_scores_after_bad_requests(served):
    server, model, x, _ = served
    for body in (deeply_nested(100), "[", record(png=b64(b"junk"))):
        post(server, body)
    assert_matches_in_process(
        server, model, {"dataframe_records": [{"pixels": x[0].tolist()}]}, to_model_input(x[:1])
    )


@pytest.mark.slow
def test_log_serving_model_from_a_keras_file(served, tmp_path):
    _, model, x, experiment_id = served
    path = tmp_path / "model.keras"
    model.save(path)
    with mlflow.start_run(experiment_id=experiment_id):
        info = registry.log_serving_model(path)
    pyfunc = mlflow.pyfunc.load_model(info.model_uri)
    result = pyfunc.predict(pd.DataFrame({"pixels": list(x[:4])}))
    expected = model.predict_on_batch(to_model_input(x[:4]))
    np.testing.assert_allclose([r["probabilities"] for r in result], expected, atol=1e-6)


@pytest.mark.slow
def test_load_keras_model_reads_both_flavors(served):
    _, model, x, experiment_id = served
    with mlflow.start_run(experiment_id=experiment_id):
        keras_flavor = mlflow.keras.log_model(model, name="keras", pip_requirements=["keras"])
    images = to_model_input(x[:4])
    expected = model.predict_on_batch(images)
    for uri in (served.server.model_uri, keras_flavor.model_uri):
        loaded = registry.load_keras_model(uri)
        np.testing.assert_allclose(loaded.predict_on_batch(images), expected, atol=1e-6)
