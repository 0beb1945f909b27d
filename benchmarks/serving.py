"""Latency and throughput of the served model over HTTP, beside in-process prediction.

Serves a registered model with `mlflow models serve` on 127.0.0.1 (or attaches to a running
server with --url) and measures, for every request form of mnist_serving.inputs:

  single   one image per request, sequential on a keep-alive connection: p50/p95/p99, req/s
  batched  --batch-size images per request from --concurrency clients: latency, images/s
  in-process  the same model's predict_on_batch on float32 arrays, and the pyfunc model's
           predict (validation included), on the same images

Each measurement runs --repeats times; the run with the best p50 (latency) or images/s
(throughput) is reported, the others are printed as they come. Without --model-uri it trains a
small model on real MNIST (a few seconds) into a temporary MLflow store and serves that.

    python benchmarks/serving.py                                     # self-contained
    python benchmarks/serving.py --model-uri models:/mnist-cnn@champion \\
        --tracking-uri sqlite:///$PWD/mlflow.db
    python benchmarks/serving.py --url http://127.0.0.1:5001 --model-uri ... --tracking-uri ...

Load test: benchmarks/load_test.py. This file also holds the helpers both scripts share.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import http.client
import io
import json
import os
import platform
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import keras
import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from PIL import Image

from mnist_mlops.data import load_mnist, one_hot, to_model_input
from mnist_mlops.models import BASELINE_ARCHITECTURE, build_model
from mnist_mlops.registry import log_serving_model
from mnist_mlops.scoring_server import ScoringServer
from mnist_mlops.training import seed_everything

DEFAULT_MNIST_DIR = Path("/work/shared/data/mnist")
DEMO_MODEL = "mnist-serving-benchmark"
FORMS = ("image", "pixels", "pixels-b64", "png", "image-columns")


# --- shared with load_test.py -------------------------------------------------------------------


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model (default: train a small one on real MNIST)")
    group.add_argument("--model-uri", help="e.g. models:/mnist-cnn@champion")
    group.add_argument(
        "--tracking-uri",
        default=os.environ.get("MLFLOW_TRACKING_URI"),
        help="MLflow store holding --model-uri (default: $MLFLOW_TRACKING_URI)",
    )
    group.add_argument(
        "--mnist-dir",
        type=Path,
        default=Path(os.environ.get("MNIST_DIR", DEFAULT_MNIST_DIR)),
        help="MNIST IDX files: test images for requests, train images for the small model "
        "(default: $MNIST_DIR or %(default)s)",
    )
    group.add_argument("--train-images", type=int, default=5000)
    group.add_argument("--epochs", type=int, default=1)
    group.add_argument("--url", help="attach to this running server instead of starting one")


def mnist_test_images(mnist_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    arrays, _ = load_mnist(mnist_dir, mnist_dir, download=False)
    return arrays.x_test, arrays.y_test


def train_small_model(mnist_dir: Path, images: int, epochs: int, seed: int = 0) -> keras.Model:
    """The baseline CNN trained on the first `images` MNIST training images: a few seconds."""
    arrays, _ = load_mnist(mnist_dir, mnist_dir, download=False)
    seed_everything(seed)
    model = build_model(**BASELINE_ARCHITECTURE, seed=seed)
    x, y = arrays.x_train[:images], arrays.y_train[:images]
    model.fit(to_model_input(x), one_hot(y), epochs=epochs, batch_size=64, verbose=0)
    return model


@contextlib.contextmanager
def served_model(
    args: argparse.Namespace,
) -> Iterator[tuple[str, str | None, ScoringServer | None]]:
    """Yield (server URL, model URI or None, the server we started or None) for the CLI args.

    Without --model-uri, a small model goes into a temporary MLflow store that lives as long
    as the context; without --url, a server is started for the model and stopped afterwards.
    """
    with tempfile.TemporaryDirectory(prefix="serving-benchmark-") as tmp:
        model_uri, tracking_uri = args.model_uri, args.tracking_uri
        if model_uri is None and args.url is None:
            model_uri, tracking_uri = register_small_model(args, Path(tmp))
        if model_uri is not None and tracking_uri is None:
            sys.exit("--model-uri needs --tracking-uri (or MLFLOW_TRACKING_URI)")
        if tracking_uri:
            mlflow.set_tracking_uri(tracking_uri)
        if args.url:
            yield args.url.rstrip("/"), model_uri, None
            return
        log = Path(tmp) / "server.log"
        print(f"starting mlflow models serve -m {model_uri} (log: {log})", file=sys.stderr)
        with ScoringServer(model_uri, tracking_uri, log) as server:
            yield server.url, model_uri, server


def register_small_model(args: argparse.Namespace, directory: Path) -> tuple[str, str]:
    print(
        f"training a small model: {args.train_images} images x {args.epochs} epoch(s)",
        file=sys.stderr,
    )
    model = train_small_model(args.mnist_dir, args.train_images, args.epochs)
    tracking_uri = f"sqlite:///{directory / 'mlflow.db'}"
    mlflow.set_tracking_uri(tracking_uri)
    experiment = mlflow.create_experiment(
        "serving-benchmark", artifact_location=(directory / "mlartifacts").as_uri()
    )
    with mlflow.start_run(experiment_id=experiment):
        info = log_serving_model(model, registered_model_name=DEMO_MODEL)
    MlflowClient().set_registered_model_alias(DEMO_MODEL, "champion", info.registered_model_version)
    return f"models:/{DEMO_MODEL}@champion", tracking_uri


def png_base64(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def request_body(form: str, images: np.ndarray) -> bytes:
    """The JSON body scoring uint8 images [N, 28, 28] in one of `FORMS`."""
    if form == "image-columns":
        floats = (images.astype(np.float32) / 255)[..., np.newaxis]
        return json.dumps({"inputs": {"image": floats.tolist()}}).encode()
    encode: dict[str, Callable[[np.ndarray], object]] = {
        "image": lambda a: (a.astype(np.float32) / 255)[..., np.newaxis].tolist(),
        "pixels": lambda a: a.tolist(),
        "pixels-b64": lambda a: base64.b64encode(a.tobytes()).decode(),
        "png": png_base64,
    }
    field = form.removesuffix("-b64")
    records = [{field: encode[form](image)} for image in images]
    return json.dumps({"dataframe_records": records}).encode()


class Client:
    """One keep-alive HTTP/1.1 connection posting JSON to /invocations."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        parsed = urllib.parse.urlsplit(url)
        self.connection = http.client.HTTPConnection(parsed.hostname, parsed.port, timeout=timeout)

    def post(self, body: bytes) -> tuple[int, bytes]:
        try:
            self.connection.request(
                "POST", "/invocations", body, {"Content-Type": "application/json"}
            )
            response = self.connection.getresponse()
            return response.status, response.read()
        except (OSError, http.client.HTTPException):
            self.connection.close()  # reconnects on the next request
            raise

    def close(self) -> None:
        self.connection.close()


@dataclass
class Result:
    latencies_ms: np.ndarray
    seconds: float
    items: int  # images (or requests) answered
    errors: int = 0

    def percentile(self, q: float) -> float:
        return float(np.percentile(self.latencies_ms, q)) if len(self.latencies_ms) else 0.0

    @property
    def per_second(self) -> float:
        return self.items / self.seconds

    def describe(self, unit: str = "images/s") -> str:
        p50, p95, p99 = (self.percentile(q) for q in (50, 95, 99))
        errors = f", {self.errors} errors" if self.errors else ""
        return (
            f"p50 {p50:7.2f} ms  p95 {p95:7.2f} ms  p99 {p99:7.2f} ms  "
            f"{self.per_second:9.0f} {unit}{errors}"
        )


def run_clients(
    url: str,
    bodies: list[bytes],
    requests: int,
    concurrency: int,
    images_per_request: int,
    seconds: float = float("inf"),
) -> Result:
    """Post `requests` bodies (cycling through `bodies`) from `concurrency` threads.

    Clients stop taking new requests after `seconds`, so a slow form cannot stall the run.
    """
    latencies: list[float] = []
    errors = 0
    lock = threading.Lock()
    counter = iter(range(requests))
    deadline = time.monotonic() + seconds

    def work() -> None:
        nonlocal errors
        client = Client(url)
        try:
            while time.monotonic() < deadline:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                start = time.perf_counter()
                try:
                    status, _ = client.post(bodies[i % len(bodies)])
                except (OSError, http.client.HTTPException):
                    status = 0
                elapsed = (time.perf_counter() - start) * 1000
                with lock:
                    latencies.append(elapsed)
                    errors += status != 200
        finally:
            client.close()

    elapsed = run_concurrently(work, concurrency)
    return Result(np.array(latencies), elapsed, len(latencies) * images_per_request, errors)


def run_concurrently(work: Callable[[], None], concurrency: int) -> float:
    """Run `work` in `concurrency` threads at once; return the wall seconds until all finish."""
    threads = [threading.Thread(target=work) for _ in range(concurrency)]
    start = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - start


def best(results: list[Result], by: str) -> Result:
    if by == "latency":
        return min(results, key=lambda r: r.percentile(50))
    return max(results, key=lambda r: r.per_second)


def machine() -> str:
    return f"{platform.node()}, {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}"


# --- the benchmark ------------------------------------------------------------------------------


def time_in_process(
    predict: Callable[[], object], repeats: int, calls: int, images_per_call: int
) -> Result:
    predict()
    runs = []
    for _ in range(repeats):
        latencies = []
        start = time.perf_counter()
        for _ in range(calls):
            t = time.perf_counter()
            predict()
            latencies.append((time.perf_counter() - t) * 1000)
        runs.append(
            Result(np.array(latencies), time.perf_counter() - start, calls * images_per_call)
        )
    return best(runs, "latency" if images_per_call == 1 else "throughput")


def in_process(args: argparse.Namespace, model_uri: str, images: np.ndarray) -> None:
    print(f"\nin-process ({model_uri})")
    pyfunc = mlflow.pyfunc.load_model(model_uri)
    keras_model = pyfunc.unwrap_python_model().model
    single = to_model_input(images[:1])
    batch = to_model_input(images[: args.batch_size])
    frame_one = pd.DataFrame({"pixels": list(images[:1])})
    frame_batch = pd.DataFrame({"pixels": list(images[: args.batch_size])})
    rows = [
        ("predict_on_batch, 1 image", lambda: keras_model.predict_on_batch(single), 1),
        ("model(x), 1 image", lambda: keras_model(single, training=False), 1),
        ("pyfunc predict, 1 image", lambda: pyfunc.predict(frame_one), 1),
        (
            f"predict_on_batch, {args.batch_size} images",
            lambda: keras_model.predict_on_batch(batch),
            args.batch_size,
        ),
        (
            f"pyfunc predict, {args.batch_size} images",
            lambda: pyfunc.predict(frame_batch),
            args.batch_size,
        ),
    ]
    for name, predict, size in rows:
        calls = args.requests if size == 1 else args.batch_requests
        result = time_in_process(predict, args.repeats, calls, size)
        print(f"  {name:32s} {result.describe()}")


def over_http(args: argparse.Namespace, url: str, images: np.ndarray) -> None:
    forms = args.forms
    print(
        f"\nHTTP single image, sequential, keep-alive ({args.requests} requests x {args.repeats})"
    )
    for form in forms:
        bodies = [request_body(form, images[i : i + 1]) for i in range(100)]
        run_clients(url, bodies, args.warmup, 1, 1)
        runs = [run_clients(url, bodies, args.requests, 1, 1) for _ in range(args.repeats)]
        for run in runs:
            print(f"    {form:18s} {run.describe('req/s')}", file=sys.stderr)
        print(f"  {form:18s} {best(runs, 'latency').describe('req/s')}  ({len(bodies[0])} B)")
    size = args.batch_size
    print(
        f"\nHTTP batched: {size} images per request from 1 or more concurrent clients "
        f"(up to {args.batch_requests} requests or {args.seconds:g} s x {args.repeats})"
    )
    for form in forms:
        bodies = [request_body(form, images[i * size : (i + 1) * size]) for i in range(4)]
        mib = len(bodies[0]) / 2**20
        for clients in args.concurrency:
            run_clients(url, bodies, clients, clients, size, args.seconds)
            runs = [
                run_clients(url, bodies, args.batch_requests, clients, size, args.seconds)
                for _ in range(args.repeats)
            ]
            label = f"{form} x{clients}"
            for run in runs:
                print(f"    {label:18s} {run.describe()}", file=sys.stderr)
            print(f"  {label:18s} {best(runs, 'throughput').describe()}  ({mib:.1f} MiB)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--requests", type=int, default=300, help="single-image requests per run")
    parser.add_argument("--warmup", type=int, default=30, help="untimed requests per form")
    parser.add_argument("--batch-size", type=int, default=1024, help="images per batched request")
    parser.add_argument("--batch-requests", type=int, default=12, help="batched requests per run")
    parser.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        default=[1, 2],
        help="concurrent clients for batched requests; each number is its own measurement",
    )
    parser.add_argument(
        "--seconds", type=float, default=10.0, help="time limit of one batched run (slow forms)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="runs per measurement; best kept")
    parser.add_argument("--forms", nargs="+", choices=FORMS, default=list(FORMS))
    args = parser.parse_args(argv)

    images, _ = mnist_test_images(args.mnist_dir)
    with served_model(args) as (url, model_uri, _server):
        print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}; server {url}")
        over_http(args, url, images)
        if model_uri is None:
            print("\nin-process: skipped (attach with --url and also give --model-uri)")
        else:
            in_process(args, model_uri, images)


if __name__ == "__main__":
    main()
