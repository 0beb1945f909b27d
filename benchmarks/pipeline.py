"""Benchmark the pipeline: per-stage wall time and peak memory, training images per second,
the retrained configuration's time to 99% validation accuracy, and the test accuracies.

Runs the real `dvc repro`, stage by stage, in a fresh copy of the repository (its own MLflow
store; your workspace and store are untouched):

    python benchmarks/pipeline.py                 # the default params (what `make run` does)
    python benchmarks/pipeline.py --profile ci    # the CI profile, about a minute
    python benchmarks/pipeline.py --seed 7        # the default params with another seed

MNIST comes from $MNIST_DIR (as for `make run`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from datetime import date
from pathlib import Path

import psutil
import yaml

from mnist_mlops.files import read_json
from mnist_mlops.paths import ProjectPaths

REPO_ROOT = Path(__file__).resolve().parents[1]
STAGES = ("prepare", "baseline", "tune", "retrain", "evaluate")
TARGET_ACCURACY = 0.99


def copy_repository(destination: Path) -> None:
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    for name in files:
        if (REPO_ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO_ROOT / name, destination / name)
    for args in (
        ["init", "-q"],
        ["add", "-A"],
        ["-c", "user.name=bench", "-c", "user.email=bench@localhost", "commit", "-qm", "bench"],
    ):
        subprocess.run(["git", *args], cwd=destination, check=True, capture_output=True)


def apply_overrides(root: Path, profile: str, seed: int | None) -> None:
    params = yaml.safe_load((root / "params.yaml").read_text())
    if profile != "default":
        for section, values in yaml.safe_load(
            (root / "profiles" / f"{profile}.yaml").read_text()
        ).items():
            params[section] = {**params[section], **values} if isinstance(values, dict) else values
    if seed is not None:
        params["seed"] = seed
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def run_stage(root: Path, stage: str, env: dict, log) -> tuple[float, int]:
    """Run one stage through DVC; return its wall seconds and the peak RSS of its process tree."""
    started = time.perf_counter()
    process = subprocess.Popen(
        ["dvc", "repro", "--single-item", stage], cwd=root, env=env, stdout=log, stderr=log
    )
    peak = 0
    stop = threading.Event()

    def sample() -> None:
        nonlocal peak
        parent = psutil.Process(process.pid)
        while not stop.is_set():
            try:
                tree = [parent, *parent.children(recursive=True)]
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            stop.wait(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    code = process.wait()
    stop.set()
    sampler.join()
    if code != 0:
        sys.exit(f"stage {stage} failed (exit {code}); see {log.name}")
    return time.perf_counter() - started, peak


def images_per_second(root: Path) -> dict[str, float]:
    """Training throughput per stage, from the epoch timings the stages record."""
    paths = ProjectPaths(root)
    sizes = read_json(paths.data_summary)["sizes"]
    rates = {}
    for stage, model, images in (
        ("baseline", "baseline", sizes["train"]),
        ("retrain", "tuned", sizes["train"] + sizes["val"]),
    ):
        history = read_json(paths.model_history(model))
        seconds = sum(row["epoch_seconds"] for row in history)
        rates[stage] = images * len(history) / seconds
    tune = read_json(paths.tuning / "metrics.json")
    rates["tune"] = tune["train_examples"] * tune["epochs_trained"] / tune["tuning_seconds"]
    return rates


def time_to_target(root: Path, env: dict) -> dict[str, float]:
    """Train the retrained configuration on the training split alone, watching the validation
    split, until it reaches TARGET_ACCURACY (the pipeline's retrain has no held-out data)."""
    script = f"""
import json, time
import keras
from mnist_mlops.data import load_split
from mnist_mlops.files import read_json
from mnist_mlops.models import build_model
from mnist_mlops.paths import ProjectPaths
from mnist_mlops.training import fit, seed_everything
paths = ProjectPaths.cwd()
config = read_json(paths.model_config("tuned"))
seed_everything(config["seed"])
train, val = load_split(paths.split("train")), load_split(paths.split("val"))
architecture = {{**config["architecture"], "decay_steps": None}}
model = build_model(**architecture, seed=config["seed"])
elapsed = []
class StopAtTarget(keras.callbacks.Callback):
    def on_epoch_end(self, epoch, logs=None):
        elapsed.append(logs["epoch_seconds"])
        if logs["val_accuracy"] >= {TARGET_ACCURACY}:
            self.model.stop_training = True
history = fit(model, train, val, epochs=config["fit"]["epochs"], batch_size=config["batch_size"],
              callbacks=[StopAtTarget()],
              data_seed=config["seed"], augment=config["fit"]["augment"])
reached = max(history["val_accuracy"]) >= {TARGET_ACCURACY}
print(json.dumps({{"seconds": sum(elapsed) if reached else None, "epochs": len(elapsed),
                  "best_val_accuracy": max(history["val_accuracy"])}}))
"""
    result = subprocess.run(
        [sys.executable, "-c", script],
        cwd=root,
        env={**env, "CI": "1"},
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--profile", default="default", help="default, or a file in profiles/ (e.g. ci)"
    )
    parser.add_argument("--seed", type=int, help="override params.yaml's seed")
    parser.add_argument("--workdir", type=Path, help="where to put the copy (default: a temp dir)")
    parser.add_argument(
        "--skip-time-to-target",
        action="store_true",
        help="skip the extra training run that times the retrained configuration to 99%%",
    )
    args = parser.parse_args()

    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="mnist-bench-"))
    root = workdir / "repo"
    root.mkdir(parents=True)
    copy_repository(root)
    apply_overrides(root, args.profile, args.seed)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(root / "src"),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
    }
    if os.environ.get("MNIST_DIR"):
        env["MNIST_DIR"] = str(Path(os.environ["MNIST_DIR"]).resolve())
    print(f"benchmarking the {args.profile} pipeline in {root} (log: {workdir / 'repro.log'})")

    timings = {}
    with open(workdir / "repro.log", "w") as log:
        for stage in STAGES:
            seconds, peak = run_stage(root, stage, env, log)
            timings[stage] = {"seconds": seconds, "peak_rss_mib": peak / 2**20}
            print(f"  {stage:<9} {seconds:8.1f} s   peak RSS {peak / 2**20:7.0f} MiB", flush=True)
    total = sum(t["seconds"] for t in timings.values())
    rates = images_per_second(root)
    metrics = json.loads((root / "evaluation/metrics.json").read_text())
    result = {
        "date": date.today().isoformat(),
        "machine": f"{psutil.cpu_count()} cores, {psutil.virtual_memory().total / 2**30:.0f} GiB, "
        f"{platform.processor() or platform.machine()}",
        "profile": args.profile,
        "seed": yaml.safe_load((root / "params.yaml").read_text())["seed"],
        "stages": timings,
        "total_seconds": total,
        "train_images_per_second": rates,
        "baseline_test_accuracy": metrics["baseline_test_accuracy"],
        "tuned_test_accuracy": metrics["tuned_test_accuracy"],
    }
    print(f"  {'total':<9} {total:8.1f} s ({total / 60:.1f} min)")
    for stage, rate in rates.items():
        print(f"  {stage} training: {rate:,.0f} images/s")
    print(f"  baseline test accuracy {result['baseline_test_accuracy']:.4f}")
    print(f"  tuned test accuracy    {result['tuned_test_accuracy']:.4f}")
    if not args.skip_time_to_target:
        result["time_to_99"] = time_to_target(root, env)
        reached = result["time_to_99"]
        shown = f"{reached['seconds']:.1f} s" if reached["seconds"] is not None else "not reached"
        print(
            f"  retrained configuration to {TARGET_ACCURACY:.0%} val accuracy: {shown} "
            f"({reached['epochs']} epochs)"
        )
    (workdir / "benchmark.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {workdir / 'benchmark.json'}")


if __name__ == "__main__":
    main()
