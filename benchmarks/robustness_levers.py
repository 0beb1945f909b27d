"""Weigh robustness levers on validation, never on the benchmark: train one architecture with a
given recipe and score the clean validation split and its HELD_OUT corruptions (MNIST-C's extra
set, `robustness.HELD_OUT`). The 15 benchmark corruptions are not touched (docs/robustness.md).

    python benchmarks/robustness_levers.py --degradation-rate 0.5
    python benchmarks/robustness_levers.py --degradation-rate 0.5 --degradation-schedule cosine
    python benchmarks/robustness_levers.py --degradation-rate 0 --epochs 6 --train-images 20000

Reads `data/prepared` (run `dvc repro prepare`) and the architecture in
`tuning/best_hparams.json` (or `--baseline` for the baseline CNN). Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np

from mnist_mlops import augmentation, models, robustness, training
from mnist_mlops.data import load_split, to_model_input
from mnist_mlops.files import read_json
from mnist_mlops.paths import ProjectPaths

CORRUPTION_SEED = 7  # any seed but the pipeline's: these copies serve choices, not reports


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--degradation-rate", type=float, default=0.0)
    parser.add_argument(
        "--degradation-schedule", choices=("constant", "cosine"), default="constant"
    )
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--train-images", type=int, default=20000)
    parser.add_argument("--baseline", action="store_true", help="the baseline CNN")
    parser.add_argument(
        "--background-normalization",
        action=argparse.BooleanOptionalAction,
        help="BackgroundNormalization first, or not (default: as the architecture says)",
    )
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args()
    paths = ProjectPaths.cwd()
    training.seed_everything(args.seed)
    x, y = load_split(paths.split("train"))
    x_val, y_val = load_split(paths.split("val"))
    picks = np.random.default_rng(0).permutation(len(y))[: args.train_images]
    if args.baseline:
        architecture, batch_size = {**models.BASELINE_ARCHITECTURE}, 128
    else:
        best = read_json(paths.best_hparams)
        architecture, batch_size = best["architecture"], best["batch_size"]
    if args.background_normalization is not None:
        architecture["background_normalization"] = args.background_normalization
    model = models.build_model(
        **architecture,
        decay_steps=-(-len(picks) // batch_size) * args.epochs,
        label_smoothing=0.1,
        seed=args.seed,
    )
    started = time.perf_counter()
    training.fit(
        model,
        (x[picks], y[picks]),
        None,
        epochs=args.epochs,
        batch_size=batch_size,
        callbacks=[],
        data_seed=args.seed,
        augment=True,
        degradation_rate=augmentation.scheduled_rate(
            args.degradation_rate, args.degradation_schedule, args.epochs
        ),
    )
    result = {**vars(args), "train_seconds": round(time.perf_counter() - started, 1)}

    def accuracy(images: np.ndarray) -> float:
        probabilities = model.predict(to_model_input(images), batch_size=1000, verbose=0)
        return round(float((probabilities.argmax(axis=1) == y_val).mean()), 4)

    result["clean"] = accuracy(x_val)
    held_out = {
        name: accuracy(robustness.corrupt(x_val, name, CORRUPTION_SEED))
        for name in robustness.HELD_OUT
    }
    result |= held_out
    result["held_out_mean"] = round(float(np.mean(list(held_out.values()))), 4)
    result["held_out_worst"] = min(held_out, key=held_out.get)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
