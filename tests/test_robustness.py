"""The corrupted test sets: deterministic, order-independent, and actually corrupted."""

from __future__ import annotations

import numpy as np
import pytest

from mnist_mlops import robustness

SEVERITIES = {"rotation": 15.0, "shift": 3, "noise": 0.3, "blur": 1.0}


@pytest.fixture
def digits() -> np.ndarray:
    """Eight 28x28 'digits': a bright off-centre bar plus a blob, each image a little different."""
    images = np.zeros((8, 28, 28), np.uint8)
    for i in range(8):
        images[i, 6 : 20 + i // 2, 9 + i % 3 : 12 + i % 3] = 255
        images[i, 18:22, 14:20] = 180
    return images


@pytest.mark.parametrize("kind", robustness.CORRUPTIONS)
def test_same_seed_same_images_and_every_image_changes(digits, kind):
    first = robustness.corrupt(digits, kind, SEVERITIES[kind], seed=7)
    again = robustness.corrupt(digits.copy(), kind, SEVERITIES[kind], seed=7)
    assert first.dtype == np.uint8 and first.shape == digits.shape
    np.testing.assert_array_equal(first, again)
    changed = np.any(first != digits, axis=(1, 2))
    # A random shift may be (0, 0) for an image; everything else changes every image.
    assert changed.mean() >= (0.75 if kind == "shift" else 1.0)


@pytest.mark.parametrize("kind", ["rotation", "shift", "noise"])
def test_another_seed_gives_other_images(digits, kind):
    a = robustness.corrupt(digits, kind, SEVERITIES[kind], seed=1)
    b = robustness.corrupt(digits, kind, SEVERITIES[kind], seed=2)
    assert not np.array_equal(a, b)


def test_sets_do_not_depend_on_which_other_corruptions_ran_or_their_order(digits):
    together = robustness.corrupted_sets(digits, SEVERITIES, seed=3)
    reversed_order = robustness.corrupted_sets(digits, dict(reversed(SEVERITIES.items())), seed=3)
    alone = robustness.corrupted_sets(digits, {"noise": 0.3}, seed=3)
    assert list(together) == list(SEVERITIES)
    for kind in SEVERITIES:
        np.testing.assert_array_equal(together[kind], reversed_order[kind])
    np.testing.assert_array_equal(together["noise"], alone["noise"])


def test_shift_moves_pixels_by_at_most_the_severity_and_keeps_them():
    image = np.zeros((50, 28, 28), np.uint8)
    image[:, 14, 14] = 255
    shifted = robustness.corrupt(image, "shift", 3, seed=0)
    for moved in shifted:
        (y,), (x,) = np.nonzero(moved)
        assert abs(y - 14) <= 3 and abs(x - 14) <= 3
    offsets = {tuple(np.argwhere(moved)[0]) for moved in shifted}
    assert len(offsets) > 10  # the offsets vary from image to image


def test_blur_spreads_ink_and_noise_stays_in_range(digits):
    blurred = robustness.corrupt(digits, "blur", 1.5, seed=0)
    assert np.count_nonzero(blurred) > np.count_nonzero(digits)
    assert abs(int(blurred.sum()) - int(digits.sum())) / digits.sum() < 0.05
    noisy = robustness.corrupt(digits, "noise", 0.3, seed=0).astype(int)
    assert 0.1 * 255 < np.abs(noisy - digits).mean() < 0.3 * 255


def test_rotation_keeps_the_ink_roughly():
    image = np.zeros((4, 28, 28), np.uint8)
    image[:, 8:20, 12:16] = 255
    rotated = robustness.corrupt(image, "rotation", 10, seed=0)
    assert abs(int(rotated.sum()) - int(image.sum())) / image.sum() < 0.1


def test_bad_input_is_refused(digits):
    with pytest.raises(ValueError, match="unknown corruption 'snow'"):
        robustness.corrupt(digits, "snow", 1.0, seed=0)
    with pytest.raises(ValueError, match="uint8"):
        robustness.corrupt(digits.astype(np.float32), "noise", 0.1, seed=0)
