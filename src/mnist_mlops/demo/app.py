"""The demo's web app: `GET /` serves the page, `POST /api/predict` forwards a drawing to the
model server and answers with its reading.

The page posts `{"png": "<base64 PNG>"}` (its canvas as it is: the served model converts any
PNG to MNIST form). The proxy sends it as one record, `{"dataframe_records": [{"png": ...}]}`,
to `<model_url>/invocations` and answers `{"digit": d, "probabilities": [p0, ..., p9],
"digit_found": bool}` (false: the drawing holds no digit, such as a dot or a scribble), or an
`{"error": message}` the page shows: 400 for a request the page or the model refuses, 503 when
the model server does not answer, 502 when it answers with a failure or something unexpected.
"""

from __future__ import annotations

import json
import logging
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).parent / "static"
# One small image on a local server takes milliseconds; seconds mean the server is stuck.
MODEL_TIMEOUT_SECONDS = 10.0

log = logging.getLogger(__name__)


def create_app(model_url: str, timeout: float = MODEL_TIMEOUT_SECONDS) -> Starlette:
    """The page and the proxy to the scoring server at `model_url` (http://host:port)."""
    invocations = f"{model_url.rstrip('/')}/invocations"

    async def page(request: Request) -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html")

    async def predict(request: Request) -> JSONResponse:
        try:
            body = await request.json()
        except ValueError:
            body = None
        png = body.get("png") if isinstance(body, dict) else None
        if not isinstance(png, str) or not png:
            return JSONResponse({"error": 'send {"png": "<base64 PNG>"} as JSON'}, status_code=400)
        # urllib blocks; a worker thread keeps the app answering meanwhile.
        status, answer = await run_in_threadpool(forward, invocations, png, timeout)
        return JSONResponse(answer, status_code=status)

    return Starlette(
        routes=[
            Route("/", page),
            Route("/api/predict", predict, methods=["POST"]),
            Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        ]
    )


def forward(invocations: str, png: str, timeout: float) -> tuple[int, dict[str, Any]]:
    """Score one base64 PNG at the scoring server's `invocations` URL: (HTTP status, answer)."""
    request = urllib.request.Request(
        invocations,
        data=json.dumps({"dataframe_records": [{"png": png}]}).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            raw = response.read()
    except urllib.error.HTTPError as err:  # the server answered, with an error status
        message = _server_message(err.read())
        if err.code == 400:
            return 400, {"error": f"The model refused the drawing: {message}"}
        log.warning("model server answered %d: %s", err.code, message)
        return 502, {"error": f"The model server failed ({err.code}): {message}"}
    except OSError as err:  # refused, reset or timed out: nothing is serving the model
        reason = getattr(err, "reason", err)
        log.warning("model server at %s not answering: %s", invocations, reason)
        return 503, {
            "error": f"The model server is not answering ({reason}): "
            "restart it (or the demo), then draw again."
        }
    try:
        prediction = json.loads(raw)["predictions"][0]
        return 200, {
            "digit": int(prediction["digit"]),
            "probabilities": [float(p) for p in prediction["probabilities"]],
            # A version registered before the served model judged this answers without it.
            "digit_found": bool(prediction.get("digit_found", True)),
        }
    except (ValueError, KeyError, IndexError, TypeError):
        log.warning("unexpected answer from the model server: %.200r", raw)
        return 502, {"error": "The model server's answer was not a digit reading."}


def _server_message(raw: bytes) -> str:
    """The `message` of an MLflow error body, else the body itself (shortened)."""
    try:
        message = str(json.loads(raw)["message"])
    except (ValueError, KeyError, TypeError):
        return raw.decode(errors="replace")[:300] or "no message"
    # MLflow puts a dump of the request before the model's own words: "Failed to predict data
    # '<the request>'. \nError: <what the model said>".
    return message.split("\nError: ", 1)[-1]
