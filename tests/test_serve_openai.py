"""OpenAI completeness against a running server, through clients nobody here wrote: the `openai` Python client,
lm-evaluation-harness (`local-completions` / `local-chat-completions`) and schemathesis over /openapi.json.

One module-scoped Serve app on a loopback port (API key on); answers are checked against the same tiny model run
locally (its forward pass and `serve.engine.run_generate`), so every number the server returns is verified.
"""
from __future__ import annotations

import math

import pytest
from serve_utils import free_port, restored_environ, sse_events, wait_ready

API_KEY = "oai-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
MAX_NEW_TOKENS = 64

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def server(ray_session, tiny_config, tiny_path):
    from ray import serve

    from derta.config import load_config
    from serve.app import start_local

    cfg = load_config("tiny", [f"model.tiny_dir={tiny_config.model.tiny_dir}", "serve.ray_actor_options={num_cpus: 0.5}",
                               "serve.max_input_tokens=256", f"serve.max_new_tokens={MAX_NEW_TOKENS}",
                               f"serve.api_key={API_KEY}", "serve.batch_wait_timeout_s=0.05"])
    import httpx

    with restored_environ():  # start_local sets Serve's variables for this process: none outlives the module
        url = start_local(cfg, tiny_path, free_port())
        with httpx.Client(base_url=url, headers=AUTH, timeout=180) as http:
            wait_ready(http)
        yield url
        serve.shutdown()


@pytest.fixture(scope="module")
def oai(server):
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local_model(tiny_path):
    from derta.modeling import load_model

    return load_model(tiny_path).eval()


def prompt_log_probs(model, ids: list[int]) -> list[float]:
    """log P(ids[i] | ids[:i]) for i >= 1, from one local forward pass."""
    import torch

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1].float()
    return logits.log_softmax(-1).gather(1, torch.tensor(ids[1:])[:, None])[:, 0].tolist()


def greedy_text(model, tokenizer, ids: list[int], max_new_tokens: int) -> str:
    from serve.engine import GenerationJob, run_generate

    return run_generate(model, tokenizer, [GenerationJob(ids, max_new_tokens)])[0]["text"]


# ============================================================================================ openai client
def test_completion_logprobs_and_echo_match_a_local_forward_pass(oai, local_model, tokenizer):
    from derta.transforms import encode_prompt_text

    text = "the sky is blue because"
    ids = encode_prompt_text(tokenizer, text)  # how the server tokenizes every prompt (one BOS)
    scored = oai.completions.create(model="derta", prompt=text, max_tokens=0, echo=True, logprobs=3, temperature=0)
    lp = scored.choices[0].logprobs
    assert scored.choices[0].text == tokenizer.decode(ids, skip_special_tokens=True) == text
    assert "".join(lp.tokens) == scored.choices[0].text and len(lp.tokens) == len(ids)
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert lp.token_logprobs[1:] == pytest.approx(prompt_log_probs(local_model, ids), abs=1e-4)
    assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
    assert all(len(top) <= 3 and max(top.values()) >= chosen - 1e-6
               for top, chosen in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))

    generated = oai.completions.create(model="derta", prompt=text, max_tokens=6, logprobs=2, temperature=0)
    choice = generated.choices[0]
    assert choice.text == greedy_text(local_model, tokenizer, ids, 6)
    assert "".join(choice.logprobs.tokens).startswith(choice.text)
    for chosen, top in zip(choice.logprobs.token_logprobs, choice.logprobs.top_logprobs):
        assert chosen <= 0 and max(top.values()) == pytest.approx(chosen)  # greedy: the chosen token is the top one


def test_token_id_and_batched_prompts(oai, tokenizer):
    texts = ["How do I bake bread?", "Why is the sky blue?", "Explain water."]
    single = [oai.completions.create(model="derta", prompt=t, max_tokens=8, temperature=0).choices[0].text
              for t in texts]
    batched = oai.completions.create(model="derta", prompt=texts, max_tokens=8, temperature=0)
    assert [c.index for c in batched.choices] == [0, 1, 2] and [c.text for c in batched.choices] == single
    from derta.transforms import encode_prompt_text

    ids = [encode_prompt_text(tokenizer, t) for t in texts]
    as_ids = oai.completions.create(model="derta", prompt=ids, max_tokens=8, temperature=0)
    assert [c.text for c in as_ids.choices] == single
    one = oai.completions.create(model="derta", prompt=ids[0], max_tokens=8, temperature=0)
    assert one.choices[0].text == single[0]
    assert batched.usage.prompt_tokens == sum(map(len, ids))


def test_chat_prefill_continues_the_assistant_message(oai, local_model, tokenizer):
    messages = [{"role": "user", "content": "How do I bake bread?"}, {"role": "assistant", "content": "Sure, first"}]
    chat = oai.chat.completions.create(model="derta", messages=messages, max_tokens=8, temperature=0,
                                       extra_body={"continue_final_message": True, "add_generation_prompt": False})
    rendered = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=True,
                                             add_generation_prompt=False)
    assert rendered.rstrip().endswith("Sure, first")
    from derta.transforms import encode_prompt_text

    ids = encode_prompt_text(tokenizer, rendered)
    assert chat.choices[0].message.content == greedy_text(local_model, tokenizer, ids, 8)
    assert chat.usage.prompt_tokens == len(ids)


def test_chat_logprobs(oai):
    messages = [{"role": "user", "content": "Why is the sky blue?"}]
    chat = oai.chat.completions.create(model="derta", messages=messages, max_tokens=6, temperature=0, logprobs=True,
                                       top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert "".join(t.token for t in content).startswith(chat.choices[0].message.content)
    assert all(len(t.top_logprobs) == 3 and t.top_logprobs[0].logprob == pytest.approx(t.logprob) for t in content)
    assert all(bytes(t.bytes).decode() == t.token for t in content)


def test_streams_add_up_and_report_usage_on_request(oai):
    messages = [{"role": "user", "content": "Explain water."}]
    plain = oai.chat.completions.create(model="derta", messages=messages, max_tokens=10, temperature=0)
    chunks = list(oai.chat.completions.create(model="derta", messages=messages, max_tokens=10, temperature=0,
                                              stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == plain.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == plain.usage.total_tokens
    assert all(c.usage is None for c in chunks[:-1])
    text_chunks = list(oai.completions.create(model="derta", prompt="the sky", max_tokens=5, temperature=0,
                                              stream=True))
    assert all(c.usage is None for c in text_chunks)


def test_unsupported_fields_are_400s_naming_them(oai, server):
    import httpx
    import openai

    messages = [{"role": "user", "content": "hi"}]
    for extra in ({"tools": [{"type": "function", "function": {"name": "f"}}]},
                  {"response_format": {"type": "json_object"}}, {"logit_bias": {"5": 10}}, {"frobnicate": 1}):
        with pytest.raises(openai.BadRequestError) as err:
            oai.chat.completions.create(model="derta", messages=messages, max_tokens=2, extra_body=extra)
        name = next(iter(extra))
        assert err.value.body["param"] == name and name in err.value.body["message"]
        assert err.value.body["code"] == "unsupported_field"
    ok = oai.chat.completions.create(model="derta", messages=messages, max_tokens=2, user="u", presence_penalty=0,
                                     response_format={"type": "text"})
    assert ok.choices[0].finish_reason in ("stop", "length")
    with pytest.raises(openai.BadRequestError, match="stream"):
        oai.completions.create(model="derta", prompt="x", max_tokens=2, logprobs=1, stream=True)
    with pytest.raises(openai.NotFoundError) as err:
        oai.completions.create(model="gpt-4", prompt="x", max_tokens=2)
    assert err.value.body["code"] == "model_not_found" and err.value.body["type"] == "not_found_error"
    raw = httpx.post(f"{server}/v1/chat/completions", headers=AUTH, json={
        "model": "derta", "messages": messages, "max_tokens": 3, "stream": True})
    events = sse_events(raw)
    assert events[-1] == "[DONE]" and events[0]["choices"][0]["delta"]["role"] == "assistant"


# ============================================================================================ lm-evaluation-harness
TASKS = """
task: derta_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: answer
target_delimiter: ""
metric_list:
  - metric: acc
---
task: derta_tiny_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "Q: {{{{question}}}}\\nA:"
doc_to_target: "{{{{choices[answer]}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
"""


def first_number(resp) -> float:
    """lm-eval's (loglikelihood, is_greedy) response, however deeply its version nests it."""
    while isinstance(resp, (list, tuple)) and isinstance(resp[0], (list, tuple)):
        resp = resp[0]
    assert math.isfinite(float(resp[0])), resp
    return float(resp[0])


def write_tasks(tmp_path) -> None:
    from pathlib import Path

    data = Path(__file__).parent / "data" / "lm_eval" / "tiny_qa.jsonl"
    for index, text in enumerate(TASKS.format(data=data).split("---")):
        (tmp_path / f"task{index}.yaml").write_text(text)


def test_lm_eval_local_completions_loglikelihood_and_generate_until(server, tiny_path, tmp_path, monkeypatch,
                                                                    local_model, tokenizer):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    write_tasks(tmp_path)
    out = lm_eval.simple_evaluate(
        model="local-completions", tasks=["derta_tiny_mc", "derta_tiny_gen"], log_samples=True,
        model_args={"base_url": f"{server}/v1/completions", "model": "derta", "tokenizer_backend": "huggingface",
                    "tokenizer": tiny_path, "num_concurrent": 2, "max_retries": 1, "max_length": 256},
        task_manager=TaskManager(include_path=str(tmp_path)))
    assert 0 <= out["results"]["derta_tiny_mc"]["acc,none"] <= 1
    assert 0 <= out["results"]["derta_tiny_gen"]["exact_match,remove_whitespace"
                                                 if "exact_match,remove_whitespace" in out["results"]["derta_tiny_gen"]
                                                 else "exact_match,none"] <= 1
    for sample in out["samples"]["derta_tiny_mc"]:  # every loglikelihood equals the local model's
        arguments = sample["arguments"]
        arguments = list(arguments.values()) if isinstance(arguments, dict) else arguments
        assert len(arguments) == len(sample["resps"]) == 2
        for args, resp in zip(arguments, sample["resps"]):
            context, continuation = (args["arg_0"], args["arg_1"]) if isinstance(args, dict) else args
            context_ids = tokenizer(context, add_special_tokens=False).input_ids
            whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
            expected = sum(prompt_log_probs(local_model, whole)[len(context_ids) - 1:])
            assert first_number(resp) == pytest.approx(expected, abs=1e-3)
    for sample in out["samples"]["derta_tiny_gen"]:
        assert isinstance(sample["resps"][0][0], str)


def test_lm_eval_local_chat_completions_generate_until(server, tmp_path, monkeypatch):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    monkeypatch.setenv("OPENAI_API_KEY", API_KEY)
    write_tasks(tmp_path)
    out = lm_eval.simple_evaluate(
        model="local-chat-completions", tasks=["derta_tiny_gen"], apply_chat_template=True, log_samples=True,
        model_args={"base_url": f"{server}/v1/chat/completions", "model": "derta", "num_concurrent": 2,
                    "max_retries": 1, "tokenizer_backend": None},
        task_manager=TaskManager(include_path=str(tmp_path)))
    assert len(out["samples"]["derta_tiny_gen"]) == 4
    assert all(isinstance(s["resps"][0][0], str) for s in out["samples"]["derta_tiny_gen"])


# ============================================================================================ schemathesis
def test_schemathesis_every_route_no_5xx(server):
    schemathesis = pytest.importorskip("schemathesis")
    from hypothesis import HealthCheck, given, settings

    schema = schemathesis.openapi.from_url(f"{server}/openapi.json", headers=AUTH)
    failures = []
    operations = list(schema.get_all_operations())
    assert len(operations) >= 8
    for result in operations:
        operation = result.ok()

        @settings(max_examples=15, deadline=None, database=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def check(case):
            response = case.call(headers=AUTH, timeout=120)
            if response.status_code >= 500 and response.status_code != 503:
                failures.append((operation.label, response.status_code, response.text[:200]))
            if response.status_code == 503:
                assert response.headers.get("retry-after")

        check()
    assert not failures, failures
