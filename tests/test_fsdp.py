"""FSDP2 on CPU (gloo): sharded meta-init model == unsharded model, global-norm clipping; through Ray Train, full and
LoRA runs killed mid-run resume from the sharded (DCP) checkpoint onto the uninterrupted run's loss curve."""
import json
import math
import socket
from pathlib import Path

import pytest
import torch

from derta.config import LoraConfig

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


def _cfg(tiny_config, **train):
    small = tiny_config.data.synthetic.model_copy(update={"n_helpful": 240, "n_harmful": 80, "n_lookalike": 20})
    data = tiny_config.data.model_copy(update={"synthetic": small, "max_length": 128})
    base = dict(strategy="fsdp", num_workers=2, batch_size=8, max_steps=6, checkpoint_every=3, log_every=1,
                torch_threads=1, max_failures=2, lr=3e-3, warmup_ratio=0.0)
    return tiny_config.model_copy(update={"data": data, "train": tiny_config.train.model_copy(
        update={**base, **train})})


def _losses(run: Path, name: str = "metrics.jsonl") -> list[tuple[int, float]]:
    return [(m["step"], m["loss"]) for m in map(json.loads, (run / name).read_text().splitlines())]


@pytest.mark.usefixtures("ray_session")
@pytest.mark.parametrize("lora", [None, LoraConfig(r=4, alpha=8)], ids=["full", "lora"])
def test_fsdp_run_killed_mid_run_resumes_from_sharded_checkpoint_on_the_same_curve(tiny_config, tmp_path, lora):
    """Rank 1 crashes after step 5 (rank 0 has logged step 4); the run restarts from the step-3 sharded checkpoint
    and redoes steps 4-6: the redone step 4 must reproduce the loss of its first run."""
    from derta.trainer import run_training

    run = tmp_path / "fault"
    final = run_training(_cfg(tiny_config, lora=lora, fault_at_step=5), run)
    assert (run / ".fault_injected").read_text() == "5"

    resumed = _losses(run)
    assert [s for s, _ in resumed] == [1, 2, 3, 4, 5, 6]
    first_runs = dict(_losses(run, "metrics.redone.jsonl"))
    assert set(first_runs) == {4}, first_runs  # logged before the crash, redone after the resume from step 3
    assert math.isclose(first_runs[4], dict(resumed)[4], rel_tol=1e-4), (first_runs, resumed)
    assert resumed[-1][1] < resumed[0][1]

    # sharded checkpoints: one DCP file per rank, written by that rank, plus the metadata
    checkpoints = sorted({p.parent for p in (run / "checkpoints").rglob(".metadata")})
    assert checkpoints and all(len(list(c.glob("*.distcp"))) == 2 for c in checkpoints)
    assert not list(final.glob("*.distcp")) and not (final / "trainer_state.json").exists()
    if lora is None:
        from transformers import AutoModelForCausalLM

        assert AutoModelForCausalLM.from_pretrained(final).config.vocab_size > 0
    else:
        assert (final / "adapter_config.json").exists() and (final / "adapter_model.safetensors").exists()
        assert not (final / "model.safetensors").exists()
