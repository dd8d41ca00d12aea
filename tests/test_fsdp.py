"""FSDP2 on CPU (gloo, 2 processes): the meta-built, rank-0-broadcast sharded model equals the unsharded model, and
clipping uses the global gradient norm. (The Ray Train end-to-end resume test is on branch `scale`, not landed.)"""
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
