from importlib import metadata

import keras

from mnist_mlops.tracking import model_requirements


def test_model_requirements_pin_the_active_keras_backend():
    pins = dict(requirement.split("==") for requirement in model_requirements())
    backend = keras.backend.backend()
    assert pins[backend] == metadata.version(backend)
    assert {"mlflow", "keras", "numpy", "pillow"} <= pins.keys()
