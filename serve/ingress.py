"""The HTTP ingress: a FastAPI app over the model deployments' handles.

`DertaIngress` holds one `DertaModel` handle per served model name; `build_api` is its FastAPI app: API key,
body limit, validation errors, the derta routes (/generate, /probe), service routes (/health, /ready, /info) and
the OpenAI routes (serve/openai_routes.py).
"""
from __future__ import annotations

import asyncio
import secrets
from typing import Callable

from ray import serve

from derta.config import DertaConfig, ServeConfig
from serve.errors import error_response, json_error, sse
from serve.openai_routes import add_openai_routes
from serve.protocol import MAX_CHARS_PER_TOKEN, GenerateRequest, ProbeRequest, Rejection, ServeError, field_error

HEALTH_ROUTE = "/health"
ROUTES = ("/generate", "/probe", "/v1/completions", "/v1/chat/completions", "/v1/models", HEALTH_ROUTE,
          "/ready", "/info")


@serve.deployment
@serve.ingress()
class DertaIngress:
    """FastAPI routes over the DertaModel handles (one per served model name)."""

    def __init__(self, models: dict, config: dict):
        from ray.serve.metrics import Counter

        self.models = models
        self.cfg = DertaConfig.model_validate(config)
        self.api_key = self.cfg.serve.api_key
        self.default_model = self.cfg.serve.model_name
        self.requests = Counter("derta_http_requests", description="HTTP requests by route and status",
                                tag_keys=("route", "status"))

    def __serve_build_asgi_app__(self):
        return build_api(self)

    # ------------------------------------------------------------------------------------ plumbing
    def handle(self, name: str | None):
        name = name or self.default_model
        if name not in self.models:
            raise ServeError(404, f"unknown model {name!r}; served models: {sorted(self.models)}")
        return self.models[name]

    def check_max_tokens(self, value: int, field_name: str) -> None:
        limit = self.cfg.serve.max_new_tokens
        if value > limit:
            raise field_error((field_name,), f"{field_name}={value} exceeds serve.max_new_tokens={limit}")

    def authorized(self, request) -> bool:
        if not self.api_key:
            return True
        header = request.headers.get("authorization", "")
        return secrets.compare_digest(header.encode(), f"Bearer {self.api_key}".encode())

    def max_body_bytes(self) -> int:
        return self.cfg.serve.max_input_tokens * MAX_CHARS_PER_TOKEN * 4 + (1 << 20)

    async def call(self, model: str | None, method: str, *args):
        """Await one DertaModel method; map rejections and Serve errors to JSON responses."""
        try:
            result = await getattr(self.handle(model), method).remote(*args)
        except Exception as err:
            return error_response(err)
        return error_response(result) if isinstance(result, Rejection) else result

    async def stream(self, model: str | None, payload: dict, to_sse: Callable[[dict], list[str]]):
        """Open a DertaModel stream; errors before its first event become normal HTTP errors."""
        from fastapi.responses import StreamingResponse

        try:
            events = self.handle(model).options(stream=True).generate_stream.remote(payload)
            start = await events.__anext__()  # the "start" event, or why the request was rejected
        except Exception as err:
            return error_response(err)
        if isinstance(start, Rejection):
            return error_response(start)

        async def body():
            finished = False
            try:
                for chunk in to_sse(start):
                    yield chunk
                async for event in events:
                    for chunk in to_sse(event):
                        yield chunk
                finished = True
            except Exception as err:  # after the 200 header: report in-band
                yield sse({"type": "error", "error": str(err)})
            finally:
                if not finished:
                    events.cancel()

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def ready(self) -> bool:
        try:
            states = await asyncio.wait_for(asyncio.gather(*(h.ready.remote() for h in self.models.values())), 5)
        except Exception:
            return False
        return all(states)


def relative_route(request) -> str:
    path, root = request.url.path, request.scope.get("root_path", "")
    if root and path.startswith(root):
        return path[len(root):] or "/"
    return path


def content_length(request) -> int:
    try:
        return int(request.headers.get("content-length") or 0)
    except ValueError:
        return 0


def build_api(ingress: DertaIngress):
    """The FastAPI app of one DertaIngress replica; routes close over it."""
    from fastapi import FastAPI, Request

    from fastapi.exceptions import RequestValidationError

    api = FastAPI(title="derta", description="DeRTa refusal-aware generation, probe and OpenAI-compatible API")

    @api.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        """422 naming each bad field; the offending input is not echoed (it may be huge, NaN or binary)."""
        return json_error(422, [{key: e[key] for key in ("loc", "msg", "type") if key in e} for e in err.errors()])

    @api.middleware("http")
    async def guard(request: Request, call_next):
        route = relative_route(request)
        if route != HEALTH_ROUTE and not ingress.authorized(request):
            response = json_error(401, "missing or wrong API key: send 'Authorization: Bearer <key>'")
        elif content_length(request) > ingress.max_body_bytes():
            response = json_error(413, f"request body exceeds {ingress.max_body_bytes()} bytes")
        else:
            response = await call_next(request)
        ingress.requests.inc(tags={"route": route if route in ROUTES else "other", "status": str(response.status_code)})
        return response

    add_service_routes(api, ingress)
    add_derta_routes(api, ingress)
    add_openai_routes(api, ingress)
    return api


def add_service_routes(api, ingress: DertaIngress) -> None:
    @api.get(HEALTH_ROUTE)
    async def health():
        return {"status": "ok"}

    @api.get("/ready")
    async def ready():
        if await ingress.ready():
            return {"status": "ready", "models": sorted(ingress.models)}
        return json_error(503, "model not loaded yet")

    @api.get("/info")
    async def info():
        models = {name: await ingress.call(name, "info") for name in ingress.models}
        failed = next((m for m in models.values() if not isinstance(m, dict)), None)
        return failed or {"default_model": ingress.default_model, "models": models}


def add_derta_routes(api, ingress: DertaIngress) -> None:
    @api.post("/generate")
    async def generate(body: GenerateRequest):
        try:
            ingress.check_max_tokens(body.max_new_tokens, "max_new_tokens")
        except ServeError as err:
            return error_response(err)
        payload = body.model_dump(exclude={"model", "stream"})
        if body.stream:
            return await ingress.stream(body.model, payload, lambda event: [sse(event)])
        return await ingress.call(body.model, "generate", payload)

    @api.post("/probe")
    async def probe(body: ProbeRequest):
        return await ingress.call(body.model, "probe", body.model_dump(exclude={"model"}))


def ingress_deployment_options(s: ServeConfig) -> dict:
    """The ingress only waits on DertaModel: let it hold everything the model can admit, plus room for
    /health and /ready, so overload surfaces as the model's 503 rather than a stuck proxy."""
    admitted = s.max_ongoing_requests + max(s.max_queued_requests, 0) + 8
    # the proxy counts requests as queued while it picks a replica, so a tight bound here would reject early
    queued = -1 if s.max_queued_requests == -1 else 2 * admitted
    return {"ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": admitted, "max_queued_requests": queued}
