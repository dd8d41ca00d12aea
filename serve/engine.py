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


GREEDY_BELOW = 1e-5  # like vLLM: a temperature this small means greedy (1/T would overflow to inf)


@dataclass
class GenerationJob:
    prompt_ids: list[int]
    max_new_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    logprobs: int | None = None  # None: no logprobs; k >= 0: the chosen token's logprob and the top k
    stream: bool = True  # False: the caller wants only the final event, not a delta per step

    @property
    def samples(self) -> bool:
        return self.temperature >= GREEDY_BELOW


class IncrementalDetokenizer:
    """Text of a growing token sequence, decoding only a short window per token (O(1) per step, not O(n)).

    The usual offsets trick (TGI, vLLM): decode ids[prefix:] and ids[prefix:read]; the text they differ by is
    new, once it does not end in an incomplete UTF-8 character. Decoding from `prefix` (one token before the new
    ones) keeps tokenizers that drop a leading space on the first token of a decode honest.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = self.read_offset = 0

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        return self._new_text(final=False)

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the end of the sequence)."""
        return self._new_text(final=True)

    def _new_text(self, final: bool) -> str:
        decode = lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)  # noqa: E731
        prefix = decode(self.ids[self.prefix_offset:self.read_offset])
        text = decode(self.ids[self.prefix_offset:])
        if len(text) > len(prefix) and (final or not text.endswith("\ufffd")):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix):]
        return ""


def token_pieces(tokenizer, ids: list[int]) -> list[str]:
    """Per-token text pieces that concatenate to the decoded text (OpenAI `logprobs.tokens`)."""
    detok = IncrementalDetokenizer(tokenizer)
    pieces = [detok.push(token) for token in ids]
    if pieces:
        pieces[-1] += detok.flush()
    return pieces


class StopMatcher:
    """Stop strings found in O(new text + longest stop) per step, not by rescanning the whole text."""

    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.longest = max(map(len, self.stops), default=0)
        # for holding back a partial stop at the end of the text: k such that stop[:k] may end the text
        self.prefix_ends = [{} for _ in self.stops]
        for ends, stop in zip(self.prefix_ends, self.stops):
            for k in range(len(stop) - 1, 0, -1):  # longest first
                ends.setdefault(stop[k - 1], []).append(k)

    def find(self, text: str, new_from: int) -> int | None:
        """The first stop occurrence that ends after `new_from` (earlier text was searched already)."""
        start = max(0, new_from - self.longest + 1)
        hits = [i for i in (text.find(s, start) for s in self.stops) if i >= 0]
        return min(hits, default=None)

    def held_back(self, text: str) -> int:
        """How many trailing characters could still become the start of a stop string."""
        if not text:
            return 0
        last = text[-1]
        held = 0
        for stop, ends in zip(self.stops, self.prefix_ends):
            held = max(held, next((k for k in ends.get(last, ()) if k > held and text.endswith(stop[:k])), 0))
        return held


class RowDecoder:
    """Incremental detokenization of one sequence, with stop strings, EOS, a token budget and logprobs."""

    def __init__(self, tokenizer, job: GenerationJob, eos_ids: set[int]):
        self.tokenizer, self.job, self.eos_ids = tokenizer, job, eos_ids
        self.detok = IncrementalDetokenizer(tokenizer)
        self.stops = StopMatcher(job.stop)
        self.token_ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.finish_reason: str | None = None
        self.error: str | None = None
        self.step_log_probs = None  # this step's log-softmax over the vocabulary (set by RowProcessor)
        self.logprobs: list[dict] = []  # per generated token: {"token", "logprob", "top": {id: logprob}}

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids) + (self.finish_reason == "eos")

    def fail(self, message: str) -> None:
        """This row alone ends with an error; its batch mates go on."""
        self.finish_reason, self.error = "error", message

    def push(self, token_id: int) -> None:
        self._record_logprob(token_id)
        if token_id in self.eos_ids:
            self.finish_reason = "eos"
            self.text += self.detok.flush()
            return
        self.token_ids.append(token_id)
        new_from = len(self.text)
        self.text += self.detok.push(token_id)
        cut = self.stops.find(self.text, new_from) if self.stops.stops else None
        if cut is not None:
            self.text, self.finish_reason = self.text[:cut], "stop"
        elif len(self.token_ids) >= self.job.max_new_tokens:
            self.finish_reason = "length"
            self.text += self.detok.flush()

    def _record_logprob(self, token_id: int) -> None:
        if self.job.logprobs is None or self.step_log_probs is None:
            return
        log_probs, self.step_log_probs = self.step_log_probs, None
        top = {}
        if self.job.logprobs > 0:
            values, ids = log_probs.topk(self.job.logprobs)
            top = dict(zip(ids.tolist(), values.tolist()))
        self.logprobs.append({"token": token_id, "logprob": float(log_probs[token_id]), "top": top})

    def take_delta(self) -> str:
        """New text that can no longer change: holds back a partial stop string."""
        end = len(self.text) if self.finished else len(self.text) - self.stops.held_back(self.text)
        delta = self.text[self.emitted:end]
        self.emitted = max(self.emitted, end)
        return delta

    def result(self) -> dict:
        finish = {"length": "length", "error": "error"}.get(self.finish_reason, "stop")
        out = {"text": self.text, "token_ids": list(self.token_ids), "prompt_tokens": len(self.job.prompt_ids),
               "completion_tokens": self.completion_tokens, "finish_reason": finish}
        if self.error:
            out["error"] = self.error
        if self.job.logprobs is not None:
            out["logprobs"] = list(self.logprobs)
        return out


def sample_token(logits, temperature: float, top_p: float, generator) -> int:
    """One draw from softmax(logits / temperature) restricted to the top_p nucleus; ValueError if impossible."""
    import torch

    logits = logits.float()
    best = logits.max()
    if not torch.isfinite(best):
        raise ValueError("the model produced non-finite logits")
    if temperature < GREEDY_BELOW:
        return int(logits.argmax())
    probs = torch.softmax((logits - best) / temperature, dim=-1)  # max-shifted: no overflow for small T
    if top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        keep = sorted_probs.cumsum(-1) - sorted_probs < top_p  # the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
    if not bool(torch.isfinite(probs).all()) or float(probs.sum()) <= 0:
        raise ValueError(f"cannot sample at temperature={temperature}, top_p={top_p}")
    return int(torch.multinomial(probs, 1, generator=generator))


def row_error(err: Exception) -> str:
    """A row's failure as the client sees it: our own ValueErrors say why, anything else only what kind."""
    return str(err) if isinstance(err, ValueError) else f"internal {type(err).__name__} while decoding"


class RowProcessor:
    """Per-row sampling and logprobs inside one batched greedy `generate`.

    A sampled row's scores become a one-hot on its own seeded draw, so each request's randomness depends only on
    its seed, never on its batch mates. Anything that goes wrong for one row (its sampling, its logprobs) ends
    that row with an error and leaves the others untouched.
    """

    def __init__(self, rows: list[RowDecoder]):
        import torch

        self.rows = rows
        self.generators = [torch.Generator().manual_seed(row.job.seed if row.job.seed is not None
                                                         else secrets.randbits(63)) for row in rows]

    def __call__(self, input_ids, scores):
        import torch

        for index, row in enumerate(self.rows):
            if row.finished:
                continue
            try:
                if row.job.logprobs is not None:
                    row.step_log_probs = torch.log_softmax(scores[index].float(), dim=-1).cpu()
                if row.job.samples:
                    token = sample_token(scores[index].cpu(), row.job.temperature, row.job.top_p,
                                         self.generators[index])
                    scores[index] = float("-inf")
                    scores[index, token] = 0.0
            except Exception as err:  # noqa: BLE001 -- isolate the row; the message names the cause
                row.fail(row_error(err))
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
                try:
                    row.push(token)
                except Exception as err:  # noqa: BLE001 -- e.g. a tokenizer that cannot decode this id
                    row.fail(row_error(err))
        self.emit()
        return torch.tensor([row.finished for row in self.rows], device=input_ids.device)

    def emit(self) -> None:
        """Per-step events to `on_step`; a step whose only news is deltas for rows nobody streams is not reported
        (under Serve each reported step wakes every request of the batch: ~5% of a batch's decode time)."""
        events, news = [], False
        for index, row in enumerate(self.rows):
            if self.done_before[index]:
                events.append(None)
                continue
            event = {"delta": row.take_delta()}
            if row.finished:
                event.update(row.result(), final=True)
                self.done_before[index] = True
            news = news or row.finished or (row.job.stream and bool(event["delta"]))
            events.append(event)
        if self.on_step and news:
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
    processor = [RowProcessor(rows)] if any(job.samples or job.logprobs is not None for job in jobs) else []
    with torch.no_grad():
        model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config,
                       logits_processor=LogitsProcessorList(processor),
                       stopping_criteria=StoppingCriteriaList([tracker]))
    for row in rows:  # generate may end before a row's own stop (e.g. the model's context length)
        if not row.finished:
            row.finish_reason = "length"
            row.text += row.detok.flush()
    if not all(tracker.done_before):
        tracker.emit()
    return [row.result() for row in rows]


# ============================================================================================ one model
class TokenBudget:
    """A per-replica bound on the tokens in flight (prompt + new tokens of every admitted request): what activations
    and KV cache scale with. A request that does not fit now is a 503 + Retry-After, one that never fits a 413."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def acquire(self, tokens: int) -> None:
        if tokens > self.limit:
            raise ServeError(413, f"this request needs {tokens} tokens in flight; the replica's budget is "
                                  f"serve.max_inflight_tokens={self.limit}", code="over_budget")
        if self.used + tokens > self.limit:
            raise ServeError(503, "the replica's token budget is in use, retry later", code="overloaded")
        self.used += tokens

    def release(self, tokens: int) -> None:
        self.used -= tokens


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
        self.model = load_model(self.path, self.cfg.model, self.device, self.adapter,
                                device_map=device_map(self.device, gpu_count())).eval()

    def info(self) -> dict:
        s = self.cfg.serve
        model = self.model
        return {
            "model": self.name, "path": public_path(self.path), "adapter": public_path(self.adapter),
            "device": self.device, "dtype": str(model.dtype).removeprefix("torch.") if model else None,
            "chat_template": bool(self.renderer and self.renderer.use_chat),
            "refusal_strings": self.cfg.data.probe_refusal_strings,
            "refusal_tokens": [self.tokenizer.decode([i]) for i in self.refusal_ids] if self.tokenizer else [],
            "refusal_token_ids": self.refusal_ids, "probe_threshold": s.probe_threshold,
            "limits": {"max_input_tokens": s.max_input_tokens, "max_new_tokens": s.max_new_tokens,
                       "max_batch_size": s.max_batch_size, "batch_wait_timeout_s": s.batch_wait_timeout_s,
                       "batch_fill_fraction": s.batch_fill_fraction,
                       "continuous_batching": s.continuous_batching,
                       "max_ongoing_requests": s.max_ongoing_requests, "max_queued_requests": s.max_queued_requests,
                       "probe_verify_tokens": s.probe_verify_tokens},
        }

    # ------------------------------------------------------------------------------------ tokenization
    def prompt_ids(self, request: dict) -> list[int]:
        texts = [request.get("prompt") or "", request.get("raw_prompt") or ""]
        self.check_chars("".join(texts + [m["content"] for m in request.get("messages") or []]), "prompt")
        if request.get("prompt_token_ids") is not None:
            return self.checked_token_ids(request["prompt_token_ids"])
        try:
            if request.get("raw_prompt") is not None:
                ids = self.renderer.encode_prompt(request["raw_prompt"])  # one BOS; the text is not templated
            elif request.get("messages") is not None:
                ids = self.renderer.encode_prompt(self.render_chat(
                    request["messages"], request.get("add_generation_prompt", True),
                    request.get("continue_final_message", False)))
            else:
                ids = self.renderer.encode_prompt(self.renderer.render(request["prompt"]))
        except Exception as err:  # e.g. a chat template that rejects the role order
            raise field_error(("messages",), f"cannot render the prompt: {err}") from None
        if not ids:
            raise field_error(("prompt",), "the prompt tokenizes to nothing")
        return ids

    def render_chat(self, messages: list[dict], add_generation_prompt: bool = True,
                    continue_final_message: bool = False) -> str:
        """A conversation as prompt text; `continue_final_message` leaves the last (assistant) message open for
        the model to continue (assistant prefill, as in vLLM and transformers)."""
        if self.renderer.use_chat and (continue_final_message or not add_generation_prompt):
            return self.tokenizer.apply_chat_template(messages, tokenize=False,
                                                      add_generation_prompt=add_generation_prompt,
                                                      continue_final_message=continue_final_message)
        if continue_final_message:  # plain template: the turns before, then the open assistant text
            return self.renderer.render_messages(messages[:-1]) + messages[-1]["content"]
        return self.renderer.render_messages(messages)

    def checked_token_ids(self, ids: list[int]) -> list[int]:
        vocab = max(len(self.tokenizer), getattr(self.model.config, "vocab_size", 0) or 0)
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise field_error(("prompt",), f"token ids {bad[:5]} are outside the vocabulary 0..{vocab - 1}")
        self.check_input_tokens(len(ids))
        return list(ids)

    def echo(self, prompt_ids: list[int], logprobs: int | None) -> dict:
        """The prompt as OpenAI `echo` returns it: its text, and with `logprobs` each prompt token's logprob
        (None for the first) and top alternatives, from ONE forward pass over the prompt."""
        import torch

        pieces = token_pieces(self.tokenizer, prompt_ids)
        if logprobs is None:
            return {"text": "".join(pieces), "tokens": None}
        with torch.no_grad():
            logits = self.model(input_ids=torch.tensor([prompt_ids], device=self.model.device)).logits[0, :-1]
        log_probs = torch.log_softmax(logits.float(), dim=-1)
        chosen = log_probs.gather(1, torch.tensor(prompt_ids[1:], device=log_probs.device)[:, None])[:, 0].tolist()
        tops = [{}] * len(chosen)
        if logprobs > 0 and chosen:
            values, ids = log_probs.topk(logprobs, dim=-1)
            tops = [dict(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
        entries = [{"token": prompt_ids[0], "logprob": None, "top": None}]
        entries += [{"token": t, "logprob": lp, "top": top} for t, lp, top in zip(prompt_ids[1:], chosen, tops)]
        return {"text": "".join(pieces), "tokens": self.readable_logprobs(entries, pieces)}

    def readable_logprobs(self, entries: list[dict], pieces: list[str] | None = None) -> list[dict]:
        """Token ids -> text: {"text": piece, "logprob", "top": [(text, logprob), ...] or None} per token; the
        pieces concatenate to the decoded text."""
        pieces = pieces if pieces is not None else token_pieces(self.tokenizer, [e["token"] for e in entries])
        decode = lambda token: self.tokenizer.decode([token])  # noqa: E731
        return [{"text": piece, "logprob": e["logprob"],
                 "top": None if e["top"] is None else [(decode(t), lp) for t, lp in e["top"].items()]}
                for piece, e in zip(pieces, entries)]

    def check_chars(self, text: str, name: str) -> None:
        if len(text) > self.cfg.serve.max_input_tokens * MAX_CHARS_PER_TOKEN:
            raise ServeError(413, f"{name} is {len(text)} characters; the input limit is "
                                  f"serve.max_input_tokens={self.cfg.serve.max_input_tokens} tokens",
                             param=name, code="input_too_long")

    def check_input_tokens(self, count: int) -> None:
        limit = self.cfg.serve.max_input_tokens
        if count > limit:
            raise ServeError(413, f"input is {count} tokens; the limit is serve.max_input_tokens={limit}",
                             code="input_too_long")

    def job(self, request: dict, stream: bool = True) -> GenerationJob:
        prompt_ids = self.prompt_ids(request)
        self.check_input_tokens(len(prompt_ids))
        return GenerationJob(prompt_ids, request["max_new_tokens"], request.get("temperature", 0.0),
                             request.get("top_p", 1.0), request.get("seed"), list(request.get("stop") or []),
                             request.get("logprobs"), stream)

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

    def probe_batch(self, items: list[tuple[list[int], list[int], float]]) -> list:
        """Many probes, one forward pass (derta.probe.probe_batch): items are (prompt_ids, response_ids, threshold)."""
        from derta.probe import probe_batch

        return probe_batch(self.model, [(p, r) for p, r, _ in items], self.refusal_ids, [t for _, _, t in items])

    def probe_cost(self, prompt_ids: list[int], response_ids: list[int], verify: tuple[list[int], int] | None) -> int:
        """Tokens a probe holds on the replica: its forward pass, plus every verify row's prefill + budget."""
        cost = len(prompt_ids) + len(response_ids)
        if verify:
            positions, tokens = verify
            cost += sum(len(prompt_ids) + i + tokens for i in positions)
        return cost

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


def gpu_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def device_map(device: str, gpus: int) -> str | None:
    """A replica with several GPUs (ray_actor_options.num_gpus > 1; Ray sets CUDA_VISIBLE_DEVICES to exactly those)
    spreads the model's layers across them; one GPU or CPU loads it whole onto `device`."""
    return "auto" if device.startswith("cuda") and gpus > 1 else None


def public_path(path: str | None) -> str | None:
    """What /info may show of a model path: a hub id as is, a local directory by its last two components only
    (the server's directory layout is nobody's business)."""
    if path is None or not Path(path).is_absolute():
        return path
    return "/".join(Path(path).parts[-2:])


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
