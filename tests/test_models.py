"""The model builder, and the search space pinned name by name (Keras Tuner swallows build errors
inside trials, so the builder and the hypermodel are tested directly)."""

import keras
import keras_tuner as kt
import numpy as np
import pytest

from mnist_mlops.data import one_hot
from mnist_mlops.models import (
    BASELINE_ARCHITECTURE,
    MnistHyperModel,
    average_ensemble,
    build_model,
    conv_activations,
    conv_macs,
    sample_architecture,
    sample_batch_size,
    shift_averaged,
)

# name: (kind, range and default, conditions). A change to the space must change this table.
PINNED_SPACE = {
    "family": ("Choice", {"default": "cnn", "values": ["cnn", "mlp"]}, []),
    "batch_norm": ("Boolean", {"default": True}, []),
    "dropout": (
        "Float",
        {"default": 0.2, "min_value": 0.0, "max_value": 0.5, "step": 0.1, "sampling": "linear"},
        [],
    ),
    "conv_blocks": (
        "Int",
        {"default": 2, "min_value": 1, "max_value": 3, "step": 1, "sampling": "linear"},
        [("family", ["cnn"])],
    ),
    "filters_0": (
        "Int",
        {"default": 32, "min_value": 16, "max_value": 128, "step": 16, "sampling": "linear"},
        [("family", ["cnn"]), ("conv_blocks", [1, 2, 3])],
    ),
    "filters_1": (
        "Int",
        {"default": 64, "min_value": 16, "max_value": 128, "step": 16, "sampling": "linear"},
        [("family", ["cnn"]), ("conv_blocks", [2, 3])],
    ),
    "filters_2": (
        "Int",
        {"default": 128, "min_value": 16, "max_value": 128, "step": 16, "sampling": "linear"},
        [("family", ["cnn"]), ("conv_blocks", [3])],
    ),
    "convs_per_block": (
        "Int",
        {"default": 1, "min_value": 1, "max_value": 2, "step": 1, "sampling": "linear"},
        [("family", ["cnn"])],
    ),
    "kernel_size": ("Choice", {"default": 3, "values": [3, 5]}, [("family", ["cnn"])]),
    "dense_units": (
        "Int",
        {"default": 128, "min_value": 64, "max_value": 512, "step": 64, "sampling": "linear"},
        [("family", ["cnn"])],
    ),
    "mlp_layers": (
        "Int",
        {"default": 2, "min_value": 1, "max_value": 3, "step": 1, "sampling": "linear"},
        [("family", ["mlp"])],
    ),
    "mlp_units_0": (
        "Int",
        {"default": 256, "min_value": 64, "max_value": 512, "step": 64, "sampling": "linear"},
        [("family", ["mlp"]), ("mlp_layers", [1, 2, 3])],
    ),
    "mlp_units_1": (
        "Int",
        {"default": 256, "min_value": 64, "max_value": 512, "step": 64, "sampling": "linear"},
        [("family", ["mlp"]), ("mlp_layers", [2, 3])],
    ),
    "mlp_units_2": (
        "Int",
        {"default": 256, "min_value": 64, "max_value": 512, "step": 64, "sampling": "linear"},
        [("family", ["mlp"]), ("mlp_layers", [3])],
    ),
    "optimizer": ("Choice", {"default": "adam", "values": ["adam", "sgd"]}, []),
    "adam_learning_rate": (
        "Float",
        {"default": 0.001, "min_value": 0.0001, "max_value": 0.01, "step": None, "sampling": "log"},
        [("optimizer", ["adam"])],
    ),
    "sgd_learning_rate": (
        "Float",
        {"default": 0.01, "min_value": 0.001, "max_value": 0.1, "step": None, "sampling": "log"},
        [("optimizer", ["sgd"])],
    ),
    "batch_size": ("Choice", {"default": 128, "values": [64, 128, 256]}, []),
}


def _full_space() -> kt.HyperParameters:
    """Register every branch of the space by forcing each conditional choice once."""
    hp = kt.HyperParameters()
    branches = (
        {"family": "cnn", "conv_blocks": 3, "optimizer": "adam"},
        {"family": "mlp", "mlp_layers": 3, "optimizer": "sgd"},
    )
    for forced in branches:
        hp.values.update(forced)
        sample_architecture(hp)
        sample_batch_size(hp)
    return hp


def test_search_space_is_pinned():
    space = {}
    for hp in _full_space().space:
        config = hp.get_config()
        ranges = {
            key: config[key]
            for key in ("default", "values", "min_value", "max_value", "step", "sampling")
            if key in config
        }
        conditions = [(c.name, list(c.values)) for c in hp.conditions]
        space[hp.name] = (type(hp).__name__, ranges, conditions)
    assert space == PINNED_SPACE


def test_default_hyperparameters_build_the_default_cnn():
    hp = kt.HyperParameters()
    architecture = sample_architecture(hp)
    assert architecture == {
        "family": "cnn",
        "background_normalization": True,
        "padding": "same",
        "batch_norm": True,
        "dropout": 0.2,
        "conv_filters": (32, 64),
        "convs_per_block": 1,
        "kernel_size": 3,
        "dense_units": (128,),
        "optimizer": "adam",
        "learning_rate": 0.001,
    }
    assert sample_batch_size(hp) == 128
    # Inactive branches are not recorded: a default trial logs no MLP or SGD values.
    assert not {"mlp_layers", "sgd_learning_rate", "filters_2"} & set(hp.values)


@pytest.mark.parametrize(
    "forced",
    [
        {},
        {"family": "cnn", "conv_blocks": 3, "kernel_size": 5, "convs_per_block": 2},
        {"family": "cnn", "conv_blocks": 1, "batch_norm": False, "dropout": 0.0},
        {"family": "mlp", "mlp_layers": 3, "optimizer": "sgd"},
    ],
)
def test_hypermodel_builds_every_branch(forced):
    hp = kt.HyperParameters()
    hp.values.update(forced)
    model = MnistHyperModel(seed=0).build(hp)
    probabilities = np.asarray(model(np.zeros((2, 28, 28, 1), "float32")))
    assert probabilities.shape == (2, 10)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, rtol=1e-5)


def test_baseline_is_the_reference_cnn():
    model = build_model(**BASELINE_ARCHITECTURE)
    convs = [layer for layer in model.layers if layer.__class__.__name__ == "Conv2D"]
    dense = [layer for layer in model.layers if layer.__class__.__name__ == "Dense"]
    assert [c.filters for c in convs] == [32, 64]
    assert [d.units for d in dense] == [128, 10]
    assert model.get_layer("flatten").output.shape == (None, 5 * 5 * 64)
    assert model.count_params() == 225_034
    assert model.output.shape == (None, 10)


def test_architectures_that_collapse_are_refused():
    with pytest.raises(ValueError, match="shrinks the 28x28 input to nothing"):
        build_model(conv_filters=(32, 64, 128), kernel_size=5, padding="valid")
    # The same blocks with 'same' padding, as the search space uses, keep a 3x3 map.
    model = build_model(conv_filters=(32, 64, 128), kernel_size=5, padding="same")
    assert model.get_layer("flatten").output.shape == (None, 3 * 3 * 128)


def test_bad_choices_are_refused():
    with pytest.raises(ValueError, match="family"):
        build_model(family="rnn")
    with pytest.raises(ValueError, match="optimizer"):
        build_model(optimizer="rmsprop")


def test_cosine_schedule_decays_the_learning_rate():
    model = build_model(learning_rate=0.01, decay_steps=100)
    optimizer = model.optimizer
    assert float(optimizer.learning_rate) == pytest.approx(0.01)
    optimizer.iterations.assign(50)
    assert float(optimizer.learning_rate) == pytest.approx(0.005, rel=1e-3)
    optimizer.iterations.assign(100)
    assert float(optimizer.learning_rate) == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_label_smoothing_sets_the_loss_target(smoothing):
    model = build_model(**BASELINE_ARCHITECTURE, label_smoothing=smoothing)
    labels = one_hot(np.array([3, 7]))
    confident = np.where(labels == 1, 1 - 1e-6, 1e-7).astype("float32")
    smoothed = labels * (1 - smoothing) + smoothing / 10
    # The loss is smallest where the prediction equals the smoothed target, not the one-hot one.
    assert float(model.loss(labels, smoothed)) <= float(model.loss(labels, confident))
    assert (float(model.loss(labels, confident)) < 1e-4) == (smoothing == 0)


def test_hypermodel_trains_trials_in_the_retrain_regime():
    x = np.random.default_rng(0).random((64, 28, 28, 1), dtype="float32")
    y = one_hot(np.arange(64) % 10)

    def trained_weights(**regime):
        keras.utils.set_random_seed(0)
        hypermodel = MnistHyperModel(seed=0, **regime)
        hp = kt.HyperParameters()
        model = hypermodel.build(hp)
        hypermodel.fit(hp, model, x, y, epochs=1, verbose=0)
        return model.loss.get_config()["label_smoothing"], model.get_weights()

    smoothing, plain = trained_weights()
    assert smoothing == 0
    assert trained_weights(augment=True, label_smoothing=0.1)[0] == 0.1
    # Same seed and data: only the random affine copies can make the weights differ.
    _, plain_again = trained_weights()
    _, augmented = trained_weights(augment=True)
    assert all(np.array_equal(a, b) for a, b in zip(plain, plain_again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(plain, augmented, strict=True))


def test_ensemble_averages_its_members_and_saves_as_one_model(tmp_path):
    tiny = {"conv_filters": (4,), "dense_units": (8,)}
    members = [build_model(**tiny, seed=seed) for seed in (0, 1)]
    images = np.random.default_rng(0).random((5, 28, 28, 1), dtype="float32")
    expected = np.mean([member.predict(images, verbose=0) for member in members], axis=0)
    ensemble = average_ensemble(members)
    names = [layer.name for layer in ensemble.layers]
    assert names == ["image", "member_0", "member_1", "probabilities"]
    # Inference copies: no optimizer (and its state) rides along in the saved file.
    assert not any(ensemble.get_layer(name).compiled for name in names[1:3])
    np.testing.assert_allclose(ensemble.predict(images, verbose=0), expected, rtol=1e-6)
    ensemble.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(loaded.predict(images, verbose=0), expected, rtol=1e-6)
    assert not np.allclose(members[0].predict(images, verbose=0), expected)
    assert average_ensemble(members[:1]) is members[0]


def _five_views(images: np.ndarray) -> list[np.ndarray]:
    """`images`, then moved one pixel down, up, right and left, zeros filling in (numpy's own
    reference for what `shift_averaged` should average over)."""
    padded = np.pad(images, ((0, 0), (1, 1), (1, 1), (0, 0)))
    height, width = images.shape[1:3]
    moves = ((1, 0), (-1, 0), (0, 1), (0, -1))  # (rows down, columns right)
    return [images] + [
        padded[:, 1 - rows : 1 - rows + height, 1 - columns : 1 - columns + width]
        for rows, columns in moves
    ]


def test_each_shift_layer_moves_the_image_its_way():
    averaged = shift_averaged(build_model(family="mlp", dense_units=(8,), seed=0), 1)
    image = np.zeros((1, 28, 28, 1), "float32")
    image[0, 5, 7, 0] = 1
    spots = {"down": (6, 7), "up": (4, 7), "right": (5, 8), "left": (5, 6)}
    for direction, spot in spots.items():
        layer = averaged.get_layer(f"shift_{direction}")
        moved = np.asarray(keras.Model(averaged.inputs, layer.output)(image))
        assert moved.shape == image.shape
        assert np.argwhere(moved[0, ..., 0]).tolist() == [list(spot)]


def test_shift_averaging_averages_the_image_and_its_four_moves_and_saves_as_one_model(tmp_path):
    model = build_model(conv_filters=(4,), dense_units=(8,), seed=0)
    images = np.random.default_rng(0).random((5, 28, 28, 1), dtype="float32")
    expected = np.mean([model.predict(view, verbose=0) for view in _five_views(images)], axis=0)
    averaged = shift_averaged(model, 1)
    assert not averaged.get_layer("classifier").compiled  # no optimizer state in the file
    np.testing.assert_allclose(averaged.predict(images, verbose=0), expected, rtol=1e-5)
    assert not np.allclose(model.predict(images, verbose=0), expected)
    averaged.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    np.testing.assert_allclose(loaded.predict(images, verbose=0), expected, rtol=1e-5)
    assert loaded.count_params() == model.count_params()  # one set of weights, used five times
    assert shift_averaged(model, 0) is model


def test_shift_averaging_wraps_an_ensemble():
    tiny = {"family": "mlp", "dense_units": (8,)}
    ensemble = average_ensemble([build_model(**tiny, seed=seed) for seed in (0, 1)])
    images = np.random.default_rng(1).random((3, 28, 28, 1), dtype="float32")
    expected = np.mean([ensemble.predict(v, verbose=0) for v in _five_views(images)], axis=0)
    averaged = shift_averaged(ensemble, 1)
    np.testing.assert_allclose(averaged.predict(images, verbose=0), expected, rtol=1e-5)


def test_one_hot_targets():
    np.testing.assert_array_equal(one_hot(np.array([0, 9])).argmax(axis=1), [0, 9])
    assert one_hot(np.array([2])).dtype == np.float32
    assert one_hot(np.array([2])).sum() == 1


def test_conv_cost_of_reference_architectures():
    assert conv_macs(**BASELINE_ARCHITECTURE) == 26 * 26 * 32 * 9 + 11 * 11 * 64 * 32 * 9
    assert conv_macs((32, 64), kernel_size=3) == 28 * 28 * 32 * 9 + 14 * 14 * 64 * 32 * 9
    assert conv_macs((32, 64), convs_per_block=2, kernel_size=5) > 4 * conv_macs((32, 64))


def test_the_cost_cap_fails_expensive_trials_before_training():
    hp = kt.HyperParameters()
    hp.values.update({"conv_blocks": 2, "convs_per_block": 2, "kernel_size": 5})
    hypermodel = MnistHyperModel(seed=0, max_conv_mmacs=8)
    model = hypermodel.build(hp)
    x, y = np.zeros((4, 28, 28, 1), "float32"), one_hot(np.zeros(4, "int64"))
    with pytest.raises(kt.errors.FailedTrialError, match=r"exceeds tune.max_conv_mmacs = 8"):
        hypermodel.fit(hp, model, x, y, epochs=1, verbose=0)
    cheap = kt.HyperParameters()
    history = hypermodel.fit(cheap, hypermodel.build(cheap), x, y, epochs=1, verbose=0)
    assert len(history.history["loss"]) == 1


def test_conv_activations_of_a_cnn_and_of_an_mlp():
    images = np.random.default_rng(0).random((3, 28, 28, 1), dtype=np.float32)
    cnn = build_model(conv_filters=(4, 8), dense_units=(8,), seed=0)
    maps = conv_activations(cnn, images, max_layers=2)
    assert {name: out.shape for name, out in maps.items()} == {
        "conv_0": (3, 28, 28, 4),
        "conv_1": (3, 14, 14, 8),
    }
    assert list(conv_activations(cnn, images, max_layers=1)) == ["conv_0"]
    mlp = build_model(family="mlp", dense_units=(8,), seed=0)
    assert conv_activations(mlp, images, max_layers=2) == {}
    # Wrappers show their first sub-model's maps for the unmoved image.
    other = build_model(conv_filters=(4, 8), dense_units=(8,), seed=1)
    for wrapper in (shift_averaged(cnn, 1), shift_averaged(average_ensemble([cnn, other]), 1)):
        wrapped = conv_activations(wrapper, images, max_layers=2)
        assert list(wrapped) == ["conv_0", "conv_1"]
        np.testing.assert_allclose(wrapped["conv_0"], maps["conv_0"], rtol=1e-5, atol=1e-6)
