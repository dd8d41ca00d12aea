"""The HTTP layer without Ray: the guard middleware (auth, body limit on real bytes, JSON 500s), error shapes,
and the refusal to serve an open port without a key. Real FastAPI app + httpx's ASGI transport."""
from __future__ import annotations

import asyncio

import pytest
from fastapi import Request

LIMIT = 1000


def guarded_app(api_key: str | None = None):
    from fastapi import FastAPI

    from serve.guard import Guard

    api = FastAPI()

    @api.post("/echo")
    async def echo(request: Request):
        return {"bytes": len(await request.body())}

    @api.get("/boom")
    async def boom():
        raise RuntimeError("secret internal detail /home/user/model")

    @api.get("/health")
    async def health():
        return {"status": "ok"}

    api.add_middleware(Guard, api_key=api_key, max_body_bytes=LIMIT, metrics=None)
    return api


def request(app, method: str, path: str, **kwargs):
    import httpx

    async def go():
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.request(method, path, **kwargs)

    return asyncio.run(go())


def assert_openai_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    if code:
        assert error["code"] == code, error
    return error


def test_body_limit_counts_the_bytes_actually_sent():
    app = guarded_app()
    assert request(app, "POST", "/echo", content=b"x" * LIMIT).json() == {"bytes": LIMIT}

    async def chunks():  # no Content-Length: chunked transfer encoding
        for _ in range(10):
            yield b"x" * 200

    assert_openai_error(request(app, "POST", "/echo", content=chunks()), 413, "body_too_large")
    lying = request(app, "POST", "/echo", content=b"x" * (LIMIT + 1), headers={"content-length": "10"})
    assert lying.status_code in (400, 413)  # h11 itself may refuse the mismatch; the route never sees it
    assert_openai_error(request(app, "POST", "/echo", content=b"x" * (LIMIT + 1)), 413, "body_too_large")


def test_unexpected_errors_are_json_500s_without_internals():
    error = assert_openai_error(request(guarded_app(), "GET", "/boom", headers={"x-request-id": "req-42"}), 500,
                                "internal_error")
    assert "req-42" in error["message"]
    assert "secret" not in error["message"] and "/home" not in error["message"] and "Traceback" not in error["message"]


def test_api_key_everywhere_but_health():
    app = guarded_app(api_key="k")
    assert request(app, "GET", "/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "k"}):
        assert_openai_error(request(app, "POST", "/echo", content=b"{}", headers=headers), 401, "invalid_api_key")
    assert request(app, "POST", "/echo", content=b"{}", headers={"Authorization": "Bearer k"}).status_code == 200


def test_503_carries_retry_after_and_every_error_has_openai_shape():
    from serve.errors import error_response, json_error
    from serve.protocol import Rejection, field_error

    response = json_error(503, "overloaded")
    assert response.headers["retry-after"] == "1"
    assert error_response(Rejection(404, "no", "model", "model_not_found")).status_code == 404
    error = field_error(("verify", "positions"), "out of range")
    assert (error.status_code, error.param) == (422, "verify.positions") and "verify.positions" in error.message

    from ray.serve.exceptions import BackPressureError

    overloaded = error_response(BackPressureError(num_queued_requests=3, max_queued_requests=2))
    assert overloaded.status_code == 503 and overloaded.headers["retry-after"] == "1"
    with pytest.raises(KeyError):  # unknown failures are not guessed at: the guard turns them into a 500
        error_response(KeyError("x"))


@pytest.mark.parametrize("host,key,insecure,ok", [
    ("127.0.0.1", None, False, True), ("localhost", None, False, True), ("::1", None, False, True),
    ("0.0.0.0", None, False, False), ("10.1.2.3", None, False, False), ("0.0.0.0", "k", False, True),
    ("0.0.0.0", None, True, True)])
def test_open_host_without_key_refuses_to_start(host, key, insecure, ok):
    from serve.ingress import check_exposure

    if ok:
        check_exposure(host, key, insecure)
    else:
        with pytest.raises(ValueError, match="--insecure"):
            check_exposure(host, key, insecure)


def test_cli_serve_refuses_open_host_without_key_unless_insecure(monkeypatch):
    from typer.testing import CliRunner

    from derta.cli import app
    from serve import app as serve_app

    monkeypatch.delenv("DERTA_API_KEY", raising=False)
    started = []
    monkeypatch.setattr("derta.runtime.init_ray", lambda *a, **k: started.append("ray"))
    result = CliRunner().invoke(app, ["serve", "--model", "m", "--set", "serve.host=0.0.0.0"])
    assert result.exit_code != 0 and "--insecure" in result.output and not started

    seen = []
    monkeypatch.setattr(serve_app, "run_local", lambda cfg, model=None, port=None: seen.append(cfg))
    result = CliRunner().invoke(app, ["serve", "--model", "m", "--insecure", "--set", "serve.host=0.0.0.0"])
    assert result.exit_code == 0, result.output
    assert seen[0].serve.insecure and seen[0].serve.host == "0.0.0.0"


def test_info_shows_no_absolute_paths():
    from serve.engine import public_path

    assert public_path("/home/me/runs/r1/final") == "r1/final"
    assert public_path("org/model") == "org/model" and public_path(None) is None
