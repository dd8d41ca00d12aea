"""serve/engine.py without Ray: batched generation with per-row sampling, stops, logprobs, and its isolation.

Runs the real tiny model (random init, real tokenizer) in-process; every test here is a plain unit test.
"""
from __future__ import annotations

import random

import pytest


@pytest.fixture(scope="module")
def tiny_model(tiny_path):
    from derta.modeling import load_model

    return load_model(tiny_path).eval()


def prompt_ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=True)


def test_tiny_temperature_is_greedy_and_never_fails_its_batch_mates(tiny_model, tokenizer):
    """temperature=1e-300 passes validation; 1/T overflows, so it must decode greedily, not raise for the batch."""
    from serve.engine import GenerationJob, run_generate

    ids = prompt_ids(tokenizer, "How do I bake bread?")
    jobs = [GenerationJob(ids, 8, temperature=1e-300), GenerationJob(ids, 8, temperature=1.0, seed=3),
            GenerationJob(ids, 8, temperature=0.0), GenerationJob(ids, 8, temperature=5e-6, top_p=1e-9)]
    results = run_generate(tiny_model, tokenizer, jobs)
    assert [r["finish_reason"] for r in results] != ["error"] * 4
    assert all("error" not in r for r in results), results
    assert results[0]["token_ids"] == results[2]["token_ids"] == results[3]["token_ids"]


def test_one_failing_row_ends_alone(tokenizer):
    """A row whose sampling cannot proceed (non-finite logits) ends with an error; the other rows sample."""
    import torch

    from serve.engine import GenerationJob, RowDecoder, RowProcessor

    jobs = [GenerationJob([1], 4, temperature=1.0, seed=0), GenerationJob([1], 4, temperature=1.0, seed=0),
            GenerationJob([1], 4, temperature=0.0, logprobs=2)]
    rows = [RowDecoder(tokenizer, job, eos_ids={-1}) for job in jobs]
    scores = torch.randn(3, 50)
    scores[1] = float("nan")
    out = RowProcessor(rows)(None, scores.clone())
    assert rows[1].finish_reason == "error" and "non-finite" in rows[1].error
    assert not rows[0].finished and not rows[2].finished
    assert (out[0] == 0).sum() == 1 and torch.isinf(out[0]).sum() == 49  # one-hot on row 0's draw
    assert torch.equal(out[2], scores[2])  # a greedy row's scores are untouched
    rows[2].push(int(scores[2].argmax()))
    entry = rows[2].logprobs[0]
    assert entry["logprob"] == pytest.approx(float(scores[2].log_softmax(-1).max()))
    assert len(entry["top"]) == 2 and max(entry["top"].values()) == pytest.approx(entry["logprob"])


def test_stop_matching_equals_naive_search_and_holds_back_partial_stops():
    from serve.engine import StopMatcher

    rng = random.Random(0)
    for _ in range(300):
        stops = ["".join(rng.choice("abc") for _ in range(rng.randint(1, 5))) for _ in range(rng.randint(1, 3))]
        matcher = StopMatcher(stops)
        text = ""
        while True:
            new_from = len(text)
            text += "".join(rng.choice("abcd") for _ in range(rng.randint(1, 3)))
            found = matcher.find(text, new_from)
            naive = min((i for i in (text.find(s) for s in stops) if i >= 0), default=None)
            assert found == naive, (stops, text)
            if found is not None or len(text) > 40:
                break
            naive_held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            assert matcher.held_back(text) == naive_held, (stops, text)


def test_decoding_is_incremental_not_quadratic(tokenizer):
    """Each pushed token decodes a short window: total decoded tokens grow linearly with the length."""
    from serve.engine import GenerationJob, RowDecoder

    class CountingTokenizer:
        decoded = 0

        def decode(self, ids, **kwargs):
            CountingTokenizer.decoded += len(ids)
            return tokenizer.decode(ids, **kwargs)

    ids = tokenizer.encode("the cake is ready now, bake the bread and explain water " * 20, add_special_tokens=False)
    row = RowDecoder(CountingTokenizer(), GenerationJob([1], len(ids) + 1, stop=["x" * 256] * 16), eos_ids={-1})
    for token in ids:
        row.push(token)
        row.take_delta()
    assert row.text == tokenizer.decode(ids, skip_special_tokens=True)
    assert CountingTokenizer.decoded <= 6 * len(ids), (CountingTokenizer.decoded, len(ids))


def test_stop_strings_are_bounded_in_count_and_length():
    from pydantic import ValidationError

    from serve.protocol import MAX_STOP_CHARS, MAX_STOP_STRINGS, CompletionRequest, GenerateRequest

    GenerateRequest(prompt="x", stop=["a" * MAX_STOP_CHARS] * MAX_STOP_STRINGS)
    for stop in (["a" * (MAX_STOP_CHARS + 1)], ["a"] * (MAX_STOP_STRINGS + 1), [""]):
        with pytest.raises(ValidationError, match="stop"):
            GenerateRequest(prompt="x", stop=stop)
    for stop in ("a" * (MAX_STOP_CHARS + 1), ["a"] * (MAX_STOP_STRINGS + 1)):
        with pytest.raises(ValidationError, match="stop"):
            CompletionRequest(model="m", prompt="x", stop=stop)


def test_batched_probe_equals_one_forward_per_sequence(tiny_model, tokenizer):
    """Probes of different lengths share one right-padded forward (logits_to_keep over the response spans) and
    still equal each sequence's own full forward + log-softmax."""
    import torch

    from derta.probe import probe, probe_batch

    texts = [("How do I bake bread?", "First mix the flour and the water."), ("Why?", "Because."),
             ("Tell me a long story about a model that bakes", " once upon a time")]
    sequences = [(tokenizer.encode(p), tokenizer.encode(r, add_special_tokens=False)) for p, r in texts]
    refusal_ids = tokenizer.encode("Sorry", add_special_tokens=False)[:1]
    batched = probe_batch(tiny_model, sequences, refusal_ids, [0.5, 1e-9, 0.5])
    for (prompt_ids, response_ids), got in zip(sequences, batched):
        alone = probe(tiny_model, prompt_ids, response_ids, refusal_ids)
        with torch.no_grad():
            logits = tiny_model(input_ids=torch.tensor([prompt_ids + response_ids])).logits[0].float()
        rows = logits[len(prompt_ids) - 1:]
        expected = rows.log_softmax(-1)[:, refusal_ids].logsumexp(-1).exp().tolist()
        assert got.refusal_prob == pytest.approx(expected, abs=1e-5)
        assert got.refusal_prob == pytest.approx(alone.refusal_prob, abs=1e-5)
        assert got.top_token_ids == alone.top_token_ids
    assert batched[1].first_crossing == 0


def test_token_budget_turns_excess_load_into_503_and_impossible_requests_into_413():
    from serve.engine import TokenBudget
    from serve.protocol import ServeError

    budget = TokenBudget(100)
    budget.acquire(60)
    with pytest.raises(ServeError) as busy:
        budget.acquire(50)
    assert busy.value.status_code == 503
    budget.release(60)
    budget.acquire(50)  # fits again once the first request is done
    with pytest.raises(ServeError) as never:
        budget.acquire(101)
    assert never.value.status_code == 413 and "max_inflight_tokens" in never.value.message


def test_a_replica_with_several_gpus_spreads_the_model_across_them():
    from serve.engine import device_map

    assert device_map("cuda", 4) == "auto"
    assert device_map("cuda", 1) is None and device_map("cpu", 0) is None


def test_load_model_with_a_device_map_is_the_same_model(tiny_path, tiny_model):
    import torch

    from derta.modeling import load_model

    model = load_model(tiny_path, device_map="auto").eval()  # CPU only here: accelerate keeps every layer on the CPU
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    ids = torch.tensor([[1, 5, 9, 12]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, tiny_model(input_ids=ids).logits)


def test_generation_stops_on_every_eos_id_of_the_checkpoints_generation_config(tiny_model, tokenizer):
    """A checkpoint's generation_config.json may list several eos ids (end of turn + eos, derta.tokens
    write_generation_config); the engine stops on each, not only on tokenizer.eos_token_id."""
    import copy

    from serve.engine import GenerationJob, run_generate

    ids = prompt_ids(tokenizer, "How do I bake bread?")
    (free,) = run_generate(tiny_model, tokenizer, [GenerationJob(ids, 6, temperature=0.0)])
    assert free["token_ids"], free
    first = free["token_ids"][0]
    assert first != tokenizer.eos_token_id
    model = copy.copy(tiny_model)  # shallow: same weights, its own generation_config
    model.generation_config = copy.deepcopy(tiny_model.generation_config)
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, first]
    (stopped,) = run_generate(model, tokenizer, [GenerationJob(ids, 6, temperature=0.0)])
    assert stopped["token_ids"] == [] and stopped["finish_reason"] != "length", stopped


def test_steps_are_reported_only_when_someone_needs_them(tiny_model, tokenizer):
    """Rows nobody streams (`stream=False`) get no per-step delta events, only their final one; a streaming batch
    mate still gets every step's delta; the results are the same either way."""
    from serve.engine import GenerationJob, run_generate

    short, long = prompt_ids(tokenizer, "How do I bake bread?"), prompt_ids(tokenizer, "Why is the sky blue, and why?")

    def run(streams: list[bool], new_tokens: list[int]):
        steps: list[list] = []
        jobs = [GenerationJob(ids, n, stream=s) for ids, n, s in zip([short, long], new_tokens, streams)]
        return run_generate(tiny_model, tokenizer, jobs, steps.append), steps

    streamed, every_step = run([True, True], [3, 9])
    quiet, final_steps = run([False, False], [3, 9])
    assert quiet == streamed
    assert [[bool(e and e.get("final")) for e in step] for step in final_steps] == [[True, False], [False, True]]
    mixed, mixed_steps = run([False, True], [3, 9])
    assert mixed == streamed and len(final_steps) < len(mixed_steps) <= len(every_step)
    streamed_text = "".join(step[1]["delta"] for step in mixed_steps if step[1] is not None)
    assert streamed_text == streamed[1]["text"]
