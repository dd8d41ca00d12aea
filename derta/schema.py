"""Corpus row models and the normaliser that turns any supported source row into one canonical record.

Row kinds
- helpful:  instruction + response                                   -> helpful MLE
- safety:   instruction + harmful_response (+ safe_response)         -> harmful-prefix MLE and/or RTO
- chat:     messages=[..., {"role": "assistant", ...}]               -> helpful MLE on the last assistant turn
- rendered: the DeRTa reference release: prefix (rendered prompt) + text + safe ("true" = text is harmful,
            train it with RTO; "false" = MLE on text)
"""
from __future__ import annotations

import json
import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

NonEmpty = Field(min_length=1)


class _Row(BaseModel):
    model_config = ConfigDict(extra="ignore", str_strip_whitespace=False)
    id: str | None = None
    system: str | None = None
    category: str | None = None

    @field_validator("id", mode="before")
    @classmethod
    def _id_to_str(cls, v):
        return None if v is None else str(v)


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty")
    return v


class HelpfulRow(_Row):
    instruction: str
    response: str
    _check = field_validator("instruction", "response")(_not_blank)


class SafetyRow(_Row):
    instruction: str
    harmful_response: str
    safe_response: str | None = None
    _check = field_validator("instruction", "harmful_response")(_not_blank)

    @field_validator("safe_response")
    @classmethod
    def _safe_not_blank(cls, v):
        return None if v is None else _not_blank(v)


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatRow(_Row):
    messages: list[Message] = Field(min_length=2)

    @field_validator("messages")
    @classmethod
    def _ends_with_assistant(cls, v: list[Message]) -> list[Message]:
        if v[-1].role != "assistant":
            raise ValueError("last message must have role 'assistant' (the response to train on)")
        if not v[-1].content.strip():
            raise ValueError("last assistant message must not be empty")
        return v


class RenderedRow(_Row):
    prefix: str
    text: str
    safe: bool = False

    _check = field_validator("prefix", "text")(_not_blank)

    @field_validator("safe", mode="before")
    @classmethod
    def _parse_bool(cls, v):
        if isinstance(v, str) and v.strip().lower() in ("true", "false"):
            return v.strip().lower() == "true"
        return v


ROW_MODELS = {"helpful": HelpfulRow, "safety": SafetyRow, "chat": ChatRow, "rendered": RenderedRow}

# canonical record columns (every normalised row has all of them; unused ones are None)
RECORD_COLUMNS = ("uid", "source", "line", "kind", "error", "id", "category", "system", "instruction",
                  "messages", "response", "harmful_response", "safe_response", "prompt_text", "target_text",
                  "target_harmful")


def infer_kind(record: dict) -> str | None:
    keys = {k for k, v in record.items() if v is not None}
    if "messages" in keys:
        return "chat"
    if {"prefix", "text"} <= keys:
        return "rendered" if "safe" in keys else "safety"
    if "harmful_response" in keys:
        return "safety"
    if "response" in keys:
        return "helpful"
    return None


def apply_columns(record: dict, columns: dict[str, str]) -> dict:
    """Rename source columns to canonical names; `columns` maps canonical -> source."""
    if not columns:
        return record
    renamed = dict(record)
    for canonical, source in columns.items():
        if source in record:
            renamed[canonical] = renamed.pop(source) if source != canonical else record[source]
    return renamed


def _strip_suffixes(text: str, suffixes: list[str]) -> str:
    stripped = text.rstrip()
    for suffix in suffixes:
        if suffix and stripped.endswith(suffix):
            return stripped[: -len(suffix)].rstrip()
    return text


def _describe_error(err: ValidationError) -> str:
    parts = []
    for problem in err.errors():
        field = ".".join(str(p) for p in problem["loc"]) or "<row>"
        msg = problem["msg"].replace("Value error, ", "")
        parts.append(f"field '{field}': {msg}")
    return "; ".join(parts)


def normalize_record(record, *, kind: str = "auto", columns: dict | None = None,
                     instruction_regex: str | None = None, strip_suffixes: list[str] = (),
                     max_chars: int = 32_000) -> dict:
    """Validate one parsed source row; return the canonical record, with `error` set when it is bad."""
    out = dict.fromkeys(RECORD_COLUMNS)
    if not isinstance(record, dict):
        out["error"] = f"row is a JSON {type(record).__name__}, expected an object"
        return out
    record = apply_columns(record, columns or {})
    if kind == "auto" and {"prefix", "text"} <= record.keys() and "safe" not in record:
        # harmful-pair files: a rendered prompt + a harmful response
        record = dict(record, instruction=record["prefix"], harmful_response=record["text"])
        instruction_regex = instruction_regex or r"### Instruction:\s*(.*?)\s*### Response:"
    row_kind = infer_kind(record) if kind == "auto" else kind
    if row_kind == "safety" and "instruction" not in record and "prefix" in record:
        record = dict(record, instruction=record["prefix"], harmful_response=record.get("text"))
    if row_kind is None:
        out["error"] = (f"cannot tell the row kind from its fields {sorted(record)}; expected instruction+response, "
                        "instruction+harmful_response[+safe_response], messages, or prefix+text+safe "
                        "(map other names with `columns`)")
        return out
    for key, value in record.items():
        if isinstance(value, str) and len(value) > max_chars:
            out["error"] = f"field '{key}' is {len(value)} chars, over max_chars={max_chars}"
            return out
    try:
        row = ROW_MODELS[row_kind].model_validate(record)
    except ValidationError as err:
        out["error"] = f"{row_kind} row: {_describe_error(err)}"
        return out
    out.update(kind=row_kind, id=row.id, category=row.category, system=row.system)
    if isinstance(row, HelpfulRow):
        out.update(instruction=row.instruction, response=_strip_suffixes(row.response, strip_suffixes))
    elif isinstance(row, SafetyRow):
        instruction = row.instruction
        if instruction_regex:
            match = re.search(instruction_regex, instruction, flags=re.S)
            instruction = match.group(1).strip() if match else instruction.strip()
        out.update(instruction=instruction, harmful_response=_strip_suffixes(row.harmful_response, strip_suffixes),
                   safe_response=row.safe_response and _strip_suffixes(row.safe_response, strip_suffixes))
    elif isinstance(row, ChatRow):
        out.update(messages=json.dumps([m.model_dump() for m in row.messages]))
    else:
        out.update(prompt_text=row.prefix, target_text=_strip_suffixes(row.text, strip_suffixes),
                   target_harmful=row.safe)
    return out
