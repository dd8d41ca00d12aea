"""Sharded checkpoints (torch.distributed.checkpoint) and the final HF export, for the FSDP2 strategy.

A checkpoint directory holds one `__<rank>_0.distcp` file per rank (its shards of the model and of the AdamW state)
plus DCP's `.metadata` (rank 0) and `trainer_state.json` (scheduler, step, data position; rank 0). Every rank
writes only its own shard into a local directory and reports it to Ray Train, which merges the ranks' files into
one checkpoint directory in the run's storage. On resume every rank reads just the pieces of its shard.

Under LoRA only the trainable adapter weights (and their optimizer state) are checkpointed: the frozen base is
re-read from the model path, so a 70B LoRA checkpoint is megabytes, not 140 GB.

The final model is exported once, by rank 0, from a full state dict gathered to CPU: an HF `save_pretrained`
directory in the export dtype (safetensors), or a PEFT adapter for LoRA (merged into the base on request).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

TRAINER_STATE = "trainer_state.json"
# files of a sharded checkpoint that do not belong in the final HF export
SHARD_PATTERNS = ("*.distcp", ".metadata", TRAINER_STATE)


def _options(cfg, **kwargs):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(ignore_frozen_params=cfg.train.lora is not None, **kwargs)


def save_sharded(directory: Path, model, optimizer, cfg, trainer_state: dict) -> None:
    """Collective: every rank writes its shard of model + optimizer into `directory` (rank-local)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_options(cfg))
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=str(directory))
    if dist.get_rank() == 0:
        (directory / TRAINER_STATE).write_text(json.dumps(trainer_state))


def load_sharded(directory: str | Path, model, optimizer, cfg) -> dict:
    """Collective: read this rank's shards into `model` and `optimizer`; returns the trainer state."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model_state, optim_state = get_state_dict(model, optimizer, options=_options(cfg))
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=str(directory))
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=_options(cfg, strict=cfg.train.lora is None))
    return json.loads((Path(directory) / TRAINER_STATE).read_text())


def is_sharded(directory: str | Path) -> bool:
    return (Path(directory) / ".metadata").exists()


def export_dtype(cfg, model_path: str) -> torch.dtype:
    """The dtype of the exported model: `model.dtype` when set, else the source checkpoint's (config.json
    `dtype`/`torch_dtype`), else fp32. The 8B/70B presets set bfloat16 -> bf16 safetensors."""
    if cfg.model.dtype != "auto":
        return getattr(torch, cfg.model.dtype)
    config_file = Path(model_path) / "config.json"
    if config_file.exists():
        config = json.loads(config_file.read_text())
        name = config.get("dtype") or config.get("torch_dtype")
        if isinstance(name, str) and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
    return torch.float32


def export_final(directory: Path, model, tokenizer, cfg, model_path: str) -> None:
    """Collective (the gather); rank 0 writes `directory`: HF model or PEFT adapter, tokenizer, run config."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    from derta.config import dump_config

    full = get_model_state_dict(model, options=_options(cfg, full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return
    directory.mkdir(parents=True, exist_ok=True)
    if cfg.train.lora is None:
        dtype = export_dtype(cfg, model_path)
        full = {name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in full.items()}
        model.save_pretrained(directory, safe_serialization=True, state_dict=full)
    elif cfg.train.merge_lora:
        _export_merged(directory, full, cfg, model_path)
    else:
        model.save_pretrained(directory, safe_serialization=True, state_dict=full)
    tokenizer.save_pretrained(directory)
    (directory / "derta_config.yaml").write_text(dump_config(cfg))  # generation_config.json: derta.trainer


def _export_merged(directory: Path, adapter_state: dict, cfg, model_path: str) -> None:
    """LoRA merged into the base (rank 0, on CPU, in the export dtype): a plain HF checkpoint."""
    from derta.fsdp import add_lora
    from derta.modeling import load_model

    dtype = export_dtype(cfg, model_path)
    base = load_model(model_path, cfg.model.model_copy(update={"dtype": str(dtype).removeprefix("torch.")}), "cpu")
    peft_model = add_lora(base, cfg)
    missing = peft_model.load_state_dict(adapter_state, strict=False)
    if missing.unexpected_keys:
        raise RuntimeError(f"adapter keys not in the model: {missing.unexpected_keys[:5]}")
    peft_model.merge_and_unload().save_pretrained(directory, safe_serialization=True)
