"""The errors the served model answers with: the HTTP status and our message, nothing more."""

from __future__ import annotations

import json

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INTERNAL_ERROR, INVALID_PARAMETER_VALUE


class ScoringError(MlflowException):
    """An error the scoring server answers with this message alone.

    MLflow's scoring server rewrites the message of an MlflowException raised by the model as
    "Failed to predict data '<kilobytes of the parsed request>'. Error: <message>" and then
    answers with `serialize_as_json()`; this class answers with the message it was raised with.
    """

    def __init__(self, message: str, error_code: int) -> None:
        super().__init__(message, error_code=error_code)
        self.reason = message

    def serialize_as_json(self) -> str:
        answer = json.loads(super().serialize_as_json())
        return json.dumps({**answer, "message": self.reason})


class InvalidInputError(ScoringError):
    """A request the model cannot score: HTTP 400 with a message naming record, field, problem."""

    def __init__(self, message: str) -> None:
        super().__init__(message, INVALID_PARAMETER_VALUE)


class ModelFailure(ScoringError):
    """The model failed on a valid batch: HTTP 500; the traceback goes to the server's log."""

    def __init__(self, message: str) -> None:
        super().__init__(message, INTERNAL_ERROR)
