"""Request and response schemas of the derta HTTP API, and the errors the model deployment returns.

Pure pydantic: imported by the ingress (FastAPI validation, OpenAPI), the deployment and the engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_CHARS_PER_TOKEN = 64  # text longer than max_input_tokens * this is rejected before tokenizing


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

