import keras
import numpy as np
import pytest

from mnist_mlops.augmentation import SeededBatches, random_affine
from mnist_mlops.models import build_model
from mnist_mlops.training import fit, seed_everything


def _digits(n: int = 16) -> np.ndarray:
    images = np.zeros((n, 28, 28, 1), np.float32)
    images[:, 8:20, 12:16] = 1.0  # a vertical bar, like a "1"
    return images


def test_random_affine_is_seeded_and_moves_pixels():
    images = _digits()
    first = random_affine(images, np.random.default_rng(3))
    again = random_affine(images, np.random.default_rng(3))
    other = random_affine(images, np.random.default_rng(4))
    np.testing.assert_array_equal(first, again)
    assert not np.allclose(first, other)
    assert first.shape == images.shape and first.dtype == np.float32
    assert first.min() >= 0 and first.max() <= 1
    assert not np.allclose(first, images)
    # the ink stays roughly the same amount: transformed, not destroyed
    np.testing.assert_allclose(first.sum(axis=(1, 2, 3)), images.sum(axis=(1, 2, 3)), rtol=0.35)


def test_random_affine_with_zero_ranges_is_the_identity():
    images = _digits()
    same = random_affine(images, np.random.default_rng(0), rotation=0, shift=0, zoom=0)
    np.testing.assert_allclose(same, images, atol=1e-6)


def test_augmented_batches_cover_every_image_each_epoch():
    x = np.arange(10, dtype=np.float32).reshape(10, 1, 1, 1) * np.ones((1, 28, 28, 1), np.float32)
    y = np.arange(10)
    batches = SeededBatches(x, y, batch_size=4, seed=0)
    assert len(batches) == 3
    orders = []
    for _ in range(2):
        batches.on_epoch_begin()
        labels = np.concatenate([batches[i][1] for i in range(len(batches))])
        assert sorted(labels) == list(range(10))
        orders.append(labels)
    assert not np.array_equal(*orders)  # a new order each epoch


@pytest.mark.parametrize(("data_seed", "augment"), [(None, False), (5, False), (5, True)])
def test_same_seed_same_weights(data_seed, augment):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (256, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 256).astype(np.uint8)

    def train() -> list[np.ndarray]:
        seed_everything(11)
        model = build_model(conv_filters=(8,), dense_units=(16,), batch_norm=True, dropout=0.2)
        fit(
            model,
            (x, y),
            None,
            epochs=2,
            batch_size=64,
            callbacks=[],
            data_seed=data_seed,
            augment=augment,
        )
        return model.get_weights()

    for a, b in zip(train(), train(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_initial_epoch_continues_the_epoch_axis():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 28, 28), dtype=np.uint8)
    y = rng.integers(0, 10, 64).astype(np.uint8)
    seen = []
    recorder = keras.callbacks.LambdaCallback(on_epoch_end=lambda epoch, logs: seen.append(epoch))
    model = build_model(conv_filters=(4,), dense_units=(8,))
    history = fit(
        model, (x, y), None, epochs=2, batch_size=32, callbacks=[recorder], initial_epoch=3
    )
    assert seen == [3, 4]
    assert len(history["loss"]) == len(history["epoch_seconds"]) == 2
