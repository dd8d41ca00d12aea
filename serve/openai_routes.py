"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (JSON and SSE streams).

Field coverage is the README's "OpenAI coverage" table: what is implemented behaves like OpenAI (and vLLM for
`echo`, `continue_final_message`, `add_generation_prompt`); everything else is a 400 naming the field.
"""
from __future__ import annotations

import asyncio
import time
import uuid
from typing import TYPE_CHECKING

from fastapi import Request

from serve.errors import error_response, sse
from serve.guard import request_id
from serve.protocol import ChatCompletionRequest, CompletionRequest, OpenAIFields, ServeError, field_error

if TYPE_CHECKING:
    from serve.ingress import DertaIngress

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions


def openai_usage(results: list[dict]) -> dict:
    prompt = sum(r["prompt_tokens"] for r in results)
    completion = sum(r["completion_tokens"] for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def unsupported(body: OpenAIFields, stream_conflicts: dict[str, bool]) -> ServeError | None:
    names = body.unsupported_fields()
    if names:
        return ServeError(400, f"unsupported field(s): {', '.join(names)} (see the README's OpenAI coverage table)",
                          param=names[0], code="unsupported_field")
    if body.stream:
        for name, used in stream_conflicts.items():
            if used:
                return ServeError(400, f"{name} is not supported with stream: true", param=name,
                                  code="unsupported_field")
    return None


def visible_entries(entries: list[dict], text: str) -> list[dict]:
    """The generated tokens that made `text` (a stop string may have cut it short)."""
    kept, offset = [], 0
    for entry in entries:
        if offset >= len(text) and entry["text"]:
            break
        kept.append(entry)
        offset += len(entry["text"])
    return kept


def add_openai_routes(api, ingress: DertaIngress) -> None:
    @api.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": name, "object": "model", "created": 0, "owned_by": "derta"}
                                           for name in ingress.models]}

    @api.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        prompts = body.prompts()
        problem = unsupported(body, {"prompt": len(prompts) > 1, "logprobs": body.logprobs is not None,
                                     "echo": body.echo})
        max_tokens = COMPLETION_DEFAULT_MAX_TOKENS if body.max_tokens is None else body.max_tokens
        if problem is None and max_tokens == 0 and not body.echo:
            problem = field_error(("max_tokens",), "0 needs echo: true (score the prompt only)")
        payloads = [{"prompt_token_ids": p} if isinstance(p, list) else {"raw_prompt": p} for p in prompts]
        extra = {"echo": body.echo, "logprobs": body.logprobs}
        return await openai_call(ingress, request, body, payloads, extra, max_tokens, "max_tokens",
                                 TextCompletionFormat(body), problem)

    @api.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        problem = unsupported(body, {"logprobs": body.logprobs})
        limit_field = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        max_tokens = getattr(body, limit_field) or ingress.cfg.serve.max_new_tokens
        payload = {"messages": [m.plain() for m in body.messages],
                   "add_generation_prompt": body.add_generation_prompt,
                   "continue_final_message": body.continue_final_message}
        extra = {"logprobs": (body.top_logprobs or 0) if body.logprobs else None}
        return await openai_call(ingress, request, body, [payload], extra, max_tokens, limit_field,
                                 ChatCompletionFormat(body), problem)


async def openai_call(ingress: DertaIngress, request: Request, body: OpenAIFields, payloads: list[dict], extra: dict,
                      max_tokens: int, limit_field: str, fmt: TextCompletionFormat, problem: ServeError | None):
    try:
        if problem:
            raise problem
        ingress.check_max_tokens(max_tokens, limit_field)
    except ServeError as err:
        return error_response(err)
    common = {"max_new_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p,
              "seed": body.seed, "stop": body.stop_list(), **extra}
    payloads = [payload | common for payload in payloads]
    if body.stream:
        return await ingress.stream(body.model, payloads[0], fmt.chunks, request_id(request.scope))
    # a batch of prompts: concurrent calls, which the model deployment batches into shared forward passes
    results = await asyncio.gather(*(ingress.call(body.model, "generate", p) for p in payloads))
    failed = next((r for r in results if not isinstance(r, dict)), None)
    return failed or fmt.response(results)


class TextCompletionFormat:
    """OpenAI `text_completion` objects and chunks."""

    object = "text_completion"
    prefix = "cmpl"

    def __init__(self, body: OpenAIFields):
        self.model, self.id, self.created = body.model, f"{self.prefix}-{uuid.uuid4().hex}", int(time.time())
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def envelope(self, choices: list[dict], **extra) -> dict:
        return {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def choice(self, index: int, result: dict) -> dict:
        echo = result.get("echo") or {}
        text = echo.get("text", "") + result["text"]
        logprobs = None
        if result.get("logprobs") is not None:
            entries = (echo.get("tokens") or []) + visible_entries(result["logprobs"], result["text"])
            logprobs = self.logprobs(entries)
        return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": result["finish_reason"]}

    @staticmethod
    def logprobs(entries: list[dict]) -> dict:
        offsets, offset = [], 0
        for entry in entries:
            offsets.append(offset)
            offset += len(entry["text"])
        return {"tokens": [e["text"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [None if e["top"] is None else dict(e["top"]) for e in entries],
                "text_offset": offsets}

    def response(self, results: list[dict]) -> dict:
        return self.envelope([self.choice(i, r) for i, r in enumerate(results)], usage=openai_usage(results))

    def delta_choice(self, text: str, finish_reason: str | None) -> dict:
        return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish_reason}

    def chunks(self, event: dict) -> list[str]:
        if event["type"] == "start":
            return self.start_chunks()
        if event["type"] == "delta":
            return [sse(self.envelope([self.delta_choice(event["text"], None)]))]
        if event["type"] == "final":
            if event["finish_reason"] == "error":
                return [sse({"error": {"message": f"generation failed: {event.get('error')}",
                                       "type": "internal_error", "param": None, "code": "generation_error"}}),
                        sse("[DONE]")]
            out = [sse(self.envelope([self.delta_choice("", event["finish_reason"])]))]
            if self.include_usage:
                out.append(sse(self.envelope([], usage=openai_usage([event]))))
            return out + [sse("[DONE]")]
        return []

    def start_chunks(self) -> list[str]:
        return []


class ChatCompletionFormat(TextCompletionFormat):
    """OpenAI `chat.completion` objects and `chat.completion.chunk` deltas."""

    object = "chat.completion"
    prefix = "chatcmpl"

    def choice(self, index: int, result: dict) -> dict:
        logprobs = None
        if result.get("logprobs") is not None:
            logprobs = {"content": [self.token_logprob(e) for e in visible_entries(result["logprobs"], result["text"])]}
        return {"index": index, "message": {"role": "assistant", "content": result["text"]}, "logprobs": logprobs,
                "finish_reason": result["finish_reason"]}

    @staticmethod
    def token_logprob(entry: dict) -> dict:
        def one(text: str, logprob: float) -> dict:
            return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

        return one(entry["text"], entry["logprob"]) | {"top_logprobs": [one(t, lp) for t, lp in entry["top"] or []]}

    def envelope(self, choices: list[dict], **extra) -> dict:
        chunk = choices and "delta" in choices[0] or not choices
        return {"id": self.id, "object": "chat.completion.chunk" if chunk else self.object, "created": self.created,
                "model": self.model, "choices": choices, **extra}

    def delta_choice(self, text: str, finish_reason: str | None) -> dict:
        return {"index": 0, "delta": {"content": text} if text else {}, "logprobs": None,
                "finish_reason": finish_reason}

    def start_chunks(self) -> list[str]:
        return [sse(self.envelope([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                    "finish_reason": None}]))]
