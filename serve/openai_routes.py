"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions (JSON and SSE streams)."""
from __future__ import annotations

import time
import uuid
from typing import TYPE_CHECKING

from serve.errors import error_response, sse
from serve.protocol import ChatCompletionRequest, CompletionRequest, OpenAIFields, ServeError, field_error

if TYPE_CHECKING:
    from serve.ingress import DertaIngress


def openai_usage(result: dict) -> dict:
    return {"prompt_tokens": result["prompt_tokens"], "completion_tokens": result["completion_tokens"],
            "total_tokens": result["prompt_tokens"] + result["completion_tokens"]}


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
