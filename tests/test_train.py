"""Ray Train: a 2-worker CPU run lowers both loss terms and moves refusal probability onto harmful positions;
checkpoints round-trip through from_pretrained; LoRA saves a PEFT adapter; a crashed worker resumes exactly."""
import json
from pathlib import Path

import pytest

from derta.config import ConfigError, LoraConfig
from derta.trainer import preflight, run_training

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("ray_session")]


def _cfg(tiny_config, **train):
    small = tiny_config.data.synthetic.model_copy(update={"n_helpful": 600, "n_harmful": 200, "n_lookalike": 60})
    data = tiny_config.data.model_copy(update={"synthetic": small, "max_length": 192})
    return tiny_config.model_copy(update={"data": data, "train": tiny_config.train.model_copy(update=train)})


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tiny_config, tmp_path_factory):
    run = tmp_path_factory.mktemp("train") / "run"
    cfg = _cfg(tiny_config, num_workers=2, epochs=3, batch_size=16, lr=3e-3, log_every=5, checkpoint_every=20)
    return cfg, run, run_training(cfg, run)


def test_two_workers_lower_both_loss_terms(trained):
    _, run, _ = trained
    metrics = _metrics(run)
    assert metrics[-1]["step"] == metrics[-1]["total_steps"]
    for term, factor in (("loss_mle", 0.7), ("loss_rto", 0.3)):
        values = [m[term] for m in metrics if m[term] is not None]  # a window may hold no row of a kind
        early, late = sum(values[:2]) / 2, sum(values[-3:]) / 3
        assert late < factor * early, (term, values)
    assert sum(m["padding_fraction"] for m in metrics) / len(metrics) < 0.1
    assert {"loss", "loss_mle", "loss_rto", "tokens", "tokens_per_s", "lr", "padding_fraction"} <= set(metrics[-1])


def test_trained_model_refuses_along_harmful_responses(trained, tiny_path):
    from derta.demo import refusal_curves
    from derta.synthetic import generate_corpus

    cfg, _, final = trained
    heldout = generate_corpus(**cfg.data.synthetic.model_dump())["heldout_safety"][:16]
    items = [(row["instruction"], row["harmful_response"]) for row in heldout]
    curves = refusal_curves({"before": tiny_path, "after": str(final)}, items, cfg, max_positions=40)
    before, after = (sum(c) / len(c) for c in (curves["before"], curves["after"]))
    assert after > 0.15 and after > 10 * before, (before, after)


def test_final_checkpoint_loads_with_from_pretrained(trained):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, run, final = trained
    assert final == run / "final"
    model = AutoModelForCausalLM.from_pretrained(final)
    tokenizer = AutoTokenizer.from_pretrained(final)
    assert model.config.vocab_size == len(tokenizer)
    assert (final / "derta_config.yaml").exists() and not (final / "trainer_state.pt").exists()
    checkpoints = list((run / "checkpoints").rglob("trainer_state.pt"))
    assert 1 <= len(checkpoints) <= 2  # keep_checkpoints=2


def test_lora_run_saves_and_reloads_adapter(tiny_config, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from derta.modeling import resolve_model_path

    cfg = _cfg(tiny_config, num_workers=1, max_steps=6, lora=LoraConfig(r=4, alpha=8), log_every=3)
    final = run_training(cfg, tmp_path / "lora")
    assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
    base = AutoModelForCausalLM.from_pretrained(resolve_model_path(cfg.model, cfg.data.synthetic))
    model = PeftModel.from_pretrained(base, final)
    assert any("lora_A" in name for name, _ in model.named_parameters())


def test_fault_injected_run_resumes_and_completes_planned_steps(tiny_config, tmp_path):
    cfg = _cfg(tiny_config, num_workers=2, max_steps=12, checkpoint_every=4, log_every=2, fault_at_step=6,
               max_failures=2)
    run = tmp_path / "fault"
    run_training(cfg, run)
    assert (run / ".fault_injected").read_text() == "6"
    steps = [m["step"] for m in _metrics(run)]
    assert steps == [2, 4, 6, 8, 10, 12]  # resumed from step 4, redone 6 once, no duplicates
    state_steps = sorted(int(p.parent.name.split("_")[-1]) if p.parent.name.split("_")[-1].isdigit() else 0
                         for p in (run / "checkpoints").rglob("trainer_state.pt"))
    assert state_steps


def test_rerun_with_same_name_resumes(tiny_config, tmp_path):
    run = tmp_path / "again"
    run_training(_cfg(tiny_config, num_workers=1, max_steps=4, checkpoint_every=2, log_every=2), run)
    run_training(_cfg(tiny_config, num_workers=1, max_steps=6, checkpoint_every=2, log_every=2), run)
    assert [m["step"] for m in _metrics(run)] == [2, 4, 6]


def test_bad_configs_fail_before_workers_start(tiny_config):
    with pytest.raises(ConfigError, match="no such local directory"):
        preflight(tiny_config.model_copy(update={"model": tiny_config.model.model_copy(
            update={"name_or_path": "./missing-model"})}))
    with pytest.raises(ConfigError, match="GPUs"):
        preflight(tiny_config.model_copy(update={"train": tiny_config.train.model_copy(update={"use_gpu": True})}))
    with pytest.raises(ConfigError, match=r"data\.refusal_string='Zqxjvw'"):  # names the field
        preflight(tiny_config.model_copy(update={"data": tiny_config.data.model_copy(
            update={"refusal_string": "Zqxjvw"})}))
