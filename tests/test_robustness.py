"""MNIST-C corruptions: deterministic, order-independent, actually corrupted, true to their
definitions; and the published files, read and checked."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mnist_mlops import robustness
from mnist_mlops.errors import PipelineError

# The corruptions that draw random numbers; the others are the same for every seed.
RANDOM = {
    "shot_noise",
    "impulse_noise",
    "glass_blur",
    "motion_blur",
    "shear",
    "rotate",
    "translate",
    "fog",
    "spatter",
    "dotted_line",
    "zigzag",
    "gaussian_noise",
    "speckle_noise",
    "elastic_transform",
}


@pytest.fixture
def digits() -> np.ndarray:
    """Eight 28x28 'digits': a bright off-centre bar plus a blob, each image a little different."""
    images = np.zeros((8, 28, 28), np.uint8)
    for i in range(8):
        images[i, 6 : 20 + i // 2, 9 + i % 3 : 12 + i % 3] = 255
        images[i, 18:22, 14:20] = 180
    return images


def test_the_benchmark_and_the_held_out_corruptions_are_mnistc_s_and_disjoint():
    assert len(robustness.BENCHMARK) == 15 and len(robustness.HELD_OUT) == 11
    assert not set(robustness.BENCHMARK) & set(robustness.HELD_OUT)
    assert robustness.CORRUPTIONS == robustness.BENCHMARK + robustness.HELD_OUT
    assert {"fog", "canny_edges", "stripe"} <= set(robustness.BENCHMARK)
    assert {"gaussian_noise", "inverse", "elastic_transform"} <= set(robustness.HELD_OUT)


@pytest.mark.parametrize("name", robustness.CORRUPTIONS)
def test_same_seed_same_images_and_every_image_changes(digits, name):
    first = robustness.corrupt(digits, name, seed=7)
    again = robustness.corrupt(digits.copy(), name, seed=7)
    assert first.dtype == np.uint8 and first.shape == digits.shape
    np.testing.assert_array_equal(first, again)
    assert np.any(first != digits, axis=(1, 2)).all()
    # 32 images: a random corruption that flips a coin per image must show another seed.
    many = np.tile(digits, (4, 1, 1))
    same_for_other_seed = np.array_equal(
        robustness.corrupt(many, name, seed=7), robustness.corrupt(many, name, seed=8)
    )
    assert same_for_other_seed == (name not in RANDOM)


def test_sets_do_not_depend_on_which_other_corruptions_ran_or_their_order(digits):
    names = ["fog", "shot_noise", "zigzag"]
    together = robustness.corrupted_sets(digits, names, seed=3)
    reversed_order = robustness.corrupted_sets(digits, names[::-1], seed=3)
    alone = robustness.corrupted_sets(digits, ["zigzag"], seed=3)
    assert list(together) == names
    for name in names:
        np.testing.assert_array_equal(together[name], reversed_order[name])
    np.testing.assert_array_equal(together["zigzag"], alone["zigzag"])


def test_stripe_inverts_exactly_the_seven_left_and_seven_right_columns(digits):
    striped = robustness.corrupt(digits, "stripe", seed=0)
    outer = np.r_[0:7, 21:28]
    np.testing.assert_array_equal(striped[:, :, outer], 255 - digits[:, :, outer])
    np.testing.assert_array_equal(striped[:, :, 7:21], digits[:, :, 7:21])


def test_brightness_lifts_the_background_to_mid_grey_and_keeps_white(digits):
    bright = robustness.corrupt(digits, "brightness", seed=0)
    assert set(np.unique(bright[digits == 0])) == {128}
    assert set(np.unique(bright[digits == 255])) == {255}


def test_canny_edges_are_binary_and_outline_the_bar(digits):
    edges = robustness.corrupt(digits, "canny_edges", seed=0)
    assert set(np.unique(edges)) == {0, 255}
    assert edges[0, 12, 8:14].any() and not edges[0, 12, 10]  # the bar's sides, not its middle


def one_dot(count: int, row: int = 14, col: int = 14) -> np.ndarray:
    images = np.zeros((count, 28, 28), np.uint8)
    images[:, row, col] = 255
    return images


def test_translate_moves_by_exactly_three_pixels_along_each_axis():
    moved = robustness.corrupt(one_dot(40), "translate", seed=0)
    offsets = {(r - 14, c - 14) for r, c in (np.argwhere(image)[0] for image in moved)}
    assert offsets == {(-3, -3), (-3, 3), (3, -3), (3, 3)}
    assert (moved == 255).sum(axis=(1, 2)).tolist() == [1] * 40  # moved whole, not resampled


def ink_centre(images: np.ndarray) -> np.ndarray:
    """The brightness-weighted centre (row, column) of each image."""
    rows, cols = np.mgrid[0:28, 0:28]
    total = images.sum(axis=(1, 2))
    return (
        np.stack([(images * rows).sum(axis=(1, 2)), (images * cols).sum(axis=(1, 2))], 1)
        / (total[:, None])
    )


def test_rotate_turns_by_0_4_radians_either_way_about_the_centre():
    images = np.zeros((30, 28, 28), np.uint8)
    images[:, 3:6, 12:15] = 255  # a blob 10 px above the centre (13.5, 13.5)
    rotated = robustness.corrupt(images, "rotate", seed=0)
    before = ink_centre(images) - 13.5
    after = ink_centre(rotated) - 13.5
    turned = np.arctan2(after[:, 0], after[:, 1]) - np.arctan2(before[:, 0], before[:, 1])
    np.testing.assert_allclose(np.abs(turned), 0.4, atol=0.02)
    assert {-1, 1} == set(np.sign(turned))
    np.testing.assert_allclose(np.hypot(*after.T), np.hypot(*before.T), atol=0.1)


def test_scale_shrinks_the_digit_to_seventy_percent_about_the_centre():
    images = np.zeros((1, 28, 28), np.uint8)
    images[0, 4:24, 4:24] = 255
    scaled = robustness.corrupt(images, "scale", seed=0)
    ink = np.argwhere(scaled[0] > 127)
    assert ink.min() == 7 and ink.max() == 20  # 20 px across at 0.7: 14 px, still centred


def test_noise_corruptions_follow_their_definitions():
    grey = np.full((8, 28, 28), 128, np.uint8)
    impulse = robustness.corrupt(grey, "impulse_noise", seed=0)
    hit = impulse != 128
    assert 0.15 < hit.mean() < 0.19  # severity 4: 17% of the pixels
    assert set(np.unique(impulse[hit])) == {0, 255}
    shot = robustness.corrupt(np.full((8, 28, 28), 255, np.uint8), "shot_noise", seed=0)
    assert set(np.unique(shot)) <= {0, 85, 170, 255}  # Poisson counts of 3 photons, clipped


def test_dotted_line_leaves_every_other_pair_of_columns_dark():
    lines = robustness.corrupt(np.zeros((20, 28, 28), np.uint8), "dotted_line", seed=0)
    dark = (np.arange(28) // 2) % 2 == 0
    assert not lines[:, :, dark].any()
    assert lines[:, :, ~dark].any(axis=(1, 2)).all()


def test_fog_lifts_the_background_and_dims_the_digit(digits):
    foggy = robustness.corrupt(digits, "fog", seed=0).astype(int)
    assert foggy[:, 0:5, 0:5].mean() > 100  # fractal fog over an empty corner
    assert foggy.max() <= 255 and foggy[digits == 255].mean() < 255


def test_bad_input_is_refused(digits):
    with pytest.raises(ValueError, match="unknown corruption 'snow'"):
        robustness.corrupt(digits, "snow", seed=0)
    with pytest.raises(ValueError, match="uint8"):
        robustness.corrupt(digits.astype(np.float32), "fog", seed=0)
    with pytest.raises(ValueError, match=r"\[N, 28, 28\]"):
        robustness.corrupt(digits[:, :20, :20], "fog", seed=0)


# --- the published files (MNISTC_DIR) ---------------------------------------------------------


def write_published(directory: Path, names: list[str], images: np.ndarray, labels: np.ndarray):
    """MNIST-C's released layout: <dir>/<corruption>/test_images.npy (N, 28, 28, 1) and labels."""
    for i, name in enumerate(names):
        (directory / name).mkdir(parents=True)
        np.save(directory / name / "test_images.npy", (images + i)[..., None])
        np.save(directory / name / "test_labels.npy", labels.astype(np.int64))


def test_published_sets_are_read_as_they_are(tmp_path, digits):
    labels = np.arange(8) % 10
    write_published(tmp_path, ["fog", "stripe"], digits, labels)
    sets = robustness.load_published(tmp_path, ["fog", "stripe"], labels.astype(np.uint8))
    assert list(sets) == ["fog", "stripe"]
    np.testing.assert_array_equal(sets["stripe"], digits + 1)


@pytest.mark.parametrize(
    ("damage", "problem"),
    [
        (
            lambda d: (d / "stripe" / "test_labels.npy").unlink(),
            r"stripe/test_labels.npy: not found",
        ),
        (
            lambda d: np.save(d / "fog" / "test_images.npy", np.zeros((8, 28, 28), np.uint8)),
            r"fog/test_images.npy: expected uint8 \(8, 28, 28, 1\), got uint8 \(8, 28, 28\)",
        ),
        (
            lambda d: np.save(d / "fog" / "test_labels.npy", np.zeros(8, np.int64)),
            r"fog/test_labels.npy: the labels differ from the test split's",
        ),
        (
            lambda d: (d / "fog" / "test_images.npy").write_bytes(b"not numpy"),
            r"fog/test_images.npy: not a readable .npy file",
        ),
    ],
)
def test_broken_published_files_are_one_clear_error(tmp_path, digits, damage, problem):
    labels = np.arange(8) % 10
    write_published(tmp_path, ["fog", "stripe"], digits, labels)
    damage(tmp_path)
    with pytest.raises(PipelineError, match=f"^MNISTC_DIR: {tmp_path}/{problem}") as caught:
        robustness.load_published(tmp_path, ["fog", "stripe"], labels)
    assert "\n" not in str(caught.value)


def test_benchmark_sets_are_generated_or_read_from_the_published_files(tmp_path, digits):
    labels = np.arange(8)
    generated, source = robustness.benchmark_sets((digits, labels), 3, None)
    assert list(generated) == list(robustness.BENCHMARK)
    assert source == "generated from the test set with seed 3"
    np.testing.assert_array_equal(generated["fog"], robustness.corrupt(digits, "fog", seed=3))
    write_published(tmp_path, list(robustness.BENCHMARK), digits, labels)
    published, source = robustness.benchmark_sets((digits, labels), 3, tmp_path)
    assert list(published) == list(robustness.BENCHMARK)
    assert source == f"the published files in {tmp_path}"
    np.testing.assert_array_equal(published["shear"], digits + robustness.BENCHMARK.index("shear"))
