"""Benchmark the distributed search: trials per hour with 1, 2 and 4 workers, and the requests an
idle worker sends.

Throughput (the default): the real tune stage, in a throwaway project with its own sqlite MLflow
store, runs the same random search (--trials trials of --epochs epochs on --images training
images) once per worker count; trials per hour = trials / the stage's `tuning_seconds` (worker
start-up included). The machine's load average is printed beside each figure: on a shared
machine it moves the results.

    python benchmarks/distributed_tuning.py                       # 1, 2 and 4 workers
    python benchmarks/distributed_tuning.py --workers 1 8 --trials 24

--idle: a Hyperband chief whose first rounds are all handed out (17 trials held) answers IDLE to
one more worker for --seconds; counts the requests of Keras Tuner's own loop (ask again at once)
and of `distributed.PatientOracleClient` (back off 0.1 s doubling to 5 s). No training.

    python benchmarks/distributed_tuning.py --idle

MNIST comes from $MNIST_DIR.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import keras_tuner as kt
import mlflow
import yaml
from keras_tuner.src.distribute.oracle_client import OracleClient

from mnist_mlops import data, distributed
from mnist_mlops.config import parse_params
from mnist_mlops.paths import ProjectPaths
from mnist_mlops.stages import prepare

REPO_ROOT = Path(__file__).resolve().parents[1]
# Hyperband with max_epochs 9 and factor 3 hands out 17 trials (the first round of each
# bracket) before it needs a result.
HYPERBAND_FIRST_ROUNDS = 17


def load() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


def throughput(workers: int, args: argparse.Namespace, arrays: data.MnistArrays) -> dict:
    with tempfile.TemporaryDirectory(prefix="distributed-bench-") as tmp:
        root = Path(tmp)
        raw = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
        raw["prepare"] |= {"train_subset": args.images + 500, "val_size": 500}
        raw["tune"] |= {
            "tuner": "random",
            "max_trials": args.trials,
            "epochs": args.epochs,
            "search_subset": args.images,
            "workers": workers,
        }
        (root / "params.yaml").write_text(yaml.safe_dump(raw))
        params = parse_params(raw)
        prepare.run(params.prepare, ProjectPaths(root), seed=params.seed, arrays=arrays)
        env = {
            **os.environ,
            "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
            "PYTHONPATH": str(REPO_ROOT / "src"),
        }
        before = load()
        started = time.monotonic()
        subprocess.run(
            [sys.executable, "-m", "mnist_mlops.stages.tune"],
            cwd=root,
            env=env,
            check=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        wall = time.monotonic() - started
        summary = json.loads((root / "tuning" / "metrics.json").read_text())
    return {
        "workers": workers,
        "trials": summary["trials"],
        "tuning_seconds": round(summary["tuning_seconds"], 1),
        "stage_seconds": round(wall, 1),
        "trials_per_hour": round(summary["trials"] / summary["tuning_seconds"] * 3600),
        "load_before": before,
        "load_after": load(),
    }


def idle_requests(seconds: float, patient: bool) -> int:
    """IDLE answers to one waiting worker in `seconds`, on a Hyperband chief on loopback."""
    with tempfile.TemporaryDirectory(prefix="distributed-idle-") as tmp:
        oracle = kt.oracles.HyperbandOracle(
            objective=kt.Objective("score", "max"), max_epochs=9, factor=3, seed=1
        )
        oracle._set_project_dir(tmp, "search")
        oracle.verbose = 0
        hp = oracle.get_space()
        hp.Int("x", 0, 1000)
        oracle.update_space(hp)
        with mlflow.start_run() as run:
            leased = distributed.LeasedOracle(oracle, 3600, run.info.run_id)
        held = [leased.create_trial(f"holder{i}") for i in range(HYPERBAND_FIRST_ROUNDS)]
        with distributed.oracle_server(leased, "127.0.0.1:0") as port:
            os.environ.update(
                {
                    distributed.ORACLE_IP_VARIABLE: "127.0.0.1",
                    distributed.ORACLE_PORT_VARIABLE: str(port),
                    distributed.TUNER_ID_VARIABLE: "waiting",
                }
            )
            client = OracleClient(oracle)
            if patient:
                waiting = threading.Thread(
                    target=distributed.PatientOracleClient(client).create_trial, args=("waiting",)
                )
                waiting.start()
                time.sleep(seconds)
            else:
                # Keras Tuner's search loop: on IDLE, ask again at once.
                deadline = time.monotonic() + seconds
                while time.monotonic() < deadline:
                    client.create_trial("waiting")
            count = leased.idle_answers
            for trial in held:  # results let Hyperband hand out its next round
                leased.update_trial(trial.trial_id, {"score": 1.0})
                trial.status = "COMPLETED"
                leased.end_trial(trial)
            if patient:
                waiting.join()
        return count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--trials", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--images", type=int, default=2500)
    parser.add_argument("--idle", action="store_true", help="count idle requests instead")
    parser.add_argument("--seconds", type=float, default=30.0)
    args = parser.parse_args()
    print(f"{os.cpu_count()} CPUs, load average {load()}", flush=True)
    if args.idle:
        mlflow.set_tracking_uri(f"sqlite:///{tempfile.mkdtemp()}/mlflow.db")
        for patient in (False, True):
            count = idle_requests(args.seconds, patient)
            name = "with backoff" if patient else "Keras Tuner's loop"
            print(f"{name}: {count} IDLE requests in {args.seconds:g} s", flush=True)
        return
    mnist = Path(os.environ.get("MNIST_DIR", REPO_ROOT.parent / "shared" / "data" / "mnist"))
    arrays, _ = data.load_mnist(mnist, mnist)
    for workers in args.workers:
        print(json.dumps(throughput(workers, args, arrays)), flush=True)


if __name__ == "__main__":
    main()
