"""`derta train --dry-run`: a per-GPU memory plan for a config, before anything is launched.

The model is built on the meta device from its config.json alone (no weights are read or needed), LoRA adapters
are attached exactly as training attaches them, and parameters are counted from the real modules. Memory is then
estimated per GPU (per worker on CPU) for the chosen strategy, following what derta's training loop allocates:

- weights: full fine-tuning keeps fp32 master weights (FSDP2: sharded 1/W; DDP: whole); a LoRA base is frozen
  in the load dtype (bf16 on GPU), its adapters fp32;
- gathered: FSDP2 all-gathers a decoder layer (plus the next one, prefetched) in the compute dtype, and the root
  (embeddings, final norm, lm_head) stays gathered from forward to backward;
- grads: fp32 for the trainable parameters. With grad_accum > 1 the micro-steps skip the reduce-scatter, so FSDP2
  holds unsharded fp32 gradients of every trainable parameter until the optimizer step;
- optimizer: AdamW's two fp32 moments per trainable parameter (sharded 1/W under FSDP2);
- activations: per decoder layer, the tensors autograd saves for one micro-batch (batch_size x max_length); with
  gradient checkpointing only each layer's input plus one layer's full set;
- loss: the model returns hidden states, not logits; the DeRTa CE projects supervised positions only, in chunks of
  `derta.losses.CE_CHUNK_ROWS` rows recomputed in the backward (derta.losses), so one chunk's logits in fp32;
- overhead: CUDA context + allocator fragmentation (1.5 GiB + 10%).
It is an estimate for planning (the numbers are upper-side); measured peaks are in docs/cluster.md when a GPU run
has checked them.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from derta.losses import CE_CHUNK_ROWS

GIB = 1024 ** 3


class PlanDoesNotFit(RuntimeError):
    """The config needs more memory per GPU than the declared GPUs have."""


def count_params(model_path: str, cfg) -> dict:
    """Parameter counts and the shapes the estimate needs, from config.json on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from derta.fsdp import add_lora, decoder_layers

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
        if cfg.train.lora is not None:
            model = add_lora(model, cfg)
    unique = {id(p): p for p in model.parameters()}.values()
    layers = decoder_layers(model)
    layer_params = max(sum(p.numel() for p in layer.parameters()) for layer in layers)
    text = getattr(config, "text_config", config)
    return {
        "params": sum(p.numel() for p in unique),
        "trainable_params": sum(p.numel() for p in unique if p.requires_grad),
        "layer_params": layer_params,
        "root_params": sum(p.numel() for p in unique) - sum(p.numel() for layer in layers for p in layer.parameters()),
        "num_layers": len(layers),
        "hidden_size": text.hidden_size,
        "intermediate_size": getattr(text, "intermediate_size", 4 * text.hidden_size),
        "vocab_size": text.vocab_size,
    }


def estimate(counts: dict, cfg) -> dict:
    """Per-GPU bytes by component for the training config (see the module docstring for the model)."""
    train = cfg.train
    world = train.num_workers
    fsdp = train.strategy == "fsdp"
    gpu = train.use_gpu
    shard = world if fsdp else 1
    compute_bytes = 2 if gpu else 4   # bf16 compute on GPU, fp32 on CPU
    base_bytes = 2 if (gpu and train.lora is not None) else 4
    params, trainable = counts["params"], counts["trainable_params"]
    frozen = params - trainable
    weights = (base_bytes * frozen + 4 * trainable) / shard
    gathered = compute_bytes * (2 * counts["layer_params"] + counts["root_params"]) if fsdp else 0
    unsharded_grads = fsdp and train.grad_accum > 1
    grads = 4 * trainable / (1 if unsharded_grads else shard)
    optimizer = 8 * trainable / shard
    batch, seq, hidden = train.batch_size, cfg.data.max_length, counts["hidden_size"]
    per_layer = compute_bytes * batch * seq * (10 * hidden + 4 * counts["intermediate_size"])
    if train.gradient_checkpointing:
        activations = counts["num_layers"] * compute_bytes * batch * seq * hidden + per_layer
    else:
        activations = counts["num_layers"] * per_layer
    # no [B, T, V] logits: lm_head projects chunks of supervised rows; per chunk its logits in the compute dtype,
    # their fp32 upcast, log-softmax and gradient
    rows = min(CE_CHUNK_ROWS, batch * (seq - 1))
    loss = rows * counts["vocab_size"] * (compute_bytes + 3 * 4)
    parts = {"weights": weights, "gathered_params": gathered, "grads": grads, "optimizer": optimizer,
             "activations": activations, "loss": loss}
    subtotal = sum(parts.values())
    parts["overhead"] = (1.5 * GIB + 0.1 * subtotal) if gpu else 0.1 * subtotal
    return {name: int(value) for name, value in parts.items()}


def device_budget(cfg) -> tuple[int, str]:
    """(bytes available per worker, what they are): the declared GPU memory, or this host's RAM / workers."""
    train = cfg.train
    if train.use_gpu:
        return int(train.gpu_memory_gb * GIB), f"{train.gpu_memory_gb:g} GiB per GPU (train.gpu_memory_gb)"
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return total // train.num_workers, f"host RAM / {train.num_workers} workers"


def make_plan(cfg, model_path: str) -> dict:
    counts = count_params(model_path, cfg)
    breakdown = estimate(counts, cfg)
    budget, budget_source = device_budget(cfg)
    per_gpu = sum(breakdown.values())
    return {
        "model": model_path, "strategy": cfg.train.strategy, "lora": cfg.train.lora is not None,
        "num_workers": cfg.train.num_workers, "use_gpu": cfg.train.use_gpu,
        "batch_size": cfg.train.batch_size, "max_length": cfg.data.max_length,
        "grad_accum": cfg.train.grad_accum, "gradient_checkpointing": cfg.train.gradient_checkpointing,
        "params": counts["params"], "trainable_params": counts["trainable_params"],
        "per_gpu_bytes": per_gpu, "per_gpu_gib": round(per_gpu / GIB, 2),
        "breakdown_bytes": breakdown,
        "budget_bytes": budget, "budget": budget_source, "fits": per_gpu <= budget,
    }


def describe(plan: dict) -> str:
    parts = ", ".join(f"{name} {value / GIB:.1f}" for name, value in plan["breakdown_bytes"].items())
    return (f"{plan['params'] / 1e9:.2f}B params ({plan['trainable_params'] / 1e6:.1f}M trainable), "
            f"{plan['strategy']} on {plan['num_workers']} workers: {plan['per_gpu_gib']:.1f} GiB per "
            f"{'GPU' if plan['use_gpu'] else 'worker'} (GiB: {parts}) vs {plan['budget_bytes'] / GIB:.1f} GiB "
            f"({plan['budget']})")


def write_plan(cfg, model_path: str, output: Path) -> dict:
    """Write OUTPUT/plan.json; raise PlanDoesNotFit (after writing it) when the plan exceeds the budget."""
    plan = make_plan(cfg, model_path)
    output.mkdir(parents=True, exist_ok=True)
    (output / "plan.json").write_text(json.dumps(plan, indent=2))
    if not plan["fits"]:
        raise PlanDoesNotFit(
            f"does not fit: {describe(plan)}. Use train.strategy=fsdp, more workers, train.lora, "
            "train.gradient_checkpointing=true or a smaller train.batch_size / data.max_length")
    return plan
