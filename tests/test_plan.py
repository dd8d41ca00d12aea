"""`derta train --dry-run`: the memory plan from config.json + tokenizer files only (no weights), for the 8B and 70B
presets with the real Llama-3 architecture numbers and the shared Llama-3.1 tokenizer standing in."""
import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from conftest import shared_file
from derta.cli import app

LLAMA3 = Path(__file__).parent / "data" / "llama3"


def _model_dir(tmp_path: Path, size: str) -> Path:
    tokenizer = shared_file("..", "tokenizers", "llama3_1")
    model = tmp_path / f"llama3-{size}"
    model.mkdir()
    shutil.copy(LLAMA3 / f"{size}.config.json", model / "config.json")
    for file in tokenizer.glob("tokenizer*.json"):
        shutil.copy(file, model / file.name)
    return model


@pytest.mark.parametrize("preset,size,params,trainable", [
    ("llama3-8b-full-derta", "8b", 8_030_261_248, 8_030_261_248),
    # LoRA r=96 on q/k/v/o/gate/up/down of 80 layers: 96 * (in + out) summed over the targeted projections
    ("llama3-70b-lora-derta", "70b", 70_553_706_496 + 1_242_562_560, 1_242_562_560),
])
def test_presets_pass_the_plan(tmp_path, preset, size, params, trainable):
    model = _model_dir(tmp_path, size)
    out = tmp_path / "plan"
    result = CliRunner().invoke(app, ["train", "--dry-run", "--config", preset, "--output", str(out),
                                      "--set", f"model.name_or_path={model}"])
    assert result.exit_code == 0, result.output
    plan = json.loads((out / "plan.json").read_text())
    assert plan["params"] == params and plan["trainable_params"] == trainable
    assert plan["fits"] is True and plan["per_gpu_bytes"] == sum(plan["breakdown_bytes"].values())
    assert 0 < plan["per_gpu_bytes"] <= plan["budget_bytes"] == 80 * 1024 ** 3
    assert not (out / "checkpoints").exists()  # nothing trained


def test_plan_that_does_not_fit_exits_nonzero_with_numbers(tmp_path):
    model = _model_dir(tmp_path, "8b")
    out = tmp_path / "plan"
    # full fine-tuning of 8B replicated per GPU (DDP): 16 bytes/param of fp32 weights + grads + AdamW ~ 120 GiB
    result = CliRunner().invoke(app, ["train", "--dry-run", "--config", "llama3-8b-full-derta", "--output", str(out),
                                      "--set", f"model.name_or_path={model}", "--set", "train.strategy=ddp"])
    assert result.exit_code != 0
    plan = json.loads((out / "plan.json").read_text())
    assert plan["fits"] is False and plan["per_gpu_bytes"] > 16 * 8_030_261_248
    assert "does not fit" in result.output and f"{plan['per_gpu_gib']:.1f} GiB" in result.output
    assert "80.0 GiB" in result.output


def test_fsdp_shards_what_ddp_replicates(tmp_path):
    from derta.config import load_config
    from derta.plan import make_plan

    model = str(_model_dir(tmp_path, "8b"))
    fsdp = load_config("llama3-8b-full-derta", [f"model.name_or_path={model}", "train.grad_accum=1"])
    ddp = load_config("llama3-8b-full-derta", [f"model.name_or_path={model}", "train.grad_accum=1",
                                                "train.strategy=ddp"])
    sharded, replicated = make_plan(fsdp, model)["breakdown_bytes"], make_plan(ddp, model)["breakdown_bytes"]
    for part in ("weights", "grads", "optimizer"):
        assert sharded[part] * 8 == pytest.approx(replicated[part], rel=1e-6)
    assert sharded["activations"] == replicated["activations"]
