"""One model builder for every stage, and the Keras Tuner search space that samples its arguments.

`build_model` is plain Keras 3 (no backend calls), so the same code trains on TensorFlow here and
on JAX on a GPU machine. Models take float32 images `[N, 28, 28, 1]` scaled to [0, 1] and return
ten softmax probabilities, and train on one-hot labels (`data.one_hot`): Keras's sparse
cross-entropy has no label smoothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import keras
import keras_tuner as kt
import numpy as np

from mnist_mlops.augmentation import fit_data
from mnist_mlops.data import NUM_CLASSES
from mnist_serving.layers import BackgroundNormalization

INPUT_SHAPE = (28, 28, 1)
POOL_SIZE = 2
# Keras's default 0.99 leaves the moving variance ~10x too large after a few hundred steps, so
# a short tuning trial with batch norm scored ~12% at inference while 97.7% in training mode.
BN_MOMENTUM = 0.9

# The reference projects' baseline CNN: conv32 -> pool -> conv64 -> pool -> dense128 -> softmax.
BASELINE_ARCHITECTURE: dict[str, Any] = {
    "family": "cnn",
    "conv_filters": (32, 64),
    "kernel_size": 3,
    "padding": "valid",
    "batch_norm": False,
    "dropout": 0.0,
    "dense_units": (128,),
}


def build_model(
    *,
    family: Literal["cnn", "mlp"] = "cnn",
    conv_filters: Sequence[int] = (32, 64),
    convs_per_block: int = 1,
    kernel_size: int = 3,
    padding: Literal["valid", "same"] = "same",
    batch_norm: bool = False,
    dropout: float = 0.0,
    dense_units: Sequence[int] = (128,),
    optimizer: Literal["adam", "sgd"] = "adam",
    learning_rate: float = 1e-3,
    decay_steps: int | None = None,
    label_smoothing: float = 0.0,
    background_normalization: bool = False,
    seed: int | None = None,
) -> keras.Model:
    """Build and compile a classifier.

    family="cnn": one block per entry of `conv_filters` (`convs_per_block` times conv [-> batch
    norm] -> relu, then 2x2 max pool), then the dense head. family="mlp": the dense head alone
    on the flattened image.
    `decay_steps` turns the constant learning rate into a cosine decay over that many steps.
    `label_smoothing` trains towards 1 - s on the true class and s / 10 on every class instead of
    a one-hot target, which penalises overconfident fits.
    (Augmentation happens in the input pipeline, `augmentation.SeededBatches`, so saved
    models hold no training-only layers.)
    """
    if family not in ("cnn", "mlp"):
        raise ValueError(f"family must be 'cnn' or 'mlp', got {family!r}")
    if family == "cnn":
        _check_conv_shapes(conv_filters, convs_per_block, kernel_size, padding)
    inputs = keras.Input(shape=INPUT_SHAPE, name="image")
    x = inputs
    if background_normalization:
        x = BackgroundNormalization(name="background_normalization")(x)
    if family == "cnn":
        for i, filters in enumerate(conv_filters):
            for j in range(convs_per_block):
                name = f"conv_{i}" if convs_per_block == 1 else f"conv_{i}_{j}"
                x = keras.layers.Conv2D(
                    filters, kernel_size, padding=padding, use_bias=not batch_norm, name=name
                )(x)
                if batch_norm:
                    x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"{name}_bn")(x)
                x = keras.layers.Activation("relu", name=f"{name}_relu")(x)
            x = keras.layers.MaxPooling2D(POOL_SIZE, name=f"pool_{i}")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    for i, units in enumerate(dense_units):
        if dropout > 0:
            x = keras.layers.Dropout(dropout, seed=seed, name=f"dropout_{i}")(x)
        x = keras.layers.Dense(units, use_bias=not batch_norm, name=f"dense_{i}")(x)
        if batch_norm:
            x = keras.layers.BatchNormalization(momentum=BN_MOMENTUM, name=f"dense_{i}_bn")(x)
        x = keras.layers.Activation("relu", name=f"dense_{i}_relu")(x)
    if dropout > 0:
        x = keras.layers.Dropout(dropout, seed=seed, name="dropout_out")(x)
    outputs = keras.layers.Dense(NUM_CLASSES, activation="softmax", name="probabilities")(x)
    model = keras.Model(inputs, outputs, name=f"mnist_{family}")
    model.compile(
        optimizer=_optimizer(optimizer, learning_rate, decay_steps),
        loss=keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing),
        metrics=["accuracy"],
    )
    return model


def average_ensemble(members: Sequence[keras.Model]) -> keras.Model:
    """One model whose output is the mean of its members' probabilities.

    The members, each built by `build_model` and trained on its own, are copied in as named,
    uncompiled sub-models (`member_0`, ...): the ensemble saves, loads, exports and serves as one
    ordinary Keras model, without the members' optimizer state (which would triple its file).
    A single member is returned as it is.
    """
    if len(members) == 1:
        return members[0]
    inputs = keras.Input(shape=INPUT_SHAPE, name="image")
    outputs = [
        inference_copy(member, name=f"member_{i}")(inputs) for i, member in enumerate(members)
    ]
    average = keras.layers.Average(name="probabilities")(outputs)
    return keras.Model(inputs, average, name=f"mnist_ensemble_of_{len(members)}")


def shift_averaged(model: keras.Model, pixels: int) -> keras.Model:
    """One model whose output is the mean of `model`'s probabilities for the image and for four
    copies of it moved `pixels` up, down, left and right (test-time augmentation).

    Made of Keras's own pad, crop and average layers around an uncompiled copy of `model`
    (`classifier`), so it saves, loads, exports and serves like the model it wraps, at five
    times its inference cost. `pixels` = 0 returns the model as it is.
    """
    if pixels == 0:
        return model
    inputs = keras.Input(shape=INPUT_SHAPE, name="image")
    classifier = inference_copy(model, name="classifier")
    # (rows, columns) padding that moves the image; the opposite crop keeps it 28x28.
    moves = {
        "down": ((pixels, 0), (0, 0)),
        "up": ((0, pixels), (0, 0)),
        "right": ((0, 0), (pixels, 0)),
        "left": ((0, 0), (0, pixels)),
    }
    views = [inputs]
    for direction, padding in moves.items():
        padded = keras.layers.ZeroPadding2D(padding, name=f"pad_{direction}")(inputs)
        cropping = tuple(tuple(reversed(pair)) for pair in padding)
        views.append(keras.layers.Cropping2D(cropping, name=f"shift_{direction}")(padded))
    average = keras.layers.Average(name="probabilities")([classifier(view) for view in views])
    return keras.Model(inputs, average, name=f"{model.name}_shift_averaged")


def inference_copy(model: keras.Model, name: str | None = None) -> keras.Model:
    """The same model and weights, rebuilt from its config: uncompiled, so it carries no
    optimizer state (which Keras saves with a compiled model, tripling an Adam-trained file)."""
    config = model.get_config()
    copy = type(model).from_config({**config, "name": name or config["name"]})
    copy.set_weights(model.get_weights())
    return copy


def _check_conv_shapes(
    conv_filters: Sequence[int], convs_per_block: int, kernel_size: int, padding: str
) -> None:
    """Refuse architectures whose feature maps would shrink to nothing before the dense head."""
    if not conv_filters or convs_per_block < 1:
        raise ValueError("a CNN needs at least one conv block of at least one conv layer")
    size = INPUT_SHAPE[0]
    for i in range(len(conv_filters)):
        if padding == "valid":
            size -= (kernel_size - 1) * convs_per_block
        size //= POOL_SIZE
        if size < 1:
            raise ValueError(
                f"conv block {i} shrinks the {INPUT_SHAPE[0]}x{INPUT_SHAPE[1]} input to nothing "
                f"({len(conv_filters)} blocks of {convs_per_block} conv, kernel {kernel_size}, "
                f"padding {padding!r})"
            )


def _optimizer(name: str, learning_rate: float, decay_steps: int | None) -> keras.Optimizer:
    schedule = (
        keras.optimizers.schedules.CosineDecay(learning_rate, decay_steps)
        if decay_steps
        else learning_rate
    )
    if name == "adam":
        return keras.optimizers.Adam(schedule)
    if name == "sgd":
        return keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {name!r}")


def sample_architecture(hp: kt.HyperParameters) -> dict[str, Any]:
    """The search space: draw `build_model` arguments from `hp`.

    Hyperparameters that only make sense for some choices live in conditional scopes, so a trial
    records only the ones that shaped its model. Each optimizer owns its learning-rate name
    because Keras Tuner keeps the first range registered under a name.
    """
    family = hp.Choice("family", ["cnn", "mlp"], default="cnn")
    architecture: dict[str, Any] = {
        "family": family,
        # Not searched: on validation with held-out corruptions it lifted the mean accuracy from
        # 0.938 to 0.967 at the same clean accuracy (docs/robustness.md).
        "background_normalization": True,
        "padding": "same",  # so three 5x5 blocks still leave a 3x3 map
        "batch_norm": hp.Boolean("batch_norm", default=True),
        "dropout": hp.Float("dropout", 0.0, 0.5, step=0.1, default=0.2),
    }
    if family == "cnn":
        with hp.conditional_scope("family", ["cnn"]):
            blocks = hp.Int("conv_blocks", 1, 3, default=2)
            architecture["conv_filters"] = tuple(_filters(hp, i) for i in range(blocks))
            architecture["convs_per_block"] = hp.Int("convs_per_block", 1, 2, default=1)
            architecture["kernel_size"] = hp.Choice("kernel_size", [3, 5], default=3)
            architecture["dense_units"] = (hp.Int("dense_units", 64, 512, step=64, default=128),)
    else:
        with hp.conditional_scope("family", ["mlp"]):
            layers = hp.Int("mlp_layers", 1, 3, default=2)
            architecture["dense_units"] = tuple(_mlp_units(hp, i) for i in range(layers))
    optimizer = hp.Choice("optimizer", ["adam", "sgd"], default="adam")
    architecture["optimizer"] = optimizer
    with hp.conditional_scope("optimizer", [optimizer]):
        if optimizer == "adam":
            architecture["learning_rate"] = hp.Float(
                "adam_learning_rate", 1e-4, 1e-2, sampling="log", default=1e-3
            )
        else:
            architecture["learning_rate"] = hp.Float(
                "sgd_learning_rate", 1e-3, 1e-1, sampling="log", default=1e-2
            )
    return architecture


def _filters(hp: kt.HyperParameters, block: int) -> int:
    # Active only where conv_blocks > block, so a 1-block trial records no filters_1.
    with hp.conditional_scope("conv_blocks", list(range(block + 1, 4))):
        return hp.Int(f"filters_{block}", 16, 128, step=16, default=32 * 2**block)


def _mlp_units(hp: kt.HyperParameters, layer: int) -> int:
    with hp.conditional_scope("mlp_layers", list(range(layer + 1, 4))):
        return hp.Int(f"mlp_units_{layer}", 64, 512, step=64, default=256)


def sample_batch_size(hp: kt.HyperParameters) -> int:
    # No 32: on CPU it trains at about half the images per second of 128.
    return hp.Choice("batch_size", [64, 128, 256], default=128)


def conv_macs(
    conv_filters: Sequence[int],
    convs_per_block: int = 1,
    kernel_size: int = 3,
    padding: str = "same",
    **_: Any,
) -> int:
    """Multiply-accumulates per image in the conv layers, which dominate a CNN's training time.

    Takes (and ignores the rest of) `build_model`'s arguments, so `conv_macs(**architecture)`.
    """
    size, channels, total = INPUT_SHAPE[0], INPUT_SHAPE[2], 0
    for filters in conv_filters:
        for _ in range(convs_per_block):
            if padding == "valid":
                size -= kernel_size - 1
            total += size * size * filters * channels * kernel_size**2
            channels = filters
        size //= POOL_SIZE
    return total


class MnistHyperModel(kt.HyperModel):
    """Keras Tuner's view of `build_model`: sample the architecture and batch size, then build.

    `max_conv_mmacs` caps a CNN's conv cost (million multiply-accumulates per image): a trial
    drawing a costlier architecture fails at once, recorded with the reason, instead of
    spending the search budget on a model the retrain budget could not afford.
    `augment`, `degradation_rate` and `label_smoothing` train each trial as the retrain stage
    trains the winner (random affine and degraded copies of the images; smoothed targets), so
    trials are ranked by how they learn under that regime rather than by how fast they fit the
    raw images.
    """

    def __init__(
        self,
        seed: int,
        max_conv_mmacs: float | None = None,
        augment: bool = False,
        degradation_rate: float = 0.0,
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__(name="mnist")
        self.seed = seed
        self.max_conv_mmacs = max_conv_mmacs
        self.augment = augment
        self.degradation_rate = degradation_rate
        self.label_smoothing = label_smoothing

    def build(self, hp: kt.HyperParameters) -> keras.Model:
        return build_model(
            **sample_architecture(hp), label_smoothing=self.label_smoothing, seed=self.seed
        )

    def fit(
        self,
        hp: kt.HyperParameters,
        model: keras.Model,
        x: np.ndarray,
        y: np.ndarray,
        **kwargs: Any,
    ) -> Any:
        # Checked here, not in build(): Keras Tuner also builds every branch of the space when
        # it starts, and an exception there would stop the whole search.
        architecture = sample_architecture(hp)
        if self.max_conv_mmacs is not None and architecture["family"] == "cnn":
            mmacs = conv_macs(**architecture) / 1e6
            if mmacs > self.max_conv_mmacs:
                raise kt.errors.FailedTrialError(
                    f"conv cost {mmacs:.1f} MMACs/image exceeds tune.max_conv_mmacs "
                    f"= {self.max_conv_mmacs}"
                )
        data_seed = self.seed if self.augment else None
        batches = fit_data(
            x,
            y,
            sample_batch_size(hp),
            data_seed=data_seed,
            augment=self.augment,
            degradation_rate=self.degradation_rate,
        )
        return model.fit(**batches, **kwargs)


def conv_activations(
    model: keras.Model, inputs: np.ndarray, max_layers: int
) -> dict[str, np.ndarray]:
    """Outputs of the model's first `max_layers` Conv2D layers for `inputs`, by layer name.

    A wrapper's (an ensemble's, a shift-averaged model's) are those of its first sub-model, for
    the unmoved image. Empty for a model without convolutions (the search may pick an MLP).
    """
    while not _convs(model) and (nested := _sub_models(model)):
        model = nested[0]
    convs = _convs(model)[:max_layers]
    if not convs:
        return {}
    probe = keras.Model(model.inputs, [layer.output for layer in convs])
    outputs = probe.predict(inputs, verbose=0)
    if len(convs) == 1:
        outputs = [outputs]
    return {layer.name: np.asarray(out) for layer, out in zip(convs, outputs, strict=True)}


def _convs(model: keras.Model) -> list[keras.layers.Layer]:
    return [layer for layer in model.layers if isinstance(layer, keras.layers.Conv2D)]


def _sub_models(model: keras.Model) -> list[keras.Model]:
    return [layer for layer in model.layers if isinstance(layer, keras.Model)]
