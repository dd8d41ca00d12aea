"""DeRTa training examples at the token level. Pure, seeded, reproducible.

Every example is `input_ids`, `labels` and `rto_mask`, aligned with each other in the Hugging Face
convention: `labels[t]` is the token the model should predict at position t (the loss shifts by one).
`labels[t] = -100` means no loss. `rto_mask[t] = 1` marks an RTO target: labels[t] is the refusal token
while input_ids[t] is the next token of the harmful response, so the model is trained to switch to a
refusal after prompt + harmful[:j] for every j.

    helpful MLE        prompt | response EOS          loss on response + EOS
    harmful-prefix MLE prompt | harmful[:k] | safe EOS loss on safe + EOS only
    RTO                prompt | harmful               refusal token at every harmful position
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

import numpy as np

IGNORE_INDEX = -100
HELPFUL, HARMFUL_PREFIX, RTO = "helpful", "harmful_prefix", "rto"
KINDS = (HELPFUL, HARMFUL_PREFIX, RTO)
MODE_KINDS = {"vanilla": (HELPFUL, HARMFUL_PREFIX), "recaug": (HELPFUL, HARMFUL_PREFIX),
              "derta": (HELPFUL, HARMFUL_PREFIX, RTO)}


@dataclass
class Example:
    kind: str
    input_ids: list[int]
    labels: list[int]
    rto_mask: list[int] = field(default_factory=list)
    prefix_len: int = 0  # k, harmful tokens before the safe response (harmful-prefix rows)
    prompt_len: int = 0

    def __post_init__(self):
        if not self.rto_mask:
            self.rto_mask = [0] * len(self.input_ids)

    @property
    def num_loss_tokens(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


class RefusalTokenError(ValueError):
    pass


def row_rng(seed: int, uid: str, salt: str = "") -> np.random.Generator:
    """A generator that depends only on (seed, row id, purpose): same row -> same draw on any worker."""
    digest = hashlib.blake2b(f"{seed}|{uid}|{salt}".encode(), digest_size=8).digest()
    return np.random.default_rng(int.from_bytes(digest, "little"))


def unit_hash(seed: int, uid: str, salt: str = "") -> float:
    """Deterministic uniform [0, 1) number for sampling decisions."""
    digest = hashlib.blake2b(f"{seed}|{uid}|{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2**64


def sample_prefix_len(num_harmful_tokens: int, k0_fraction: float, rng: np.random.Generator) -> int:
    """k = 0 with probability k0_fraction, else uniform over 1..num_harmful_tokens."""
    if num_harmful_tokens == 0 or rng.random() < k0_fraction:
        return 0
    return int(rng.integers(1, num_harmful_tokens + 1))


def helpful_example(prompt: list[int], response: list[int], eos_id: int, max_length: int) -> Example:
    input_ids = (prompt + response + [eos_id])[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + response + [eos_id])[:max_length]
    return Example(HELPFUL, input_ids, labels, prompt_len=len(prompt))


def harmful_prefix_example(prompt: list[int], harmful: list[int], safe: list[int], k: int, eos_id: int,
                           max_length: int) -> Example:
    # shorten the harmful prefix before the safe response, so the refusal survives truncation
    room_for_prefix = max(0, max_length - len(prompt) - len(safe) - 1)
    k = min(k, len(harmful), room_for_prefix)
    context = prompt + harmful[:k]
    input_ids = (context + safe + [eos_id])[:max_length]
    labels = ([IGNORE_INDEX] * len(context) + safe + [eos_id])[:max_length]
    return Example(HARMFUL_PREFIX, input_ids, labels, prefix_len=k, prompt_len=len(prompt))


def rto_example(prompt: list[int], harmful: list[int], refusal_id: int, max_length: int) -> Example:
    input_ids = (prompt + harmful)[:max_length]
    n_targets = len(input_ids) - len(prompt)
    labels = [IGNORE_INDEX] * len(prompt) + [refusal_id] * max(n_targets, 0)
    rto_mask = [0] * len(prompt) + [1] * max(n_targets, 0)
    return Example(RTO, input_ids, labels[: len(input_ids)], rto_mask[: len(input_ids)], prompt_len=len(prompt))


# ----------------------------------------------------------------------------------- refusal tokens
def refusal_token_id(tokenizer, refusal_string: str) -> int:
    """First token of `refusal_string` as it is tokenized when it starts a response.

    Responses are tokenized as their own segment right after the rendered prompt, so this is exactly the
    token the model must emit to begin the refusal. Never a hard-coded id.
    """
    ids = tokenizer.encode(refusal_string, add_special_tokens=False)
    if not ids:
        raise RefusalTokenError(f"refusal string {refusal_string!r} tokenizes to nothing with this tokenizer")
    first = tokenizer.decode(ids[:1]).strip()
    if not first or not refusal_string.strip().startswith(first[:1]):
        raise RefusalTokenError(
            f"cannot derive a refusal token from {refusal_string!r}: its first token decodes to {first!r}. "
            "Set data.refusal_string to a word the tokenizer has, e.g. 'Sorry' or 'I'")
    if len(first) < 2 and len(refusal_string.strip()) > 1:
        raise RefusalTokenError(
            f"refusal string {refusal_string!r} starts with the single character token {first!r}, which would "
            "also start ordinary answers; pick a refusal string whose first token is a whole word")
    return ids[0]


def refusal_token_ids(tokenizer, refusal_strings: list[str]) -> list[int]:
    """The set of refusal-start tokens (probe); deduplicated, order kept."""
    ids: list[int] = []
    for text in refusal_strings:
        token = refusal_token_id(tokenizer, text)
        if token not in ids:
            ids.append(token)
    return ids


# -------------------------------------------------------------------------------------- rendering
class PromptRenderer:
    """Render a prompt with the tokenizer's chat template, or a plain template when it has none."""

    def __init__(self, tokenizer, use_chat_template: bool = True,
                 plain_template: str = "### Instruction:\n{instruction}\n\n### Response:\n",
                 system_prompt: str | None = None):
        self.tokenizer = tokenizer
        self.use_chat = bool(use_chat_template and getattr(tokenizer, "chat_template", None))
        self.plain_template = plain_template
        self.system_prompt = system_prompt

    def render_messages(self, messages: list[dict]) -> str:
        if self.use_chat:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        parts = [m["content"] for m in messages if m["role"] == "system"]
        turns = [m for m in messages if m["role"] != "system"]
        history = "".join(
            self.plain_template.format(instruction=m["content"]) if m["role"] == "user" else m["content"] + "\n\n"
            for m in turns[:-1])
        last = self.plain_template.format(instruction=turns[-1]["content"]) if turns else ""
        return "\n\n".join(parts + [history + last]) if parts else history + last

    def render(self, instruction: str, system: str | None = None) -> str:
        messages = []
        if system or self.system_prompt:
            messages.append({"role": "system", "content": system or self.system_prompt})
        messages.append({"role": "user", "content": instruction})
        return self.render_messages(messages)

    def encode_prompt(self, text: str) -> list[int]:
        # chat templates carry their own BOS; plain templates get the tokenizer's usual special tokens
        return self.tokenizer.encode(text, add_special_tokens=not self.use_chat)


# ------------------------------------------------------------------------------------- row -> examples
def examples_for_record(record: dict, tokenizer, renderer: PromptRenderer, *, mode: str, refusal_id: int,
                        refusal_templates: list[str], k0_fraction: float, max_length: int,
                        seed: int) -> list[Example]:
    """All training examples one canonical record yields under `mode` (see MODE_KINDS)."""
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    eos = tokenizer.eos_token_id
    kind, uid = record["kind"], record["uid"]
    if kind == "rendered":
        prompt = renderer.tokenizer.encode(record["prompt_text"], add_special_tokens=True)
        target = encode(record["target_text"])
        if record["target_harmful"]:
            return [rto_example(prompt, target, refusal_id, max_length)] if mode == "derta" else []
        return [helpful_example(prompt, target, eos, max_length)]
    if kind == "chat":
        messages = json.loads(record["messages"])
        prompt = renderer.encode_prompt(renderer.render_messages(messages[:-1]))
        return [helpful_example(prompt, encode(messages[-1]["content"]), eos, max_length)]
    prompt = renderer.encode_prompt(renderer.render(record["instruction"], record.get("system")))
    if kind == "helpful":
        return [helpful_example(prompt, encode(record["response"]), eos, max_length)]
    harmful = encode(record["harmful_response"])
    safe_text = record.get("safe_response") or refusal_templates[
        int(row_rng(seed, uid, "template").integers(len(refusal_templates)))]
    safe = encode(safe_text)
    k = 0 if mode == "vanilla" else sample_prefix_len(len(harmful), k0_fraction, row_rng(seed, uid, "k"))
    examples = [harmful_prefix_example(prompt, harmful, safe, k, eos, max_length)]
    if mode == "derta":
        examples.append(rto_example(prompt, harmful, refusal_id, max_length))
    return examples
