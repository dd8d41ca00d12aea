"""The ASGI middleware in front of every route: API key, body limit, metrics, and the last-resort 500.

Pure ASGI (not Starlette's BaseHTTPMiddleware) so that it sees the body as it arrives: the limit counts the bytes
actually received, so a chunked body or a lying Content-Length cannot get past it, and streams pass through
untouched. Anything a route raises unexpectedly becomes a counted JSON 500 in OpenAI's shape, logged with the
request id (Serve's proxy puts that id on every response as `X-Request-ID` and in every replica log line).

`Admission` is the overload fast path: a model request that finds the models' whole capacity already inside the
ingress is answered 503 + `Retry-After` here, before its body is read or anything is awaited, instead of going
through FastAPI, validation and the model handle only to meet Serve's back-pressure (bench_serve.py `overload`).
"""
from __future__ import annotations

import logging
import secrets
import time

from serve.errors import json_error

logger = logging.getLogger("ray.serve")
HEALTH_ROUTE = "/health"
ROUTES = ("/generate", "/probe", "/v1/completions", "/v1/chat/completions", "/v1/models", HEALTH_ROUTE,
          "/ready", "/info", "/metrics", "/openapi.json", "/docs")
MODEL_ROUTES = ("/generate", "/probe", "/v1/completions", "/v1/chat/completions")  # the routes that await a model
LATENCY_MS = [1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000, 60000]


class BodyTooLarge(Exception):
    pass


class HttpMetrics:
    """Prometheus metrics through Ray Serve (exported on each node's metrics port with Serve's own)."""

    def __init__(self):
        from ray.serve.metrics import Counter, Gauge, Histogram

        self.requests = Counter("derta_http_requests", description="HTTP requests by route and status",
                                tag_keys=("route", "status"))
        self.errors = Counter("derta_http_errors", description="HTTP 4xx/5xx responses by route and class",
                              tag_keys=("route", "class"))
        self.latency = Histogram("derta_http_latency_ms", description="HTTP request latency until the response "
                                 "ends (ms)", boundaries=LATENCY_MS, tag_keys=("route",))
        self.in_flight = Gauge("derta_http_in_flight", description="requests in this ingress replica now")
        self.current = 0

    def started(self) -> None:
        self.current += 1
        self.in_flight.set(self.current)

    def finished(self, route: str, status: int, seconds: float) -> None:
        self.current -= 1
        self.in_flight.set(self.current)
        self.requests.inc(tags={"route": route, "status": str(status)})
        if status >= 400:
            self.errors.inc(tags={"route": route, "class": f"{status // 100}xx"})
        self.latency.observe(seconds * 1000, tags={"route": route})


class Admission:
    """At most `capacity` model requests inside this ingress replica at once; the newest beyond it is turned away.

    `capacity` is what the model deployments can hold at their largest (replicas x max_ongoing_requests +
    max_queued_requests, summed over served models; the ingress learns it from their live Serve config; with n
    ingress replicas each holds ceil(1/n) of it, serve/ingress.py ingress_share), so this
    only rejects what Serve's own back-pressure would reject too (or, with several models, a request arriving while
    the models together are full); Serve's per-deployment check stays the exact one behind it. None: no limit
    (not known yet, or an unbounded queue)."""

    def __init__(self, capacity: int | None):
        self.capacity, self.inside = capacity, 0

    def enter(self) -> bool:
        if self.capacity is not None and self.inside >= self.capacity:
            return False
        self.inside += 1
        return True

    def leave(self) -> None:
        self.inside -= 1


def relative_route(scope) -> str:
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root):] or "/"
    return path


def header(scope, name: bytes) -> str:
    for key, value in scope.get("headers", []):
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


def request_id(scope) -> str:
    return header(scope, b"x-request-id") or "-"


class Guard:
    def __init__(self, app, api_key: str | None, max_body_bytes: int, metrics: HttpMetrics | None,
                 admission: Admission | None = None):
        self.app, self.api_key, self.max_body_bytes, self.metrics = app, api_key, max_body_bytes, metrics
        self.admission = admission or Admission(None)

    def authorized(self, scope) -> bool:
        if not self.api_key:
            return True
        return secrets.compare_digest(header(scope, b"authorization").encode(), f"Bearer {self.api_key}".encode())

    async def read_body(self, receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body"):
                break
        return b"".join(chunks)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = relative_route(scope)
        route_tag = route if route in ROUTES else "other"
        started, status, response_started = time.perf_counter(), [500], [False]

        async def tracked_send(message):
            if message["type"] == "http.response.start":
                status[0], response_started[0] = message["status"], True
            await send(message)

        if self.metrics:
            self.metrics.started()
        admitted = False
        try:
            if route != HEALTH_ROUTE and not self.authorized(scope):
                response = json_error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                                      code="invalid_api_key")
                return await response(scope, receive, tracked_send)
            if route in MODEL_ROUTES:
                admitted = self.admission.enter()
                if not admitted:
                    return await json_error(503, "server overloaded, retry later", code="overloaded")(
                        scope, receive, tracked_send)
            try:
                declared = int(header(scope, b"content-length") or 0)
            except ValueError:
                declared = 0
            try:
                if declared > self.max_body_bytes:
                    raise BodyTooLarge
                body = await self.read_body(receive)
            except BodyTooLarge:
                response = json_error(413, f"request body exceeds {self.max_body_bytes} bytes", code="body_too_large")
                return await response(scope, receive, tracked_send)
            await self.app(scope, replay(body, receive), tracked_send)
        except Exception as err:  # noqa: BLE001 -- the last resort: log it, count it, answer in JSON
            logger.error("request %s %s failed", request_id(scope), route, exc_info=err)
            if not response_started[0]:
                response = json_error(500, f"internal error (request id {request_id(scope)})", code="internal_error")
                await response(scope, receive, tracked_send)
        finally:
            if admitted:
                self.admission.leave()
            if self.metrics:
                self.metrics.finished(route_tag, status[0], time.perf_counter() - started)


def replay(body: bytes, receive):
    """A `receive` that yields the already-read body once, then defers to the connection (disconnects)."""
    sent = [False]

    async def receive_again():
        if not sent[0]:
            sent[0] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return receive_again
