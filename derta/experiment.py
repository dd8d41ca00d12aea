"""`derta experiment`: the paper's refusal-position finding at toy scale, on 2 CPU cores.

1. base     pre-train the tiny model from random init on the synthetic corpus with harmful completions as ordinary
            helpful rows (instruction -> harmful_response) plus the helpful rows: a stand-in for a base model that
            already knows harmful content. `experiment.base_epochs` passes at `experiment.base_lr`.
2. arms     from that base checkpoint, fine-tune with data.mode vanilla, recaug and derta on the synthetic train
            splits: identical helpful data, identical steps (`experiment.finetune_steps`) at `experiment.finetune_lr`,
            gentler than pre-training, as for a real base model (a full-lr fine-tune erases the base's harmful
            continuations and the experiment would no longer model the paper's setting).
3. eval     `run_eval` on the held-out synthetic suites (EXPERIMENT_SUITES; `eval.suites` is not used): prefilling
            ASR at `eval.prefill_ks`, refusal rate on harmful prompts, exact-answer helpfulness and over-refusal on
            lookalikes, plus refusal-position curves; same summary.json layout as `derta eval`.

Output: DIR/runs/<arm>/ (training runs; <arm>/final is the HF checkpoint), DIR/data/ (corpus JSONL),
DIR/summary.json, DIR/curves.json, DIR/items/, DIR/report.md + PNGs, DIR/experiment.json (steps, timings).
The preset is `configs/experiment.yaml`.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from derta.config import DertaConfig, SourceConfig

ARMS = ("vanilla", "recaug", "derta")
EXPERIMENT_SUITES = ["synthetic_prefill", "synthetic_harmful", "synthetic_helpful", "synthetic_lookalike"]


def write_corpus_files(cfg: DertaConfig, data_dir: Path) -> dict[str, Path]:
    """The synthetic splits plus `pretrain.jsonl` (helpful rows + harmful completions as helpful rows)."""
    from derta.synthetic import write_corpus

    paths = write_corpus(data_dir, **cfg.data.synthetic.model_dump())
    helpful = [json.loads(line) for line in paths["train_helpful"].read_text().splitlines()]
    harmful = [json.loads(line) for line in paths["train_safety"].read_text().splitlines()]
    rows = ([{"id": r["id"], "instruction": r["instruction"], "response": r["response"]} for r in helpful]
            + [{"id": r["id"], "instruction": r["instruction"], "response": r["harmful_response"]} for r in harmful])
    paths["pretrain"] = data_dir / "pretrain.jsonl"
    paths["pretrain"].write_text("".join(json.dumps(row) + "\n" for row in rows))
    return paths


def with_updates(cfg: DertaConfig, data: dict | None = None, model: dict | None = None,
                 train: dict | None = None) -> DertaConfig:
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=data or {}),
                                  "model": cfg.model.model_copy(update=model or {}),
                                  "train": cfg.train.model_copy(update=train or {})})


def base_config(cfg: DertaConfig, paths: dict[str, Path]) -> DertaConfig:
    """Plain MLE on pretrain.jsonl (every row helpful), `experiment.base_epochs` passes at `experiment.base_lr`."""
    exp = cfg.experiment
    return with_updates(cfg, data={"sources": [SourceConfig(path=str(paths["pretrain"]), kind="helpful")],
                                   "mode": "vanilla"},
                        train={"max_steps": None, "run_name": "base", "epochs": exp.base_epochs or cfg.train.epochs,
                               "lr": exp.base_lr or cfg.train.lr})


def arm_config(cfg: DertaConfig, paths: dict[str, Path], base: Path, mode: str,
               steps: int | None) -> DertaConfig:
    """Fine-tune `base` with `mode` on the synthetic train splits for `steps` steps at `experiment.finetune_lr`."""
    sources = [SourceConfig(path=str(paths[split])) for split in ("train_helpful", "train_safety")]
    return with_updates(cfg, data={"sources": sources, "mode": mode}, model={"name_or_path": str(base)},
                        train={"run_name": mode, "max_steps": steps, "lr": cfg.experiment.finetune_lr or cfg.train.lr})


def timed_training(cfg: DertaConfig, output: Path) -> dict:
    from derta.trainer import run_training

    start = time.perf_counter()
    final = run_training(cfg, output)
    run = json.loads((output / "run.json").read_text())
    return {"checkpoint": str(final), "steps": run["total_steps"], "lr": cfg.train.lr, "rows": run["rows"],
            "examples_by_kind": run["examples_by_kind"], "seconds": round(time.perf_counter() - start, 1)}


def run_experiment(cfg: DertaConfig, output: Path | str) -> dict:
    """Train base + vanilla / recaug / derta, evaluate all four, write the report; returns the summary."""
    from derta.evaluation import run_eval
    from derta.report import compact_table, write_report
    from derta.runtime import init_ray

    start = time.perf_counter()
    output = Path(output)
    init_ray()
    paths = write_corpus_files(cfg, output / "data")
    runs = {"base": timed_training(base_config(cfg, paths), output / "runs" / "base")}
    base, steps = Path(runs["base"]["checkpoint"]), cfg.experiment.finetune_steps or cfg.train.max_steps
    for mode in ARMS:  # vanilla first: with no step count set, its epoch-based count is used for all arms
        runs[mode] = timed_training(arm_config(cfg, paths, base, mode, steps), output / "runs" / mode)
        steps = runs[mode]["steps"]
    eval_start = time.perf_counter()
    models = [f"{name}={run['checkpoint']}" for name, run in runs.items()]
    summary = run_eval(cfg, models, EXPERIMENT_SUITES, output)
    timings = {"train_seconds": {name: run["seconds"] for name, run in runs.items()},
               "eval_seconds": round(time.perf_counter() - eval_start, 1),
               "total_seconds": round(time.perf_counter() - start, 1)}
    (output / "experiment.json").write_text(json.dumps({"runs": runs, **timings}, indent=2))
    curves = json.loads((output / "curves.json").read_text())
    write_report(summary, curves, output, title="DeRTa toy experiment: refusal position bias",
                 notes=[experiment_notes(runs, timings)])
    print("\n" + compact_table(summary))
    print(f"\nwall time {timings['total_seconds']:.0f} s (training {sum(timings['train_seconds'].values()):.0f} s, "
          f"evaluation {timings['eval_seconds']:.0f} s); report: {output / 'report.md'}", flush=True)
    return summary


def experiment_notes(runs: dict, timings: dict) -> str:
    lines = ["Base: tiny Llama pre-trained from random init on helpful rows plus harmful completions; vanilla, "
             "recaug and derta are fine-tuned from it with identical steps, learning rate and helpful data.", "",
             "| model | steps | lr | training rows by kind | train s |", "|---|---|---|---|---|"]
    lines += [f"| {name} | {run['steps']} | {run['lr']:.2g} | {', '.join(f'{k} {n}' for k, n in run['examples_by_kind'].items())} | "
              f"{run['seconds']} |" for name, run in runs.items()]
    lines += ["", f"Evaluation {timings['eval_seconds']} s; total wall time {timings['total_seconds']} s."]
    return "\n".join(lines)
