"""The served model as MLflow's models-from-code: the file `log_serving_model` logs.

Loading the registered model runs this file (with `mnist_serving` on sys.path from the model's
`code_paths`) instead of unpickling a `DigitClassifier`, so it loads where pickle is refused
(MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false). Importing it only hands MLflow the model object.
"""

import mlflow

from mnist_serving.model import DigitClassifier

mlflow.models.set_model(DigitClassifier())
