"""FSDP2 on CPU (gloo, 2 processes): the meta-built, rank-0-broadcast sharded model equals the unsharded model, and
clipping uses the global gradient norm; through Ray Train (2 CPU workers, full and LoRA), a run whose worker crashes
mid-run resumes from its sharded checkpoint on the loss curve of an uninterrupted run."""
import json
import math
import socket
from pathlib import Path

import pytest
import torch


pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _sharded_vs_full(rank: int, world: int, port: int, model_path: str, config: dict, out: str) -> None:
    import os

    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from derta.config import DertaConfig
    from derta.fsdp import build_fsdp_model, clip_global_norm
    from derta.modeling import load_model

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    cfg = DertaConfig.model_validate(config)
    model = build_fsdp_model(model_path, cfg, torch.device("cpu"))
    params = [p for p in model.parameters() if p.requires_grad]
    torch.manual_seed(0)
    tokens = torch.randint(0, 500, (2, 12))
    sharded_logits = model(input_ids=tokens).logits
    sharded_logits.float().pow(2).mean().backward()
    norm = clip_global_norm(params, 1e-3)
    clipped = math.sqrt(sum(float(p.grad.full_tensor().pow(2).sum()) for p in params))

    reference = load_model(model_path, cfg.model.model_copy(update={"dtype": "float32"}), "cpu")
    logits = reference(input_ids=tokens).logits
    logits.pow(2).mean().backward()
    full_norm = float(torch.nn.utils.get_total_norm([p.grad for p in reference.parameters() if p.grad is not None]))
    if rank == 0:
        Path(out).write_text(json.dumps({
            "max_logit_diff": float((sharded_logits - logits).abs().max()), "norm": norm, "full_norm": full_norm,
            "clipped_norm": clipped, "all_dtensor": all(isinstance(p, DTensor) for p in params),
            "local_fraction": sum(p.to_local().numel() for p in params) / sum(p.numel() for p in params),
            "tied": model.lm_head.weight is model.model.embed_tokens.weight}))
    dist.destroy_process_group()


def test_sharded_meta_init_model_equals_full_model_and_clips_by_global_norm(tiny_config, tiny_path, tmp_path):
    out = tmp_path / "result.json"
    torch.multiprocessing.spawn(_sharded_vs_full, nprocs=2, args=(
        2, _free_port(), tiny_path, tiny_config.model_dump(mode="json"), str(out)))
    result = json.loads(out.read_text())
    assert result["max_logit_diff"] < 1e-5  # weights broadcast from rank 0 into the meta-built shards
    assert result["all_dtensor"] and 0.4 < result["local_fraction"] < 0.6 and result["tied"]
    # the norm every rank clips by is the whole model's, not its shard's
    assert math.isclose(result["norm"], result["full_norm"], rel_tol=1e-4)
    assert math.isclose(result["clipped_norm"], 1e-3, rel_tol=1e-3)


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory):
    # the runs are siblings, so they share one prepared-data cache entry (.derta-cache next to them)
    return tmp_path_factory.mktemp("fsdp-runs")


def _cfg(tiny_config, **train):
    small = tiny_config.data.synthetic.model_copy(update={"n_helpful": 160, "n_harmful": 48, "n_lookalike": 8})
    data = tiny_config.data.model_copy(update={"synthetic": small, "max_length": 96})
    base = dict(strategy="fsdp", num_workers=2, batch_size=4, group_buffer_batches=4, max_steps=5,
                checkpoint_every=2, log_every=1, torch_threads=1, max_failures=1, lr=3e-3, warmup_ratio=0.0)
    return tiny_config.model_copy(update={"data": data, "train": tiny_config.train.model_copy(
        update={**base, **train})})


def _losses(run: Path, name: str = "metrics.jsonl") -> dict[int, float]:
    return {m["step"]: m["loss"] for m in map(json.loads, (run / name).read_text().splitlines())}


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("lora", [None, {"r": 4, "alpha": 8}], ids=["full", "lora"])
def test_fsdp_worker_crash_resumes_from_sharded_checkpoint_on_the_uninterrupted_curve(tiny_config, runs_dir, lora):
    """Rank 1 crashes after optimizer step 3 (the checkpoint of step 2 is the latest); Ray Train restarts the worker
    group, which resumes from the DCP shards of step 2 and redoes steps 3-5. The whole curve must equal the
    uninterrupted run's: the same rows per rank and batches (derta.train_data), dropout seeds per step, and the
    model + AdamW + scheduler state restored from the shards."""
    from derta.config import LoraConfig
    from derta.trainer import run_training

    lora = LoraConfig(**lora) if lora else None
    name = "lora" if lora else "full"
    plain, fault = runs_dir / f"{name}-plain", runs_dir / f"{name}-fault"
    run_training(_cfg(tiny_config, lora=lora), plain)
    final = run_training(_cfg(tiny_config, lora=lora, fault_at_step=3), fault)

    assert (fault / ".fault_injected").read_text() == "3"  # the crash happened (once)
    expected, resumed = _losses(plain), _losses(fault)
    assert sorted(expected) == sorted(resumed) == [1, 2, 3, 4, 5]
    for step in expected:
        assert math.isclose(resumed[step], expected[step], rel_tol=1e-4, abs_tol=1e-6), (step, expected, resumed)
    assert expected[5] < expected[1]  # it trains
    redone = _losses(fault, "metrics.redone.jsonl") if (fault / "metrics.redone.jsonl").exists() else {}
    assert set(redone) <= {3}  # rank 0 may have logged step 3 before rank 1 crashed; nothing after it

    # sharded checkpoints: DCP metadata plus one .distcp shard file per rank
    checkpoints = sorted({p.parent for p in (fault / "checkpoints").rglob(".metadata")})
    assert checkpoints and all(len(list(c.glob("*.distcp"))) == 2 for c in checkpoints), checkpoints
    assert final == fault / "final" and not list(final.glob("*.distcp")) and not (final / ".metadata").exists()
    if lora is None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(final)
        assert (final / "model.safetensors").exists() and model.config.vocab_size > 0
    else:
        from peft import PeftConfig

        assert (final / "adapter_model.safetensors").exists() and not (final / "model.safetensors").exists()
        assert PeftConfig.from_pretrained(str(final)).r == 4
