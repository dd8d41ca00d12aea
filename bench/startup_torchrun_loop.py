"""The baseline of bench_startup.py: `derta train`'s loop under plain torchrun, no Ray.

    torchrun --standalone --nproc_per_node 2 bench/startup_torchrun_loop.py --steps 2 --record marks.json

Each rank reads the tiny preset's synthetic corpus, turns its half of the rows into DeRTa examples with the same
derta functions the Ray Data pipeline runs (parse -> normalize -> tokenize), loads the tiny model, wraps it in DDP
(gloo) and runs `--steps` steps of derta_loss + AdamW on length-grouped batches. Rank 0 records when each phase
ended, in seconds since BENCH_LAUNCHED (set by the bench just before it launched torchrun).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--record", required=True)
    args = parser.parse_args()
    launched = float(os.environ.get("BENCH_LAUNCHED", time.time()))
    marks = {}

    def mark(name):
        marks[name] = time.time() - launched - sum(marks.values())

    import torch
    import torch.distributed as dist

    from derta.batching import collate, grouped_batches
    from derta.config import load_config
    from derta.data import synthetic_sources, tokenize_blocks
    from derta.data_read import _map_args, _parse_jsonl, normalize_batch
    from derta.losses import derta_loss
    from derta.modeling import load_model, load_tokenizer, resolve_model_path
    from derta.transforms import MODE_KINDS

    mark("imports")
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // world))
    cfg = load_config("tiny", [f"train.max_steps={args.steps}"])
    model_path = resolve_model_path(cfg.model, cfg.data.synthetic, cfg.data.refusal_string)
    tokenizer = load_tokenizer(model_path)
    mark("process group + config")

    data = cfg.data
    _map_args(data)  # the same validation the Ray path does
    with tempfile.TemporaryDirectory() as tmp:
        sources = synthetic_sources(data, Path(tmp))
        rows = []
        for index, source in enumerate(sources):
            raw = list(_parse_jsonl(source.path, Path(source.path).read_bytes()))[rank::world]
            batch = {key: [row[key] for row in raw] for key in ("source", "line", "raw", "error")}
            batch["source_index"] = [index] * len(raw)
            records = normalize_batch(batch, [s.model_dump() for s in sources], data.max_chars).to_pydict()
            examples = tokenize_blocks(records, model_path, data.model_dump_json(), data.mode,
                                       data.tokenize_batch_size).to_pylist()
            rows += [ex for ex in examples if ex["kind"] in MODE_KINDS[data.mode]]
    mark("data")

    model = load_model(model_path, cfg.model.model_copy(update={"dtype": "float32"}), "cpu").float()
    model = torch.nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    mark("model + DDP")
    train = cfg.train
    batches = grouped_batches(iter(rows), train.batch_size, train.group_buffer_batches, seed=train.seed)
    for step, batch_rows in enumerate(batches, start=1):
        batch = collate(batch_rows, tokenizer.pad_token_id)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        terms = derta_loss(logits, batch["labels"], batch["rto_mask"], train.mle_weight, train.rto_weight)
        terms.total.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step == 1:
            mark("step 1")
            marks["first step"] = time.time() - launched  # the headline: absolute time to the first step
        if step >= args.steps:
            break
    if rank == 0:
        Path(args.record).write_text(json.dumps(marks))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
