"""Overload fast path without Ray: the guard's admission limit (503 + Retry-After before the route runs), the
ingress deployment options that let a burst reach it, and the model replica's lower CPU priority.
Deterministic: requests are held in flight by events, never by timing."""
from __future__ import annotations

import asyncio
import os
import threading

from fastapi import Request


def admission_app(capacity: int | None):
    """A guarded app whose /generate holds every request until `release` is set; counts route entries."""
    from fastapi import FastAPI

    from serve.guard import Admission, Guard

    api = FastAPI()
    api.state.entered, api.state.release = 0, asyncio.Event()

    @api.post("/generate")
    async def generate(request: Request):
        api.state.entered += 1
        body = await request.json()
        if body.get("fail"):
            raise RuntimeError("model failed")
        await api.state.release.wait()
        return {"ok": True}

    @api.get("/health")
    async def health():
        return {"status": "ok"}

    admission = Admission(capacity)
    api.add_middleware(Guard, api_key=None, max_body_bytes=10_000, metrics=None, admission=admission)
    return api, admission


async def wait_until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0)


def test_admission_turns_away_model_requests_beyond_capacity_before_the_route_runs():
    import httpx

    async def scenario():
        app, admission = admission_app(capacity=2)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            held = [asyncio.create_task(client.post("/generate", json={"prompt": str(i)})) for i in range(2)]
            await wait_until(lambda: app.state.entered == 2)
            rejected = await client.post("/generate", json={"prompt": "one too many"})
            health = await client.get("/health")  # not a model route: never turned away
            assert app.state.entered == 2 and admission.inside == 2
            app.state.release.set()
            done = await asyncio.gather(*held)
            assert admission.inside == 0
            failed = await client.post("/generate", json={"fail": True})  # a 500 frees its slot too
            assert admission.inside == 0
            app.state.release.set()
            after = await client.post("/generate", json={"prompt": "room again"})
        return rejected, health, done, failed, after

    rejected, health, done, failed, after = asyncio.run(scenario())
    assert rejected.status_code == 503 and rejected.headers["retry-after"] == "1", rejected.headers
    error = rejected.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "overloaded", error
    assert health.status_code == 200
    assert [r.status_code for r in done] == [200, 200]
    assert failed.status_code == 500 and after.status_code == 200


def test_admission_without_capacity_admits_everything():
    import httpx

    async def scenario():
        app, admission = admission_app(capacity=None)
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            held = [asyncio.create_task(client.post("/generate", json={})) for _ in range(20)]
            await wait_until(lambda: app.state.entered == 20)
            app.state.release.set()
            return [r.status_code for r in await asyncio.gather(*held)]

    assert asyncio.run(scenario()) == [200] * 20


def test_ingress_takes_a_burst_beyond_model_capacity_and_proxy_rejections_carry_retry_after():
    from derta.config import ServeConfig
    from serve.errors import RETRY_AFTER_S
    from serve.deployment import model_capacity
    from serve.ingress import INGRESS_BURST_FACTOR, DertaIngress, ingress_deployment_options

    small = ServeConfig(max_ongoing_requests=4, max_queued_requests=4)
    assert model_capacity(small) == 8 and model_capacity(small, models=3) == 24
    autoscaled = ServeConfig(max_ongoing_requests=16, max_queued_requests=64,
                             autoscaling={"min_replicas": 1, "max_replicas": 4})
    assert model_capacity(autoscaled) == 4 * 16 + 64  # the largest the model deployment can get
    for s, models in ((small, 1), (small, 3), (autoscaled, 1), (ServeConfig(), 2)):
        options = ingress_deployment_options(s, models)
        # the ingress must take a whole 4x-capacity burst: the excess gets its JSON 503 there, not proxy back-off
        assert options["max_ongoing_requests"] >= INGRESS_BURST_FACTOR * model_capacity(s, models) >= \
            4 * model_capacity(s, models)
        assert options["max_queued_requests"] >= options["max_ongoing_requests"]
        assert options["backpressure_config"].status_code == 503
        assert options["backpressure_config"].retry_after_s == RETRY_AFTER_S
        DertaIngress.options(**options)  # Serve accepts them
    unbounded = ServeConfig(max_queued_requests=-1)
    assert model_capacity(unbounded) is None
    assert ingress_deployment_options(unbounded)["max_queued_requests"] == -1


def test_lower_priority_renices_every_thread_of_the_process(monkeypatch):
    """Linux niceness is per thread: every thread alive now (incl. ones started before, e.g. Ray's) is reniced."""
    from serve.deployment import lower_priority

    stop = threading.Event()
    worker = threading.Thread(target=stop.wait)
    worker.start()
    calls: dict[int, int] = {}
    monkeypatch.setattr(os, "getpriority", lambda which, tid: 3)
    monkeypatch.setattr(os, "setpriority", lambda which, tid, value: calls.__setitem__(tid, value))
    try:
        lower_priority(10)
        alive = {int(tid) for tid in os.listdir("/proc/self/task")}
    finally:
        stop.set()
        worker.join()
    assert worker.native_id in calls and threading.get_native_id() in calls
    assert alive <= set(calls) and set(calls.values()) == {13}
    calls.clear()
    lower_priority(30)  # clamped to the lowest priority
    assert set(calls.values()) == {19}
    calls.clear()
    lower_priority(0)
    assert calls == {}


def test_deployment_capacity_reads_the_live_serve_config():
    """The fast path's limit comes from the model deployment's own Serve config (serve_config.yaml may override the
    derta preset), computed like model_capacity computes it from the preset."""
    from ray.serve._private.config import DeploymentConfig

    from derta.config import ServeConfig
    from serve.deployment import deployment_capacity, model_capacity, model_deployment_options

    for s in (ServeConfig(max_ongoing_requests=4, max_queued_requests=4, num_replicas=3),
              ServeConfig(max_ongoing_requests=16, max_queued_requests=64,
                          autoscaling={"min_replicas": 1, "max_replicas": 4}),
              ServeConfig(max_queued_requests=-1)):
        options = model_deployment_options(s)
        options.pop("ray_actor_options")
        live = DeploymentConfig(**options)
        assert deployment_capacity(live) == model_capacity(s)


def test_an_admitted_request_outlasts_the_routers_burst_over_rejection(monkeypatch):
    """Serve's router rejects while earlier requests are still being assigned; a request the guard admitted retries
    (bounded), one without a known capacity or past the retry window gets the 503."""
    from types import SimpleNamespace

    from ray.serve.exceptions import BackPressureError

    from serve.guard import Admission
    from serve.ingress import DertaIngress

    admitted = DertaIngress.func_or_class.admitted

    def flaky(failures: int):
        calls = []

        async def start():
            calls.append(1)
            if len(calls) <= failures:
                raise BackPressureError(num_queued_requests=4, max_queued_requests=4)
            return "ok"
        return start, calls

    import serve.ingress

    monkeypatch.setattr(serve.ingress, "ROUTER_RETRY_S", 600)  # a window no CPU contention can exhaust
    start, calls = flaky(3)
    assert asyncio.run(admitted(SimpleNamespace(admission=Admission(8)), start)) == "ok" and len(calls) == 4
    start, calls = flaky(1)
    try:
        asyncio.run(admitted(SimpleNamespace(admission=Admission(None)), start))
        raise AssertionError("no capacity known: the router's rejection must stand")
    except BackPressureError:
        assert len(calls) == 1
    monkeypatch.setattr(serve.ingress, "ROUTER_RETRY_S", 0)
    start, calls = flaky(10**9)
    try:  # never accepted: the retries end (ROUTER_RETRY_S) and the 503 stands
        asyncio.run(admitted(SimpleNamespace(admission=Admission(8)), start))
        raise AssertionError("retries must end")
    except BackPressureError:
        assert len(calls) >= 1


def test_each_ingress_replica_admits_its_share_of_the_models_capacity(monkeypatch):
    """With n ingress replicas (autoscaling; HAProxy spreads requests over them) each admits ceil(capacity / n):
    together exactly the models' capacity, never less, and one replica alone the whole of it."""
    from types import SimpleNamespace

    from serve import ingress

    for capacity in (1, 7, 8, 64):
        for replicas in (1, 2, 3, 4):
            share = ingress.ingress_share(capacity, replicas)
            assert share * replicas >= capacity and (share - 1) * replicas < capacity
    assert ingress.ingress_share(8, 1) == 8 and ingress.ingress_share(8, 0) == 8

    def status_with(running: int):
        deployment = SimpleNamespace(replica_states={"RUNNING": running, "STARTING": 1} if running else {})
        app = SimpleNamespace(deployments={"DertaIngress": deployment})
        return lambda: SimpleNamespace(applications={"derta": app})

    monkeypatch.setattr(ingress.serve, "get_replica_context",
                        lambda: SimpleNamespace(app_name="derta", deployment="DertaIngress"))
    for running, expected in ((3, 3), (1, 1), (0, 1)):  # starting replicas take no traffic; itself at least
        monkeypatch.setattr(ingress.serve, "status", status_with(running))
        assert ingress.running_ingress_replicas() == expected
