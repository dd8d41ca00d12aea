"""Error responses in OpenAI's shape, for every route, and SSE framing.

Every error body is `{"error": {"message", "type", "param", "code"}}`; every 503 carries `Retry-After`. Messages
are written for the client: unexpected exceptions are logged server-side and answered with a generic 500 that
names the request id, never with `str(err)` or a traceback.
"""
from __future__ import annotations

import asyncio
import json
import logging

from serve.protocol import Rejection, ServeError

logger = logging.getLogger("ray.serve")
RETRY_AFTER_S = 1
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "not_found_error", 413: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error", 500: "internal_error", 503: "service_unavailable_error"}


def error_body(status_code: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": ERROR_TYPES.get(status_code, "invalid_request_error"),
                      "param": param, "code": code}}


def json_error(status_code: int, message: str, param: str | None = None, code: str | None = None):
    from fastapi.responses import JSONResponse

    headers = {"Retry-After": str(RETRY_AFTER_S)} if status_code == 503 else None
    return JSONResponse(error_body(status_code, message, param, code), status_code=status_code, headers=headers)


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def known_failure(err: BaseException) -> ServeError | None:
    """Failures with a status of their own: client errors, and the model tier being unavailable or overloaded."""
    from ray.exceptions import RayActorError  # ActorDiedError, ActorUnavailableError: a replica's node went away
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(err, ServeError):
        return err
    if isinstance(err, (RayActorError, DeploymentUnavailableError)):
        return ServeError(503, "model replica unavailable, retry later", code="replica_unavailable")
    if isinstance(err, BackPressureError):
        return ServeError(503, "server overloaded, retry later", code="overloaded")
    if isinstance(err, (asyncio.TimeoutError, TimeoutError)):
        return ServeError(503, "model timed out, retry later", code="timeout")
    return None


def error_response(err: Exception | Rejection):
    """The JSON error for a rejection or a known failure; anything else is re-raised (the guard makes it a 500)."""
    if isinstance(err, Rejection):
        return json_error(err.status_code, err.message, err.param, err.code)
    known = known_failure(err)
    if known is None:
        raise err
    return json_error(known.status_code, known.message, known.param, known.code)


def stream_error(err: BaseException, request_id: str | None) -> dict:
    """The in-band error event of a stream that already sent its 200 header."""
    known = known_failure(err)
    if known is None:
        logger.error("stream %s failed", request_id, exc_info=err)
        return error_body(500, f"internal error (request id {request_id})", code="internal_error")
    return error_body(known.status_code, known.message, known.param, known.code)
