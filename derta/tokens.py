"""The special tokens a real checkpoint has to get right: end of turn, stop tokens, BOS.

**End-of-turn rule.** The token that ends an assistant turn is read from the chat template, never assumed: render
a short conversation whose last message is an assistant turn with a marker as content, take what the template
writes right after the marker, strip whitespace, and tokenize it. If it starts with a special token (Llama-3
`<|eot_id|>`, Qwen `<|im_end|>`, Gemma `<end_of_turn>`, Mistral/Llama-2 `</s>`), that token ends turns;
otherwise (no template, the plain template, or a template that ends turns with plain text) it is
`tokenizer.eos_token_id`. Training targets end with it; generation stops on it and on every eos id
(`stop_token_ids`), and the final checkpoint's `generation_config.json` lists them all (`write_generation_config`).
"""
from __future__ import annotations

from pathlib import Path

_MARKER = "derta-end-of-turn-marker"
_CACHE_ATTR = "_derta_token_cache"


def _cache(tokenizer) -> dict:
    cache = getattr(tokenizer, _CACHE_ATTR, None)
    if cache is None:
        cache = {}
        try:
            setattr(tokenizer, _CACHE_ATTR, cache)
        except AttributeError:  # a tokenizer that refuses new attributes: no caching
            pass
    return cache


def is_special_token(tokenizer, token_id: int) -> bool:
    if token_id in set(tokenizer.all_special_ids):
        return True
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return bool(token_id in added and getattr(added[token_id], "special", False))


def template_turn_suffix(tokenizer) -> str | None:
    """What the chat template writes right after an assistant message's content; None without a usable template."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _MARKER}]
    try:
        rendered = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception:  # noqa: BLE001 - a template that cannot render a plain exchange has no usable turn end
        return None
    if not isinstance(rendered, str) or _MARKER not in rendered:
        return None
    return rendered[rendered.rindex(_MARKER) + len(_MARKER):]


def end_of_turn_id(tokenizer, use_chat_template: bool = True) -> int:
    """The token that ends an assistant turn (see the module docstring for the rule)."""
    key = ("eot", bool(use_chat_template))
    cache = _cache(tokenizer)
    if key not in cache:
        cache[key] = _derive_end_of_turn(tokenizer, use_chat_template)
    return cache[key]


def _derive_end_of_turn(tokenizer, use_chat_template: bool) -> int:
    suffix = template_turn_suffix(tokenizer) if use_chat_template else None
    if suffix and suffix.strip():
        ids = tokenizer.encode(suffix.strip(), add_special_tokens=False)
        if ids and is_special_token(tokenizer, ids[0]):
            return ids[0]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos token and its chat template ends assistant turns with no special "
                         "token: there is no token to end a response with")
    return tokenizer.eos_token_id


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in value] if isinstance(value, (list, tuple, set)) else [int(value)]


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Ids generation stops on: the checkpoint's generation_config `eos_token_id` (int or list), the tokenizer's eos
    and the chat template's end-of-turn token. Deduplicated, order kept."""
    ids = _as_list(getattr(generation_config, "eos_token_id", None)) + _as_list(tokenizer.eos_token_id)
    ids.append(end_of_turn_id(tokenizer, use_chat_template=True))
    return list(dict.fromkeys(ids))


def write_generation_config(directory: str | Path, tokenizer) -> Path:
    """Write/update `directory/generation_config.json` so its `eos_token_id` lists every stop token (a list when
    there are several), keeping what is already there. Returns the file path."""
    from transformers import GenerationConfig

    directory = Path(directory)
    try:
        config = GenerationConfig.from_pretrained(directory)
    except (OSError, ValueError):
        config = GenerationConfig()
    stops = stop_token_ids(tokenizer, config)
    config.eos_token_id = stops if len(stops) > 1 else stops[0]
    if config.bos_token_id is None and tokenizer.bos_token_id is not None:
        config.bos_token_id = tokenizer.bos_token_id
    if config.pad_token_id is None and tokenizer.pad_token_id is not None:
        config.pad_token_id = tokenizer.pad_token_id
    config.save_pretrained(directory)
    return directory / "generation_config.json"


# ---------------------------------------------------------------------------------------------- BOS
def adds_bos(tokenizer) -> bool:
    """Whether this tokenizer puts a BOS in front of text it encodes with special tokens (Llama: yes, Qwen: no)."""
    cache = _cache(tokenizer)
    if "adds_bos" not in cache:
        bos = tokenizer.bos_token_id
        ids = tokenizer.encode("a", add_special_tokens=True) if bos is not None else []
        cache["adds_bos"] = bool(ids) and ids[0] == bos
    return cache["adds_bos"]


def with_one_bos(tokenizer, ids: list[int]) -> list[int]:
    """`ids` starting with exactly one BOS when the tokenizer uses one (a rendered template that already wrote the
    BOS text, plus the tokenizer's own BOS, would otherwise give two); unchanged when it does not."""
    if not adds_bos(tokenizer):
        return list(ids)
    bos = tokenizer.bos_token_id
    start = 0
    while start < len(ids) and ids[start] == bos:
        start += 1
    return [bos] + list(ids[start:])


def encode_prompt_text(tokenizer, text: str) -> list[int]:
    """Tokens of a prompt given as text (a rendered template or raw text): exactly one BOS where the tokenizer has
    one, whether or not the text already starts with the BOS string."""
    # the BOS text is dropped before encoding: SentencePiece tokenizes "<s>Hello" as <s> + "Hello", not "▁Hello"
    return with_one_bos(tokenizer, tokenizer.encode(text_for_server(tokenizer, text), add_special_tokens=False))


def text_for_server(tokenizer, text: str) -> str:
    """A rendered prompt as text for a server that tokenizes it with special tokens (derta serve, vLLM and other
    OpenAI-compatible servers): the BOS text the template wrote is dropped where the tokenizer adds its own BOS,
    so the server's tokens start with exactly one."""
    bos = tokenizer.bos_token
    if bos and adds_bos(tokenizer):
        while text.startswith(bos):
            text = text[len(bos):]
    return text
