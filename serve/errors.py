"""HTTP error responses and SSE framing shared by the ingress and the OpenAI routes."""
from __future__ import annotations

import asyncio
import json
from typing import Any

from serve.protocol import Rejection, ServeError


def json_error(status_code: int, detail: Any):
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": detail}, status_code=status_code)


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def error_response(err: Exception | Rejection):
    from ray.exceptions import RayActorError  # ActorDiedError, ActorUnavailableError: a replica's node went away
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(err, (ServeError, Rejection)):
        return json_error(err.status_code, err.detail)
    if isinstance(err, (RayActorError, DeploymentUnavailableError)):
        return json_error(503, "model replica unavailable, retry later")
    if isinstance(err, BackPressureError):
        return json_error(503, f"server overloaded, retry later ({err.message})")
    if isinstance(err, (asyncio.TimeoutError, TimeoutError)):
        return json_error(503, "model timed out")
    raise err
