"""Benchmark DeRTa training throughput on the tiny model (CPU): the loss, the length-grouped loop, Ray Train, TRL.

    python bench/bench_train.py [--threads 2] [--steps 35] [--warm-steps 5] [--ray-workers 2] [--repeats 1]
                                [--trl-grouped] [--trl-defaults] [--no-random-diag]
    python bench/bench_train.py --ray-only --ray-strategies ddp,fsdp     # FSDP2 vs DDP step cost, 2 CPU workers

Everything runs on the tiny Llama from `resolve_model_path(load_config('tiny').model, ...)` (random init, fp32,
sdpa), on the same DeRTa examples (helpful + harmful_prefix + rto rows of the synthetic corpus, derta mode), with the
same total number of torch threads (--threads; a Ray run with W workers gives each worker threads // W).

Part a, one training step (forward + loss + backward + AdamW step) on the SAME collated batches, alternating order:
  sft_step    F.cross_entropy(logits[:, :-1], labels[:, 1:], ignore_index=-100): the HF-style CE, same positions
  derta_step  derta.losses.derta_loss (MLE + RTO terms)                           target: <= 1.05x sft_step cost
  (also the loss alone, from fixed logits: CE forward+backward vs derta_loss forward+backward)
  The headline cost ratio is in process CPU time (all threads) over all steps of both kinds: on this shared box wall
  time of a single step swings 2x with other people's load, CPU time barely moves. Wall-clock ratios (median over
  back-to-back pairs on the same batch, and the sum of per-batch best times) are printed too.

Part b, trainer throughput in REAL (non-pad) tokens/s, steady state: the first --warm-steps steps are excluded; the
rest is cut into windows of --warm-steps steps (exactly the windows derta's Ray loop logs to metrics.jsonl with
log_every = --warm-steps), each timed end of step to end of step (data loading and collation included). The reported
tok/s is the MEDIAN window (robust to load bursts from other work on this shared machine); the mean is printed too,
and for the in-process trainers real tokens per CPU-second of this process (tok/CPU-s), which does not depend on how
much of the 2 cores the run happened to get: wall tok/s = tok/CPU-s x cores obtained, and the cores obtained swung
between ~0.4 and ~1.5 from run to run here. Ray workers are other processes, so derta_ray has wall numbers only.
  plain_loop  in-process: derta.batching.grouped_batches + collate + derta_loss + AdamW + clip + LambdaLR
  derta_ray   derta.trainer.run_training (Ray Data prep + Ray Train TorchTrainer, W workers); throughput from
              metrics.jsonl windows (log_every = --warm-steps, first window dropped); startup reported apart
  trl         trl.SFTTrainer, SFTConfig(completion_only_loss=True), prompt/completion text pairs decoded from the
              same examples (RTO rows: completion = the harmful text, since TRL cannot express RTO targets; the token
              count is kept), fp32, no gradient checkpointing, default random sampler, padded to the batch longest
  trl_grouped (with --trl-grouped) the same with train_sampling_strategy="group_by_length"
  trl_defaults (with --trl-defaults) the same with SFTConfig's own defaults: bf16=True (bf16 autocast on CPU) and
              gradient_checkpointing=True
  plain_loop_random  diagnostic: plain_loop on random batches (padding like TRL's): separates the padding effect
              from TRL's own per-token overhead
With --repeats N, plain_loop and trl alternate N times (ABAB) and their windows are pooled.
The machine is shared and noisy: OMP_WAIT_POLICY defaults to PASSIVE here (see below) and the load average is printed.
Runtime: ~3-4.5 minutes on the 2-core box (Ray startup + run_training's data prep and worker start are ~1-1.5 of them).
Padding waste = pad tokens / all tokens in the batches each trainer actually ran (TRL: its collator's output).
With --ray-strategies ddp,fsdp each Ray run is repeated with train.strategy=fsdp (FSDP2, gloo on CPU) and the
FSDP2/DDP step cost ratio (median windows) is printed; --ray-only skips everything else.
Ratios printed last: derta_ray/trl (target >= 2x), plain_loop/trl (~4x expected), derta_ray/plain_loop.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray starts its workers at niceness 15 (RAY_worker_niceness); a bench runs them at the priority of the process it
# compares them with, or any niced background work on the machine skews the ratio against Ray.
os.environ.setdefault("RAY_worker_niceness", "0")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# The bench machine is shared: with the default (spinning) OpenMP wait policy, 2 torch threads on 2 busy cores
# collapse (steps 10x slower and erratic). Passive waiting keeps them stable; it applies to every trainer alike
# (Ray workers inherit the driver's environment). Override with OMP_WAIT_POLICY=ACTIVE to see the difference.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from derta.batching import collate, grouped_batches  # noqa: E402
from derta.config import SourceConfig, load_config  # noqa: E402
from derta.losses import derta_loss  # noqa: E402
from derta.modeling import load_model, load_tokenizer, resolve_model_path  # noqa: E402
from derta.transforms import IGNORE_INDEX, KINDS  # noqa: E402
from derta.train_loop import lr_lambda  # noqa: E402

BENCH_START = time.perf_counter()


def load() -> str:
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


LOAD_START = load()


def log(message: str) -> None:
    print(f"[{time.perf_counter() - BENCH_START:6.1f}s] {message}", flush=True)


# --------------------------------------------------------------------------------------------- data
def build_examples(cfg, tokenizer_path: str) -> list[dict]:
    """DeRTa examples of the synthetic train splits, in process, through the same functions the Ray pipeline maps."""
    from derta.data import tokenize_batch
    from derta.data_read import _parse_jsonl, normalize_batch
    from derta.synthetic import generate_corpus

    corpus = generate_corpus(**cfg.data.synthetic.model_dump())
    sources = [SourceConfig(path=split).model_dump() for split in ("train_helpful", "train_safety")]
    rows: list[dict] = []
    for index, split in enumerate(("train_helpful", "train_safety")):
        raw = list(_parse_jsonl(split, "\n".join(json.dumps(r) for r in corpus[split]).encode()))
        batch = {k: [r[k] for r in raw] for k in ("source", "line", "raw", "error")}
        batch["source_index"] = [index] * len(raw)
        records = normalize_batch(batch, sources, cfg.data.max_chars).to_pydict()
        out = tokenize_batch(records, tokenizer_path, cfg.data.model_dump_json(), cfg.data.mode).to_pylist()
        rows += [r for r in out if r["kind"] in KINDS]
    random.Random(cfg.train.seed).shuffle(rows)
    return rows


def batch_stats(batch: dict) -> tuple[int, int]:
    """(real tokens, all tokens) of a collated batch."""
    return int(batch["attention_mask"].sum()), batch["attention_mask"].numel()


def clock() -> tuple[float, float]:
    """(wall, this process's CPU time over all its threads): CPU time hardly moves when other work shares the cores
    (OMP_WAIT_POLICY=PASSIVE: idle threads sleep instead of spinning), so it is the steadier cost measure."""
    return time.perf_counter(), time.process_time()


def step_windows(ends: list[tuple[float, float]], stats: list[tuple[int, int]], warm: int) -> list[tuple]:
    """(real tokens, all tokens, wall s, CPU s) per window of `warm` consecutive steps after the first `warm` steps,
    from each step's end clock and batch stats: the same windows derta's Ray loop logs (log_every = warm)."""
    windows = []
    for start in range(warm, len(ends) - warm + 1, warm):
        chunk = stats[start:start + warm]
        (w0, c0), (w1, c1) = ends[start - 1], ends[start + warm - 1]
        windows.append((sum(n for n, _ in chunk), sum(n for _, n in chunk), w1 - w0, c1 - c0))
    return windows


def summarize(windows: list[tuple]) -> dict:
    """Median window throughput (robust to bursts of load from other work on the machine), the plain mean, and
    tokens per CPU-second where the trainer runs in this process."""
    real, padded, seconds = (sum(w[i] for w in windows) for i in range(3))
    cpu = sum(w[3] for w in windows) if all(len(w) > 3 for w in windows) else None
    return {"tok_s": statistics.median(w[0] / w[2] for w in windows), "mean_tok_s": real / seconds,
            "pad": 1 - real / padded, "seconds": seconds, "windows": len(windows),
            "cpu_tok_s": real / cpu if cpu else None}


def fresh_model(model_path: str, cfg):
    torch.manual_seed(cfg.train.seed)
    model = load_model(model_path, cfg.model.model_copy(update={"dtype": "float32"}), "cpu").float()
    model.config.use_cache = False
    model.train()
    return model


# ------------------------------------------------------------------------------------- a: step cost
def sft_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


def bench_step(model_path: str, cfg, batches: list[dict], reps: int) -> dict:
    model = fresh_model(model_path, cfg)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    cpu = {"sft": 0.0, "derta": 0.0}

    def step(batch: dict, kind: str) -> float:
        started, cpu_started = clock()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        if kind == "derta":
            loss = derta_loss(logits, batch["labels"], batch["rto_mask"]).total
        else:
            loss = sft_loss(logits, batch["labels"])
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        cpu[kind] += time.process_time() - cpu_started
        return time.perf_counter() - started

    for batch in batches[:2]:  # warm-up: allocator, first-call dispatch
        step(batch, "sft"), step(batch, "derta")
    # per batch and kind, the fastest of `reps` runs (the machine is shared: contention only ever adds time)
    best = {"sft": [math.inf] * len(batches), "derta": [math.inf] * len(batches)}
    pair_ratios = []
    for rep in range(reps):
        for i, batch in enumerate(batches):
            order = ("sft", "derta") if (i + rep) % 2 == 0 else ("derta", "sft")
            measured = {kind: step(batch, kind) for kind in order}
            for kind in measured:
                best[kind][i] = min(best[kind][i], measured[kind])
            pair_ratios.append(measured["derta"] / measured["sft"])
    times = {kind: sum(values) for kind, values in best.items()}
    cpu_ratio = cpu["derta"] / cpu["sft"]  # includes the warm-up steps, which both kinds ran alike

    # the loss alone on fixed logits (forward + backward of the loss, no model): isolates derta_loss's overhead
    loss_times = {"sft": [], "derta": []}
    loss_pairs = []
    loss_cpu = {"sft": 0.0, "derta": 0.0}
    with torch.no_grad():
        fixed = [(model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits, b) for b in batches]
    for rep in range(reps * 3):
        for i, (logits, batch) in enumerate(fixed):
            order = ("sft", "derta") if (i + rep) % 2 == 0 else ("derta", "sft")
            pair = {}
            for kind in order:
                leaf = logits.detach().requires_grad_(True)
                started, cpu_started = clock()
                loss = (derta_loss(leaf, batch["labels"], batch["rto_mask"]).total if kind == "derta"
                        else sft_loss(leaf, batch["labels"]))
                loss.backward()
                pair[kind] = time.perf_counter() - started
                loss_cpu[kind] += time.process_time() - cpu_started
                loss_times[kind].append(pair[kind])
            loss_pairs.append(pair["derta"] / pair["sft"])
    real = sum(batch_stats(b)[0] for b in batches)
    return {"sft_tok_s": real / times["sft"], "derta_tok_s": real / times["derta"],
            "step_ratio": times["derta"] / times["sft"], "median_pair_ratio": statistics.median(pair_ratios),
            "cpu_ratio": cpu_ratio,
            "loss_sft_ms": 1e3 * statistics.median(loss_times["sft"]),
            "loss_derta_ms": 1e3 * statistics.median(loss_times["derta"]),
            "loss_pair_ratio": statistics.median(loss_pairs), "loss_cpu_ratio": loss_cpu["derta"] / loss_cpu["sft"],
            "step_sft_ms": 1e3 * times["sft"] / len(batches), "step_derta_ms": 1e3 * times["derta"] / len(batches)}


# ------------------------------------------------------------------------------ b: plain PyTorch loop
def run_plain_loop(model_path: str, cfg, rows: list[dict], steps: int, warm: int, grouped: bool = True) -> dict:
    train = cfg.train
    tokenizer = load_tokenizer(model_path)
    model = fresh_model(model_path, cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=train.lr, betas=train.betas, weight_decay=train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train.scheduler, 0, steps))
    ends: list[tuple[float, float]] = []
    stats: list[tuple[int, int]] = []
    if grouped:
        batches = grouped_batches(iter(rows), train.batch_size, train.group_buffer_batches, seed=train.seed)
    else:  # diagnostic: the same loop on random (shuffled-order) batches, padded to each batch's longest row
        batches = (rows[i:i + train.batch_size] for i in range(0, len(rows) - train.batch_size + 1, train.batch_size))
    for step, batch_rows in enumerate(batches, start=1):
        batch = collate(batch_rows, tokenizer.pad_token_id, 1)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        derta_loss(logits, batch["labels"], batch["rto_mask"], train.mle_weight, train.rto_weight).total.backward()
        if train.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, train.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        ends.append(clock())
        stats.append(batch_stats(batch))
        if step == steps:
            break
    else:
        raise SystemExit(f"plain loop: only {step} batches for --steps {steps}; use a larger corpus")
    return {"windows": step_windows(ends, stats, warm)}


# ------------------------------------------------------------------------------------------------ TRL
def trl_pairs(rows: list[dict], tokenizer) -> list[dict]:
    """prompt/completion text pairs holding the same tokens as each derta example."""
    pairs = []
    for row in rows:
        ids, labels = row["input_ids"], row["labels"]
        first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        completion = ids[first:]
        if row["kind"] == "rto":  # TRL appends EOS to a completion without one: drop a token to keep the count
            completion = completion[:-1] + [tokenizer.eos_token_id]
        pairs.append({"prompt": tokenizer.decode(ids[:first]), "completion": tokenizer.decode(completion)})
    return pairs


def run_trl(model_path: str, cfg, rows: list[dict], steps: int, warm: int, workdir: Path,
            sampling: str = "random", trl_defaults: bool = False) -> dict:
    import datasets
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    train = cfg.train
    tokenizer = load_tokenizer(model_path)
    setup_started = time.perf_counter()
    dataset = datasets.Dataset.from_list(trl_pairs(rows, tokenizer))
    args = SFTConfig(
        output_dir=str(workdir), per_device_train_batch_size=train.batch_size, max_steps=steps,
        learning_rate=train.lr, adam_beta1=train.betas[0], adam_beta2=train.betas[1], weight_decay=train.weight_decay,
        max_grad_norm=train.max_grad_norm, lr_scheduler_type=train.scheduler, warmup_steps=0,
        completion_only_loss=True, max_length=cfg.data.max_length, packing=False, padding_free=False,
        use_cpu=True, dataloader_num_workers=0,
        # fair by default: fp32 and no recomputation, like derta on CPU; --trl-defaults keeps SFTConfig's own defaults
        # (bf16=True -> bf16 autocast on CPU, gradient_checkpointing=True)
        **({} if trl_defaults else {"bf16": False, "fp16": False, "gradient_checkpointing": False}),
        train_sampling_strategy=sampling, logging_steps=10_000, save_strategy="no", report_to="none",
        disable_tqdm=True, seed=train.seed, data_seed=train.seed)
    trainer = SFTTrainer(model=fresh_model(model_path, cfg), args=args, train_dataset=dataset,
                         processing_class=tokenizer)
    setup_s = time.perf_counter() - setup_started
    trl_tokens = sum(len(ids) for ids in trainer.train_dataset["input_ids"])
    trl_supervised = sum(sum(label != IGNORE_INDEX for label in labels[1:])
                         for labels in trainer.train_dataset["labels"])

    collated: list[tuple[int, int]] = []
    collator = trainer.data_collator

    def recording_collator(examples):
        out = collator(examples)
        collated.append(batch_stats(out))
        return out

    trainer.data_collator = recording_collator
    ends: list[tuple[float, float]] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            ends.append(clock())

    trainer.add_callback(StepClock())
    trainer.train()
    # accelerate's loader may collate one batch ahead; the first `steps` collator calls are the batches trained on
    return {"windows": step_windows(ends[:steps], collated[:steps], warm), "setup_s": setup_s,
            "dataset_tokens": trl_tokens, "dataset_supervised": trl_supervised}


# -------------------------------------------------------------------------------------------- Ray Train
def run_ray(cfg, workers: int, threads: int, steps: int, warm: int, output: Path, strategy: str = "ddp") -> dict:
    from derta.trainer import run_training

    train = cfg.train.model_copy(update={
        "num_workers": workers, "torch_threads": max(1, threads // workers), "max_steps": steps, "log_every": warm,
        "checkpoint_every": 10 * steps, "max_failures": 0, "run_name": f"bench-w{workers}", "strategy": strategy})
    run_cfg = cfg.model_copy(update={"train": train})
    started = time.perf_counter()
    run_training(run_cfg, output)
    wall = time.perf_counter() - started
    windows = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    windows = [w for w in windows if "tokens_per_s" in w]
    # (real tokens, all tokens, seconds) per logged window, summed over workers (rank 0's clock)
    triples = [(w["tokens"], round(w["tokens"] / (1 - w["padding_fraction"])), w["tokens"] / w["tokens_per_s"])
               for w in windows]
    in_steps = sum(t[2] for t in triples)
    # the first window holds the warm-up steps (and the shard iterator's start), like the in-process trainers'
    return {"windows": triples[1:], "wall_s": wall, "startup_s": wall - in_steps, "first_window_s": triples[0][2],
            "workers": workers, "threads_per_worker": train.torch_threads}


def report_strategies(results: dict) -> None:
    """FSDP2 vs DDP: the same Ray run (workers, threads, batches) per strategy; step cost = 1 / median tok/s."""
    for name, r in results.items():
        print(f"{name:<22} {r['tok_s']:8.0f} tok/s (median window), {r['seconds'] / max(r['windows'], 1):.1f} s per "
              f"window, strategy {r['strategy']}, {r['workers']} workers x {r['threads_per_worker']} threads")
    for name in [n for n in results if results[n]["strategy"] == "fsdp"]:
        ddp = name.replace("_fsdp", "")
        if ddp in results:
            print(f"ratio {name}/{ddp} step cost = {results[ddp]['tok_s'] / results[name]['tok_s']:.2f}x "
                  "(FSDP2 vs DDP, same workers, median windows)")


def run_ray_section(cfg, args, tmp: Path, results: dict) -> float:
    """The derta_ray runs (each worker count x strategy) into `results`; returns the ray.init time."""
    ray_startup = 0.0
    ray_workers = [int(w) for w in args.ray_workers.split(",") if int(w) > 0]
    if ray_workers:
        import logging

        import ray

        from derta.runtime import quiet_data

        started = time.perf_counter()
        # init_ray(num_cpus=4) as in the test suite (2 train workers + a Ray Data stage fit), no worker log echo
        ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.ERROR, log_to_driver=False)
        quiet_data()
        ray_startup = time.perf_counter() - started
        log(f"ray startup (ray.init): {ray_startup:.1f}s (not timed)")
        for workers, strategy in [(w, s) for w in ray_workers for s in args.ray_strategies.split(",")]:
            name = f"derta_ray_w{workers}" + ("" if strategy == "ddp" else f"_{strategy}")
            run = run_ray(cfg, workers, args.threads, args.steps, args.warm_steps, tmp / name, strategy)
            run["strategy"] = strategy
            results[name] = run | summarize(run["windows"])
            log(f"b) {name}: {results[name]['tok_s']:.0f} tok/s (median window); run_training wall "
                f"{run['wall_s']:.1f}s of which startup/prep/teardown {run['startup_s']:.1f}s (not timed)")
        ray.shutdown()

    return ray_startup


# ------------------------------------------------------------------------------------------------ main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="total torch threads for every trainer")
    parser.add_argument("--steps", type=int, default=35, help="optimizer steps per trainer (warm-up included)")
    parser.add_argument("--warm-steps", type=int, default=5)
    parser.add_argument("--step-batches", type=int, default=6, help="part a: batches per repetition")
    parser.add_argument("--step-reps", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="plain_loop/trl runs each (ABAB order), windows pooled")
    parser.add_argument("--no-random-diag", action="store_true", help="skip plain_loop_random_batches")
    parser.add_argument("--ray-workers", default="2",
                        help="comma list, e.g. 1,2 (each is one run_training); 0 skips Ray")
    parser.add_argument("--ray-strategies", default="ddp",
                        help="comma list of train.strategy for the Ray runs, e.g. ddp,fsdp (FSDP2 vs DDP step cost)")
    parser.add_argument("--ray-only", action="store_true",
                        help="only the Ray runs (skip part a, plain_loop and TRL), e.g. for --ray-strategies ddp,fsdp")
    parser.add_argument("--trl-grouped", action="store_true", help="also run TRL with group_by_length")
    parser.add_argument("--trl-defaults", action="store_true",
                        help="also run TRL with SFTConfig's defaults (bf16 autocast, gradient checkpointing)")
    parser.add_argument("--helpful", type=int, default=600, help="synthetic corpus size (the test suite's)")
    parser.add_argument("--harmful", type=int, default=200)
    parser.add_argument("--lookalike", type=int, default=60)
    args = parser.parse_args()
    if args.steps % args.warm_steps:
        parser.error("--steps must be a multiple of --warm-steps (Ray logs one window per warm-steps steps)")

    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    base = load_config("tiny")
    model_path = resolve_model_path(base.model, base.data.synthetic, base.data.refusal_string)
    # a smaller corpus than the preset, and the built tiny dir as a local path (no tokenizer rebuild for it)
    synthetic = base.data.synthetic.model_copy(update={"n_helpful": args.helpful, "n_harmful": args.harmful,
                                                       "n_lookalike": args.lookalike})
    cfg = base.model_copy(update={"data": base.data.model_copy(update={"synthetic": synthetic}),
                                  "model": base.model.model_copy(update={"name_or_path": model_path})})
    torch.set_num_threads(args.threads)
    tmp = Path(tempfile.mkdtemp(prefix="derta-bench-train-"))
    results: dict[str, dict] = {}
    try:
        rows = build_examples(cfg, model_path)
        counts = {k: sum(r["kind"] == k for r in rows) for k in KINDS}
        log(f"{len(rows)} examples {counts}; batch_size={cfg.train.batch_size} per worker, "
            f"group_buffer_batches={cfg.train.group_buffer_batches}, threads={args.threads}, cpus={os.cpu_count()}, "
            f"torch {torch.__version__}")

        if args.ray_only:
            run_ray_section(cfg, args, tmp, results)
            report_strategies(results)
            print(f"load average at start {LOAD_START}, at end {load()} (2 cores)")
            return
        # ---- a
        tokenizer = load_tokenizer(model_path)
        step_batches = [collate(b, tokenizer.pad_token_id) for b in
                        grouped_batches(iter(rows), cfg.train.batch_size, cfg.train.group_buffer_batches, seed=1)]
        step_batches = step_batches[:args.step_batches]
        a = bench_step(model_path, cfg, step_batches, args.step_reps)
        log(f"a) sft_step   {a['sft_tok_s']:8.0f} tok/s  ({a['step_sft_ms']:.1f} ms/step)")
        log(f"a) derta_step {a['derta_tok_s']:8.0f} tok/s  ({a['step_derta_ms']:.1f} ms/step)")
        log(f"a) loss only (fixed logits, fwd+bwd, median): sft {a['loss_sft_ms']:.2f} ms, "
            f"derta_loss {a['loss_derta_ms']:.2f} ms (median pair ratio {a['loss_pair_ratio']:.2f}x)")

        # ---- b: plain loop and TRL alternate (ABAB...) when --repeats > 1; windows of all runs are pooled
        derta_tokens = sum(r["length"] for r in rows)
        derta_supervised = sum(sum(label != IGNORE_INDEX for label in r["labels"][1:]) for r in rows)
        runs: dict[str, list[dict]] = {"plain_loop": [], "trl": []}

        def record(name: str, run: dict, extra: str = "") -> None:
            runs.setdefault(name, []).append(run)
            log(f"b) {name} run {len(runs[name])}: {summarize(run['windows'])['tok_s']:.0f} tok/s "
                f"(median window){extra}")

        for _ in range(args.repeats):
            record("plain_loop", run_plain_loop(model_path, cfg, rows, args.steps, args.warm_steps))
            run = run_trl(model_path, cfg, rows, args.steps, args.warm_steps, tmp / "trl")
            record("trl", run, f"; SFTTrainer init {run['setup_s']:.1f}s; its dataset: {run['dataset_tokens']} tokens "
                               f"vs derta {derta_tokens}, supervised {run['dataset_supervised']} vs {derta_supervised}")
        if not args.no_random_diag:
            record("plain_loop_random", run_plain_loop(model_path, cfg, rows, args.steps, args.warm_steps,
                                                       grouped=False))
        if args.trl_defaults:
            record("trl_defaults", run_trl(model_path, cfg, rows, args.steps, args.warm_steps, tmp / "trl_d",
                                           trl_defaults=True))
        if args.trl_grouped:
            record("trl_grouped", run_trl(model_path, cfg, rows, args.steps, args.warm_steps, tmp / "trl_g",
                                          sampling="group_by_length"))
        for name, measured in runs.items():
            results[name] = summarize([w for run in measured for w in run["windows"]])
            results[name].update(runs=len(measured), setup_s=measured[0].get("setup_s"))

        ray_startup = run_ray_section(cfg, args, tmp, results)

        # ---- report
        print(f"\n== a) one training step, same batches, same model, {args.threads} threads ({len(step_batches)} "
              f"batches x {args.step_reps} reps, alternating order, best run per batch)")
        print(f"sft_step   (F.cross_entropy)  {a['sft_tok_s']:8.0f} tok/s   {a['step_sft_ms']:7.1f} ms/step")
        print(f"derta_step (derta_loss)       {a['derta_tok_s']:8.0f} tok/s   {a['step_derta_ms']:7.1f} ms/step")
        print(f"loss alone, fixed logits      sft {a['loss_sft_ms']:.2f} ms   derta {a['loss_derta_ms']:.2f} ms   "
              f"(medians; median per-pair wall ratio {a['loss_pair_ratio']:.3f}x, CPU-time ratio "
              f"{a['loss_cpu_ratio']:.3f}x)")
        print(f"wall-clock step ratios derta/sft: median of back-to-back pairs {a['median_pair_ratio']:.3f}x, "
              f"sum of per-batch best times {a['step_ratio']:.3f}x (both swing +-20% with the machine's load)")
        print(f"ratio derta_step/sft_step cost = {a['cpu_ratio']:.3f}x (process CPU time, all steps; target <= 1.05x)")
        print(f"\n== b) trainer throughput, real (non-pad) tokens/s, {args.threads} threads in total; windows of "
              f"{args.warm_steps} steps after {args.warm_steps} warm-up steps (steps {args.warm_steps + 1}.."
              f"{args.steps})")
        print(f"{'trainer':<18}{'tok/s':>8}{'mean':>8}{'tok/CPU-s':>10}{'pad waste':>11}{'windows':>9}{'seconds':>9}"
              "   notes")
        for name, r in results.items():
            if name.startswith("derta_ray"):
                note = (f"{r['workers']} workers x {r['threads_per_worker']} threads; startup+prep+teardown "
                        f"{r['startup_s']:.1f}s, ray.init {ray_startup:.1f}s (excluded)")
            elif name.startswith("trl"):
                note = f"SFTTrainer init (tokenize) {r['setup_s']:.1f}s (excluded)"
            elif name == "plain_loop_random":
                note = "diagnostic: plain_loop on random batches (TRL's padding)"
            else:
                note = "in-process, no Ray"
            if r.get("runs", 1) > 1:
                note += f"; {r['runs']} runs pooled"
            cpu = f"{r['cpu_tok_s']:>10.0f}" if r["cpu_tok_s"] else f"{'-':>10}"
            print(f"{name:<18}{r['tok_s']:>8.0f}{r['mean_tok_s']:>8.0f}{cpu}{r['pad']:>10.1%}{r['windows']:>9}"
                  f"{r['seconds']:>9.1f}   {note}")
        print("tok/s = median over windows (robust to load bursts); mean = all real tokens / all window time; "
              "tok/CPU-s = real tokens per CPU-second of this process (in-process trainers only)")
        print(f"\nbench wall {time.perf_counter() - BENCH_START:.0f}s; load average at start {LOAD_START}, "
              f"at end {load()} (2 cores: anything above ~2 means other work shared the machine)")
        rate = {name: r["tok_s"] for name, r in results.items()}
        cpu = {name: r["cpu_tok_s"] for name, r in results.items() if r["cpu_tok_s"]}
        if "plain_loop_random" in rate:
            print(f"diagnostic: plain_loop/plain_loop_random = {rate['plain_loop'] / rate['plain_loop_random']:.2f}x "
                  f"(CPU-time based {cpu['plain_loop'] / cpu['plain_loop_random']:.2f}x): the length-grouping win "
                  "alone; "
                  f"plain_loop_random/trl = {rate['plain_loop_random'] / rate['trl']:.2f}x (CPU-time based "
                  f"{cpu['plain_loop_random'] / cpu['trl']:.2f}x): TRL's own per-token overhead at equal padding")
        print(f"CPU-time based plain_loop/trl = {cpu['plain_loop'] / cpu['trl']:.2f}x")
        for name in [n for n in rate if n.startswith("trl_")]:
            print(f"ratio plain_loop/{name} = {rate['plain_loop'] / rate[name]:.2f}x (CPU-time based "
                  f"{cpu['plain_loop'] / cpu[name]:.2f}x)")
        ray_names = [n for n in rate if n.startswith("derta_ray")]
        for name in ray_names[:-1]:
            print(f"ratio {name}/trl = {rate[name] / rate['trl']:.2f}x; {name}/plain_loop = "
                  f"{rate[name] / rate['plain_loop']:.2f}x")
        if ray_names:
            print(f"ratio {ray_names[-1]}/trl = {rate[ray_names[-1]] / rate['trl']:.2f}x (target >= 2x)")
        print(f"ratio plain_loop/trl = {rate['plain_loop'] / rate['trl']:.2f}x (~4x expected)")
        if ray_names:
            print(f"ratio {ray_names[-1]}/plain_loop = {rate[ray_names[-1]] / rate['plain_loop']:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
