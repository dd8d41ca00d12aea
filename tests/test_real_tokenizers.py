"""Real tokenizers (../shared/tokenizers) and synthesized variants of other families: end of turn, stop tokens,
one BOS, refusal/probe validation, preflight of every preset. Fast: no Ray, no training."""
from __future__ import annotations

import json

import pytest

from derta.config import CONFIG_DIR, ConfigError, load_config
from derta.modeling import load_tokenizer
from derta.preflight import check_tokens, run_preflight
from derta.tokens import adds_bos, end_of_turn_id, stop_token_ids, write_generation_config
from derta.transforms import HARMFUL_PREFIX, HELPFUL, RTO, IGNORE_INDEX, PromptRenderer, examples_for_record
from real_models import FAMILIES, config_only_model_dir, copy_tokenizer, shared_tokenizer_dir, variant_dir

# family/variant -> (end-of-turn token, eos token, BOS token or None)
EXPECTED = {
    "llama3_1": ("<|eot_id|>", "<|eot_id|>", "<|begin_of_text|>"),
    "qwen3": ("<|im_end|>", "<|im_end|>", None),
    "llama2": ("</s>", "</s>", "<s>"),  # no chat template: eos
    "llama3_base": ("<|eot_id|>", "<|end_of_text|>", "<|begin_of_text|>"),
    "gemma": ("<end_of_turn>", "</s>", "<s>"),
    "mistral_v03": ("</s>", "</s>", "<s>"),
}
VARIANTS = ("llama3_base", "gemma", "mistral_v03")


@pytest.fixture(scope="module")
def tokenizer_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tokenizers")
    dirs = {family: shared_tokenizer_dir(family) for family in FAMILIES}
    dirs.update({name: variant_dir(name, root) for name in VARIANTS})
    return dirs


@pytest.fixture(scope="module")
def tokenizers(tokenizer_dirs):
    return {name: load_tokenizer(str(path)) for name, path in tokenizer_dirs.items()}


NAMES = list(EXPECTED)


@pytest.mark.parametrize("name", NAMES)
def test_end_of_turn_and_stop_tokens_follow_the_template(tokenizers, name):
    tokenizer = tokenizers[name]
    eot, eos, _ = EXPECTED[name]
    assert tokenizer.eos_token == eos
    assert tokenizer.convert_ids_to_tokens(end_of_turn_id(tokenizer)) == eot
    stops = tokenizer.convert_ids_to_tokens(stop_token_ids(tokenizer))
    assert set(stops) == {eot, eos}
    # the plain template (no chat template in use) ends responses with eos
    assert end_of_turn_id(tokenizer, use_chat_template=False) == tokenizer.eos_token_id


@pytest.mark.parametrize("name", NAMES)
def test_examples_end_with_the_end_of_turn_token_and_have_one_bos(tokenizers, name):
    tokenizer = tokenizers[name]
    eot_token, _, bos = EXPECTED[name]
    renderer = PromptRenderer(tokenizer)
    eot = tokenizer.convert_tokens_to_ids(eot_token)
    helpful = {"kind": "helpful", "uid": "h", "instruction": "Name a colour.", "response": "Blue."}
    safety = {"kind": "safety", "uid": "s", "instruction": "Do harm.", "harmful_response": "Step one: do it now.",
              "safe_response": None}
    examples = examples_for_record(helpful, tokenizer, renderer, mode="derta", refusal_id=5,
                                   refusal_templates=["Sorry, I can't."], k0_fraction=0.0, max_length=256, seed=0)
    examples += examples_for_record(safety, tokenizer, renderer, mode="derta", refusal_id=5,
                                    refusal_templates=["Sorry, I can't."], k0_fraction=0.0, max_length=256, seed=0)
    by_kind = {ex.kind: ex for ex in examples}
    for kind in (HELPFUL, HARMFUL_PREFIX):
        ex = by_kind[kind]
        assert ex.input_ids[-1] == eot and ex.labels[-1] == eot
        assert ex.labels.count(eot) == 1  # only the response is closed by the target
    for ex in examples:
        n_bos = ex.input_ids.count(tokenizer.bos_token_id) if tokenizer.bos_token_id is not None else 0
        assert n_bos == (1 if bos else 0)
        if bos:
            assert ex.input_ids[0] == tokenizer.bos_token_id
    assert by_kind[RTO].labels[-1] == 5 and IGNORE_INDEX in by_kind[RTO].labels


@pytest.mark.parametrize("name", NAMES)
def test_raw_prompt_text_gets_exactly_one_bos(tokenizers, name):
    from derta.tokens import encode_prompt_text, text_for_server

    tokenizer = tokenizers[name]
    bos = EXPECTED[name][2]
    for text in ("Hello there", (bos or "") + "Hello there", (bos or "") * 2 + "Hello there"):
        ids = encode_prompt_text(tokenizer, text)
        assert ids.count(tokenizer.bos_token_id) == (1 if bos else 0) if tokenizer.bos_token_id is not None else True
        server_ids = tokenizer.encode(text_for_server(tokenizer, text), add_special_tokens=True)
        assert server_ids == ids
    assert adds_bos(tokenizer) == bool(bos)


@pytest.mark.parametrize("name", ["llama2", "gemma", "mistral_v03"])
def test_sentencepiece_continuation_keeps_its_space(tokenizers, name):
    """A response segment tokenized on its own decodes with its leading space after a harmful prefix."""
    tokenizer = tokenizers[name]
    prefix = tokenizer.encode("Step one: do", add_special_tokens=False)
    safe = tokenizer.encode("Sorry, I can't.", add_special_tokens=False)
    assert tokenizer.decode(prefix + safe) == "Step one: do Sorry, I can't."


@pytest.mark.parametrize("name", NAMES)
def test_multi_token_probe_strings_are_config_errors_naming_the_field(tokenizers, name):
    cfg = load_config(None, ['data.probe_refusal_strings=["Sorry", "I cannot"]'])
    with pytest.raises(ConfigError, match=r"data\.probe_refusal_strings\[1\].*'I cannot'"):
        check_tokens(cfg, tokenizers[name])
    cfg = load_config(None, ["data.refusal_string=I can't"])
    with pytest.raises(ConfigError, match=r"data\.refusal_string"):
        check_tokens(cfg, tokenizers[name])


@pytest.mark.parametrize("name", NAMES)
def test_probe_tokens_deduplicate_and_templates_are_counted(tokenizers, name):
    cfg = load_config(None, ['data.probe_refusal_strings=["Sorry", "Sorry, I cannot", "Unfortunately"]',
                             'data.refusal_templates=["Sorry, no.", "I will not help.", "Sorry."]'])
    report = check_tokens(cfg, tokenizers[name])
    assert len(report["probe_tokens"]["ids"]) == 2
    assert report["probe_tokens"]["tokens"][0].strip() == "Sorry"
    assert report["refusal_templates_not_starting_with_refusal"] == 1
    assert "data.refusal_templates[1]" in report["warnings"][0]


@pytest.mark.parametrize("name", ["llama3_1", "llama3_base", "gemma"])
def test_generation_config_lists_every_stop_token(tokenizers, tmp_path, name):
    tokenizer = tokenizers[name]
    from transformers import GenerationConfig

    GenerationConfig(eos_token_id=tokenizer.eos_token_id, temperature=0.6, do_sample=True).save_pretrained(tmp_path)
    write_generation_config(tmp_path, tokenizer)
    saved = json.loads((tmp_path / "generation_config.json").read_text())
    eot = tokenizer.convert_tokens_to_ids(EXPECTED[name][0])
    assert sorted(saved["eos_token_id"] if isinstance(saved["eos_token_id"], list) else [saved["eos_token_id"]]) \
        == sorted({eot, tokenizer.eos_token_id})
    assert saved["temperature"] == 0.6  # what was there is kept


def preset_family(name: str) -> str | None:
    return "llama3_1" if name.startswith("llama3") else None


@pytest.mark.parametrize("preset", sorted(p.stem for p in CONFIG_DIR.glob("*.yaml")))
def test_every_preset_passes_the_preflight(preset, tmp_path, tiny_path):
    """Every shipped preset with the matching shared tokenizer standing in for the hub model (the tiny presets
    with the embedded tiny model)."""
    family = preset_family(preset)
    if family:
        model_dir = config_only_model_dir(shared_tokenizer_dir(family), tmp_path / "model")
        overrides = [f"model.name_or_path={model_dir}"]
    else:
        overrides = [f"model.name_or_path={tiny_path}"]
    report = run_preflight(load_config(preset, overrides))
    assert report["tokens"]["probe_tokens"]["ids"]
    assert report["tokens"]["refusal_templates_not_starting_with_refusal"] == 0
    assert report["lengths"]["model_context"] >= report["lengths"]["max_length"]


def test_dry_run_cli_from_a_config_only_model_dir(tmp_path):
    from typer.testing import CliRunner

    from derta.cli import app

    model_dir = config_only_model_dir(copy_tokenizer("llama3_1", tmp_path / "tok"), tmp_path / "model")
    result = CliRunner().invoke(app, ["train", "--dry-run", "--config", "llama3-8b-full-derta",
                                      "--set", f"model.name_or_path={model_dir}"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.output[result.output.index("{"):])
    assert report["tokens"]["end_of_turn"]["token"] == "<|eot_id|>"
    bad = CliRunner().invoke(app, ["train", "--dry-run", "--set", f"model.name_or_path={model_dir}",
                                   "--set", 'data.probe_refusal_strings=["I cannot"]'])
    assert bad.exit_code == 2 and "data.probe_refusal_strings[0]" in bad.output
