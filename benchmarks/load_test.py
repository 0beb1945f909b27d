"""Bounded load test of the served model on loopback: N requests from C concurrent clients.

Sends --requests single-image requests (default 10,000) from --concurrency keep-alive clients
(default 32) to `mlflow models serve` on 127.0.0.1, cycling through the request forms, and
prints the error count, latency percentiles, throughput and the server's resident memory (RSS)
before, after and at its peak (sampled every --rss-interval seconds with psutil). It stops by
itself: when all requests are answered, or after --max-seconds.

    python benchmarks/load_test.py                                    # self-contained
    python benchmarks/load_test.py --model-uri models:/mnist-cnn@champion \\
        --tracking-uri sqlite:///$PWD/mlflow.db
    python benchmarks/load_test.py --url http://127.0.0.1:5001        # a running server

Shares its model and request helpers with benchmarks/serving.py (run both as scripts).
"""

from __future__ import annotations

import argparse
import collections
import http.client
import json
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
import psutil
from serving import (
    FORMS,
    Client,
    Result,
    add_model_arguments,
    machine,
    mnist_test_images,
    request_body,
    run_concurrently,
    served_model,
)

from mnist_mlops.scoring_server import ping

LOOPBACK = {"127.0.0.1", "localhost", "::1"}
MIB = 2**20


@dataclass
class MemoryMonitor:
    """Samples the RSS of the server's processes in a thread; remembers the peak."""

    pids: list[int]
    interval: float
    peak_model: int = 0
    peak_total: int = 0
    samples: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def rss(self) -> tuple[int, int]:
        """(RSS of the process holding the model, the last pid; of all of them), in bytes."""
        sizes = []
        for pid in self.pids:
            try:
                sizes.append(psutil.Process(pid).memory_info().rss)
            except psutil.NoSuchProcess:
                sizes.append(0)
        return (sizes[-1] if sizes else 0), sum(sizes)

    def run(self) -> None:
        while not self._stop.wait(self.interval):
            model, total = self.rss()
            self.peak_model = max(self.peak_model, model)
            self.peak_total = max(self.peak_total, total)
            self.samples += 1

    def __enter__(self) -> MemoryMonitor:
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def server_pids(url: str, started: list[int] | None) -> list[int]:
    """The server's processes: those we started, else whoever listens on the URL's port."""
    if started:
        return started
    port = urllib.parse.urlsplit(url).port
    listeners = [
        c.pid
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port and c.pid
    ]
    return listeners[:1]


def load(
    url: str, bodies: list[bytes], requests: int, concurrency: int, timeout: float, deadline: float
) -> tuple[Result, collections.Counter[str], int]:
    """Send the requests; return the result, error kinds with counts, and requests not sent."""
    latencies: list[float] = []
    errors: collections.Counter[str] = collections.Counter()
    lock = threading.Lock()
    counter = iter(range(requests))
    unsent = 0

    def work() -> None:
        nonlocal unsent
        client = Client(url, timeout=timeout)
        try:
            while (i := _next(counter, lock)) is not None:
                if time.monotonic() > deadline:
                    with lock:
                        unsent += 1
                    continue
                start = time.perf_counter()
                error = None
                try:
                    status, raw = client.post(bodies[i % len(bodies)])
                    if status != 200:
                        error = f"HTTP {status}: {raw[:200].decode(errors='replace')}"
                    elif len(json.loads(raw)["predictions"]) != 1:
                        error = "answer without exactly one prediction"
                except (OSError, http.client.HTTPException, ValueError, KeyError) as err:
                    error = f"{type(err).__name__}: {err}"
                elapsed = (time.perf_counter() - start) * 1000
                with lock:
                    latencies.append(elapsed)
                    if error:
                        errors[error] += 1
        finally:
            client.close()

    seconds = run_concurrently(work, concurrency)
    result = Result(np.array(latencies), seconds, len(latencies), sum(errors.values()))
    return result, errors, unsent


def _next(counter: Iterator[int], lock: threading.Lock) -> int | None:
    with lock:
        return next(counter, None)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--form", choices=["mixed", *FORMS], default="mixed", help="request form (mixed: cycle)"
    )
    parser.add_argument("--warmup", type=int, default=200, help="requests before measuring")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds per request")
    parser.add_argument("--max-seconds", type=float, default=600.0, help="stop sending after")
    parser.add_argument("--rss-interval", type=float, default=0.1, help="seconds between samples")
    args = parser.parse_args(argv)
    if args.url and urllib.parse.urlsplit(args.url).hostname not in LOOPBACK:
        sys.exit(f"--url must be on this machine ({', '.join(sorted(LOOPBACK))}): {args.url}")

    images, _ = mnist_test_images(args.mnist_dir)
    forms = [f for f in FORMS if f != "image-columns"] if args.form == "mixed" else [args.form]
    bodies = [request_body(forms[i % len(forms)], images[i : i + 1]) for i in range(400)]
    with served_model(args) as (url, _model_uri, server):
        pids = server_pids(url, server.pids() if server else None)
        monitor = MemoryMonitor(pids, args.rss_interval)
        idle = monitor.rss()
        load(url, bodies, args.warmup, args.concurrency, args.timeout, time.monotonic() + 60)
        before = monitor.rss()
        with monitor:
            result, errors, unsent = load(
                url,
                bodies,
                args.requests,
                args.concurrency,
                args.timeout,
                time.monotonic() + args.max_seconds,
            )
        after = monitor.rss()
        alive = ping(url, timeout=5)

    percentiles = "  ".join(f"p{q} {result.percentile(q):.2f} ms" for q in (50, 90, 95, 99, 99.9))
    print(f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {machine()}; server {url}")
    print(
        f"load: {len(result.latencies_ms)} requests ({', '.join(forms)}, one image each) from "
        f"{args.concurrency} clients, after {args.warmup} warm-up requests"
    )
    print(f"errors: {result.errors}" + (f", not sent (time limit): {unsent}" if unsent else ""))
    for error, count in errors.most_common(5):
        print(f"  {count} x {error}")
    print(f"latency: {percentiles}  max {result.latencies_ms.max():.2f} ms")
    print(f"throughput: {result.per_second:.0f} requests/s over {result.seconds:.1f} s")
    if pids:
        print(
            f"server RSS, model process (pid {pids[-1]}): idle {idle[0] / MIB:.0f} MiB, "
            f"before {before[0] / MIB:.0f} MiB, peak {monitor.peak_model / MIB:.0f} MiB, "
            f"after {after[0] / MIB:.0f} MiB ({monitor.samples} samples)"
        )
        print(
            f"server RSS, all {len(pids)} processes: before {before[1] / MIB:.0f} MiB, "
            f"peak {monitor.peak_total / MIB:.0f} MiB, after {after[1] / MIB:.0f} MiB"
        )
    else:
        print("server RSS: unknown (no process found listening on the port)")
    print(f"server answers /ping after the load: {alive}")


if __name__ == "__main__":
    main()
