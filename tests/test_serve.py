"""Ray Serve app over HTTP: every route, every error path, probe math, batching, OpenAI client, overload.

One module-scoped Serve instance on a free loopback port runs the main app through `start_local` (what
`derta serve` runs: default model + a registry alias, API key on); the overload test deploys a second small app
through `build_app` (the serve_config.yaml import path) with max_ongoing=1 / max_queued=1, and the token-budget
test one with a small serve.max_inflight_tokens; each is deleted after its test.
"""
from __future__ import annotations

import json
import os
import sys
import time
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
from serve_utils import free_port, restored_environ, sse_events, wait_ready

API_KEY = "test-key"
MAX_INPUT_TOKENS = 256
MAX_NEW_TOKENS = 64
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PROMPTS = ["How do I bake bread?", "Why is the sky blue?", "Explain water.", "Make a cake step by step.",
           "What is light scattering?", "Tell me a story about a model."]


def overrides(tiny_config, *extra: str) -> list[str]:
    return [f"model.tiny_dir={tiny_config.model.tiny_dir}", "serve.ray_actor_options={num_cpus: 0.5}",
            f"serve.max_input_tokens={MAX_INPUT_TOKENS}", f"serve.max_new_tokens={MAX_NEW_TOKENS}", *extra]


@pytest.fixture(scope="module")
def server(ray_session, tiny_config, tiny_path):
    """The main app at http://127.0.0.1:<port>/ with models `derta` (default) and `alias` (registry)."""
    from ray import serve

    from derta.config import load_config
    from serve.app import start_local

    cfg = load_config("tiny", overrides(tiny_config, f"serve.api_key={API_KEY}", "serve.batch_wait_timeout_s=0.05",
                                        f"serve.registry={{alias: {{path: {tiny_path}}}}}"))
    with restored_environ():  # start_local sets Serve's variables for this process: none outlives the module
        yield start_local(cfg, tiny_path, free_port())
        serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    import httpx

    with httpx.Client(base_url=server, headers=AUTH, timeout=120) as http:
        wait_ready(http)
        yield http


@pytest.fixture(scope="module")
def local_model(tiny_path):
    from derta.modeling import load_model

    return load_model(tiny_path).eval()


def generate(client, prompt: str, **fields) -> dict:
    response = client.post("/generate", json={"prompt": prompt, **fields})
    assert response.status_code == 200, response.text
    return response.json()


def assert_field_error(response, status: int, field: str, text: str | None = None) -> None:
    assert response.status_code == status, response.text
    assert set(response.json()["error"]) == {"message", "type", "param", "code"}, response.text
    body = json.dumps(response.json())
    assert field in body, body
    if text:
        assert text in body, body


# ============================================================================================ unit tests
def test_default_model_path_picks_newest_complete_checkpoint(tmp_path, tiny_config, monkeypatch):
    from serve.app import default_model_path

    older, newer, broken = (tmp_path / name / "final" for name in ("old", "new", "broken"))
    for index, final in enumerate((older, newer, broken)):
        final.mkdir(parents=True)
        if final is not broken:
            (final / "config.json").write_text("{}")
        os.utime(final, (1000 + index, 1000 + index))
    assert default_model_path(tiny_config, tmp_path) == str(newer)

    trained = []
    fake_trainer = types.SimpleNamespace(run_training=lambda cfg: trained.append(cfg) or tmp_path / "t" / "final")
    monkeypatch.setitem(sys.modules, "derta.trainer", fake_trainer)  # the real one imports Ray Train
    assert default_model_path(tiny_config, tmp_path / "empty") == str(tmp_path / "t" / "final")
    assert trained == [tiny_config]


def test_build_args_are_validated():
    from pydantic import ValidationError

    from serve.app import build_app

    with pytest.raises(ValidationError, match="modle"):
        build_app({"config": "tiny", "modle": "x"})


def test_row_decoder_stop_strings_and_holdback(tokenizer):
    from serve.engine import GenerationJob, RowDecoder

    ids = tokenizer.encode("the cake is ready now", add_special_tokens=False)
    row = RowDecoder(tokenizer, GenerationJob([1], max_new_tokens=50, stop=["is ready now"]), eos_ids={-1})
    streamed = []
    for token in ids:
        row.push(token)
        streamed.append(row.take_delta())
    # "is", then "is ready" could still become the stop string: held back, never streamed
    assert row.finish_reason == "stop" and row.text == "the cake " and "".join(streamed) == row.text
    assert not any("is" in delta for delta in streamed)
    row = RowDecoder(tokenizer, GenerationJob([1], max_new_tokens=2), eos_ids={-1})
    row.push(ids[0])
    row.push(ids[1])
    assert row.result()["finish_reason"] == "length" and row.completion_tokens == 2


def test_run_local_defaults_blocks_until_sigterm_then_shuts_down(tiny_config, monkeypatch, capsys):
    """`derta serve` around start_local (which the shared `server` fixture runs for real)."""
    import signal
    import threading

    from serve import app

    calls = []
    monkeypatch.setattr(app, "default_model_path", lambda cfg: "/runs/newest/final")
    monkeypatch.setattr(app, "start_local", lambda *args: calls.append(args) or "http://127.0.0.1:1234")
    monkeypatch.setattr(app.serve, "shutdown", lambda: calls.append("shutdown"))
    monkeypatch.setattr(app, "wait_direct_ingress", lambda name, host: ["http://127.0.0.1:30000"])
    monkeypatch.setattr(app, "warm_up", lambda url, n: calls.append(("warm_up", url, n)) or n)
    original = signal.getsignal(signal.SIGTERM)

    def signal_once_waiting():
        while signal.getsignal(signal.SIGTERM) is original:
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=signal_once_waiting, daemon=True).start()
    app.run_local(tiny_config)
    # once the app runs: HAProxy's connections to the replica warmed through --port (serve.warmup_connections)
    assert calls == [(tiny_config, "/runs/newest/final", None),
                     ("warm_up", "http://127.0.0.1:1234", tiny_config.serve.warmup_connections), "shutdown"]
    out = capsys.readouterr().out
    assert "serving /runs/newest/final at http://127.0.0.1:1234" in out
    assert "direct ingress (no proxy hop): http://127.0.0.1:30000" in out  # serve.direct_ingress: on by default
    assert signal.getsignal(signal.SIGTERM) is original


# ============================================================================================ service routes
@pytest.mark.slow
def test_serve_runs_with_dertas_keep_alive(server):
    """start_local gives Serve serve.keep_alive_timeout_s: the HTTP options Serve's controller hands to every
    ingress replica's HTTP server (direct ingress) and to HAProxy's config (tests/test_serve_haproxy.py)."""
    import ray
    from ray.serve.context import _get_global_client

    from derta.config import ServeConfig

    options = ray.get(_get_global_client()._controller.get_http_config.remote())
    assert options.keep_alive_timeout_s == ServeConfig().keep_alive_timeout_s != 90  # not Ray's default


def test_health_is_open_and_everything_else_needs_the_key(client):
    assert client.get("/health", headers={"Authorization": ""}).json() == {"status": "ok"}
    for method, route in [("GET", "/ready"), ("GET", "/info"), ("GET", "/v1/models"), ("POST", "/generate"),
                          ("POST", "/probe"), ("POST", "/v1/completions"), ("POST", "/v1/chat/completions")]:
        for headers in ({"Authorization": ""}, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}):
            response = client.request(method, route, headers=headers, json={"prompt": "hi"})
            assert response.status_code == 401, (route, headers, response.text)
            assert "API key" in response.json()["error"]["message"]


@pytest.mark.slow
def test_ready_and_info(client, tiny_path):
    assert client.get("/ready").json()["models"] == ["alias", "derta"]
    info = client.get("/info").json()
    assert info["default_model"] == "derta" and set(info["models"]) == {"derta", "alias"}
    model = info["models"]["derta"]
    assert model["path"] == "/".join(tiny_path.split("/")[-2:]) and model["adapter"] is None and model["ready"]
    assert tiny_path not in json.dumps(info) and "/tmp" not in json.dumps(info)  # no server paths
    assert model["refusal_tokens"] == ["Sorry"] and model["device"] == "cpu" and model["dtype"] == "float32"
    assert model["limits"]["max_input_tokens"] == MAX_INPUT_TOKENS
    assert model["limits"]["max_new_tokens"] == MAX_NEW_TOKENS


@pytest.mark.slow
def test_every_response_has_a_request_id(client):
    responses = [client.get("/health"), client.get("/nope"), client.post("/generate", json={}),
                 client.post("/generate", json={"prompt": "x", "max_new_tokens": 1}),
                 client.post("/generate", json={"prompt": "x"}, headers={"Authorization": "no"})]
    assert all(r.headers.get("x-request-id") for r in responses), [dict(r.headers) for r in responses]
    mine = client.post("/generate", json={"prompt": "x", "max_new_tokens": 1}, headers={"X-Request-ID": "abc-123"})
    assert mine.headers["x-request-id"] == "abc-123"


@pytest.mark.slow
def test_chunked_body_over_the_limit_is_refused_before_parsing(client):
    def chunks():  # no Content-Length: the limit must count the bytes themselves
        yield b'{"prompt": "x", "pad": "'
        for _ in range(64):
            yield b"y" * 65536
        yield b'"}'

    response = client.post("/generate", content=chunks(), headers={**AUTH, "content-type": "application/json"})
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large", response.text


# ============================================================================================ /generate
@pytest.mark.slow
def test_generate_prompt_and_messages_agree(client):
    result = generate(client, "How do I bake bread?", max_new_tokens=12)
    assert result["finish_reason"] in ("stop", "length") and result["prompt_tokens"] > 0
    assert 1 <= result["completion_tokens"] <= 12 and result["model"] == "derta"
    as_messages = client.post("/generate", json={"messages": [{"role": "user", "content": "How do I bake bread?"}],
                                                 "max_new_tokens": 12}).json()
    assert as_messages["text"] == result["text"]
    assert client.post("/generate", json={"prompt": "How do I bake bread?", "max_new_tokens": 12,
                                          "model": "alias"}).json()["text"] == result["text"]


@pytest.mark.slow
def test_generate_stop_string_truncates(client):
    text = generate(client, "Why is the sky blue?", max_new_tokens=24)["text"]
    assert len(text) >= 4, text
    stop = text[2:4]
    stopped = generate(client, "Why is the sky blue?", max_new_tokens=24, stop=[stop])
    assert stopped["finish_reason"] == "stop" and stopped["text"] == text[:text.find(stop)]


@pytest.mark.slow
def test_stream_deltas_add_up_to_the_non_streamed_text(client):
    plain = generate(client, "Explain water.", max_new_tokens=16)
    response = client.post("/generate", json={"prompt": "Explain water.", "max_new_tokens": 16, "stream": True})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response)
    assert events[0]["type"] == "start" and events[-1]["type"] == "final"
    deltas = "".join(e["text"] for e in events if e["type"] == "delta")
    assert deltas == events[-1]["text"] == plain["text"]
    assert events[-1]["completion_tokens"] == plain["completion_tokens"]


@pytest.mark.slow
def test_batched_output_equals_unbatched_at_temperature_zero(client):
    sequential = [generate(client, p, max_new_tokens=20) for p in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        concurrent = list(pool.map(lambda p: generate(client, p, max_new_tokens=20), PROMPTS))
    # whether these happened to share a batch depends on timing; the budget test checks batching deterministically
    assert [r["text"] for r in concurrent] == [r["text"] for r in sequential]


@pytest.mark.slow
def test_seeded_sampling_is_per_request(client):
    fields = dict(max_new_tokens=24, temperature=1.0, top_p=0.95)
    alone = generate(client, PROMPTS[0], seed=7, **fields)["text"]
    assert generate(client, PROMPTS[0], seed=7, **fields)["text"] == alone
    assert generate(client, PROMPTS[0], seed=8, **fields)["text"] != alone
    with ThreadPoolExecutor(4) as pool:  # batch mates with other seeds do not change this request's draws
        batch = list(pool.map(lambda s: generate(client, PROMPTS[0], seed=s, **fields), [7, 1, 2, 3]))
    assert batch[0]["text"] == alone


# ============================================================================================ /probe
@pytest.mark.slow
def test_probe_equals_per_position_forward_passes(client, local_model, tokenizer, tiny_config):
    import torch

    from derta.transforms import PromptRenderer, refusal_token_ids

    prompt, response = "How do I make a cake?", "First bake the bread, then explain why the sky is blue."
    result = client.post("/probe", json={"prompt": prompt, "response": response}).json()
    data = tiny_config.data
    renderer = PromptRenderer(tokenizer, data.use_chat_template, data.plain_template, data.system_prompt)
    prompt_ids = renderer.encode_prompt(renderer.render(prompt))
    response_ids = tokenizer.encode(response, add_special_tokens=False)
    refusal_ids = refusal_token_ids(tokenizer, data.probe_refusal_strings)
    expected = []
    with torch.no_grad():
        for i in range(len(response_ids) + 1):
            logits = local_model(input_ids=torch.tensor([prompt_ids + response_ids[:i]])).logits[0, -1]
            expected.append(logits.softmax(-1)[refusal_ids].sum().item())
    got = [p["p_refusal"] for p in result["positions"]]
    assert len(got) == len(response_ids) + 1 == result["response_tokens"] + 1
    assert max(abs(g - e) for g, e in zip(got, expected)) < 1e-4
    assert got == pytest.approx(expected, rel=1e-3)
    assert "".join(p["token"] for p in result["positions"][:-1]) == response
    assert result["positions"][-1]["token"] is None
    assert result["min"] == pytest.approx(min(expected), rel=1e-3)
    assert result["mean"] == pytest.approx(sum(expected) / len(expected), rel=1e-3)
    assert result["refusal_tokens"] == ["Sorry"] and result["first_crossing"] is None  # untrained model


@pytest.mark.slow
def test_concurrent_probes_share_batches_and_equal_sequential_ones(client):
    bodies = [{"prompt": p, "response": "First bake the bread, then explain water."} for p in PROMPTS]
    sequential = [client.post("/probe", json=body).json() for body in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        concurrent = list(pool.map(lambda body: client.post("/probe", json=body).json(), bodies))
    for alone, together in zip(sequential, concurrent):
        assert [p["p_refusal"] for p in together["positions"]] == pytest.approx(
            [p["p_refusal"] for p in alone["positions"]], abs=1e-5)


@pytest.mark.slow
def test_probe_threshold_messages_and_verify(client):
    body = {"messages": [{"role": "user", "content": "Bake a cake"}], "response": "first the water",
            "threshold": 1e-6, "verify": {"positions": [0, 2], "tokens": 4}}
    result = client.post("/probe", json=body).json()
    assert result["first_crossing"] == 0 and result["threshold"] == 1e-6
    assert [v["i"] for v in result["verify"]] == [0, 2]
    assert all(isinstance(v["continuation"], str) and isinstance(v["refuses"], bool) for v in result["verify"])
    n = result["response_tokens"]
    assert_field_error(client.post("/probe", json={**body, "verify": {"positions": [n + 1]}}), 422,
                       "positions", f"0..{n}")
    assert_field_error(client.post("/probe", json={**body, "verify": {"positions": [0], "tokens": 65}}), 422,
                       "tokens", str(MAX_NEW_TOKENS))
    assert client.post("/probe", json={"prompt": "x", "response": ""}).json()["positions"][0]["i"] == 0


# ============================================================================================ OpenAI API
@pytest.mark.slow
def test_openai_client(server, client):
    import openai

    oai = openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)
    assert {m.id for m in oai.models.list()} == {"derta", "alias"}
    messages = [{"role": "user", "content": "How do I bake bread?"}]
    chat = oai.chat.completions.create(model="derta", messages=messages, max_tokens=12, temperature=0)
    assert chat.choices[0].message.content == generate(client, "How do I bake bread?", max_new_tokens=12)["text"]
    assert chat.usage.completion_tokens == 12 or chat.choices[0].finish_reason == "stop"
    stream = oai.chat.completions.create(model="derta", messages=messages, max_tokens=12, temperature=0, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == chat.choices[0].finish_reason

    completion = oai.completions.create(model="alias", prompt="the sky is", max_tokens=8, temperature=0)
    streamed = oai.completions.create(model="alias", prompt="the sky is", max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed) == completion.choices[0].text
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens

    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(model="gpt-4", messages=messages, max_tokens=4)
    with pytest.raises(openai.UnprocessableEntityError):
        oai.chat.completions.create(model="derta", messages=messages, max_tokens=MAX_NEW_TOKENS + 1)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server}/v1", api_key="wrong", max_retries=0).models.list()


@pytest.mark.slow
def test_raw_sse_has_done_marker(client):
    response = client.post("/v1/chat/completions", json={
        "model": "derta", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "stream": True})
    events = sse_events(response)
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"
    assert all(e["object"] == "chat.completion.chunk" for e in events[:-1])


# ============================================================================================ bad input
BAD_BODIES = [
    ("/generate", {"prompt": 5}, "prompt"),
    ("/generate", {"prompt": "x", "max_new_tokens": 0}, "max_new_tokens"),
    ("/generate", {"prompt": "x", "max_new_tokens": MAX_NEW_TOKENS + 1}, "max_new_tokens"),
    ("/generate", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/generate", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/generate", {"prompt": "x", "seed": 10**30}, "seed"),
    ("/generate", {"prompt": "x", "stop": "abc"}, "stop"),
    ("/generate", {"prompt": "x", "stream": {"a": 1}}, "stream"),
    ("/generate", {"prompt": "x", "promptt": "typo"}, "promptt"),
    ("/generate", {}, "exactly one of 'prompt' or 'messages'"),
    ("/generate", {"prompt": "x", "messages": [{"role": "user", "content": "y"}]}, "exactly one"),
    ("/generate", {"messages": [{"role": "user", "content": {"a": [1, {"b": None}]}}]}, "content"),
    ("/generate", {"messages": [{"role": "root", "content": "x"}]}, "role"),
    ("/generate", {"messages": []}, "messages"),
    ("/generate", [1, 2, 3], "body"),
    ("/probe", {"prompt": "x"}, "response"),
    ("/probe", {"prompt": "x", "response": "y", "threshold": 2}, "threshold"),
    ("/probe", {"prompt": "x", "response": "y", "verify": {"positions": []}}, "positions"),
    ("/v1/chat/completions", {"model": "derta", "messages": [{"role": "user", "content": "x"}],
                              "max_tokens": MAX_NEW_TOKENS + 1}, "max_tokens"),
    ("/v1/chat/completions", {"model": "derta", "messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]}, "model"),
    ("/v1/completions", {"model": "derta", "prompt": [[1, -2]]}, "prompt"),
    ("/v1/completions", {"model": "derta", "prompt": [10**9]}, "prompt"),
    ("/v1/completions", {"model": "derta", "prompt": "a", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"model": "derta", "prompt": "a", "logprobs": 21}, "logprobs"),
    ("/v1/chat/completions", {"model": "derta", "messages": [{"role": "user", "content": "x"}],
                              "continue_final_message": True, "add_generation_prompt": False},
     "continue_final_message"),
    ("/v1/completions", {"model": "derta", "prompt": "a", "n": 2}, "n"),
]


@pytest.mark.slow
@pytest.mark.parametrize("route,body,field", BAD_BODIES, ids=[f"{r}:{f}" for r, _, f in BAD_BODIES])
def test_bad_fields_get_422_naming_the_field(client, route, body, field):
    assert_field_error(client.post(route, json=body), 422, field)


@pytest.mark.slow
def test_limits_unknown_models_and_junk_payloads(client):
    long_prompt = "bake the bread " * 200
    assert_field_error(client.post("/generate", json={"prompt": long_prompt}), 413, "message", str(MAX_INPUT_TOKENS))
    assert_field_error(client.post("/probe", json={"prompt": "x", "response": long_prompt}), 413, "message",
                       f"max_input_tokens={MAX_INPUT_TOKENS}")
    assert_field_error(client.post("/generate", json={"prompt": "x" * 10_000_000}), 413, "body_too_large")
    assert client.post("/generate", json={"prompt": "x", "model": "../../etc/passwd"}).status_code == 404
    assert client.post("/probe", json={"prompt": "x", "response": "y", "model": "nope"}).status_code == 404
    assert client.post("/v1/completions", json={"model": "nope", "prompt": "x"}).status_code == 404

    json_headers = {**AUTH, "content-type": "application/json"}
    junk = [b"", b"{not json", b"\xff\xfe\xfa{\"prompt\": \"\xff\"}", b'{"prompt": "x", "temperature": NaN}',
            b"[" * 100_000 + b"]" * 100_000, b'{"prompt": "\\ud800 lone surrogate"}', b"null", b'"just a string"']
    for payload in junk:
        response = client.post("/generate", content=payload, headers=json_headers)
        assert 400 <= response.status_code < 500, (payload[:40], response.status_code, response.text[:200])
    text_plain = client.post("/generate", content=b"prompt=hi", headers={**AUTH, "content-type": "text/plain"})
    assert 400 <= text_plain.status_code < 500
    weird = generate(client, "\x00\x07\x1b[31m\u202e\ufeff tab\t nl\n \U0001F600", max_new_tokens=4)
    assert weird["completion_tokens"] >= 1
    assert client.get("/health").status_code == 200 and generate(client, "still alive?", max_new_tokens=2)


# ============================================================================================ overload
# Contention-proof overload tests: the admitted requests are held in flight by a long `batch_wait_timeout_s` (a lone
# request waits that long for batch mates before it runs), so the concurrent requests that arrive meanwhile meet a
# full replica however slowly this machine runs them. The tests assert invariants (status set, error shape, Retry-After,
# health and a fully released budget afterwards), never wall-clock times; bench/bench_serve.py measures latencies.
HOLD_S = 8


@pytest.mark.slow
def test_overload_gives_503_with_retry_after_and_recovers(server, tiny_config, tiny_path, monkeypatch):
    import httpx
    from ray import serve

    from serve.app import build_app

    monkeypatch.delenv("DERTA_API_KEY", raising=False)  # this app runs without a key

    app = build_app({"config": "tiny", "model": tiny_path, "set": overrides(
        tiny_config, "serve.max_ongoing_requests=1", "serve.max_queued_requests=1",
        "serve.max_batch_size=16", f"serve.batch_wait_timeout_s={HOLD_S}")})
    serve.run(app, name="overload", route_prefix="/overload", blocking=False)
    try:
        with httpx.Client(base_url=f"{server}/overload", timeout=300) as http:
            wait_ready(http)
            body = {"prompt": "How do I bake bread?", "max_new_tokens": 8}
            with ThreadPoolExecutor(12) as pool:
                results = list(pool.map(lambda _: http.post("/generate", json=body), range(12)))
            statuses = [response.status_code for response in results]
            # capacity 2 (one ongoing + one queued) against 12: some are turned away, nothing else fails
            assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
            for response in results:
                if response.status_code == 503:
                    assert response.headers["retry-after"] == "1", response.headers
                    assert response.json()["error"]["code"] == "overloaded", response.text
                else:
                    assert response.json()["completion_tokens"] >= 1, response.text
            assert http.get("/health").status_code == 200
            assert http.post("/generate", json={"prompt": "hi", "max_new_tokens": 2}).status_code == 200
            # the guard's fast path learnt the model deployment's live limit: 1 ongoing + 1 queued
            assert http.get("/info").json()["admission_capacity"] == 2
    finally:
        serve.delete("overload")


@pytest.mark.slow
def test_token_budget_turns_excess_load_into_503_and_is_released(server, client, tiny_config, tiny_path, monkeypatch):
    """serve.max_inflight_tokens over HTTP: concurrent /probe and /v1/completions requests that together exceed
    the replica's token budget get 503 + Retry-After in OpenAI's shape (budget code), the rest complete; a request
    that can never fit is a 413; afterwards the whole budget is free again."""
    import httpx
    from ray import serve

    from serve.app import build_app

    monkeypatch.delenv("DERTA_API_KEY", raising=False)
    probe_body = {"prompt": "How do I bake bread?", "response": "First mix the flour and water, then knead it."}
    completion_body = {"model": "derta", "prompt": "Why is the sky blue?", "max_tokens": 8, "temperature": 0}
    # each request's cost in the budget's units, measured on the main app (same model and tokenizer)
    probed = client.post("/probe", json=probe_body).json()
    probe_cost = probed["prompt_tokens"] + probed["response_tokens"]
    completion_cost = client.post("/v1/completions", json=completion_body).json()["usage"]["prompt_tokens"] + 8
    generated = [generate(client, prompt, max_new_tokens=8) for prompt in PROMPTS[:2]]
    generate_cost = max(result["prompt_tokens"] for result in generated) + 8
    budget = 2 * max(probe_cost, completion_cost, generate_cost)  # any two requests fit, the eight together do not

    app = build_app({"config": "tiny", "model": tiny_path, "set": overrides(
        tiny_config, f"serve.max_inflight_tokens={budget}", "serve.max_ongoing_requests=32",
        "serve.max_queued_requests=32", "serve.max_batch_size=16", f"serve.batch_wait_timeout_s={HOLD_S}")})
    serve.run(app, name="budget", route_prefix="/budget", blocking=False)
    try:
        with httpx.Client(base_url=f"{server}/budget", timeout=300) as http:
            wait_ready(http)
            calls = [("/probe", probe_body), ("/v1/completions", completion_body)] * 4
            with ThreadPoolExecutor(len(calls)) as pool:
                results = list(pool.map(lambda call: (call[0], http.post(call[0], json=call[1])), calls))
            statuses = [response.status_code for _, response in results]
            assert set(statuses) <= {200, 503} and 200 in statuses and 503 in statuses, statuses
            for route, response in results:
                if response.status_code == 503:
                    assert response.headers["retry-after"] == "1", response.headers
                    error = response.json()["error"]
                    assert set(error) == {"message", "type", "param", "code"}, error
                    assert error["code"] == "overloaded" and "token budget" in error["message"], error
                    assert error["type"] == "service_unavailable_error", error
                elif route == "/probe":
                    assert response.json()["response_tokens"] == probed["response_tokens"], response.text
                else:
                    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length"), response.text

            # more than the whole budget can never be admitted: 413 naming the setting, not a retry hint
            too_big = {**probe_body, "response": probe_body["response"] * (budget // probed["response_tokens"] + 1)}
            refused = http.post("/probe", json=too_big)
            assert refused.status_code == 413 and "retry-after" not in refused.headers, refused.text
            assert "serve.max_inflight_tokens" in refused.json()["error"]["message"], refused.text
            # every admitted request released its tokens: two requests held together by the batch wait both fit
            # again, run as one batch, and generate what each generated alone on the main app
            assert http.get("/health").status_code == 200
            with ThreadPoolExecutor(2) as pool:
                again = list(pool.map(lambda prompt: http.post("/generate", json={
                    "prompt": prompt, "max_new_tokens": 8}), PROMPTS[:2]))
            assert [response.status_code for response in again] == [200, 200], [r.text for r in again]
            assert [response.json()["batch_size"] for response in again] == [2, 2]
            assert [response.json()["text"] for response in again] == [result["text"] for result in generated]
    finally:
        serve.delete("budget")


def test_deployment_options_follow_the_serve_config():
    from derta.config import ServeConfig
    from serve.deployment import model_deployment_options

    fixed = model_deployment_options(ServeConfig(num_replicas=3, max_replicas_per_node=1))
    assert fixed["num_replicas"] == 3 and fixed["max_replicas_per_node"] == 1
    scaled = model_deployment_options(ServeConfig(autoscaling={"min_replicas": 0, "max_replicas": 4}))
    assert "num_replicas" not in scaled and "max_replicas_per_node" not in scaled
    assert scaled["autoscaling_config"]["max_replicas"] == 4


@pytest.mark.slow
@pytest.mark.parametrize("continuous", [True, False])
def test_generate_joins_a_running_batch_with_continuous_batching(server, client, tiny_config, tiny_path, continuous):
    """serve.continuous_batching: a request sent while another decodes joins its batch (batch_size 2) instead of
    waiting for it to end, and both get what unbatched generation gives them; the static path still works."""
    import threading

    import httpx
    from ray import serve

    from serve.app import build_app

    long_prompt, short_prompt = PROMPTS[0], PROMPTS[1]
    expected = [generate(client, p, max_new_tokens=n) for p, n in ((long_prompt, MAX_NEW_TOKENS), (short_prompt, 4))]
    assert expected[0]["finish_reason"] == "length"  # the long request is still decoding when the short one comes
    app = build_app({"config": "tiny", "model": tiny_path, "set": overrides(
        tiny_config, f"serve.continuous_batching={str(continuous).lower()}", "serve.batch_wait_timeout_s=0")})
    serve.run(app, name="contbatch", route_prefix="/contbatch", blocking=False)
    try:
        with httpx.Client(base_url=f"{server}/contbatch", timeout=300) as http:
            wait_ready(http)
            started, results = threading.Event(), {}

            def long_stream():
                body = {"prompt": long_prompt, "max_new_tokens": MAX_NEW_TOKENS, "stream": True}
                with http.stream("POST", "/generate", json=body) as response:
                    for line in response.iter_lines():
                        if line.startswith("data: ") and line != "data: [DONE]":
                            event = json.loads(line.removeprefix("data: "))
                            started.set() if event["type"] == "delta" else None
                            results["long"] = event
            thread = threading.Thread(target=long_stream)
            thread.start()
            assert started.wait(120)
            results["short"] = generate(http, short_prompt, max_new_tokens=4)
            thread.join(300)
    finally:
        serve.delete("contbatch")
    assert results["long"]["type"] == "final"
    for name, want in zip(("long", "short"), expected):
        assert results[name]["text"] == want["text"] and results[name]["finish_reason"] == want["finish_reason"]
    if continuous:
        assert results["short"]["batch_size"] == 2 == results["long"]["batch_size"]
