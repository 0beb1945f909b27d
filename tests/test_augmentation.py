"""Training-time degradations: seeded, bounded, each doing what its name says."""

import itertools

import numpy as np
import pytest

from mnist_mlops.augmentation import (
    DEGRADATIONS,
    SeededBatches,
    cosine_fade,
    random_degradations,
    scheduled_rate,
)


def _digits(n: int = 32) -> np.ndarray:
    images = np.zeros((n, 28, 28, 1), np.float32)
    images[:, 6:22, 12:16] = 1.0  # a vertical bar, like a "1"
    return images


def test_degradations_are_seeded_bounded_and_leave_the_input_alone():
    images = _digits()
    kept = images.copy()
    first = random_degradations(images, np.random.default_rng(1), rate=1.0)
    np.testing.assert_array_equal(first, random_degradations(images, np.random.default_rng(1), 1.0))
    assert not np.array_equal(first, random_degradations(images, np.random.default_rng(2), 1.0))
    np.testing.assert_array_equal(images, kept)
    assert first.shape == images.shape and first.dtype == np.float32
    assert first.min() >= 0 and first.max() <= 1


@pytest.mark.parametrize(("rate", "changed"), [(0.0, 0), (1.0, 32)])
def test_rate_is_the_share_of_degraded_images(rate, changed):
    images = _digits()
    degraded = random_degradations(images, np.random.default_rng(0), rate)
    assert int((np.abs(degraded - images) > 1e-6).any(axis=(1, 2, 3)).sum()) == changed


def test_about_rate_of_a_large_batch_is_degraded():
    images = _digits(2000)
    degraded = random_degradations(images, np.random.default_rng(0), 0.5)
    share = (np.abs(degraded - images) > 1e-6).any(axis=(1, 2, 3)).mean()
    assert 0.45 < share < 0.55


def test_each_degradation_does_what_its_name_says():
    x = _digits(64)[..., 0]
    ink, paper = x > 0.5, x < 0.5
    rng = np.random.default_rng(0)
    out = {name: degrade(x.copy(), rng) for name, degrade in DEGRADATIONS.items()}
    assert np.std(out["noise"][paper]) > 0.04  # the background is no longer flat
    assert 0 < out["blur"][:, 6:22, 11].mean() < 1  # ink leaks beside the bar
    tinted = out["tint"]
    assert (tinted[paper] > 0).mean() > 0.5  # the paper is lighter or ramped...
    assert (tinted.max(axis=(1, 2)) - np.median(tinted, axis=(1, 2)) > 0).all()  # ink shows
    assert ((out["erase"] != x).sum(axis=(1, 2)) > 0).all()
    inverted = out["invert_patch"]
    assert ((inverted > 0.5) & paper).any(axis=(1, 2)).mean() > 0.9  # light paper in a patch
    assert ((out["lines"] > 0.4) & paper).any(axis=(1, 2)).all()  # strokes across the paper
    areas = (out["stroke_width"] > 0.5).sum(axis=(1, 2))
    assert (areas < ink[0].sum()).any() and (areas > ink[0].sum()).any()  # thinner and thicker
    assert (areas != ink[0].sum()).all()


def test_batches_degrade_only_with_augment_and_reproducibly():
    x = _digits(64)
    y = np.arange(64) % 10

    def first_batch(**options):
        return SeededBatches(x, y, batch_size=64, seed=3, **options)[0][0]

    plain = first_batch(augment=True)
    degraded = first_batch(augment=True, degradation_rate=1.0)
    np.testing.assert_array_equal(degraded, first_batch(augment=True, degradation_rate=1.0))
    assert not np.allclose(plain, degraded)
    np.testing.assert_array_equal(first_batch(augment=False, degradation_rate=1.0), x)


def test_cosine_fade_starts_at_the_rate_halves_midway_and_ends_near_zero():
    fade = cosine_fade(0.5, epochs=30, first_epoch=60)  # a third ensemble member's epochs
    rates = [fade(epoch) for epoch in range(60, 90)]
    assert rates[0] == pytest.approx(0.5) and rates[15] == pytest.approx(0.25)
    assert 0 < rates[-1] < 0.01
    assert all(a > b for a, b in itertools.pairwise(rates))


def test_batches_take_each_epochs_share_from_a_fade():
    x = _digits(256)

    def degraded_share(epoch: int) -> float:
        batches = SeededBatches(
            x,
            np.zeros(256),
            256,
            seed=3,
            augment=True,
            degradation_rate=lambda e: e / 4,
            first_epoch=epoch,
        )
        moved_only = SeededBatches(x, np.zeros(256), 256, seed=3, first_epoch=epoch)
        changed = np.abs(batches[0][0] - moved_only[0][0]) > 1e-6
        return changed.any(axis=(1, 2, 3)).mean()

    assert degraded_share(0) == 0
    assert 0.15 < degraded_share(1) < 0.35
    assert degraded_share(4) > 0.95  # (a chain can leave an image as it was: an erasure on paper)


def test_scheduled_rate_is_the_rate_or_its_fade():
    assert scheduled_rate(0.5, "constant", epochs=30) == 0.5
    fade = scheduled_rate(0.5, "cosine", epochs=30, first_epoch=30)
    assert fade(30) == pytest.approx(0.5) and fade(45) == pytest.approx(0.25)
