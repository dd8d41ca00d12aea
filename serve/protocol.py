"""Request and response schemas of the derta HTTP API, and the errors the model deployment returns.

Pure pydantic: imported by the ingress (FastAPI validation, OpenAPI), the deployment and the engine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

MAX_CHARS_PER_TOKEN = 64  # text longer than max_input_tokens * this is rejected before tokenizing
MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256  # stop matching costs O(longest stop) per decoding step
StopString = Annotated[str, StringConstraints(min_length=1, max_length=MAX_STOP_CHARS)]


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
    stop: list[StopString] = Field(default_factory=list, max_length=MAX_STOP_STRINGS)


class VerifyRequest(Body):
    positions: list[int] = Field(min_length=1, max_length=32)
    tokens: int | None = Field(None, ge=1)


class ProbeRequest(PromptFields):
    response: str
    threshold: float | None = Field(None, gt=0, lt=1, allow_inf_nan=False)
    verify: VerifyRequest | None = None


MAX_PROMPTS = 64  # prompts in one /v1/completions request
MAX_LOGPROBS = 20
# OpenAI fields we accept only with a value that changes nothing; any other value (or any other unknown field)
# is a 400 that names it, never silently ignored. README "OpenAI coverage" lists the same.
NO_OP_VALUES: dict[str, tuple] = {
    "user": (), "best_of": (None, 1), "suffix": (None, ""), "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "logit_bias": (None, {}), "response_format": (None, {"type": "text"}), "tools": (None, []),
    "tool_choice": (None, "none"), "parallel_tool_calls": (None, True, False), "functions": (None, []),
    "function_call": (None, "none"), "modalities": (None, ["text"]), "service_tier": (None, "auto", "default"),
    "store": (None, False), "metadata": (None, {}), "prediction": (None,), "audio": (None,),
    "reasoning_effort": (None,),
}


class StreamOptions(Body):
    include_usage: bool = False


class OpenAIFields(SamplingFields):
    model_config = ConfigDict(extra="allow")  # unknown fields are checked by `unsupported_fields`, not dropped
    model: str
    temperature: float = Field(1.0, ge=0, le=5, allow_inf_nan=False)
    max_tokens: int | None = Field(None, ge=1)
    stop: StopString | Annotated[list[StopString], Field(max_length=MAX_STOP_STRINGS)] | None = None
    n: int = Field(1, ge=1, le=1)
    stream_options: StreamOptions | None = None

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported_fields(self) -> list[str]:
        """Fields sent that this server does not implement (with a value other than a no-op)."""
        extra = self.model_extra or {}
        return [name for name, value in extra.items()
                if name not in NO_OP_VALUES or (NO_OP_VALUES[name] and value not in NO_OP_VALUES[name])]


TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(OpenAIFields):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=MAX_PROMPTS)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=MAX_PROMPTS)] = Field(
            description="raw text (no chat template) or token ids; one prompt or a batch of them")
    max_tokens: int | None = Field(None, ge=0, description="0 only with echo: score the prompt, generate nothing")
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    def prompts(self) -> list[str | list[int]]:
        """The batch: each entry a text or a list of token ids."""
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


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
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    add_generation_prompt: bool = Field(True, description="as in vLLM: end the prompt with the assistant header")
    continue_final_message: bool = Field(
        False, description="as in vLLM: the last (assistant) message is a prefill the model continues")

    @model_validator(mode="after")
    def _prefill(self):
        if self.continue_final_message and self.add_generation_prompt:
            raise ValueError("continue_final_message needs add_generation_prompt: false (as in vLLM)")
        if self.continue_final_message and self.messages[-1].role != "assistant":
            raise ValueError("continue_final_message needs the last message to be the assistant's")
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self


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
    message: str
    param: str | None = None
    code: str | None = None


class ServeError(Exception):
    """An error with an HTTP status and a message safe to show the client (OpenAI's error object)."""

    def __init__(self, status_code: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(status_code, message)
        self.status_code, self.message, self.param, self.code = status_code, message, param, code

    def rejection(self) -> Rejection:
        return Rejection(self.status_code, self.message, self.param, self.code)


def field_error(loc: tuple, message: str, status_code: int = 422) -> ServeError:
    """A bad field: the message and `param` name it (dotted path, e.g. `verify.positions`)."""
    param = ".".join(map(str, loc))
    return ServeError(status_code, f"{param}: {message}", param=param, code="invalid_value")
