"""The per-worker DeRTa training loop (runs inside Ray Train workers).

One forward pass per micro-batch; `losses.derta_loss` splits it into the MLE and RTO terms. Checkpoints are HF
`save_pretrained` directories (model or PEFT adapter + tokenizer + run config) plus `trainer_state.pt`
(optimizer, scheduler, step, data position), reported through `ray.train.report`.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from derta.batching import collate
from derta.config import DertaConfig, dump_config
from derta.losses import derta_loss, hidden_only_kwargs
from derta.train_data import epoch_batches, rank_pieces

STATE_FILE = "trainer_state.pt"
FAULT_MARKER = ".fault_injected"


class InjectedFault(RuntimeError):
    pass


def plan_steps(num_rows: int, world_size: int, batch_size: int, grad_accum: int, epochs: float,
               max_steps: int | None) -> tuple[int, int]:
    """(micro-batches per epoch per worker, total optimizer steps)."""
    batches_per_epoch = (num_rows // world_size) // batch_size
    if batches_per_epoch == 0:
        raise ValueError(f"{num_rows} rows cannot fill one batch of {batch_size} on each of {world_size} workers")
    total = max_steps or max(1, math.floor(epochs * batches_per_epoch / grad_accum))
    return batches_per_epoch, total


def build_model(model_path: str, cfg: DertaConfig, device: torch.device, resume_dir: str | None):
    from derta.modeling import load_model

    train = cfg.train
    if train.lora is None:
        # full fine-tuning keeps fp32 master weights (bf16 AdamW updates of ~lr*1e-1 would round away);
        # bf16 comes from autocast on GPU
        fp32 = cfg.model.model_copy(update={"dtype": "float32"})
        model = load_model(resume_dir or model_path, fp32, str(device))
    else:
        from peft import LoraConfig, PeftModel, get_peft_model

        base = load_model(model_path, cfg.model, str(device))
        if resume_dir:
            model = PeftModel.from_pretrained(base, resume_dir, is_trainable=True)
        else:
            lora = train.lora
            model = get_peft_model(base, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                                    target_modules=lora.target_modules, task_type="CAUSAL_LM"))
    if device.type == "cpu":
        model = model.float()  # fp32 on CPU; bf16 autocast is used on GPU
    if train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if train.lora is not None:
            model.enable_input_require_grads()
    model.config.use_cache = False
    return model


def unwrap(model):
    return getattr(model, "module", model)


def save_checkpoint(directory: Path, model, tokenizer, cfg: DertaConfig, state: dict) -> None:
    unwrap(model).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    (directory / "derta_config.yaml").write_text(dump_config(cfg))
    torch.save(state, directory / STATE_FILE)


def lr_lambda(kind: str, warmup: int, total: int):
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
        if kind == "linear":
            return max(0.0, 1 - progress)
        return 1.0
    return factor


def _all_reduce(values: list[float]) -> list[float]:
    import torch.distributed as dist

    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        if dist.get_backend() == "nccl":
            tensor = tensor.cuda()
        dist.all_reduce(tensor)
    return tensor.cpu().tolist()


def maybe_inject_fault(cfg: DertaConfig, step: int, rank: int, world: int, output_dir: str) -> None:
    fault_step = cfg.train.fault_at_step or int(os.environ.get("DERTA_FAULT_AT_STEP", "0") or 0)
    if not fault_step or step != fault_step or rank != min(1, world - 1):
        return
    marker = Path(output_dir) / FAULT_MARKER
    if marker.exists():
        return  # crash once per run directory
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(step))
    raise InjectedFault(f"fault injected at step {step} on rank {rank} (train.fault_at_step / DERTA_FAULT_AT_STEP)")


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch
    from ray.train import Checkpoint

    from derta.modeling import load_tokenizer

    cfg = DertaConfig.model_validate(loop_config["config"])
    train = cfg.train
    _quiet_report_log()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if train.torch_threads:
        torch.set_num_threads(train.torch_threads)
    torch.manual_seed(train.seed + rank)
    device = ray.train.torch.get_device()
    output_dir = loop_config["output_dir"]

    fsdp = train.strategy == "fsdp"
    batches_per_epoch, total_steps = loop_config["batches_per_epoch"], loop_config["total_steps"]
    tokenizer = load_tokenizer(loop_config["model_path"])
    checkpoint = ray.train.get_checkpoint()
    # as_directory: a checkpoint on local/shared storage is read in place (each rank reads only its shards)
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as resume_dir:
        model, params, optimizer, scheduler, state = _setup(loop_config, cfg, device, resume_dir, total_steps)
    lm_head = unwrap(model).get_output_embeddings()
    step, epoch, batch_in_epoch = 0, 0, 0
    if state:
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        if rank == 0:
            _truncate_metrics(output_dir, step)
            _say(f"[derta] resumed at step {step} (epoch {epoch}, batch {batch_in_epoch})")

    use_autocast = device.type == "cuda"
    pad_multiple = 8 if device.type == "cuda" else 1  # tensor-core friendly shapes only matter on GPU
    pieces = rank_pieces(loop_config["examples_dir"], rank, world)  # this rank's rows, the same in every run
    window = {"mle": 0.0, "n_mle": 0, "rto": 0.0, "n_rto": 0, "tokens": 0, "padded": 0, "t0": time.perf_counter()}
    model.train()
    micro = 0
    while step < total_steps:
        batches = epoch_batches(pieces, train.batch_size, train.group_buffer_batches, train.seed, epoch)
        for index, batch_rows in enumerate(batches):
            if index >= batches_per_epoch or step >= total_steps:
                break
            if index < batch_in_epoch:
                continue  # data position of a resumed run: skip what was already trained
            if micro % train.grad_accum == 0:
                # per optimizer step, so dropout masks are the same after a resume as in an uninterrupted run
                torch.manual_seed(train.seed + 1_000_003 * step + rank)
            batch = {k: v.to(device) for k, v in collate(batch_rows, tokenizer.pad_token_id, pad_multiple).items()}
            sync = (micro + 1) % train.grad_accum == 0  # gradients are reduced on the last micro-batch only
            with _gradient_sync(model, sync, fsdp):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_autocast):
                    # final hidden states, no logits: the loss projects only supervised positions to the vocab
                    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                **hidden_only_kwargs(device))
                    terms = derta_loss(out.hidden_states[-1], batch["labels"], batch["rto_mask"], train.mle_weight,
                                       train.rto_weight, train.loss_weighting, train.rto_keep_fraction,
                                       lm_head=lm_head)
                (terms.total / train.grad_accum).backward()
            window["mle"] += float(terms.mle) * terms.n_mle
            window["rto"] += float(terms.rto) * terms.n_rto
            window["n_mle"] += terms.n_mle
            window["n_rto"] += terms.n_rto
            window["tokens"] += int(batch["attention_mask"].sum())
            window["padded"] += batch["attention_mask"].numel()
            micro += 1
            if micro % train.grad_accum:
                continue
            if train.max_grad_norm:
                clip_global_norm(params, train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            batch_in_epoch = index + 1
            maybe_inject_fault(cfg, step, rank, world, output_dir)
            is_last = step >= total_steps
            metrics = {"step": step, "epoch": epoch}
            if step % train.log_every == 0 or is_last:
                metrics.update(_window_metrics(window, scheduler, step, total_steps, epoch))
                window.update(mle=0.0, n_mle=0, rto=0.0, n_rto=0, tokens=0, padded=0, t0=time.perf_counter())
                if rank == 0:
                    _log(output_dir, metrics)
            if step % train.checkpoint_every == 0 or is_last:
                next_position = (epoch, batch_in_epoch) if batch_in_epoch < batches_per_epoch else (epoch + 1, 0)
                state = {"scheduler": scheduler.state_dict(), "step": step,
                         "epoch": next_position[0], "batch_in_epoch": next_position[1]}
                if fsdp:
                    _report_sharded(metrics, model, optimizer, tokenizer, cfg, state, loop_config, is_last)
                else:
                    state["optimizer"] = optimizer.state_dict()
                    _report(metrics, model, tokenizer, cfg, state, rank)
            elif "loss" in metrics:
                ray.train.report(metrics)
        if step >= total_steps:
            break
        epoch, batch_in_epoch = epoch + 1, 0


def _setup(loop_config: dict, cfg: DertaConfig, device, resume_dir: str | None, total_steps: int):
    """(model, trainable params, optimizer, scheduler, resumed trainer state or None)."""
    import ray.train.torch

    train = cfg.train
    if train.strategy == "fsdp":
        from derta.fsdp import build_fsdp_model

        model = build_fsdp_model(loop_config["model_path"], cfg, device)
    else:
        model = build_model(loop_config["model_path"], cfg, device, resume_dir)
        model = ray.train.torch.prepare_model(model, parallel_strategy="ddp")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)
    warmup = int(train.warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train.scheduler, warmup, total_steps))
    state = None
    if resume_dir and train.strategy == "fsdp":
        from derta.checkpoint import load_sharded

        state = load_sharded(resume_dir, model, optimizer, cfg)
    elif resume_dir:
        state = torch.load(Path(resume_dir) / STATE_FILE, weights_only=False)
        optimizer.load_state_dict(state["optimizer"])
    if state:
        scheduler.load_state_dict(state["scheduler"])
    return model, params, optimizer, scheduler, state


def _quiet_report_log() -> None:
    """Ray Train V2 logs every `report` at INFO under a logger named by its file path, which LoggingConfig does
    not reach; it would print a line per logged step on the driver's console."""
    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


def _window_metrics(window: dict, scheduler, step: int, total_steps: int, epoch: int) -> dict:
    mle, n_mle, rto, n_rto, tokens, padded = _all_reduce(
        [window["mle"], window["n_mle"], window["rto"], window["n_rto"], window["tokens"], window["padded"]])
    elapsed = max(time.perf_counter() - window["t0"], 1e-9)
    return {
        "step": step, "total_steps": total_steps, "epoch": epoch,
        "loss": (mle + rto) / max(n_mle + n_rto, 1),
        "loss_mle": mle / n_mle if n_mle else None, "loss_rto": rto / n_rto if n_rto else None,
        "supervised_tokens": int(n_mle + n_rto), "tokens": int(tokens),
        "tokens_per_s": tokens / elapsed, "lr": scheduler.get_last_lr()[0],
        "padding_fraction": 1 - tokens / max(padded, 1),
    }


def _truncate_metrics(output_dir: str, step: int) -> None:
    """Drop log lines of steps after the checkpoint we resume from (they are about to be redone); the dropped
    lines go to metrics.redone.jsonl, so a resumed step can be compared with its first run."""
    path = Path(output_dir) / "metrics.jsonl"
    if path.exists():
        lines = [line for line in path.read_text().splitlines() if line]
        dropped = [line for line in lines if json.loads(line)["step"] > step]
        if dropped:
            with (Path(output_dir) / "metrics.redone.jsonl").open("a") as f:
                f.write("".join(line + "\n" for line in dropped))
        path.write_text("".join(line + "\n" for line in lines if json.loads(line)["step"] <= step))


def _log(output_dir: str, metrics: dict) -> None:
    path = Path(output_dir) / "metrics.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(metrics) + "\n")
    terms = ", ".join(f"{name} {metrics['loss_' + name]:.4f}" for name in ("mle", "rto")
                      if metrics["loss_" + name] is not None)
    _say(f"[derta] step {metrics['step']}/{metrics['total_steps']} loss {metrics['loss']:.4f} ({terms}) "
         f"lr {metrics['lr']:.2e} {metrics['tokens_per_s']:.0f} tok/s pad {metrics['padding_fraction']:.1%}")


def _say(line: str) -> None:
    # sys.stdout directly: Ray Train patches print() into a logger that echoes each line twice on the console
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def _report(metrics: dict, model, tokenizer, cfg: DertaConfig, state: dict, rank: int) -> None:
    import ray.train
    from ray.train import Checkpoint

    if rank != 0:
        ray.train.report(metrics)
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp), model, tokenizer, cfg, state)
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def _report_sharded(metrics: dict, model, optimizer, tokenizer, cfg: DertaConfig, state: dict, loop_config: dict,
                    is_last: bool) -> None:
    """Every rank writes its DCP shard into a local directory and reports it; Ray Train merges the ranks' files
    into one checkpoint directory. The last checkpoint also carries the HF export (rank 0), which the driver copies
    to OUTPUT/final."""
    import ray.train
    from ray.train import Checkpoint

    from derta.checkpoint import export_final, save_sharded

    with tempfile.TemporaryDirectory() as tmp:
        save_sharded(Path(tmp), model, optimizer, cfg, state)
        if is_last:
            export_final(Path(tmp), model, tokenizer, cfg, loop_config["model_path"])
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(tmp))


def _gradient_sync(model, sync: bool, fsdp: bool):
    """No gradient all-reduce / reduce-scatter on accumulation micro-steps: FSDP2 keeps the unsharded gradients
    (set_requires_gradient_sync), DDP accumulates locally (no_sync)."""
    if fsdp:
        model.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if not sync and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def clip_global_norm(params: list[torch.Tensor], max_norm: float) -> float:
    from derta.fsdp import clip_global_norm as clip

    return clip(params, max_norm)
