"""DeRTa training examples at the token level. Pure, seeded, reproducible.

Every example is `input_ids`, `labels` and `rto_mask`, aligned with each other in the Hugging Face
convention: `labels[t]` is the token the model should predict at position t (the loss shifts by one).
`labels[t] = -100` means no loss. `rto_mask[t] = 1` marks an RTO target: labels[t] is the refusal token
while input_ids[t] is the next token of the harmful response, so the model is trained to switch to a
refusal after prompt + harmful[:j] for every j.

    helpful MLE        prompt | response EOT          loss on response + EOT
    harmful-prefix MLE prompt | harmful[:k] | safe EOT loss on safe + EOT only
    RTO                prompt | harmful               refusal token after every harmful prefix, the whole one too

EOT is the chat template's end-of-turn token (derta.tokens.end_of_turn_id); eos without a template. The harmful
prefix is cut on tokens (`data.prefix_unit: token`, k uniform in 1..n) or, like the reference implementation, on
words (`word`: k uniform in 1..words-2, prefix and refusal joined with a space).
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field

import numpy as np

from derta.tokens import encode_prompt_text, end_of_turn_id, text_for_server, with_one_bos

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


def row_key(uid: str) -> str:
    """The part of a row id ("<source path>:<line>") that seeds its draws: the file name and line, not the directory.
    The same corpus must give the same examples wherever it lives: the synthetic corpus is written under each run's
    own (temporary) work directory, and a copied or re-mounted corpus keeps its file names."""
    return uid.rsplit("/", 1)[-1]


def _digest(seed: int, uid: str, salt: str) -> int:
    return int.from_bytes(hashlib.blake2b(f"{seed}|{row_key(uid)}|{salt}".encode(), digest_size=8).digest(), "little")


def row_rng(seed: int, uid: str, salt: str = "") -> np.random.Generator:
    """A generator that depends only on (seed, row key, purpose): same row -> same draw on any worker, in any run."""
    return np.random.default_rng(_digest(seed, uid, salt))


def unit_hash(seed: int, uid: str, salt: str = "") -> float:
    """Deterministic uniform [0, 1) number for sampling decisions."""
    return _digest(seed, uid, salt) / 2**64


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
                           max_length: int, safe_mid: list[int] | None = None) -> Example:
    """`safe_mid`: the refusal as it continues a non-empty harmful prefix (" Sorry, ..."), used when k > 0."""
    # shorten the harmful prefix before the safe response, so the refusal survives truncation
    room_for_prefix = max(0, max_length - len(prompt) - max(len(safe), len(safe_mid or safe)) - 1)
    k = min(k, len(harmful), room_for_prefix)
    if k > 0 and safe_mid is not None:
        safe = safe_mid
    context = prompt + harmful[:k]
    input_ids = (context + safe + [eos_id])[:max_length]
    labels = ([IGNORE_INDEX] * len(context) + safe + [eos_id])[:max_length]
    return Example(HARMFUL_PREFIX, input_ids, labels, prefix_len=k, prompt_len=len(prompt))


def rto_example(prompt: list[int], harmful: list[int], refusal_id: int, max_length: int,
                after_end: bool = True, mid_refusal_id: int | None = None) -> Example:
    # n + 1 targets: after prompt + harmful[:j] for j = 0..n, the last one after the whole harmful response (the
    # reference trains it too). The extra input token is never a context for any loss; the refusal token fills it.
    # after_end=False (data.rto_after_end) drops that last target: n targets, j = 0..n-1, none where a finished
    # response has its end-of-turn token, so RTO never pulls "Sorry" onto the position where EOS belongs.
    # mid_refusal_id (data.mid_refusal_space): the target after a non-empty prefix (j >= 1) is the refusal word with
    # its leading space (" Sorry"), the natural continuation of a sentence; right after the prompt it is "Sorry".
    input_ids = (prompt + harmful + ([refusal_id] if after_end else []))[:max_length]
    n_targets = len(input_ids) - len(prompt)
    later = refusal_id if mid_refusal_id is None else mid_refusal_id
    targets = ([refusal_id] + [later] * (n_targets - 1)) if n_targets > 0 else []
    labels = [IGNORE_INDEX] * len(prompt) + targets
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

    @property
    def prompt_special_tokens(self) -> bool:
        # chat templates carry their own BOS; plain templates get the tokenizer's usual special tokens
        return not self.use_chat

    @property
    def end_of_turn_id(self) -> int:
        """The token that ends a response under this renderer (derta.tokens.end_of_turn_id)."""
        return end_of_turn_id(self.tokenizer, self.use_chat)

    def encode_prompt(self, text: str) -> list[int]:
        """Exactly one BOS where the tokenizer has one, whether or not the rendered text already carries it."""
        return encode_prompt_text(self.tokenizer, text)


# ------------------------------------------------------------------------------------- row -> examples
# One record -> examples in three steps, so many records can share one tokenizer call (examples_for_records):
#   record_texts (render the prompt, pick the refusal) -> encode_texts / encode_many -> examples_from_ids
@dataclass
class RecordTexts:
    """The strings one record tokenizes: its rendered prompt and its response segments (no special tokens)."""
    prompt: str
    prompt_special_tokens: bool
    segments: dict[str, str]


@dataclass
class RecordIds:
    prompt: list[int]
    segments: dict[str, list[int]]


def word_prefix(harmful: str, k0_fraction: float, rng: np.random.Generator) -> str:
    """The reference's cut: the first k space-separated words, k = 0 with probability k0_fraction, else uniform in
    1..len(words)-2 (k = 0 when the response has fewer than 3 words)."""
    words = harmful.split(" ")
    if len(words) < 3 or rng.random() < k0_fraction:
        return ""
    return " ".join(words[: int(rng.integers(1, len(words) - 1))])


def first_sentences(text: str, n: int | None) -> str:
    """The first `n` sentences of `text` (all of it for None): a sentence ends in . ! or ? before a space."""
    return text if n is None else " ".join(re.split(r"(?<=[.!?]) ", text)[:n])


def record_texts(record: dict, renderer: PromptRenderer, *, refusal_templates: list[str], seed: int,
                 prefix_unit: str = "token", k0_fraction: float = 1 / 3, mode: str = "derta",
                 mid_refusal_space: bool = False, safe_sentences: int | None = None) -> RecordTexts:
    kind = record["kind"]
    if kind == "rendered":
        return RecordTexts(record["prompt_text"], True, {"target": record["target_text"]})
    if kind == "chat":
        messages = json.loads(record["messages"])
        return RecordTexts(renderer.render_messages(messages[:-1]), renderer.prompt_special_tokens,
                           {"response": messages[-1]["content"]})
    prompt = renderer.render(record["instruction"], record.get("system"))
    if kind == "helpful":
        return RecordTexts(prompt, renderer.prompt_special_tokens, {"response": record["response"]})
    safe = record.get("safe_response") or refusal_templates[
        int(row_rng(seed, record["uid"], "template").integers(len(refusal_templates)))]
    safe = first_sentences(safe, safe_sentences)  # data.safe_sentences: a shorter refusal that ends (EOS) sooner
    segments = {"harmful": record["harmful_response"], "safe": safe}
    if prefix_unit == "word":
        prefix = "" if mode == "vanilla" else word_prefix(record["harmful_response"], k0_fraction,
                                                          row_rng(seed, record["uid"], "k"))
        segments.update(prefix=prefix, safe=" " + safe if prefix else safe)
    elif mid_refusal_space and mode != "vanilla":  # token cut: the refusal after k > 0 tokens starts with a space
        segments["safe_mid"] = " " + safe
    return RecordTexts(prompt, renderer.prompt_special_tokens, segments)


def encode_texts(tokenizer, texts: RecordTexts) -> RecordIds:
    segments = {name: tokenizer.encode(text, add_special_tokens=False) for name, text in texts.segments.items()}
    return RecordIds(encode_prompt_text(tokenizer, texts.prompt), segments)


def encode_many(tokenizer, many: list[RecordTexts]) -> list[RecordIds]:
    """encode_texts for every record, with one batched tokenizer call. Prompts get exactly one BOS where the
    tokenizer has one (a template that writes the BOS text and a tokenizer that adds one must not give two)."""
    flat = [text_for_server(tokenizer, t.prompt) for t in many] + [text for t in many for text in t.segments.values()]
    ids = iter(_encode_batch(tokenizer, flat, False))
    prompts = [with_one_bos(tokenizer, next(ids)) for _ in many]
    return [RecordIds(prompt, {name: next(ids) for name in t.segments}) for prompt, t in zip(prompts, many)]


def _encode_batch(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    if not texts:
        return []
    return tokenizer(texts, add_special_tokens=add_special_tokens, return_attention_mask=False,
                     return_token_type_ids=False)["input_ids"]


def examples_from_ids(record: dict, ids: RecordIds, *, eos_id: int, mode: str, refusal_id: int, k0_fraction: float,
                      max_length: int, seed: int, rto_after_end: bool = True,
                      mid_refusal_id: int | None = None) -> list[Example]:
    kind, prompt = record["kind"], ids.prompt
    if kind == "rendered":
        target = ids.segments["target"]
        if record["target_harmful"]:
            return ([rto_example(prompt, target, refusal_id, max_length, rto_after_end, mid_refusal_id)]
                if mode == "derta" else [])
        return [helpful_example(prompt, target, eos_id, max_length)]
    if kind in ("chat", "helpful"):
        return [helpful_example(prompt, ids.segments["response"], eos_id, max_length)]
    harmful, safe = ids.segments["harmful"], ids.segments["safe"]
    if "prefix" in ids.segments:  # cut on words when the texts were made (record_texts)
        prefix = ids.segments["prefix"]
        examples = [harmful_prefix_example(prompt, prefix, safe, len(prefix), eos_id, max_length)]
    else:
        k = 0 if mode == "vanilla" else sample_prefix_len(len(harmful), k0_fraction, row_rng(seed, record["uid"], "k"))
        examples = [harmful_prefix_example(prompt, harmful, safe, k, eos_id, max_length, ids.segments.get("safe_mid"))]
    if mode == "derta":
        examples.append(rto_example(prompt, harmful, refusal_id, max_length, rto_after_end, mid_refusal_id))
    return examples


def examples_for_record(record: dict, tokenizer, renderer: PromptRenderer, *, mode: str, refusal_id: int,
                        refusal_templates: list[str], k0_fraction: float, max_length: int,
                        seed: int, prefix_unit: str = "token", rto_after_end: bool = True,
                        mid_refusal_id: int | None = None, safe_sentences: int | None = None) -> list[Example]:
    """All training examples one canonical record yields under `mode` (see MODE_KINDS). `mid_refusal_id`: the
    refusal token with its leading space; given, refusals after a non-empty harmful prefix start with it."""
    texts = record_texts(record, renderer, refusal_templates=refusal_templates, seed=seed, prefix_unit=prefix_unit,
                         k0_fraction=k0_fraction, mode=mode, mid_refusal_space=mid_refusal_id is not None,
                         safe_sentences=safe_sentences)
    return examples_from_ids(record, encode_texts(tokenizer, texts), eos_id=renderer.end_of_turn_id, mode=mode,
                             refusal_id=refusal_id, k0_fraction=k0_fraction, max_length=max_length, seed=seed,
                             rto_after_end=rto_after_end, mid_refusal_id=mid_refusal_id)


def examples_for_records(records: list[dict], tokenizer, renderer: PromptRenderer, *, mode: str, refusal_id: int,
                         refusal_templates: list[str], k0_fraction: float, max_length: int,
                         seed: int, prefix_unit: str = "token",
                         rto_after_end: bool = True, mid_refusal_id: int | None = None,
                         safe_sentences: int | None = None) -> list[list[Example] | Exception]:
    """examples_for_record for each record, tokenized in batch. A record that fails gets its exception in its
    slot (the same one examples_for_record raises) and does not affect the others."""
    texts = [_attempt(record_texts, r, renderer, refusal_templates=refusal_templates, seed=seed,
                      prefix_unit=prefix_unit, k0_fraction=k0_fraction, mode=mode,
                      mid_refusal_space=mid_refusal_id is not None, safe_sentences=safe_sentences) for r in records]
    ids = _encode_valid(tokenizer, texts)
    settings = dict(eos_id=renderer.end_of_turn_id, mode=mode, refusal_id=refusal_id, k0_fraction=k0_fraction,
                    max_length=max_length, seed=seed, rto_after_end=rto_after_end, mid_refusal_id=mid_refusal_id)
    return [i if isinstance(i, Exception) else _attempt(examples_from_ids, r, i, **settings)
            for r, i in zip(records, ids)]


def _encode_valid(tokenizer, texts: list[RecordTexts | Exception]) -> list[RecordIds | Exception]:
    """Encode the records that rendered; exceptions pass through in place."""
    valid = [t for t in texts if not isinstance(t, Exception)]
    try:
        encoded = iter(encode_many(tokenizer, valid))
    except Exception:  # noqa: BLE001 - some text the tokenizer rejects: find it row by row
        encoded = iter([_attempt(encode_texts, tokenizer, t) for t in valid])
    return [t if isinstance(t, Exception) else next(encoded) for t in texts]


def _attempt(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except Exception as err:  # noqa: BLE001 - the caller reports it against its row
        return err
