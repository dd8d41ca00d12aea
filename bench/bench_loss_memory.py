"""Peak memory of one training step at a Llama-3 vocabulary (V=128,256): the DeRTa CE before/after.

    python bench/bench_loss_memory.py [--batch 4] [--seq 512] [--supervised 0.6] [--hidden 256] [--layers 2]

Each variant runs in a fresh process (peak RSS, `ru_maxrss`, is per process): build a small random Llama with
the full 128K vocabulary (fp32, CPU), one forward + loss + backward on the same batch (the last `--supervised`
fraction of each row carries labels, a third of them RTO positions). Reported: peak RSS of the step above the RSS
just before it (model and batch already built).
  before   baseline: the previous derta CE, `F.cross_entropy(logits[:, :-1].float().reshape(-1, V), ...,
           reduction="none")` over every position (an fp32 [B, T, V] copy, its log-softmax and their gradients)
  after    the training loop's path: the model returns final hidden states and no logits
           (derta.losses.hidden_only_kwargs), derta.losses.derta_loss gathers the supervised rows and projects them
           through lm_head to fp32 logits in chunks of CE_CHUNK_ROWS rows, recomputed in the backward
"before" also holds the model's own fp32 [B, T, V] logits and their gradient; "after" never builds them. The ratio after/before and
the two losses (which must agree) are printed last.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

VOCAB = 128_256


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def step(variant: str, args) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from derta.losses import derta_loss, hidden_only_kwargs
    from derta.transforms import IGNORE_INDEX

    torch.manual_seed(0)
    torch.set_num_threads(1)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=args.seq, tie_word_embeddings=False)
    model = LlamaForCausalLM(config)
    input_ids = torch.randint(0, VOCAB, (args.batch, args.seq))
    labels = input_ids.clone()
    start = int(args.seq * (1 - args.supervised))
    labels[:, :start] = IGNORE_INDEX
    rto = torch.zeros_like(labels, dtype=torch.bool)
    rto[::3, start:] = True
    before = rss_mb()
    if variant == "before":
        logits = model(input_ids=input_ids).logits
        shift = logits[:, :-1].float()
        ce = F.cross_entropy(shift.reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX,
                             reduction="none")
        loss = ce.sum() / (labels[:, 1:] != IGNORE_INDEX).sum()
    else:
        out = model(input_ids=input_ids, **hidden_only_kwargs("cpu"))
        loss = derta_loss(out.hidden_states[-1], labels, rto, weighting="token_mean",
                          lm_head=model.get_output_embeddings()).total
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"variant": variant, "loss": float(loss), "step_peak_mb": peak - before,
            "logits_mb": args.batch * args.seq * VOCAB * 4 / 2 ** 20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--supervised", type=float, default=0.6)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--variant", choices=["before", "after"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.variant:
        print(json.dumps(step(args.variant, args)))
        return
    results = {}
    for variant in ("before", "after"):
        cmd = [sys.executable, __file__, "--variant", variant] + [
            f"--{k}={v}" for k, v in vars(args).items() if k != "variant" and v is not None]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        results[variant] = json.loads(out.strip().splitlines()[-1])
        r = results[variant]
        print(f"{variant:6s}  peak RSS of the step {r['step_peak_mb']:8.0f} MB   loss {r['loss']:.5f}   "
              f"(model logits [B,T,V] fp32: {r['logits_mb']:.0f} MB)", flush=True)
    b, a = results["before"], results["after"]
    print(f"B={args.batch} T={args.seq} V={VOCAB} supervised={args.supervised:.0%}: after/before peak "
          f"{a['step_peak_mb'] / b['step_peak_mb']:.2f}x ({b['step_peak_mb'] - a['step_peak_mb']:.0f} MB less); "
          f"losses equal: {abs(a['loss'] - b['loss']) < 1e-4 * abs(b['loss'])}")


if __name__ == "__main__":
    main()
