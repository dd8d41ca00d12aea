"""The HTTP ingress: a FastAPI app over the model deployments' handles.

`DertaIngress` holds one `DertaModel` handle per served model name; `build_api` is its FastAPI app: the guard
(serve/guard.py: API key, body limit, metrics, 500s), validation errors in OpenAI's shape, the derta routes
(/generate, /probe), service routes (/health, /ready, /info) and the OpenAI routes (serve/openai_routes.py).
"""
from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
from typing import Callable

from fastapi import Request
from ray import serve

from derta.config import DertaConfig, ServeConfig
from serve.deployment import deployment_capacity, model_capacity
from serve.errors import error_response, json_error, sse, stream_error
from serve.guard import HEALTH_ROUTE, Admission, Guard, HttpMetrics, request_id
from serve.openai_routes import add_openai_routes
from serve.protocol import MAX_CHARS_PER_TOKEN, GenerateRequest, ProbeRequest, Rejection, ServeError, field_error


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(host: str, api_key: str | None, insecure: bool) -> None:
    """Refuse to serve without an API key on an address other machines can reach, unless told to."""
    if not api_key and not insecure and not is_loopback(host):
        raise ValueError(
            f"refusing to serve on {host} without an API key: anyone who can reach it could use the model. "
            "Set serve.api_key or DERTA_API_KEY, bind 127.0.0.1, or pass --insecure (serve.insecure=true)")


def proxy_host() -> str | None:
    """The host Serve's HTTP proxies bind (serve_config.yaml http_options.host), if Serve can tell."""
    try:
        from ray.serve.context import _get_global_client

        return _get_global_client().http_config.host
    except Exception:  # noqa: BLE001 -- not under a Serve controller (e.g. a plain ASGI test)
        return None


@serve.deployment
@serve.ingress()
class DertaIngress:
    """FastAPI routes over the DertaModel handles (one per served model name)."""

    def __init__(self, models: dict, config: dict):
        self.models = models
        self.cfg = DertaConfig.model_validate(config)
        self.api_key = self.cfg.serve.api_key
        self.default_model = self.cfg.serve.model_name
        host = proxy_host()
        if host:
            check_exposure(host, self.api_key, self.cfg.serve.insecure)
        warn_without_direct_ingress(self.cfg.serve.direct_ingress)
        self.metrics = HttpMetrics()
        self.admission = Admission(None)  # the guard's overload fast path, off until learn_capacity knows the limit
        self.capacity_task: asyncio.Future | None = None
        self.capacity_checked = float("-inf")

    def __serve_build_asgi_app__(self):
        return build_api(self)

    # ------------------------------------------------------------------------------------ plumbing
    def handle(self, name: str | None):
        name = name or self.default_model
        if name not in self.models:
            raise ServeError(404, f"unknown model {name!r}; served models: {sorted(self.models)}", param="model",
                             code="model_not_found")
        return self.models[name]

    def check_max_tokens(self, value: int, field_name: str) -> None:
        limit = self.cfg.serve.max_new_tokens
        if value > limit:
            raise field_error((field_name,), f"{field_name}={value} exceeds serve.max_new_tokens={limit}")

    def max_body_bytes(self) -> int:
        return self.cfg.serve.max_input_tokens * MAX_CHARS_PER_TOKEN * 4 + (1 << 20)

    def learn_capacity(self) -> None:
        """Give the guard's admission limit what the model deployments can hold at their largest, read from their
        live config at Serve's controller (serve_config.yaml may set it apart from the derta config; asking the
        models instead would compete with the traffic for their slots). Re-read every CAPACITY_REFRESH_S (a
        redeploy may change it). Until it is known, and with an unbounded queue, Serve's back-pressure alone
        rejects."""
        if self.capacity_task is None and time.monotonic() - self.capacity_checked >= CAPACITY_REFRESH_S:
            self.capacity_checked = time.monotonic()
            self.capacity_task = asyncio.ensure_future(self._fetch_capacity())

    async def _fetch_capacity(self) -> None:
        try:
            capacities = await asyncio.to_thread(live_capacities, list(self.models.values()))
            replicas = await asyncio.to_thread(running_ingress_replicas)
            self.admission.capacity = None if None in capacities else ingress_share(sum(capacities), replicas)
        except Exception:  # noqa: BLE001 -- not under a Serve controller (a plain ASGI test): no fast path
            pass
        finally:
            self.capacity_task = None

    async def admitted(self, start: Callable):
        """`await start()`, retried while Serve's router over-rejects a request the guard admitted.

        Serve's router counts a request as queued until a replica has accepted it, so in a burst it turns away
        requests while earlier ones are still being assigned (ray/serve/_private/router.py
        `wrap_request_assignment` says so): with the burst straight at the ingress (serve.direct_ingress) only 4-5
        of a capacity of 8 got in. A request the guard's Admission let in (the models' live capacity is not
        exhausted) therefore retries its BackPressureError for up to ROUTER_RETRY_S; without a known capacity the
        first one stands."""
        from ray.serve.exceptions import BackPressureError

        deadline = time.monotonic() + ROUTER_RETRY_S
        while True:
            try:
                return await start()
            except BackPressureError:
                if self.admission.capacity is None or time.monotonic() >= deadline:
                    raise
            await asyncio.sleep(ROUTER_RETRY_PAUSE_S)

    async def call(self, model: str | None, method: str, *args):
        """Await one DertaModel method; map rejections and Serve errors to JSON responses."""
        self.learn_capacity()
        try:
            handle = self.handle(model)
            result = await self.admitted(lambda: getattr(handle, method).remote(*args))
        except Exception as err:
            return error_response(err)
        return error_response(result) if isinstance(result, Rejection) else result

    async def stream(self, model: str | None, payload: dict, to_sse: Callable[[dict], list[str]], rid: str = "-"):
        """Open a DertaModel stream; errors before its first event become normal HTTP errors."""
        from fastapi.responses import StreamingResponse

        self.learn_capacity()
        async def open_stream():
            events = self.handle(model).options(stream=True).generate_stream.remote(payload)
            return events, await events.__anext__()  # the "start" event, or why the request was rejected

        try:
            events, start = await self.admitted(open_stream)
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
            except Exception as err:  # after the 200 header: report in-band, without internals
                yield sse(stream_error(err, rid))
            finally:
                if not finished:
                    events.cancel()

        return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def ready(self) -> bool:
        self.learn_capacity()
        try:
            states = await asyncio.wait_for(asyncio.gather(*(h.ready.remote() for h in self.models.values())), 5)
        except Exception:
            return False
        return all(states)


def warn_without_direct_ingress(wanted: bool) -> bool:
    """serve.direct_ingress is decided when Serve starts (RAY_SERVE_ENABLE_DIRECT_INGRESS in the cluster's
    environment), not by the app: say so in the replica log when the config asks for it and the cluster lacks it
    (e.g. `serve run` or a RayService without the variable). Returns whether it warned."""
    from ray.serve._private.constants import RAY_SERVE_ENABLE_DIRECT_INGRESS

    if wanted and not RAY_SERVE_ENABLE_DIRECT_INGRESS:
        logging.getLogger("ray.serve").warning(
            "serve.direct_ingress=true, but this cluster's Serve runs without direct ingress: set "
            "RAY_SERVE_ENABLE_DIRECT_INGRESS=1 and RAY_SERVE_ENABLE_HA_PROXY=1 in the environment Ray starts with; "
            "serving through Serve's proxy only")
        return True
    return False


CAPACITY_REFRESH_S = 30
ROUTER_RETRY_S, ROUTER_RETRY_PAUSE_S = 0.2, 0.005


def live_capacities(handles) -> list[int | None]:
    """Each model deployment's capacity (serve/deployment.py deployment_capacity) from Serve's controller."""
    from ray.serve.context import _get_global_client

    client, app = _get_global_client(), serve.get_replica_context().app_name
    return [deployment_capacity(client.get_deployment_info(h.deployment_name, app)[0].deployment_config)
            for h in handles]


def running_ingress_replicas() -> int:
    """How many replicas of this ingress deployment are running now (Serve's status; at least this one)."""
    context = serve.get_replica_context()
    app = serve.status().applications.get(context.app_name)
    deployment = app.deployments.get(context.deployment) if app else None
    return max(1, deployment.replica_states.get("RUNNING", 0) if deployment else 1)


def ingress_share(capacity: int, replicas: int) -> int:
    """One ingress replica's part of the models' capacity. HAProxy (serve.direct_ingress) or Serve's proxy spreads
    requests evenly over the ingress replicas, so with n of them each admits ceil(capacity / n): together they
    admit the models' capacity and answer the rest with the guard's fast 503 (if each admitted the whole capacity,
    n - 1 shares of a burst would pass the guard and wait ROUTER_RETRY_S for Serve's back-pressure 503)."""
    return -(-capacity // max(1, replicas))


def build_api(ingress: DertaIngress):
    """The FastAPI app of one DertaIngress replica; routes close over it."""
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError

    api = FastAPI(title="derta", description="DeRTa refusal-aware generation, probe and OpenAI-compatible API")

    @api.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, err: RequestValidationError):
        """422 naming each bad field; the offending input is not echoed (it may be huge, NaN or binary)."""
        return validation_error(err.errors())

    api.add_middleware(Guard, api_key=ingress.api_key, max_body_bytes=ingress.max_body_bytes(),
                       metrics=ingress.metrics, admission=ingress.admission)
    add_service_routes(api, ingress)
    add_derta_routes(api, ingress)
    add_openai_routes(api, ingress)
    return api


def validation_error(errors: list[dict]):
    """FastAPI's validation errors as one OpenAI error: every bad field in the message, the first as `param`."""
    fields = [".".join(str(part) for part in e.get("loc", ()) if part != "body") or "body" for e in errors]
    message = "; ".join(f"{name}: {e.get('msg', 'invalid')}" for name, e in zip(fields, errors))
    return json_error(422, message or "invalid request body", fields[0] if fields else None, "invalid_value")


def add_service_routes(api, ingress: DertaIngress) -> None:
    @api.get(HEALTH_ROUTE)
    async def health():
        return {"status": "ok"}

    @api.get("/ready")
    async def ready():
        if await ingress.ready():
            return {"status": "ready", "models": sorted(ingress.models)}
        return json_error(503, "model not loaded yet", code="not_ready")

    @api.get("/info")
    async def info():
        models = {name: await ingress.call(name, "info") for name in ingress.models}
        failed = next((m for m in models.values() if not isinstance(m, dict)), None)
        return failed or {"default_model": ingress.default_model, "models": models,
                          "admission_capacity": ingress.admission.capacity}


def add_derta_routes(api, ingress: DertaIngress) -> None:
    @api.post("/generate")
    async def generate(body: GenerateRequest, request: Request):
        try:
            ingress.check_max_tokens(body.max_new_tokens, "max_new_tokens")
        except ServeError as err:
            return error_response(err)
        payload = body.model_dump(exclude={"model", "stream"})
        if body.stream:
            return await ingress.stream(body.model, payload, lambda event: [sse(event)], request_id(request.scope))
        return await ingress.call(body.model, "generate", payload)

    @api.post("/probe")
    async def probe(body: ProbeRequest):
        return await ingress.call(body.model, "probe", body.model_dump(exclude={"model"}))


# Requests the ingress takes per request the models can hold: overload must reach the ingress to get its fast JSON
# 503 (serve/guard.py Admission). With room for only the admitted ones, Serve's proxy held the rest of a burst
# and retried them with growing back-off (50, 100, 200, 400 ms ...): 503s took up to 1.4 s.
INGRESS_BURST_FACTOR = 8


def ingress_deployment_options(s: ServeConfig, models: int = 1) -> dict:
    """The ingress only waits on DertaModel: it takes INGRESS_BURST_FACTOR x what the models can hold, plus room
    for /health and /ready, and turns the excess away itself (503 + Retry-After in OpenAI's shape). Beyond even
    that, Serve's proxy queues a little and then rejects with its own 503, which also carries Retry-After."""
    from ray.serve.config import BackpressureConfig

    from serve.errors import RETRY_AFTER_S

    capacity = model_capacity(s, models)
    if capacity is None:
        ongoing, queued = models * s.num_replicas * s.max_ongoing_requests + 8, -1
    else:
        ongoing = INGRESS_BURST_FACTOR * capacity + 8
        queued = 2 * ongoing  # the proxy counts requests as queued while it picks a replica: not too tight
    return {"ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": ongoing, "max_queued_requests": queued,
            "backpressure_config": BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S)}
