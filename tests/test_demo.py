"""The draw-a-digit demo (`make demo`, `python -m mnist_mlops.demo`) end to end: a small real model
registered as @champion in a throwaway store, a real `mlflow models serve`, the demo as its own
process, and a real headless Chromium (Debian's, driven by Selenium) drawing digits on the page
with mouse, pen and touch pointer events."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import keras
import mlflow
import numpy as np
import psutil
import pytest
from PIL import Image, ImageDraw
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.actions import interaction
from selenium.webdriver.common.actions.action_builder import ActionBuilder
from selenium.webdriver.common.actions.pointer_input import PointerInput
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait
from support import REPO_ROOT, register_small_champion

from mnist_mlops import registry
from mnist_mlops.config import load_params
from mnist_mlops.data import load_mnist
from mnist_mlops.demo.__main__ import champion_uri
from mnist_mlops.demo.app import STATIC_DIR
from mnist_mlops.errors import PipelineError
from mnist_mlops.scoring_server import SERVER_HOST, ScoringServer
from mnist_serving.png import decode_png, to_mnist

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Chromium and its driver on PATH: "
    "apt-get install -y --no-install-recommends chromium chromium-driver",
)
# Root in a container needs --no-sandbox; the rest keeps the browser from reaching out.
CHROMIUM_FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1000,800",
)  # fmt: skip

TRAIN_IMAGES = 3000
CANVAS = 280  # the page's canvas: its size in CSS pixels and in canvas pixels
SCALE = CANVAS // 28  # canvas pixels per MNIST pixel
LINE_WIDTH = int(re.search(r"LINE_WIDTH = (\d+)", (STATIC_DIR / "demo.js").read_text())[1])
INK_LEVEL = 128  # MNIST pixels at least this bright are traced
# A digit is drawn only if the model reads its trace right in process with this probability,
# so that Chromium's anti-aliasing (not exactly PIL's) cannot change the answer.
SURE = 0.9
DRAWN = {  # digit -> the pointer that draws it
    7: interaction.POINTER_MOUSE,
    2: interaction.POINTER_PEN,
    0: interaction.POINTER_TOUCH,
    4: interaction.POINTER_MOUSE,
}
STARTUP_SECONDS = 180  # the demo with its own model server: ~10-20 s here
WAIT_SECONDS = 60
DOWN_MESSAGE = "The model server is not answering"

Stroke = tuple[tuple[int, int], tuple[int, int]]


class Registered(NamedTuple):
    tracking_uri: str
    model_uri: str
    model: keras.Model  # the Keras model behind the registered version, for in-process answers
    x_test: np.ndarray
    y_test: np.ndarray


class Demo(NamedTuple):
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path


# --- a registered model, the servers, the browser ----------------------------------------------


@pytest.fixture(scope="module")
def registered(mnist_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Registered:
    """A small CNN trained on real MNIST, registered under params.yaml's name as @champion."""
    arrays, _ = load_mnist(mnist_dir, mnist_dir, download=False)
    name = load_params(REPO_ROOT / "params.yaml").mlflow.registered_model
    previous_uri = mlflow.get_tracking_uri()
    try:
        model, tracking_uri, _ = register_small_champion(
            arrays.x_train[:TRAIN_IMAGES],
            arrays.y_train[:TRAIN_IMAGES],
            tmp_path_factory.mktemp("mlflow"),
            "demo-test",
            name,
        )
    finally:
        mlflow.set_tracking_uri(previous_uri)
    model_uri = f"models:/{name}@{registry.CHAMPION_ALIAS}"
    return Registered(tracking_uri, model_uri, model, arrays.x_test, arrays.y_test)


@pytest.fixture(scope="module")
def model_server(
    registered: Registered, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ScoringServer]:
    log_path = tmp_path_factory.mktemp("model-server") / "server.log"
    with ScoringServer(registered.model_uri, registered.tracking_uri, log_path) as server:
        yield server


@pytest.fixture(scope="module")
def demo(model_server: ScoringServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Demo]:
    """The demo in front of `model_server`, as `python -m mnist_mlops.demo --model-url`."""
    log_path = tmp_path_factory.mktemp("demo") / "demo.log"
    running = start_demo(log_path, "--model-url", model_server.url)
    yield running
    assert stop_demo(running.process) == 0, running.log_path.read_text()


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[webdriver.Chrome]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tmp_path_factory.mktemp("chromium-profile")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    # An explicit driver path: Selenium then never looks for (or downloads) a driver itself.
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def drawable(registered: Registered) -> dict[int, list[Stroke]]:
    """For each digit of DRAWN, the strokes of the first real test digit whose trace the model
    reads right (in process, with probability at least SURE)."""
    chosen = {}
    for digit in DRAWN:
        for image in registered.x_test[registered.y_test == digit][:50]:
            strokes = trace(image)
            probabilities = read_in_process(registered.model, render(strokes))
            if probabilities.argmax() == digit and probabilities[digit] >= SURE:
                chosen[digit] = strokes
                break
        else:
            pytest.fail(f"the model reads none of the first 50 traced {digit}s right, sure")
    return chosen


def start_demo(log_path: Path, *args: str, env: dict[str, str] | None = None) -> Demo:
    """`python -m mnist_mlops.demo --port 0 ARGS` from the repository root, once it prints its
    address."""
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mnist_mlops.demo", "--port", "0", *args],
            cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    address = re.compile(rf"draw a digit at (http://{re.escape(SERVER_HOST)}:\d+)")
    deadline = time.monotonic() + STARTUP_SECONDS
    while not (found := address.search(log_path.read_text())):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_demo(process)
            pytest.fail(f"the demo did not print its address; its log:\n{log_path.read_text()}")
        time.sleep(0.25)
    return Demo(process, found[1], log_path)


def stop_demo(process: subprocess.Popen[bytes], timeout: float = 60) -> int:
    """SIGTERM, as a service manager stops it; the exit code."""
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        return process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        raise


def post_json(url: str, payload: Any) -> tuple[int, Any]:
    request = urllib.request.Request(
        url, json.dumps(payload).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=WAIT_SECONDS) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as err:
        return err.code, json.load(err)


# --- digits as strokes --------------------------------------------------------------------------


def trace(image: np.ndarray) -> list[Stroke]:
    """A real MNIST digit as strokes on the canvas: one horizontal stroke per run of ink in each
    pixel row, drawn thick enough (LINE_WIDTH) that neighbouring rows merge into a solid digit."""
    strokes = []
    for row, ink in enumerate(image >= INK_LEVEL):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], ink.astype(np.int8), [0]])))
        y = row * SCALE + SCALE // 2
        for start, end in edges.reshape(-1, 2):
            first, last = start * SCALE + SCALE // 2, (end - 1) * SCALE + SCALE // 2
            strokes.append(((int(first), y), (int(last), y)))
    return strokes


def render(strokes: list[Stroke]) -> str:
    """The strokes as the page draws them (black, LINE_WIDTH, round ends, on white): base64 PNG."""
    image = Image.new("L", (CANVAS, CANVAS), 255)
    pen = ImageDraw.Draw(image)
    radius = LINE_WIDTH / 2
    for start, end in strokes:
        pen.line([start, end], fill=0, width=LINE_WIDTH)
        for x, y in (start, end):
            pen.ellipse([x - radius, y - radius, x + radius, y + radius], fill=0)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def read_in_process(model: keras.Model, png: str) -> np.ndarray:
    """The model's ten probabilities for a base64 PNG, converted as the served model does."""
    image = to_mnist(decode_png(base64.b64decode(png)))
    return model.predict_on_batch(image[np.newaxis, ..., np.newaxis])[0]


# --- the page -----------------------------------------------------------------------------------


def draw(driver: webdriver.Chrome, strokes: list[Stroke], pointer: str) -> None:
    """Each stroke as pointer down, move, up on the canvas, with a mouse, pen or touch pointer."""
    canvas = driver.find_element(By.ID, "pad")
    # Not "reading": the next look at the page waits for the answer to this drawing.
    driver.execute_script("document.body.dataset.state = 'drawing'")
    actions = ActionBuilder(driver, mouse=PointerInput(pointer, pointer), duration=0)
    centre = CANVAS // 2  # moves are relative to the centre of the canvas
    for (x0, y0), (x1, y1) in strokes:
        actions.pointer_action.move_to(canvas, x0 - centre, y0 - centre).pointer_down()
        actions.pointer_action.move_to(canvas, x1 - centre, y1 - centre).pointer_up()
    actions.perform()


def look(driver: webdriver.Chrome) -> dict[str, Any]:
    """What the page shows now, and the drawing as a base64 PNG."""
    return driver.execute_script(
        """
        const bars = [...document.querySelectorAll('#bars li')];
        return {
          state: document.body.dataset.state,
          status: document.getElementById('status').textContent,
          statusIsError: document.getElementById('status').classList.contains('error'),
          answer: document.getElementById('answer').textContent,
          probabilities: bars.map((bar) => bar.dataset.probability ?? null),
          barLengths: bars.map((bar) => {
            const part = (selector) => bar.querySelector(selector).getBoundingClientRect().width;
            return part('.fill') / part('.track');
          }),
          top: bars.filter((bar) => bar.classList.contains('top')).map((bar) => bar.dataset.digit),
          png: document.getElementById('pad').toDataURL('image/png').split(',')[1],
        };"""
    )


def reading(driver: webdriver.Chrome) -> dict[str, Any]:
    """What the page shows once it has answered (or failed) for the drawing as it is."""
    WebDriverWait(driver, WAIT_SECONDS).until(
        lambda d: (
            d.execute_script("return document.body.dataset.state") not in ("drawing", "reading")
        )
    )
    return look(driver)


def hold_requests(driver: webdriver.Chrome) -> None:
    """From now on, hold each request the page makes until `release_requests`."""
    driver.execute_script(
        """
        window.heldRequests = [];
        const fetchOnce = window.fetch;
        // Each held request, once released, resolves when the page has handled its answer: a
        // timer runs after the promise reactions that read the answer and show it.
        window.fetch = (...args) => new Promise((resolve, reject) => {
          window.heldRequests.push(() => new Promise((handled) => {
            fetchOnce(...args).then((response) => {
              const json = response.json.bind(response);
              response.json = () => json().finally(() => setTimeout(handled));
              resolve(response);
            }, (error) => { setTimeout(handled); reject(error); });
          }));
        });"""
    )


def held_requests(driver: webdriver.Chrome) -> int:
    return driver.execute_script("return window.heldRequests.length")


def release_requests(driver: webdriver.Chrome) -> None:
    """Send the held requests and return once the page has handled every answer."""
    driver.execute_async_script(
        """
        const done = arguments[arguments.length - 1];
        Promise.all(window.heldRequests.splice(0).map((send) => send())).then(() => done());"""
    )


def record_pointer_types(driver: webdriver.Chrome) -> None:
    driver.execute_script(
        """
        window.pointerTypes = new Set();
        document.getElementById('pad').addEventListener(
          'pointerdown', (event) => window.pointerTypes.add(event.pointerType));"""
    )


# --- tests --------------------------------------------------------------------------------------


@needs_chromium
@pytest.mark.slow
def test_page_reads_digits_drawn_with_mouse_pen_and_touch(demo, browser, drawable, registered):
    browser.get(demo.url)
    record_pointer_types(browser)
    for digit, pointer in DRAWN.items():
        browser.find_element(By.ID, "clear").click()
        draw(browser, drawable[digit], pointer)
        page = reading(browser)
        assert page["state"] == "answered", page["status"]
        assert page["answer"] == str(digit)
        assert page["top"] == [str(digit)]
        assert page["status"].startswith(f"The model reads a {digit} (")
        # The bars are the served model's answer for exactly what the canvas holds.
        expected = read_in_process(registered.model, page["png"])
        shown = [float(p) for p in page["probabilities"]]
        np.testing.assert_allclose(shown, expected, atol=1e-5)
        np.testing.assert_allclose(page["barLengths"], expected, atol=0.01)
    pointer_types = browser.execute_script("return [...window.pointerTypes].sort()")
    assert pointer_types == ["mouse", "pen", "touch"]


@needs_chromium
@pytest.mark.slow
def test_blank_canvas_asks_for_a_digit_and_sends_nothing(demo, browser, drawable):
    browser.get(demo.url)
    page = look(browser)
    assert (page["state"], page["status"], page["answer"]) == ("idle", "Draw a digit", "")
    assert page["probabilities"] == [None] * 10

    draw(browser, drawable[7], interaction.POINTER_MOUSE)
    assert reading(browser)["answer"] == "7"
    hold_requests(browser)
    browser.find_element(By.ID, "clear").click()
    page = look(browser)
    assert (page["state"], page["status"], page["answer"]) == ("idle", "Draw a digit", "")
    assert page["probabilities"] == [None] * 10
    assert page["barLengths"] == [0] * 10
    assert held_requests(browser) == 0


@needs_chromium
@pytest.mark.slow
def test_an_answer_that_arrives_after_clear_is_dropped(demo, browser, drawable):
    browser.get(demo.url)
    hold_requests(browser)
    draw(browser, drawable[7], interaction.POINTER_MOUSE)
    assert held_requests(browser) > 0
    browser.find_element(By.ID, "clear").click()
    release_requests(browser)  # the answers for the 7 arrive now, after the clear
    page = look(browser)
    assert (page["state"], page["status"], page["answer"]) == ("idle", "Draw a digit", "")
    assert page["probabilities"] == [None] * 10


@needs_chromium
@pytest.mark.slow
def test_page_says_when_the_model_server_is_down(demo, browser, drawable, model_server):
    browser.get(demo.url)
    model_server.stop()
    try:
        status, answer = post_json(f"{demo.url}/api/predict", {"png": render(drawable[2])})
        assert status == 503
        assert answer["error"].startswith(f"{DOWN_MESSAGE} (")

        draw(browser, drawable[2], interaction.POINTER_MOUSE)
        page = reading(browser)
        assert page["state"] == "error"
        assert page["status"] == answer["error"]
        assert page["statusIsError"]
        assert page["answer"] == ""
        assert page["probabilities"] == [None] * 10
    finally:
        model_server.start()
    # Back up: the next stroke is read again.
    draw(browser, [((140, 140), (141, 140))], interaction.POINTER_MOUSE)
    assert reading(browser)["state"] == "answered"


# Drawings that hold no digit: a dot, and a patch scribbled over (zigzag strokes, solid ink).
NOT_DIGITS = {
    "dot": [((140, 140), (141, 140))],
    "scribble": [((80, y), (200, y + 8)) for y in range(80, 200, 12)],
}


@needs_chromium
@pytest.mark.slow
@pytest.mark.parametrize("drawing", list(NOT_DIGITS))
def test_page_says_no_digit_found_for_a_dot_or_a_scribble(demo, browser, drawing):
    status, answer = post_json(f"{demo.url}/api/predict", {"png": render(NOT_DIGITS[drawing])})
    assert status == 200 and answer["digit_found"] is False, answer
    browser.get(demo.url)
    draw(browser, NOT_DIGITS[drawing], interaction.POINTER_MOUSE)
    page = reading(browser)
    assert (page["state"], page["status"], page["answer"]) == ("no-digit", "No digit found", "")
    assert not page["statusIsError"]
    assert page["probabilities"] == [None] * 10
    assert page["barLengths"] == [0] * 10


@pytest.mark.slow
def test_proxy_refuses_requests_without_a_png_drawing(demo):
    status, answer = post_json(f"{demo.url}/api/predict", {"image": [0.0] * 784})
    assert (status, answer) == (400, {"error": 'send {"png": "<base64 PNG>"} as JSON'})
    # The model's own 400, passed on with its message.
    status, answer = post_json(
        f"{demo.url}/api/predict", {"png": base64.b64encode(b"GIF89a").decode()}
    )
    assert status == 400
    assert answer["error"].startswith("The model refused the drawing: record 0: 'png' is not a PNG")


@pytest.mark.slow
def test_demo_serves_the_champion_itself_and_stops_it_on_exit(registered, tmp_path):
    """Without --model-url the demo starts models:/<params.yaml name>@champion from the store
    MLFLOW_TRACKING_URI names, and SIGTERM stops both."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered.tracking_uri}
    running = start_demo(tmp_path / "demo.log", env=env)
    try:
        children = psutil.Process(running.process.pid).children(recursive=True)
        assert any("models serve" in " ".join(child.cmdline()) for child in children)
        png = render(trace(registered.x_test[0]))
        status, answer = post_json(f"{running.url}/api/predict", {"png": png})
        assert status == 200, answer
        expected = read_in_process(registered.model, png)
        assert answer["digit"] == int(expected.argmax())
        assert answer["digit_found"] is True
        np.testing.assert_allclose(answer["probabilities"], expected, atol=1e-5)
    finally:
        code = stop_demo(running.process)
    log = running.log_path.read_text()
    assert code == 0, log
    assert f"starting the model server for {registered.model_uri}" in log
    assert "model server stopped" in log
    leaked = [child.pid for child in children if psutil.pid_exists(child.pid)]
    assert not leaked, f"model server processes left after the demo stopped: {leaked}"


def test_demo_without_a_store_says_to_run_the_pipeline(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)  # params.yaml, as `make demo` finds it
    database = tmp_path / "mlflow.db"
    with pytest.raises(PipelineError) as error:
        champion_uri(f"sqlite:///{database}")
    assert str(error.value) == f"no MLflow store at {database}; run the pipeline first (make run)"
    assert not database.exists()


def test_demo_without_a_champion_says_to_run_the_pipeline(mlflow_store, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    name = load_params(REPO_ROOT / "params.yaml").mlflow.registered_model
    with pytest.raises(PipelineError) as error:
        champion_uri(mlflow_store)
    assert str(error.value) == (
        f"no version of {name!r} holds @champion in the MLflow store {mlflow_store}; "
        "run the pipeline first (make run), or pass --model-url"
    )


def test_demo_on_a_busy_port_says_so_at_once():
    with socket.socket() as busy:
        busy.bind((SERVER_HOST, 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "mnist_mlops.demo", "--port", str(port), "--model-url", "x"],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=STARTUP_SECONDS,
        )  # fmt: skip
    assert result.returncode == 1
    # One line from the guard, no traceback.
    assert result.stderr.strip().endswith(
        f"cannot listen on {SERVER_HOST}:{port} (Address already in use); choose another --port"
    )
    assert "Traceback" not in result.stderr
