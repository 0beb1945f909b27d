"""How the served model's PNG conversion and digit check do on inputs a person sends.

Prints, as markdown tables (docs/serving.md holds a run):

  conversion   for each photograph-like case of tests/photo_cases.py, built from --digits MNIST
               test digits: the mean correlation of the converted 28x28 image with the original
               digit, and the share the digit check finds;
  digit check  how many of the 10,000 MNIST test digits hold a digit, as sent (`pixels`) and
               through the PNG conversion; and how many of --fields images of each kind without
               a digit are wrongly found, through the PNG conversion (sizes 28-300 pixels) and
               as 28x28 `image`s (their top-left corner); dense salt-and-pepper noise apart.

    python benchmarks/photos.py [--digits 1000] [--fields 1000]   # MNIST_DIR: the IDX files
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
# The cases are the tests' own (tests/photo_cases.py), so the figures are of what they check.
sys.path.insert(0, str(REPO_ROOT / "tests"))

from photo_cases import NO_DIGIT_CASES, PHOTO_CASES, salt_and_pepper  # noqa: E402

from mnist_mlops.data import read_idx  # noqa: E402
from mnist_serving import png, presence  # noqa: E402

DENSE_NOISE = (0.3, 0.4, 0.5)  # salt-and-pepper densities beyond NO_DIGIT_CASES' 1-20%


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.ravel() - a.mean(), b.ravel() - b.mean()
    norm = float(np.sqrt((a @ a) * (b @ b)))
    return float(a @ b) / norm if norm else 0.0


def converted(images: list[np.ndarray]) -> np.ndarray:
    """uint8 images of any size -> float32 [N, 28, 28], as the served model converts PNGs."""
    return np.stack([png.to_mnist(image.astype(np.float32)) for image in images])


def conversion_table(digits: np.ndarray) -> None:
    print("| case | mean correlation with the original digit | digit found | ms per image |")
    print("|---|---|---|---|")
    for name, build in PHOTO_CASES.items():
        rng = np.random.default_rng(0)
        photos = [build(digit, rng) for digit in digits]
        start = time.perf_counter()
        images = converted(photos)
        ms = (time.perf_counter() - start) * 1000 / len(photos)
        mean = np.mean([correlation(i, d / 255) for i, d in zip(images, digits, strict=True)])
        found = presence.digits_found(images).mean()
        print(f"| {name} | {mean:.3f} | {found:.1%} | {ms:.1f} |")


def presence_table(x_test: np.ndarray, fields: int) -> None:
    print("| images | digit found |")
    print("|---|---|")
    for how, images in (
        ("as sent (`pixels`)", x_test / 255),
        ("through the PNG conversion", converted(list(x_test))),
    ):
        found = presence.digits_found(images).sum()
        print(f"| MNIST test digits {how} | {found:,} of {len(x_test):,} |")
    rng = np.random.default_rng(0)
    for name, make in NO_DIGIT_CASES.items():
        images = [make(rng) for _ in range(fields)]
        via_png = presence.digits_found(converted(images)).sum()
        as_image = presence.digits_found(np.stack([i[:28, :28] / 255 for i in images])).sum()
        print(f"| {name}: as PNG / as 28x28 `image` | {via_png} / {as_image} of {fields:,} |")
    for density in DENSE_NOISE:
        images = [salt_and_pepper(rng, density) for _ in range(fields)]
        via_png = presence.digits_found(converted(images)).sum()
        as_image = presence.digits_found(np.stack([i[:28, :28] / 255 for i in images])).sum()
        print(
            f"| salt and pepper {density:.0%}: as PNG / as 28x28 `image` "
            f"| {via_png} / {as_image} of {fields:,} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--digits", type=int, default=1000, help="test digits per case")
    parser.add_argument("--fields", type=int, default=1000, help="images per kind without one")
    args = parser.parse_args()
    mnist_dir = Path(os.environ.get("MNIST_DIR", REPO_ROOT.parent / "shared" / "data" / "mnist"))
    x_test = read_idx(mnist_dir / "t10k-images-idx3-ubyte.gz")
    conversion_table(x_test[: args.digits])
    print()
    presence_table(x_test, args.fields)


if __name__ == "__main__":
    main()
