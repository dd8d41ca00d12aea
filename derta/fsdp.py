"""FSDP2 (`torch.distributed.fsdp.fully_shard`) model setup for the training loop.

The model is built on the meta device from its config (no weights anywhere yet), LoRA adapters are added, every
decoder layer and then the root are sharded, and only then is storage allocated: each rank holds 1/world of the
weights. Rank 0 alone reads the checkpoint (in the training dtype, onto CPU) and `set_model_state_dict(...,
broadcast_from_rank0=True)` sends every rank its shard. No rank ever materialises an fp32 copy of the model on
its accelerator.

Dtypes (decided here, documented in README "Scale"):
- full fine-tuning: fp32 sharded master weights; on GPU a MixedPrecisionPolicy runs forward/backward with bf16
  params and all-gathers, reduce-scatters gradients in fp32 (bf16 AdamW updates of ~lr would round away);
- LoRA: the frozen base is kept in the load dtype (bf16 on GPU), the adapters are fp32 (FSDP2 only needs the
  *trainable* parameters of a shard group to share a dtype); on GPU the same bf16 MixedPrecisionPolicy applies;
- CPU (CI, gloo): fp32 everywhere and no MixedPrecisionPolicy: CPU bf16 matmuls are slow and emulated in places,
  and the point of the CPU path is to exercise sharding, state dicts and checkpoints, not precision.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks (one FSDP2 unit each): the children of the first `ModuleList` named
    `layers`/`h`/`blocks` found in the model."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and name.rsplit(".", 1)[-1] in ("layers", "h", "blocks"):
            return list(module)
    raise ValueError(f"{type(model).__name__}: no decoder layer list (layers/h/blocks) to shard")


def build_meta_model(model_path: str, cfg, lora_resume_dir: str | None = None) -> nn.Module:
    """The architecture from config.json on the meta device (params only: buffers such as rotary inv_freq stay real
    on CPU), with LoRA adapters attached when configured."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, trust_remote_code=cfg.model.trust_remote_code)
    kwargs = {"trust_remote_code": cfg.model.trust_remote_code}
    if cfg.model.attn_implementation:
        kwargs["attn_implementation"] = cfg.model.attn_implementation
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, **kwargs)
    # outside the context: init_empty_weights re-creates every registered parameter, which would untie them again
    model.tie_weights()
    with init_empty_weights(include_buffers=False):
        if cfg.train.lora is not None:
            model = add_lora(model, cfg, lora_resume_dir)
    return model


def add_lora(model: nn.Module, cfg, resume_dir: str | None = None) -> nn.Module:
    from peft import LoraConfig, PeftModel, get_peft_model

    if resume_dir:
        return PeftModel.from_pretrained(model, resume_dir, is_trainable=True)
    lora = cfg.train.lora
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=lora.target_modules, task_type="CAUSAL_LM"))


def load_dtype(cfg, device: torch.device) -> torch.dtype:
    """The dtype the weights are read and kept in. Full fine-tuning keeps fp32 masters; a LoRA base is frozen, so
    it stays in the configured dtype (bf16 on GPU by default)."""
    from derta.modeling import torch_dtype

    if cfg.train.lora is None or device.type == "cpu":
        return torch.float32
    return torch_dtype(cfg.model.dtype, device.type)


def mixed_precision(device: torch.device):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if device.type == "cpu":
        return None
    return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)


def shard(model: nn.Module, device: torch.device) -> nn.Module:
    """fully_shard each decoder layer, then the root (embeddings, final norm, lm_head, tied weights)."""
    from torch.distributed.fsdp import fully_shard

    kwargs = {}
    policy = mixed_precision(device)
    if policy is not None:
        kwargs["mp_policy"] = policy
    layers = decoder_layers(model)
    for index, layer in enumerate(layers):
        # the last layer's parameters are needed again right away by the backward: keep them gathered
        fully_shard(layer, reshard_after_forward=index < len(layers) - 1, **kwargs)
    fully_shard(model, **kwargs)
    return model


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate the (sharded) storage of meta parameters on `device`; real buffers are kept as they are."""
    buffers = {name: buf.detach().clone() for name, buf in model.named_buffers() if not buf.is_meta}
    model.to_empty(device=device)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name in buffers:
                buf.copy_(buffers[name].to(buf.device))


def full_state_on_rank0(model_path: str, cfg, dtype: torch.dtype, lora_resume_dir: str | None,
                        sharded: nn.Module) -> dict:
    """Rank 0: the complete state dict in `dtype` on CPU, keyed like `sharded` (LoRA: base + fresh or resumed
    adapters, initialised exactly as PEFT does). Other ranks: {}."""
    if dist.get_rank() != 0:
        return {}
    from derta.modeling import load_model

    base = load_model(model_path, cfg.model.model_copy(update={"dtype": str(dtype).removeprefix("torch.")}), "cpu")
    model = add_lora(base, cfg, lora_resume_dir) if cfg.train.lora is not None else base
    state = model.state_dict()
    wanted = set(sharded.state_dict())  # includes tied aliases such as lm_head.weight
    return {name: tensor for name, tensor in state.items() if name in wanted}


def build_fsdp_model(model_path: str, cfg, device: torch.device, lora_resume_dir: str | None = None) -> nn.Module:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    model = build_meta_model(model_path, cfg, lora_resume_dir)
    dtype = load_dtype(cfg, device)
    if cfg.train.lora is not None and dtype != torch.float32:
        for name, param in model.named_parameters():
            if not param.requires_grad:  # frozen base in the load dtype; adapters stay fp32
                param.data = param.data.to(dtype)
    if cfg.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.train.lora is not None:
            model.enable_input_require_grads()
    model.config.use_cache = False
    shard(model, device)
    materialize(model, device)
    full = full_state_on_rank0(model_path, cfg, dtype, lora_resume_dir, model)
    set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    return model


def clip_global_norm(params: list[torch.Tensor], max_norm: float) -> float:
    """Clip by the norm over ALL ranks' shards. Under FSDP2 gradients are DTensors: their norm is a partial
    (per-shard) DTensor, and `full_tensor()` all-reduces it to the global value before the clip coefficient is
    computed (the bug to avoid: each rank clipping by its own local norm)."""
    from torch.distributed.tensor import DTensor

    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, norm_type=2.0)
    if isinstance(total, DTensor):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return float(total)
