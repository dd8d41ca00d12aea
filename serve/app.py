"""Ray Serve application for derta: generation, the refusal-position probe and an OpenAI-compatible API.

Two deployments built from ONE `DertaConfig`:

    DertaIngress  FastAPI over HTTP: request validation, API key, model-name routing, SSE, error mapping.
    DertaModel    one model + tokenizer per replica: dynamic batching (`@serve.batch`) of left-padded
                  `model.generate` calls, and `/probe` through `derta.probe` (one forward pass).

`build_app({"config": ..., "model": ..., "set": [...]})` is the import path `serve/serve_config.yaml` uses;
`run_local(cfg)` is `derta serve`. Requests name models only from `serve.registry` or `serve.model_name`;
no request field ever becomes a filesystem path.
"""
from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray import serve

from derta.config import REPO_ROOT, DertaConfig, ServeConfig, load_config

HEALTH_ROUTE = "/health"
MAX_CHARS_PER_TOKEN = 64  # text longer than max_input_tokens * this is rejected before tokenizing
FINAL_FIELDS = ("text", "finish_reason", "prompt_tokens", "completion_tokens", "batch_size")
ROUTES = ("/generate", "/probe", "/v1/completions", "/v1/chat/completions", "/v1/models", HEALTH_ROUTE,
          "/ready", "/info")


# ============================================================================================ request bodies
class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Message(Body):
    role: Literal["system", "user", "assistant"]
    content: str


class PromptFields(Body):
    model: str | None = Field(None, description="a name from serve.registry, or serve.model_name (default)")
    prompt: str | None = Field(None, description="one user turn, rendered with the chat template")
    messages: list[Message] | None = Field(None, min_length=1, max_length=256)

    @model_validator(mode="after")
    def _one_prompt(self):
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give exactly one of 'prompt' or 'messages'")
        return self


class SamplingFields(Body):
    temperature: float = Field(0.0, ge=0, le=5, allow_inf_nan=False)
    top_p: float = Field(1.0, gt=0, le=1, allow_inf_nan=False)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stream: bool = False


class GenerateRequest(PromptFields, SamplingFields):
    max_new_tokens: int = Field(64, ge=1)
    stop: list[str] = Field(default_factory=list, max_length=8)


class VerifyRequest(Body):
    positions: list[int] = Field(min_length=1, max_length=32)
    tokens: int | None = Field(None, ge=1)


class ProbeRequest(PromptFields):
    response: str
    threshold: float | None = Field(None, gt=0, lt=1, allow_inf_nan=False)
    verify: VerifyRequest | None = None


class OpenAIFields(SamplingFields):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, logprobs, ...)
    model: str
    temperature: float = Field(1.0, ge=0, le=5, allow_inf_nan=False)
    max_tokens: int | None = Field(None, ge=1)
    stop: str | list[str] | None = None
    n: int = Field(1, ge=1, le=1)

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class CompletionRequest(OpenAIFields):
    prompt: str | list[str] = Field(description="raw text (no chat template); one prompt per request")

    def single_prompt(self) -> str | None:
        if isinstance(self.prompt, str):
            return self.prompt
        return self.prompt[0] if len(self.prompt) == 1 else None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: str | list[TextPart]

    def plain(self) -> dict:
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatCompletionRequest(OpenAIFields):
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_completion_tokens: int | None = Field(None, ge=1)


class BuildArgs(BaseModel):
    model_config = ConfigDict(extra="forbid")
    config: str | None = None
    model: str | None = None
    set: list[str] = Field(default_factory=list)


@dataclass
class Rejection:
    """A request DertaModel refuses (bad input, over a limit, not loaded). Returned, not raised, so that
    client errors cross the handle as plain values instead of logged tracebacks."""

    status_code: int
    detail: Any


class ServeError(Exception):
    """An error with an HTTP status; DertaModel returns it to the ingress as a `Rejection`."""

    def __init__(self, status_code: int, detail: Any):
        super().__init__(status_code, detail)
        self.status_code, self.detail = status_code, detail

    def rejection(self) -> Rejection:
        return Rejection(self.status_code, self.detail)


def field_error(loc: tuple, message: str) -> ServeError:
    """A 422 shaped like FastAPI's validation errors, so clients see one format for every bad field."""
    return ServeError(422, [{"loc": ["body", *loc], "msg": message, "type": "value_error"}])


# ============================================================================================ decoding engine
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
    configured = getattr(model.generation_config, "eos_token_id", None)
    ids = configured if isinstance(configured, list) else [configured]
    return {i for i in ids + [tokenizer.eos_token_id] if i is not None}


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


# ============================================================================================ model loading
def model_sources(cfg: DertaConfig, model: str | None = None) -> dict[str, dict[str, str | None]]:
    """Served name -> {path, adapter}: the default model plus every `serve.registry` entry."""
    default = {"path": absolute_if_local(model or cfg.model.name_or_path),
               "adapter": absolute_if_local(cfg.model.adapter)}
    sources = {cfg.serve.model_name: default}
    for name, entry in cfg.serve.registry.items():
        if "path" not in entry:
            raise ValueError(f"serve.registry.{name}: needs a 'path' (and optionally an 'adapter')")
        sources[name] = {"path": absolute_if_local(entry["path"]), "adapter": absolute_if_local(entry.get("adapter"))}
    return sources


def absolute_if_local(path: str | None) -> str | None:
    """Replicas may run in another working directory: pin existing relative paths to this one."""
    if path is None or path == "tiny":
        return path
    local = Path(os.path.expanduser(path))
    return str(local.resolve()) if local.exists() else path


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


def resolve_source(cfg: DertaConfig, source: dict) -> str:
    from derta.modeling import resolve_model_path

    model_cfg = cfg.model.model_copy(update={"name_or_path": source["path"]})
    return resolve_model_path(model_cfg, cfg.data.synthetic, cfg.data.refusal_string)


def continuation_refuses(text: str, token_ids: list[int], refusal_ids: list[int]) -> bool:
    """Does a greedy continuation refuse? The shared rule-based judge if present, else its first token."""
    try:
        from derta.judge import is_refusal_text
    except ImportError:
        return bool(token_ids) and token_ids[0] in refusal_ids
    return is_refusal_text(text)


# ============================================================================================ model deployment
@serve.deployment
class DertaModel:
    """One model per replica, loaded before the replica takes traffic."""

    async def __init__(self, config: dict, name: str, source: dict):
        import torch

        self.cfg = DertaConfig.model_validate(config)
        self.name, self.adapter = name, source.get("adapter")
        self.path = resolve_source(self.cfg, source)  # fails the deployment early on a bad path
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = self.tokenizer = self.renderer = None
        self.refusal_ids: list[int] = []
        self.load_error: BaseException | None = None
        self.loaded = threading.Event()
        self._generate_batch.set_max_batch_size(self.cfg.serve.max_batch_size)
        self._generate_batch.set_batch_wait_timeout_s(self.cfg.serve.batch_wait_timeout_s)
        self._init_metrics()
        # Serve routes traffic to a replica once __init__ returns: load first, so a new or restarted replica
        # (node loss, autoscale-up) never answers "still loading"; a load error fails the replica
        await asyncio.to_thread(self._load)
        self.check_health()

    def _init_metrics(self) -> None:
        from ray.serve.metrics import Counter, Histogram

        self.probe_latency = Histogram("derta_probe_latency_ms", description="/probe model time (ms)",
                                       boundaries=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000])
        self.batch_sizes = Histogram("derta_generate_batch_size", description="requests per generate batch",
                                     boundaries=[1, 2, 4, 8, 16, 32, 64])
        self.generated_tokens = Counter("derta_generated_tokens", description="completion tokens generated")

    def _load(self) -> None:
        from derta.modeling import load_model, load_tokenizer
        from derta.transforms import PromptRenderer, refusal_token_ids

        try:
            data = self.cfg.data
            self.tokenizer = load_tokenizer(tokenizer_source(self.cfg, self.path, self.adapter),
                                            self.cfg.model.trust_remote_code)
            self.renderer = PromptRenderer(self.tokenizer, data.use_chat_template, data.plain_template,
                                           data.system_prompt)
            self.refusal_ids = refusal_token_ids(self.tokenizer, data.probe_refusal_strings)
            self.model = load_model(self.path, self.cfg.model, self.device, self.adapter).eval()
        except BaseException as err:  # reported by check_health, /ready and every request
            self.load_error = err
        finally:
            self.loaded.set()

    def check_health(self) -> None:
        if self.load_error is not None:
            raise RuntimeError(f"model {self.path} failed to load: {self.load_error!r}")

    def ready(self) -> bool:
        return self.loaded.is_set() and self.load_error is None

    def _require_model(self) -> None:
        if not self.ready():
            reason = f"failed to load: {self.load_error!r}" if self.load_error else "is still loading"
            raise ServeError(503, f"model {self.name!r} {reason}")

    def info(self) -> dict:
        s = self.cfg.serve
        model = self.model
        return {
            "model": self.name, "path": self.path, "adapter": self.adapter, "ready": self.ready(),
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
    def _prompt_ids(self, request: dict) -> list[int]:
        self._require_model()
        texts = [request.get("prompt") or "", request.get("raw_prompt") or ""]
        self._check_chars("".join(texts + [m["content"] for m in request.get("messages") or []]), "prompt")
        try:
            if request.get("raw_prompt") is not None:
                ids = self.tokenizer.encode(request["raw_prompt"], add_special_tokens=True)
            elif request.get("messages") is not None:
                ids = self.renderer.encode_prompt(self.renderer.render_messages(request["messages"]))
            else:
                ids = self.renderer.encode_prompt(self.renderer.render(request["prompt"]))
        except Exception as err:  # e.g. a chat template that rejects the role order
            raise field_error(("messages",), f"cannot render the prompt: {err}") from None
        if not ids:
            raise field_error(("prompt",), "the prompt tokenizes to nothing")
        return ids

    def _check_chars(self, text: str, name: str) -> None:
        if len(text) > self.cfg.serve.max_input_tokens * MAX_CHARS_PER_TOKEN:
            raise ServeError(413, f"{name} is {len(text)} characters; the input limit is "
                                  f"serve.max_input_tokens={self.cfg.serve.max_input_tokens} tokens")

    def _check_input_tokens(self, count: int) -> None:
        limit = self.cfg.serve.max_input_tokens
        if count > limit:
            raise ServeError(413, f"input is {count} tokens; the limit is serve.max_input_tokens={limit}")

    def _job(self, request: dict) -> GenerationJob:
        prompt_ids = self._prompt_ids(request)
        self._check_input_tokens(len(prompt_ids))
        return GenerationJob(prompt_ids, request["max_new_tokens"], request.get("temperature", 0.0),
                             request.get("top_p", 1.0), request.get("seed"), list(request.get("stop") or []))

    # ------------------------------------------------------------------------------------ generation
    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def _generate_batch(self, jobs: list[GenerationJob]) -> AsyncIterator[list]:
        """Serve groups concurrent calls into `jobs`; yields one event per job per decoding step."""
        loop = asyncio.get_running_loop()
        steps: asyncio.Queue = asyncio.Queue()
        emit = lambda item: loop.call_soon_threadsafe(steps.put_nowait, item)  # noqa: E731
        self.batch_sizes.observe(len(jobs))

        def work():
            try:
                run_generate(self.model, self.tokenizer, jobs, emit)
            except Exception as err:
                emit(err)
            finally:
                emit(None)

        worker = loop.run_in_executor(None, work)
        while (events := await steps.get()) is not None:
            if isinstance(events, Exception):
                raise events
            yield [StopIteration if event is None else dict(event, batch_size=len(jobs)) for event in events]
        await worker

    async def generate(self, request: dict) -> dict | Rejection:
        events = [event async for event in self.generate_stream(request)]
        if isinstance(events[0], Rejection):
            return events[0]
        return {key: value for key, value in events[-1].items() if key != "type"}

    async def generate_stream(self, request: dict) -> AsyncIterator[dict | Rejection]:
        """A "start" event (or a Rejection), {"type": "delta", "text"} events, then one "final" event."""
        try:
            job = self._job(request)
        except ServeError as err:
            yield err.rejection()
            return
        yield {"type": "start", "prompt_tokens": len(job.prompt_ids)}  # validation passed: HTTP 200 from here
        async for event in self._generate_batch(job):  # consumed to the end: Serve settles every step future
            if event["delta"]:
                yield {"type": "delta", "text": event["delta"]}
            if event.get("final"):
                self.generated_tokens.inc(event["completion_tokens"])
                yield {"type": "final", "model": self.name} | {key: event[key] for key in FINAL_FIELDS}

    # ------------------------------------------------------------------------------------ probe
    async def probe(self, request: dict) -> dict | Rejection:
        try:
            return await self._probe(request)
        except ServeError as err:
            return err.rejection()

    async def _probe(self, request: dict) -> dict:
        from derta.probe import probe as probe_sequence

        prompt_ids = self._prompt_ids(request)
        self._check_chars(request["response"], "response")
        response_ids = self.tokenizer.encode(request["response"], add_special_tokens=False)
        self._check_input_tokens(len(prompt_ids) + len(response_ids))
        verify = self._verify_plan(request.get("verify"), len(response_ids))
        threshold = request.get("threshold") or self.cfg.serve.probe_threshold
        started = time.perf_counter()
        result = await asyncio.to_thread(probe_sequence, self.model, prompt_ids, response_ids, self.refusal_ids,
                                         threshold)
        self.probe_latency.observe((time.perf_counter() - started) * 1000)
        out = self._probe_report(result, response_ids, threshold) | {"prompt_tokens": len(prompt_ids)}
        if verify:
            out["verify"] = await asyncio.to_thread(self._verify, prompt_ids, response_ids, *verify)
        return out

    def _probe_report(self, result, response_ids: list[int], threshold: float) -> dict:
        decode = lambda token: self.tokenizer.decode([token])  # noqa: E731
        positions = [{"i": i, "token": decode(response_ids[i]) if i < len(response_ids) else None,
                      "p_refusal": p, "top_token": decode(top)}
                     for i, (p, top) in enumerate(zip(result.refusal_prob, result.top_token_ids))]
        return {"model": self.name, "positions": positions, "first_crossing": result.first_crossing,
                "min": result.min_prob, "mean": result.mean_prob, "threshold": threshold,
                "refusal_tokens": [decode(i) for i in self.refusal_ids], "response_tokens": len(response_ids)}

    def _verify_plan(self, verify: dict | None, response_len: int) -> tuple[list[int], int] | None:
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

    def _verify(self, prompt_ids: list[int], response_ids: list[int], positions: list[int], tokens: int) -> list:
        """Prefill prompt + response[:i] and greedily continue: does the model actually refuse there?"""
        jobs = [GenerationJob(prompt_ids + response_ids[:i], tokens) for i in positions]
        results = run_generate(self.model, self.tokenizer, jobs)
        return [{"i": i, "continuation": r["text"],
                 "refuses": continuation_refuses(r["text"], r["token_ids"], self.refusal_ids)}
                for i, r in zip(positions, results)]


# ============================================================================================ HTTP ingress
def json_error(status_code: int, detail: Any):
    from fastapi.responses import JSONResponse

    return JSONResponse({"detail": detail}, status_code=status_code)


def sse(payload: dict | str) -> str:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def openai_usage(result: dict) -> dict:
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}


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


def error_response(err: Exception | Rejection):
    from ray.exceptions import RayActorError  # ActorDiedError, ActorUnavailableError: a replica's node went away
    from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError

    if isinstance(err, (ServeError, Rejection)):
        return json_error(err.status_code, err.detail)
    if isinstance(err, (RayActorError, DeploymentUnavailableError)):
        return json_error(503, "model replica unavailable, retry later")
    if isinstance(err, BackPressureError):
        return json_error(503, f"server overloaded, retry later ({err.message})")
    if isinstance(err, (asyncio.TimeoutError, TimeoutError)):
        return json_error(503, "model timed out")
    raise err


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


def add_openai_routes(api, ingress: DertaIngress) -> None:
    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "derta"}
                                           for name in ingress.models]}

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest):
        prompt = body.single_prompt()
        if prompt is None:
            return error_response(field_error(("prompt",), "send exactly one prompt per request"))
        return await openai_call(ingress, body, {"raw_prompt": prompt}, "max_tokens", TextCompletionFormat)

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        limit_field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        payload = {"messages": [m.plain() for m in body.messages]}
        return await openai_call(ingress, body, payload, limit_field, ChatCompletionFormat)


async def openai_call(ingress: DertaIngress, body: OpenAIFields, payload: dict, limit_field: str, fmt: type):
    max_tokens = getattr(body, limit_field) or fmt.default_max_tokens or ingress.cfg.serve.max_new_tokens
    try:
        ingress.check_max_tokens(max_tokens, limit_field)
    except ServeError as err:
        return error_response(err)
    payload |= {"max_new_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
                "seed": body.seed, "stop": body.stop_list()}
    formatter = fmt(body.model)
    if body.stream:
        return await ingress.stream(body.model, payload, formatter.chunks)
    result = await ingress.call(body.model, "generate", payload)
    return formatter.response(result) if isinstance(result, dict) else result


class TextCompletionFormat:
    """OpenAI `text_completion` objects and chunks."""

    object = "text_completion"
    prefix = "cmpl"
    default_max_tokens: int | None = 16  # OpenAI's default for /v1/completions

    def __init__(self, model: str):
        self.model, self.id, self.created = model, f"{self.prefix}-{uuid.uuid4().hex}", int(time.time())

    def envelope(self, choice: dict, **extra) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": [{"index": 0, **choice}], **extra}

    def choice(self, text: str, finish_reason: str | None) -> dict:
        return {"text": text, "logprobs": None, "finish_reason": finish_reason}

    def response(self, result: dict) -> dict:
        return self.envelope(self.choice(result["text"], result["finish_reason"]), usage=openai_usage(result))

    def chunks(self, event: dict) -> list[str]:
        if event["type"] == "delta":
            return [sse(self.envelope(self.choice(event["text"], None)))]
        if event["type"] == "final":
            return [sse(self.envelope(self.choice("", event["finish_reason"]), usage=openai_usage(event))),
                    sse("[DONE]")]
        return []


class ChatCompletionFormat(TextCompletionFormat):
    """OpenAI `chat.completion` objects and `chat.completion.chunk` deltas."""

    object = "chat.completion"
    prefix = "chatcmpl"
    default_max_tokens = None  # up to serve.max_new_tokens

    def choice(self, text: str, finish_reason: str | None) -> dict:
        return {"message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish_reason}

    def chunk(self, delta: dict, finish_reason: str | None, **extra) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return sse({"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                    "choices": [choice], **extra})

    def chunks(self, event: dict) -> list[str]:
        if event["type"] == "start":
            return [self.chunk({"role": "assistant", "content": ""}, None)]
        if event["type"] == "delta":
            return [self.chunk({"content": event["text"]}, None)]
        if event["type"] == "final":
            return [self.chunk({}, event["finish_reason"], usage=openai_usage(event)), sse("[DONE]")]
        return []


# ============================================================================================ application
def model_deployment_options(s: ServeConfig) -> dict:
    options = {"ray_actor_options": dict(s.ray_actor_options), "max_ongoing_requests": s.max_ongoing_requests,
               "max_queued_requests": s.max_queued_requests}
    if s.autoscaling:
        options["autoscaling_config"] = s.autoscaling.model_dump()
    else:
        options["num_replicas"] = s.num_replicas
    if s.max_replicas_per_node:
        options["max_replicas_per_node"] = s.max_replicas_per_node
    return options


def ingress_deployment_options(s: ServeConfig) -> dict:
    """The ingress only waits on DertaModel: let it hold everything the model can admit, plus room for
    /health and /ready, so overload surfaces as the model's 503 rather than a stuck proxy."""
    admitted = s.max_ongoing_requests + max(s.max_queued_requests, 0) + 8
    # the proxy counts requests as queued while it picks a replica, so a tight bound here would reject early
    queued = -1 if s.max_queued_requests == -1 else 2 * admitted
    return {"ray_actor_options": {"num_cpus": 0}, "max_ongoing_requests": admitted, "max_queued_requests": queued}


def deployment_name(served_name: str, default_name: str) -> str:
    if served_name == default_name:
        return "DertaModel"
    return "DertaModel_" + "".join(c if c.isalnum() or c in "-_" else "_" for c in served_name)


def bind_app(cfg: DertaConfig, model: str | None = None):
    """The Serve application for `cfg`; `model` overrides `cfg.model.name_or_path` for the default name."""
    api_key = cfg.serve.api_key or os.environ.get("DERTA_API_KEY") or None
    cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update={"api_key": api_key})})
    config = cfg.model_dump(mode="json")
    options = model_deployment_options(cfg.serve)
    handles = {name: DertaModel.options(name=deployment_name(name, cfg.serve.model_name), **options)
               .bind(config, name, source) for name, source in model_sources(cfg, model).items()}
    return DertaIngress.options(**ingress_deployment_options(cfg.serve)).bind(handles, config)


def build_app(args: dict):
    """Serve import path `serve.app:build_app`; args: {config, model?, set?}."""
    parsed = BuildArgs.model_validate(args or {})
    config = parsed.config
    if config and not Path(config).exists() and (REPO_ROOT / config).exists():
        config = str(REPO_ROOT / config)  # `configs/tiny.yaml` from any working directory
    return bind_app(load_config(config, parsed.set), parsed.model)


def default_model_path(cfg: DertaConfig, runs_dir: Path | str | None = None) -> str:
    """The newest `runs/*/final` checkpoint; with none, train one with `cfg` first."""
    runs = Path(runs_dir) if runs_dir else REPO_ROOT / "runs"
    finals = [p for p in runs.glob("*/final")
              if (p / "config.json").exists() or (p / "adapter_config.json").exists()]
    if finals:
        return str(max(finals, key=lambda p: p.stat().st_mtime))
    from derta.trainer import run_training

    print(f"[derta] no checkpoint under {runs}/*/final; training one with the current config first", flush=True)
    return str(run_training(cfg))


def start_local(cfg: DertaConfig, model: str, port: int | None = None) -> str:
    """Start Ray if needed, Serve's HTTP proxy on `serve.host` and the app at '/'; returns the base URL."""
    from derta.runtime import init_ray

    init_ray()
    port = port or cfg.serve.port
    serve.start(http_options={"host": cfg.serve.host, "port": port})
    serve.run(bind_app(cfg, model), name="derta", route_prefix="/", blocking=False)
    return f"http://{cfg.serve.host}:{port}"


def run_local(cfg: DertaConfig, model: str | None = None, port: int | None = None) -> None:
    """`derta serve`: serve `model` (default: the newest local checkpoint), block until SIGINT/SIGTERM."""
    model = model or default_model_path(cfg)
    url = start_local(cfg, model, port)
    print(f"[derta] serving {model} at {url} (Ctrl-C to stop)", flush=True)
    try:
        wait_for_signal()
    finally:
        serve.shutdown()


def wait_for_signal() -> None:
    """Block until SIGINT or SIGTERM; the previous handlers are restored afterwards."""
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        while not stop.wait(1.0):
            pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
