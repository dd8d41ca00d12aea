"""Real tokenizers from ../shared/tokenizers paired with small random-init models of their vocabulary, and
synthesized variants of other families built by editing a real tokenizer's config in a temp dir."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import SHARED

TOKENIZERS = SHARED.parent / "tokenizers"
FAMILIES = ("llama3_1", "qwen3", "llama2")

GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'assistant' %}{% set role = 'model' %}"
    "{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
MISTRAL_V03_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + '[/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}")


def shared_tokenizer_dir(family: str) -> Path:
    path = TOKENIZERS / family
    if not (path / "tokenizer.json").exists():
        pytest.skip(f"shared tokenizer not found at {path}")
    return path


def copy_tokenizer(family: str, target: Path) -> Path:
    target.mkdir(parents=True, exist_ok=True)
    for file in shared_tokenizer_dir(family).iterdir():
        shutil.copy(file, target / file.name)
        (target / file.name).chmod(0o644)
    return target


def edit_tokenizer_config(directory: Path, **changes) -> Path:
    """Edit tokenizer_config.json in place (None deletes a key)."""
    path = directory / "tokenizer_config.json"
    config = json.loads(path.read_text())
    for key, value in changes.items():
        config.pop(key, None) if value is None else config.__setitem__(key, value)
    path.write_text(json.dumps(config, indent=2))
    return directory


def add_special_tokens(directory: Path, tokens: list[str]) -> Path:
    """Add special tokens the way a family's own tokenizer files carry them (tokenizer.json added_tokens)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.add_special_tokens({"additional_special_tokens": tokens})
    tokenizer.save_pretrained(directory)
    return directory


def variant_dir(name: str, root: Path) -> Path:
    """Other families that follow the same conventions, built from the shared files:
    - llama3_base: Llama-3 base config (eos <|end_of_text|>) with the instruct template (turns end <|eot_id|>)
    - gemma: a Gemma-style template whose turns end with <end_of_turn>
    - mistral_v03: a Mistral v0.3-style [INST] template, turns end with eos </s>"""
    target = root / name
    if name == "llama3_base":
        return edit_tokenizer_config(copy_tokenizer("llama3_1", target), eos_token="<|end_of_text|>")
    if name == "gemma":
        copy_tokenizer("llama2", target)
        add_special_tokens(target, ["<start_of_turn>", "<end_of_turn>"])
        return edit_tokenizer_config(target, chat_template=GEMMA_TEMPLATE)
    if name == "mistral_v03":
        copy_tokenizer("llama2", target)
        add_special_tokens(target, ["[INST]", "[/INST]"])
        return edit_tokenizer_config(target, chat_template=MISTRAL_V03_TEMPLATE)
    raise ValueError(name)


def tiny_model_dir(tokenizer_dir: Path, target: Path | None = None, max_positions: int = 512) -> Path:
    """A 1-layer random-init Llama with the tokenizer's vocabulary, saved next to the tokenizer files."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target = target or tokenizer_dir
    if target != tokenizer_dir:
        shutil.copytree(tokenizer_dir, target, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=max_positions,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(target)
    return target


def config_only_model_dir(tokenizer_dir: Path, target: Path, max_positions: int = 8192) -> Path:
    """A model directory with only config.json + tokenizer files (what a preflight needs; no weights)."""
    from transformers import AutoTokenizer, LlamaConfig

    shutil.copytree(tokenizer_dir, target, dirs_exist_ok=True)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    LlamaConfig(vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                max_position_embeddings=max_positions).save_pretrained(target)
    return target
