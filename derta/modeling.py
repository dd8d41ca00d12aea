"""Model and tokenizer loading: the embedded `tiny` preset, local HF directories and hub ids.

`tiny` is a random-init Llama plus a byte-level BPE tokenizer trained on the synthetic corpus, written with
`save_pretrained` so that the ordinary `AutoModelForCausalLM.from_pretrained(path)` path loads it. Everything
else goes through the same `from_pretrained` calls; tests only ever pass local paths.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

from derta.config import ConfigError, ModelConfig, SyntheticConfig, mid_refusal_word

SPECIAL_TOKENS = {"pad": "<|pad|>", "eos": "<|eos|>", "bos": "<|bos|>", "unk": "<|unk|>"}
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
TINY_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _tiny_key(model: ModelConfig, synthetic: SyntheticConfig) -> str:
    # a knob at its default stays out of the key: configs that do not use it keep their cached tiny model
    synthetic_key = synthetic.cache_key()
    tiny_key = model.tiny.model_dump(exclude=None if model.tiny.mid_refusal_token else {"mid_refusal_token"})
    payload = json.dumps([tiny_key, synthetic_key, TINY_CHAT_TEMPLATE, 2], sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


def train_tiny_tokenizer(texts, vocab_size: int, refusal_string: str = "Sorry", mid_refusal_token: bool = False):
    """Train a byte-level BPE on `texts` and wrap it as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS.values()) + ROLE_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token=SPECIAL_TOKENS["bos"], eos_token=SPECIAL_TOKENS["eos"],
        pad_token=SPECIAL_TOKENS["pad"], unk_token=SPECIAL_TOKENS["unk"],
        additional_special_tokens=ROLE_TOKENS,
    )
    tokenizer.chat_template = TINY_CHAT_TEMPLATE
    if len(tokenizer.encode(refusal_string, add_special_tokens=False)) != 1:
        tokenizer.add_tokens([refusal_string])  # the refusal string must be one token in the tiny preset
    if mid_refusal_token:  # " Sorry": a refusal that starts mid-response (data.mid_refusal_space)
        word = mid_refusal_word(refusal_string)
        if len(tokenizer.encode(word, add_special_tokens=False)) != 1:
            tokenizer.add_tokens([word])
    return tokenizer


TOKENIZER_SAMPLE_ROWS = {"n_helpful": 40_000, "n_harmful": 10_000, "n_lookalike": 4_000}


def build_tiny(model: ModelConfig, synthetic: SyntheticConfig, refusal_string: str = "Sorry") -> Path:
    """Build (once, cached by config hash) the tiny model + tokenizer and return its directory."""
    root = Path(os.path.expanduser(model.tiny_dir))
    target = root / _tiny_key(model, synthetic)
    if (target / "config.json").exists() and (target / "tokenizer.json").exists():
        return target
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from derta.synthetic import generate_corpus, tokenizer_training_texts

    # the BPE vocabulary saturates long before a large synthetic corpus ends: a million-row config trains it on a
    # capped sample (the same rows for every config below the caps), so it costs the default's seconds and memory
    sample = {name: min(getattr(synthetic, name), cap) for name, cap in TOKENIZER_SAMPLE_ROWS.items()}
    corpus = generate_corpus(**synthetic.model_copy(update=sample).model_dump())
    tokenizer = train_tiny_tokenizer(tokenizer_training_texts(corpus), model.tiny.vocab_size, refusal_string,
                                     model.tiny.mid_refusal_token)
    t = model.tiny
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
        num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
        num_key_value_heads=t.num_key_value_heads, max_position_embeddings=t.max_position_embeddings,
        tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(t.seed)
    llama = LlamaForCausalLM(config)
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    llama.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    tmp.rename(target) if not target.exists() else None
    return target


def resolve_model_path(model: ModelConfig, synthetic: SyntheticConfig | None = None,
                       refusal_string: str = "Sorry") -> str:
    """Local directory for `tiny`/local paths; the hub id unchanged. Fails with a clear message otherwise."""
    name = model.name_or_path
    if name == "tiny":
        return str(build_tiny(model, synthetic or SyntheticConfig(), refusal_string))
    path = Path(os.path.expanduser(name))
    if path.exists():
        if not (path / "config.json").exists() and not (path / "adapter_config.json").exists():
            raise ConfigError(f"model.name_or_path={name!r}: directory has no config.json (not an HF checkpoint)")
        return str(path)
    if HUB_ID.match(name) and not name.startswith((".", "/", "~")):
        return name
    raise ConfigError(
        f"model.name_or_path={name!r}: no such local directory, and not a hub id of the form 'org/name'. "
        "Use 'tiny', a local HF checkpoint directory, or a hub id such as meta-llama/Meta-Llama-3-8B")


# tokenizer classes that are transformers' plain `tokenizers` backend (aliases in transformers 5): such a directory
# is loaded by that class directly, as AutoTokenizer would resolve it, without AutoTokenizer's import of the model
# registry, which imports torch (seconds of CPU in every Ray Data tokenize worker)
PLAIN_TOKENIZER_CLASSES = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _declared_tokenizer_class(path: str) -> str | None:
    try:
        return json.loads((Path(path) / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError):
        return None


def load_tokenizer(path: str, trust_remote_code: bool = False):
    if (_declared_tokenizer_class(path) in PLAIN_TOKENIZER_CLASSES and (Path(path) / "tokenizer.json").is_file()
            and not trust_remote_code):
        from transformers import PreTrainedTokenizerFast

        tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
    else:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def torch_dtype(name: str, device: str):
    import torch

    if name == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    return getattr(torch, name)


def load_model(path: str, model: ModelConfig | None = None, device: str = "cpu", adapter: str | None = None,
               device_map: str | None = None):
    """`AutoModelForCausalLM.from_pretrained`, optionally with a PEFT adapter on top.

    `path` may itself be a PEFT adapter directory; its base model is then loaded from adapter_config.json.
    `device_map="auto"` places the layers across every visible GPU (a Serve replica sees only its own GPUs).
    """
    from transformers import AutoModelForCausalLM

    model = model or ModelConfig()
    adapter_config = Path(path) / "adapter_config.json"
    if adapter is None and adapter_config.exists():
        adapter, path = path, json.loads(adapter_config.read_text())["base_model_name_or_path"]
    kwargs = {"dtype": torch_dtype(model.dtype, device), "trust_remote_code": model.trust_remote_code}
    if model.attn_implementation:
        kwargs["attn_implementation"] = model.attn_implementation
    if device_map:
        kwargs["device_map"] = device_map
    llm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if adapter:
        from peft import PeftModel

        llm = PeftModel.from_pretrained(llm, adapter)
    return llm if device_map else llm.to(device)
