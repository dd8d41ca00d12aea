"""The HF generation engine behind the model deployment; plain Python + torch + transformers, no Ray.

`run_generate` decodes many requests in ONE left-padded batched `model.generate`, each row with its own
sampling, seed, stop strings and token budget (`RowDecoder`, `RowSampler`, `RowTracker`). `Engine` holds one
model + tokenizer: it turns request dicts into token ids (the one place that tokenizes for serving), checks the
input limits, runs the refusal probe and its `verify` continuations.
"""
from __future__ import annotations

import json
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from derta.config import DertaConfig
from serve.protocol import MAX_CHARS_PER_TOKEN, ServeError, field_error


@dataclass
class GenerationJob:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


class RowDecoder:
    """Incremental detokenization of one sequence, with stop strings, EOS and a token budget."""

    def __init__(self, tokenizer, job: GenerationJob, eos_ids: set[int]):
        self.tokenizer, self.job, self.eos_ids = tokenizer, job, eos_ids
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finish_reason: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids) + (self.finish_reason == "eos")

    def push(self, token_id: int) -> None:
        if token_id in self.eos_ids:
            self.finish_reason = "eos"
            return
        self.token_ids.append(token_id)
        self.text = self.tokenizer.decode(self.token_ids, skip_special_tokens=True)
        cut = min((i for i in (self.text.find(s) for s in self.job.stop) if i >= 0), default=None)
        if cut is not None:
            self.text, self.finish_reason = self.text[:cut], "stop"
        elif len(self.token_ids) >= self.job.max_new_tokens:
            self.finish_reason = "length"

    def take_delta(self) -> str:
        """New text that can no longer change: holds back a partial UTF-8 char or a partial stop string."""
        end = len(self.text) if self.finished else self._stable_end()
        delta = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta

    def _stable_end(self) -> int:
        text = self.text.rstrip("\ufffd")
        held = max((k for s in self.job.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        return len(text) - held

    def result(self) -> dict:
        return {"text": self.text, "token_ids": list(self.token_ids), "prompt_tokens": len(self.job.prompt_ids),
                "completion_tokens": self.completion_tokens,
                "finish_reason": "length" if self.finish_reason == "length" else "stop"}


def sample_token(logits, temperature: float, top_p: float, generator) -> int:
    import torch

    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    return int(torch.multinomial(probs, 1, generator=generator))


class RowSampler:
    """Per-row seeded sampling inside one batched greedy `generate`: a sampled row's scores become a one-hot
    on its draw, so each request's randomness depends only on its own seed, never on its batch mates."""

    def __init__(self, jobs: list[GenerationJob]):
        import torch

        self.jobs = jobs
        self.generators = [torch.Generator().manual_seed(job.seed if job.seed is not None
                                                         else secrets.randbits(63)) for job in jobs]

    def __call__(self, input_ids, scores):
        for row, job in enumerate(self.jobs):
            if job.temperature > 0:
                token = sample_token(scores[row].cpu(), job.temperature, job.top_p, self.generators[row])
                scores[row] = float("-inf")
                scores[row, token] = 0.0
        return scores


class RowTracker:
    """Stopping criterion that feeds each new token to its row and reports per-step events to `on_step`."""

    def __init__(self, rows: list[RowDecoder], on_step: Callable[[list[dict | None]], None] | None):
        self.rows, self.on_step = rows, on_step
        self.done_before = [False] * len(rows)

    def __call__(self, input_ids, scores, **kwargs):
        import torch

        for row, token in zip(self.rows, input_ids[:, -1].tolist()):
            if not row.finished:
                row.push(token)
        self.emit()
        return torch.tensor([row.finished for row in self.rows], device=input_ids.device)

    def emit(self) -> None:
        events = []
        for index, row in enumerate(self.rows):
            if self.done_before[index]:
                events.append(None)
                continue
            event = {"delta": row.take_delta()}
            if row.finished:
                event.update(row.result(), final=True)
                self.done_before[index] = True
            events.append(event)
        if self.on_step:
            self.on_step(events)


def left_pad(sequences: list[list[int]], pad_id: int, device: str):
    import torch

    width = max(map(len, sequences))
    input_ids = [[pad_id] * (width - len(s)) + s for s in sequences]
    mask = [[0] * (width - len(s)) + [1] * len(s) for s in sequences]
    return torch.tensor(input_ids, device=device), torch.tensor(mask, device=device)


def eos_token_ids(model, tokenizer) -> set[int]:
    """generation_config.json's eos list + the tokenizer's eos + the chat template's end-of-turn token."""
    from derta.tokens import stop_token_ids

    return set(stop_token_ids(tokenizer, getattr(model, "generation_config", None)))


def run_generate(model, tokenizer, jobs: list[GenerationJob],
                 on_step: Callable[[list[dict | None]], None] | None = None) -> list[dict]:
    """One left-padded batched `model.generate` for all jobs; returns one result dict per job."""
    import torch
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    eos_ids = eos_token_ids(model, tokenizer)
    rows = [RowDecoder(tokenizer, job, eos_ids) for job in jobs]
    tracker = RowTracker(rows, on_step)
    pad_id = tokenizer.pad_token_id
    input_ids, attention_mask = left_pad([job.prompt_ids for job in jobs], pad_id, model.device)
    config = GenerationConfig(max_new_tokens=max(job.max_new_tokens for job in jobs), do_sample=False,
                              pad_token_id=pad_id, eos_token_id=sorted(eos_ids))
    sampler = [RowSampler(jobs)] if any(job.temperature > 0 for job in jobs) else []
    with torch.no_grad():
        model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                       logits_processor=LogitsProcessorList(sampler),
                       stopping_criteria=StoppingCriteriaList([tracker]))
    for row in rows:  # generate may end before a row's own stop (e.g. the model's context length)
        if not row.finished:
            row.finish_reason = "length"
    if not all(tracker.done_before):
        tracker.emit()
    return [row.result() for row in rows]


# ============================================================================================ one model
class Engine:
    """One model + tokenizer + prompt renderer, and everything the routes need from them."""

    def __init__(self, cfg: DertaConfig, name: str, path: str, adapter: str | None, device: str):
        self.cfg, self.name, self.path, self.adapter, self.device = cfg, name, path, adapter, device
        self.model = self.tokenizer = self.renderer = None
        self.refusal_ids: list[int] = []

    def load(self) -> None:
        from derta.modeling import load_model, load_tokenizer
        from derta.transforms import PromptRenderer, refusal_token_ids

        data = self.cfg.data
        self.tokenizer = load_tokenizer(tokenizer_source(self.cfg, self.path, self.adapter),
                                        self.cfg.model.trust_remote_code)
        self.renderer = PromptRenderer(self.tokenizer, data.use_chat_template, data.plain_template,
                                       data.system_prompt)
        self.refusal_ids = refusal_token_ids(self.tokenizer, data.probe_refusal_strings)
        self.model = load_model(self.path, self.cfg.model, self.device, self.adapter).eval()

    def info(self) -> dict:
        s = self.cfg.serve
        model = self.model
        return {
            "model": self.name, "path": self.path, "adapter": self.adapter,
            "device": self.device, "dtype": str(model.dtype).removeprefix("torch.") if model else None,
            "chat_template": bool(self.renderer and self.renderer.use_chat),
            "refusal_strings": self.cfg.data.probe_refusal_strings,
            "refusal_tokens": [self.tokenizer.decode([i]) for i in self.refusal_ids] if self.tokenizer else [],
            "refusal_token_ids": self.refusal_ids, "probe_threshold": s.probe_threshold,
            "limits": {"max_input_tokens": s.max_input_tokens, "max_new_tokens": s.max_new_tokens,
                       "max_batch_size": s.max_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s,
                       "max_ongoing_requests": s.max_ongoing_requests, "max_queued_requests": s.max_queued_requests,
                       "probe_verify_tokens": s.probe_verify_tokens},
        }

    # ------------------------------------------------------------------------------------ tokenization
    def prompt_ids(self, request: dict) -> list[int]:
        texts = [request.get("prompt") or "", request.get("raw_prompt") or ""]
        self.check_chars("".join(texts + [m["content"] for m in request.get("messages") or []]), "prompt")
        try:
            if request.get("raw_prompt") is not None:
                ids = self.renderer.encode_prompt(request["raw_prompt"])  # one BOS; the text is not templated
            elif request.get("messages") is not None:
                ids = self.renderer.encode_prompt(self.renderer.render_messages(request["messages"]))
            else:
                ids = self.renderer.encode_prompt(self.renderer.render(request["prompt"]))
        except Exception as err:  # e.g. a chat template that rejects the role order
            raise field_error(("messages",), f"cannot render the prompt: {err}") from None
        if not ids:
            raise field_error(("prompt",), "the prompt tokenizes to nothing")
        return ids

    def check_chars(self, text: str, name: str) -> None:
        if len(text) > self.cfg.serve.max_input_tokens * MAX_CHARS_PER_TOKEN:
            raise ServeError(413, f"{name} is {len(text)} characters; the input limit is "
                                  f"serve.max_input_tokens={self.cfg.serve.max_input_tokens} tokens")

    def check_input_tokens(self, count: int) -> None:
        limit = self.cfg.serve.max_input_tokens
        if count > limit:
            raise ServeError(413, f"input is {count} tokens; the limit is serve.max_input_tokens={limit}")

    def job(self, request: dict) -> GenerationJob:
        prompt_ids = self.prompt_ids(request)
        self.check_input_tokens(len(prompt_ids))
        return GenerationJob(prompt_ids, request["max_new_tokens"], request.get("temperature", 0.0),
                             request.get("top_p", 1.0), request.get("seed"), list(request.get("stop") or []))

    def generate(self, jobs: list[GenerationJob], on_step: Callable[[list[dict | None]], None] | None = None):
        return run_generate(self.model, self.tokenizer, jobs, on_step)

    # ------------------------------------------------------------------------------------ probe
    def probe_inputs(self, request: dict) -> tuple[list[int], list[int], tuple[list[int], int] | None, float]:
        """Validate a /probe request: (prompt_ids, response_ids, verify plan, threshold)."""
        prompt_ids = self.prompt_ids(request)
        self.check_chars(request["response"], "response")
        response_ids = self.tokenizer.encode(request["response"], add_special_tokens=False)
        self.check_input_tokens(len(prompt_ids) + len(response_ids))
        verify = self.verify_plan(request.get("verify"), len(response_ids))
        threshold = request.get("threshold") or self.cfg.serve.probe_threshold
        return prompt_ids, response_ids, verify, threshold

    def probe(self, prompt_ids: list[int], response_ids: list[int], threshold: float):
        from derta.probe import probe as probe_sequence

        return probe_sequence(self.model, prompt_ids, response_ids, self.refusal_ids, threshold)

    def probe_report(self, result, response_ids: list[int], threshold: float) -> dict:
        decode = lambda token: self.tokenizer.decode([token])  # noqa: E731
        positions = [{"i": i, "token": decode(response_ids[i]) if i < len(response_ids) else None,
                      "p_refusal": p, "top_token": decode(top)}
                     for i, (p, top) in enumerate(zip(result.refusal_prob, result.top_token_ids))]
        return {"model": self.name, "positions": positions, "first_crossing": result.first_crossing,
                "min": result.min_prob, "mean": result.mean_prob, "threshold": threshold,
                "refusal_tokens": [decode(i) for i in self.refusal_ids], "response_tokens": len(response_ids)}

    def verify_plan(self, verify: dict | None, response_len: int) -> tuple[list[int], int] | None:
        if not verify:
            return None
        bad = [i for i in verify["positions"] if not 0 <= i <= response_len]
        if bad:
            raise field_error(("verify", "positions"), f"positions {bad} are outside 0..{response_len} "
                                                       "(the response has that many tokens)")
        tokens = verify.get("tokens") or self.cfg.serve.probe_verify_tokens
        if tokens > self.cfg.serve.max_new_tokens:
            limit = self.cfg.serve.max_new_tokens
            raise field_error(("verify", "tokens"), f"{tokens} exceeds serve.max_new_tokens={limit}")
        return sorted(set(verify["positions"])), tokens

    def verify(self, prompt_ids: list[int], response_ids: list[int], positions: list[int], tokens: int) -> list:
        """Prefill prompt + response[:i] and greedily continue: does the model actually refuse there?"""
        jobs = [GenerationJob(prompt_ids + response_ids[:i], tokens) for i in positions]
        results = run_generate(self.model, self.tokenizer, jobs)
        return [{"i": i, "continuation": r["text"],
                 "refuses": continuation_refuses(r["text"], r["token_ids"], self.refusal_ids)}
                for i, r in zip(positions, results)]


def tokenizer_source(cfg: DertaConfig, path: str, adapter: str | None) -> str:
    """The explicit `model.tokenizer`, else the adapter's own tokenizer if it saved one, else the model's."""
    if cfg.model.tokenizer:
        return cfg.model.tokenizer
    for candidate in (adapter, path):
        if candidate and (Path(candidate) / "tokenizer_config.json").exists():
            return candidate
    adapter_config = Path(path) / "adapter_config.json"
    if adapter_config.exists():
        return json.loads(adapter_config.read_text())["base_model_name_or_path"]
    return path


def continuation_refuses(text: str, token_ids: list[int], refusal_ids: list[int]) -> bool:
    """Does a greedy continuation refuse? The shared rule-based judge if present, else its first token."""
    try:
        from derta.judge import is_refusal_text
    except ImportError:
        return bool(token_ids) and token_ids[0] in refusal_ids
    return is_refusal_text(text)
