"""serve/scheduler.py without Ray: continuous batching gives every request what unbatched generation gives it.

Rows join the running batch mid-flight (submitted from another row's event, i.e. between two decoding steps, so
the test is deterministic) and leave as soon as they finish; each row's result is compared with `run_generate` of
that request alone: greedy tokens, seeded samples, stop strings, logprobs, max_tokens.
"""
from __future__ import annotations

import threading

import pytest

from real_models import shared_tokenizer_dir, tiny_model_dir


@pytest.fixture(scope="module")
def tiny_model(tiny_path):
    from derta.modeling import load_model

    return load_model(tiny_path).eval()


class Collector:
    """Events per request; submits follow-up requests after a given number of another request's events."""

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.events: dict[int, list[dict]] = {}
        self.finals: dict[int, dict] = {}
        self.done = threading.Event()
        self.expected = 0
        self.triggers: dict[tuple[int, int], list[tuple[int, object]]] = {}  # (request, nth event) -> [(id, job)]
        self.tickets = {}

    def submit(self, key: int, job) -> None:
        self.expected += 1
        self.events[key] = []
        self.tickets[key] = self.scheduler.submit(job, lambda event, key=key: self.on_event(key, event))

    def on_event(self, key: int, event: dict) -> None:
        self.events[key].append(event)
        for later_key, job in self.triggers.pop((key, len(self.events[key])), []):
            self.submit(later_key, job)
        if event.get("final"):
            self.finals[key] = event
            if len(self.finals) == self.expected and not self.triggers:
                self.done.set()

    def wait(self) -> dict[int, dict]:
        assert self.done.wait(120), f"only {sorted(self.finals)} of {sorted(self.events)} finished"
        return self.finals


def alone(model, tokenizer, job) -> dict:
    from serve.engine import run_generate

    (result,) = run_generate(model, tokenizer, [job])
    return result


def assert_same_result(got: dict, want: dict) -> None:
    for key in ("text", "token_ids", "finish_reason", "prompt_tokens", "completion_tokens"):
        assert got[key] == want[key], (key, got, want)
    if "logprobs" in want:
        assert [e["token"] for e in got["logprobs"]] == [e["token"] for e in want["logprobs"]]
        for g, w in zip(got["logprobs"], want["logprobs"]):
            assert g["logprob"] == pytest.approx(w["logprob"], abs=1e-4)
            assert list(g["top"]) == list(w["top"])


def mixed_jobs(tokenizer):
    """Prompts of different lengths, greedy and sampled rows, stops, logprobs and different max_tokens."""
    from serve.engine import GenerationJob

    texts = ["Hi", "How do I bake bread at home with a very old oven and no scale?", "Tell me a story.",
             "What is the capital of France, and why is it famous for its food and art?", "Sorry", "Write a poem"]
    ids = [tokenizer.encode(text, add_special_tokens=True) for text in texts]
    return [GenerationJob(ids[0], 12), GenerationJob(ids[1], 5, stream=False),
            GenerationJob(ids[2], 9, temperature=0.9, top_p=0.8, seed=7),
            GenerationJob(ids[3], 14, logprobs=3), GenerationJob(ids[4], 1),
            GenerationJob(ids[5], 11, temperature=1.3, seed=11, logprobs=0),
            GenerationJob(ids[1], 7, stop=["e"]), GenerationJob(ids[2], 10, stop=["zzz-never"])]


def run_mixed(model, tokenizer, jobs, max_batch_size: int) -> dict[int, dict]:
    """Jobs 0-1 start; the others join while they decode (after 2, 3, 5 steps of earlier rows)."""
    from serve.scheduler import Scheduler

    scheduler = Scheduler(model, tokenizer, max_batch_size)
    collector = Collector(scheduler)
    collector.triggers = {(0, 2): [(2, jobs[2]), (3, jobs[3])], (0, 3): [(4, jobs[4])],
                          (2, 2): [(5, jobs[5]), (6, jobs[6])], (3, 5): [(7, jobs[7])]}
    for job in jobs:
        job.stream = True  # events on every step drive the triggers (job 1 stays as given: final only)
    jobs[1].stream = False
    collector.submit(0, jobs[0])
    collector.submit(1, jobs[1])
    try:
        return collector.wait()
    finally:
        scheduler.close()


@pytest.mark.parametrize("max_batch_size", [16, 3])
def test_rows_joining_mid_flight_get_what_unbatched_generation_gives_them(tiny_model, tokenizer, max_batch_size):
    jobs = mixed_jobs(tokenizer)
    finals = run_mixed(tiny_model, tokenizer, jobs, max_batch_size)
    for key, job in enumerate(jobs):
        assert_same_result(finals[key], alone(tiny_model, tokenizer, job))
        assert 1 <= finals[key]["batch_size"] <= max_batch_size
    assert max(f["batch_size"] for f in finals.values()) > 1  # rows really shared steps


def test_streamed_deltas_add_up_to_the_text_and_only_streaming_rows_get_them(tiny_model, tokenizer):
    jobs = mixed_jobs(tokenizer)
    from serve.scheduler import Scheduler

    scheduler = Scheduler(tiny_model, tokenizer, 8)
    collector = Collector(scheduler)
    for key, job in enumerate(jobs):
        collector.submit(key, job)
    try:
        finals = collector.wait()
    finally:
        scheduler.close()
    for key, job in enumerate(jobs):
        events = collector.events[key]
        assert [bool(e.get("final")) for e in events] == [False] * (len(events) - 1) + [True]
        if job.stream:
            assert "".join(e["delta"] for e in events) == finals[key]["text"]
        else:  # the caller wants only the final event (its text is the whole text)
            assert len(events) == 1


def test_a_cancelled_row_leaves_and_its_batch_mates_finish_unchanged(tiny_model, tokenizer):
    from serve.engine import GenerationJob
    from serve.scheduler import Scheduler

    ids = tokenizer.encode("How do I bake bread?", add_special_tokens=True)
    keep, gone = GenerationJob(ids + ids, 10), GenerationJob(ids, 40)
    scheduler = Scheduler(tiny_model, tokenizer, 8)
    collector = Collector(scheduler)
    collector.events[1] = []  # not submitted through the collector: only `keep` is expected to finish
    ticket = scheduler.submit(gone, lambda event: (collector.events[1].append(event),
                                                   len(collector.events[1]) == 3 and scheduler.cancel(ticket)))
    collector.submit(0, keep)
    try:
        finals = collector.wait()
    finally:
        scheduler.close()
    assert_same_result(finals[0], alone(tiny_model, tokenizer, keep))
    assert not any(e.get("final") for e in collector.events[1]) and len(collector.events[1]) == 3
    assert len(scheduler.batch) == 0


def test_a_failing_forward_pass_fails_its_rows_and_the_loop_goes_on(tiny_model, tokenizer):
    from serve.engine import GenerationJob
    from serve.scheduler import Scheduler

    scheduler = Scheduler(tiny_model, tokenizer, 8)
    ids = tokenizer.encode("Hello there", add_special_tokens=True)
    collector = Collector(scheduler)
    collector.submit(0, GenerationJob([10 ** 9], 4))  # an id outside the embedding: the prefill raises
    try:
        assert collector.wait()[0]["finish_reason"] == "error"
        assert "internal" in collector.finals[0]["error"]
        collector.done.clear()
        collector.submit(1, GenerationJob(ids, 6))
        assert_same_result(collector.wait()[1], alone(tiny_model, tokenizer, GenerationJob(ids, 6)))
    finally:
        scheduler.close()


@pytest.mark.parametrize("family", ["llama3_1", "qwen3"])
def test_real_tokenizer_presets_decode_as_unbatched(family, tmp_path):
    """The real Llama 3 / Qwen3 vocabularies (multi-byte tokens, several EOS ids) with a random-init model."""
    from derta.modeling import load_model, load_tokenizer
    from serve.engine import GenerationJob

    source = shared_tokenizer_dir(family)
    if not source.exists():
        pytest.skip(f"shared tokenizer {family} not found")
    model_dir = tiny_model_dir(source, tmp_path / family)
    model, tokenizer = load_model(str(model_dir)).eval(), load_tokenizer(str(model_dir))
    jobs = mixed_jobs(tokenizer)
    finals = run_mixed(model, tokenizer, jobs, 16)
    for key, job in enumerate(jobs):
        assert_same_result(finals[key], alone(model, tokenizer, job))


def test_growing_cache_layer_matches_concatenation_and_writes_steps_in_place():
    import torch

    from serve.scheduler import GrowingLayer

    torch.manual_seed(0)
    layer, keys, values = GrowingLayer(), torch.empty(3, 2, 0, 4), torch.empty(3, 2, 0, 4)
    pointers = []
    for width in (5, 1, 1, 1):  # a prefill, then decoding steps
        k, v = torch.randn(3, 2, width, 4), torch.randn(3, 2, width, 4)
        keys, values = torch.cat([keys, k], -2), torch.cat([values, v], -2)
        got_k, got_v = layer.update(k, v)
        assert torch.equal(got_k, keys) and torch.equal(got_v, values)
        assert layer.get_seq_length() == keys.shape[-2]
        pointers.append(got_k.data_ptr())
    assert len(set(pointers)) == 1  # the steps wrote into the prefill's buffer, no copy of the cache per step
    # what DecodeBatch.drop / join do: replace keys/values with tensors of their own (drop row 1, cut column 0)
    layer.keys, layer.values = layer.keys[torch.tensor([0, 2]), :, 1:], layer.values[torch.tensor([0, 2]), :, 1:]
    keys, values = keys[[0, 2], :, 1:], values[[0, 2], :, 1:]
    for _ in range(GrowingLayer.GROW_MIN + 3):  # past the new buffer's room: it grows again
        k, v = torch.randn(2, 2, 1, 4), torch.randn(2, 2, 1, 4)
        keys, values = torch.cat([keys, k], -2), torch.cat([values, v], -2)
        got_k, got_v = layer.update(k, v)
    assert torch.equal(got_k, keys) and torch.equal(got_v, values)
