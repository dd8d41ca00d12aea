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

Seeds: the three fine-tunes and their evaluation run once per seed (`experiment.seeds`, default 3, from
`experiment.first_seed`); a seed sets train.seed and data.seed (order, prefix lengths) and model.tiny.seed. With
`experiment.shared_base` (the preset) the base is pre-trained once, with `experiment.base_seed`, as the paper fine-tunes
one pre-trained model; otherwise every seed pre-trains its own base from its own init. The corpus and the evaluation items are the same for every seed. Evaluation uses the held-out half
`eval.heldout_split`: "test" (the preset) for reported numbers, "dev" for tuning and variants.

Output:
    DIR/data/                          corpus JSONL (training splits, pretrain.jsonl), shared by all seeds
    DIR/base/{run,eval}/               the shared base: training run (run/final = HF checkpoint), evaluation
    DIR/seeds/seed-<s>/                one seed: runs/<model>/ (training; final = HF checkpoint), eval/<model>/
                                       (a `derta eval` output dir), summary.json, curves.json
    DIR/summary.json                   the mean over seeds, `derta eval` shape (asr_by_prefix, refusal_by_prefix,
                                       degenerate_by_prefix per k; see derta.coherence for the three outcomes)
    DIR/intervals.json                 the same shape, [low, high] 95% t interval over seeds (null for one seed)
    DIR/items/<model>/<suite>.jsonl    every seed's items, with a `seed` field
    DIR/curves.json, DIR/report.md + PNGs, DIR/experiment.json (config, steps, timings per seed)
A finished training run whose config is unchanged is reused (`experiment_run.json`), and so are the completions
of an evaluation whose model and generation settings are unchanged (`experiment_eval.json`; they are judged
again with the current judge): variants that change only the fine-tunes, the judge or the report do not pre-train
or generate again what did not change. Both keys spell paths inside DIR relative to it (`relocatable`), and a
run's checkpoint is recorded relative to its run directory: a copied or moved DIR (or one named by a relative
--output from another working directory) is still reused. The preset is `configs/experiment.yaml`.
"""
from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

from derta.config import DertaConfig, SourceConfig

ARMS = ("vanilla", "recaug", "derta")
EXPERIMENT_SUITES = ["synthetic_prefill", "synthetic_harmful", "synthetic_helpful", "synthetic_lookalike",
                     "synthetic_benign_prefill"]


def write_corpus_files(cfg: DertaConfig, data_dir: Path) -> dict[str, Path]:
    """The synthetic splits plus `pretrain.jsonl` (helpful rows + harmful completions as helpful rows)."""
    from derta.synthetic import _write_atomically, write_corpus

    paths = write_corpus(data_dir, **cfg.data.synthetic.model_dump())
    helpful = [json.loads(line) for line in paths["train_helpful"].read_text().splitlines()]
    harmful = [json.loads(line) for line in paths["train_safety"].read_text().splitlines()]
    rows = ([{"id": r["id"], "instruction": r["instruction"], "response": r["response"]} for r in helpful]
            + [{"id": r["id"], "instruction": r["instruction"], "response": r["harmful_response"]} for r in harmful])
    paths["pretrain"] = data_dir / "pretrain.jsonl"
    _write_atomically(paths["pretrain"], "".join(json.dumps(row) + "\n" for row in rows))
    return paths


def with_updates(cfg: DertaConfig, data: dict | None = None, model: dict | None = None,
                 train: dict | None = None, eval: dict | None = None) -> DertaConfig:
    return cfg.model_copy(update={"data": cfg.data.model_copy(update=data or {}),
                                  "model": cfg.model.model_copy(update=model or {}),
                                  "train": cfg.train.model_copy(update=train or {}),
                                  "eval": cfg.eval.model_copy(update=eval or {})})


def seeded(cfg: DertaConfig, seed: int) -> DertaConfig:
    """The config of one repetition: model init, training order and prefix sampling from `seed`."""
    return with_updates(cfg, data={"seed": seed}, model={"tiny": cfg.model.tiny.model_copy(update={"seed": seed})},
                        train={"seed": seed}, eval={"seed": seed})


def base_config(cfg: DertaConfig, paths: dict[str, Path]) -> DertaConfig:
    """Plain MLE on pretrain.jsonl (every row helpful), `experiment.base_epochs` passes at `experiment.base_lr`.
    The knobs of safety rows (their mix targets, data.safe_sentences) are reset: they do not touch the base, so a
    variant that changes only them fine-tunes the same base."""
    exp = cfg.experiment
    mix = cfg.data.mix.model_copy(update={"harmful_prefix": None, "rto": None})
    return with_updates(cfg, data={"sources": [SourceConfig(path=str(paths["pretrain"]), kind="helpful")],
                                   "mode": "vanilla", "mix": mix, "safe_sentences": None},
                        train={"max_steps": None, "run_name": "base", "epochs": exp.base_epochs or cfg.train.epochs,
                               "lr": exp.base_lr or cfg.train.lr})


def arm_config(cfg: DertaConfig, paths: dict[str, Path], base: Path, mode: str,
               steps: int | None) -> DertaConfig:
    """Fine-tune `base` with `mode` on the synthetic train splits for `steps` steps at `experiment.finetune_lr`."""
    sources = [SourceConfig(path=str(paths[split])) for split in ("train_helpful", "train_safety")]
    return with_updates(cfg, data={"sources": sources, "mode": mode}, model={"name_or_path": str(base)},
                        train={"run_name": mode, "max_steps": steps, "lr": cfg.experiment.finetune_lr or cfg.train.lr})


def training_key(cfg: DertaConfig) -> dict:
    """What determines a training run: the data, model and train sections (not eval: a tuning run on the dev split
    and the reported run on the test split share their trainings), not RTO settings without RTO examples (nor
    `loss_weighting`: without RTO positions both weightings are the MLE token mean, so a variant that changes it
    does not pre-train the base again), not the prefix-length distribution or unit in vanilla (always k = 0)."""
    key = cfg.model_dump(mode="json", include={"data", "model", "train"})
    key["data"]["synthetic"] = cfg.data.synthetic.cache_key()
    if cfg.data.safe_sentences is None:  # at its default a knob stays out of the key: older runs are still reused
        key["data"].pop("safe_sentences")
    if cfg.data.mode != "derta":
        key["train"].pop("loss_weighting", None)
        key["train"].pop("rto_weight", None)
        key["train"].pop("rto_keep_fraction", None)
        key["data"].pop("rto_keep_fraction", None)
        key["data"].pop("rto_after_end", None)
        key["data"]["mix"].pop("rto", None)
    if cfg.data.mode == "vanilla":  # no prefix at all: neither its length distribution nor its unit matter
        key["data"].pop("k0_fraction", None)
        key["data"].pop("prefix_unit", None)
        key["data"].pop("mid_refusal_space", None)
    return key


ROOT_MARK = "<experiment>"


def relocatable(value, root: Path | None):
    """`value` (a key: nested dicts / lists / strings) with every path under the experiment directory `root` written
    as `<experiment>/<path relative to root>`: the key no longer depends on where DIR lies or how it was named."""
    if root is None:
        return value
    if isinstance(value, dict):
        return {k: relocatable(v, root) for k, v in value.items()}
    if isinstance(value, list):
        return [relocatable(v, root) for v in value]
    if isinstance(value, str) and Path(value).is_absolute() and Path(value).is_relative_to(root):
        return str(Path(ROOT_MARK) / Path(value).relative_to(root))
    return value


def timed_training(cfg: DertaConfig, output: Path, root: Path | None = None) -> dict:
    """Train (or reuse a finished run of the identical config in `output`); returns the run's record. `root`: the
    experiment directory (absolute), whose paths the reuse key spells relative to it."""
    with exclusive(output):
        return _timed_training(cfg, output, root)


def _timed_training(cfg: DertaConfig, output: Path, root: Path | None) -> dict:
    from derta.trainer import run_training

    record_file, config = output / "experiment_run.json", relocatable(training_key(cfg), root)
    if record_file.exists():
        record = json.loads(record_file.read_text())
        checkpoint = output / record["checkpoint"]  # relative to the run directory (absolute in older records)
        if record.get("config") == config and checkpoint.exists():
            return {**record["run"], "checkpoint": str(checkpoint), "config_key": config, "reused": True}
    discard_stale_run(output, config)
    start = time.perf_counter()
    final = run_training(cfg, output)
    run = json.loads((output / "run.json").read_text())
    result = {"checkpoint": str(final), "steps": run["total_steps"], "lr": cfg.train.lr, "rows": run["rows"],
              "examples_by_kind": run["examples_by_kind"], "seconds": round(time.perf_counter() - start, 1)}
    local = str(Path(final).relative_to(output)) if Path(final).is_relative_to(output) else str(final)
    record_file.write_text(json.dumps({"config": config, "checkpoint": local, "run": {**result, "checkpoint": local}},
                                      indent=2))
    return {**result, "config_key": config}


def discard_stale_run(output: Path, config: dict) -> None:
    """Ray Train resumes from the latest checkpoint under `output`/checkpoints (same storage path and run name):
    a variant trained into the directory of a run with another config would silently continue (or, when that run
    had finished, simply return) the old model. Its checkpoints, export and logs are removed first; those of an
    interrupted run of this same config (`experiment_run.started.json`) are kept, so it resumes."""
    import shutil

    started = output / "experiment_run.started.json"
    if not (started.exists() and json.loads(started.read_text()) == config):
        for stale in ("checkpoints", "final"):
            shutil.rmtree(output / stale, ignore_errors=True)
        for stale in ("experiment_run.json", "metrics.jsonl", "metrics.redone.jsonl", "run.json"):
            (output / stale).unlink(missing_ok=True)
    started.write_text(json.dumps(config, indent=2))


# the evaluation settings that decide the completions; the judging is redone whenever an evaluation is reused
GENERATION_FIELDS = ("data_dir", "prefill_ks", "max_new_tokens", "limit", "seed", "heldout_split", "torch_threads")


def evaluation_key(cfg: DertaConfig, name: str, run: dict) -> dict:
    return {"model": name, "training": run["config_key"], "synthetic": cfg.data.synthetic.cache_key(),
            "generation": {f: v for f, v in cfg.eval.model_dump(mode="json").items() if f in GENERATION_FIELDS}}


def evaluate(cfg: DertaConfig, name: str, run: dict, output: Path) -> tuple[dict, list]:
    """({suite: metrics}, refusal curve) of one trained model, evaluated into `output` (a `derta eval` dir). When
    the model's training and the generation settings are unchanged, the stored completions are reused and only
    judged again (`rejudge`: the current judge and coherence rule)."""
    from derta.evaluation import run_eval

    key_file, key = output / "experiment_eval.json", evaluation_key(cfg, name, run)
    with exclusive(output):  # two experiments sharing a base (e.g. seeds run in parallel) evaluate it once
        if key_file.exists() and json.loads(key_file.read_text()) == key and (output / "summary.json").exists():
            return rejudge(cfg, name, output), json.loads((output / "curves.json").read_text())[name]
        key_file.unlink(missing_ok=True)
        summary = run_eval(cfg, [f"{name}={run['checkpoint']}"], EXPERIMENT_SUITES, output)
        key_file.write_text(json.dumps(key, indent=2))
        return summary[name], json.loads((output / "curves.json").read_text())[name]


def rejudge(cfg: DertaConfig, name: str, output: Path) -> dict:
    """Judge the stored completions of `output`/items/<name>/ again; rewrites the items and summary.json."""
    from derta.evaluation import item_record, metric_kind, rounded, suite_metrics, write_jsonl
    from derta.judge_models import make_judge
    from derta.suites import EvalItem

    judge, metrics = make_judge(cfg.eval), {}
    for suite in EXPERIMENT_SUITES:
        path = output / "items" / name / f"{suite}.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        items = [EvalItem(id=r["id"], suite=r["suite"], prompt=r["prompt"], prefix=r["prefix"],
                          reference=r["reference"], kind=r["kind"], meta={"k": r["k"]}) for r in rows]
        completions = [r["completion"] for r in rows]
        records = [item_record(item, completion, verdict, judge_name) for item, completion, (verdict, judge_name)
                   in zip(items, completions, judge.judge_items(items, completions))]
        write_jsonl(path, records)
        metrics[suite] = rounded(suite_metrics(metric_kind(suite), records))
    summary = json.loads((output / "summary.json").read_text())
    summary[name] = metrics
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    return metrics


@contextlib.contextmanager
def exclusive(directory: Path):
    """An exclusive lock on `directory` (a lock file in it) for the duration of the block."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / ".experiment.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def run_seed(cfg: DertaConfig, paths: dict[str, Path], output: Path, base: dict | None,
             root: Path | None = None) -> dict:
    """One repetition: the base (unless `base` = the shared one's record), the three fine-tunes, evaluation.
    `output`/runs/<model>/ holds the training runs, `output`/eval/<model>/ the evaluations."""
    start = time.perf_counter()
    runs = {"base": base or timed_training(base_config(cfg, paths), output / "runs" / "base", root)}
    steps = cfg.experiment.finetune_steps or cfg.train.max_steps
    for mode in ARMS:  # vanilla first: with no step count set, its epoch-based count is used for all arms
        runs[mode] = timed_training(arm_config(cfg, paths, Path(runs["base"]["checkpoint"]), mode, steps),
                                    output / "runs" / mode, root)
        steps = runs[mode]["steps"]
    eval_start = time.perf_counter()
    summary, curves = {}, {}
    for name, run in runs.items():
        shared = bool(run.get("eval_dir"))  # the shared base: evaluated once, with the base seed
        summary[name], curves[name] = evaluate(seeded(cfg, cfg.experiment.base_seed) if shared else cfg, name, run,
                                               Path(run["eval_dir"]) if shared else output / "eval" / name)
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    (output / "curves.json").write_text(json.dumps(curves))
    timings = {"train_seconds": {name: run["seconds"] for name, run in runs.items() if name in ARMS or not base},
               "eval_seconds": round(time.perf_counter() - eval_start, 1),
               "total_seconds": round(time.perf_counter() - start, 1)}
    return {"summary": summary, "curves": curves, "runs": runs, **timings}


def seeds_of(cfg: DertaConfig) -> list[int]:
    return list(range(cfg.experiment.first_seed, cfg.experiment.first_seed + cfg.experiment.seeds))


def run_experiment(cfg: DertaConfig, output: Path | str) -> dict:
    """Every seed of (base +) vanilla / recaug / derta, evaluated; writes the mean, intervals and the report."""
    from derta.aggregate import interval_summary, mean_curves, mean_summary
    from derta.report import compact_table, write_report
    from derta.runtime import init_ray

    start = time.perf_counter()
    output = Path(output).resolve()  # absolute: keys and checkpoints then do not depend on the working directory
    init_ray()
    paths = write_corpus_files(cfg, output / "data")
    base = None
    if cfg.experiment.shared_base:  # one base model, as the paper fine-tunes one pre-trained model per seed
        base_cfg = seeded(cfg, cfg.experiment.base_seed)
        base = timed_training(base_config(base_cfg, paths), output / "base" / "run", output)
        base["eval_dir"] = str(output / "base" / "eval")
    per_seed = {}
    for seed in seeds_of(cfg):
        print(f"[derta] experiment seed {seed} ({len(per_seed) + 1}/{cfg.experiment.seeds})", flush=True)
        per_seed[seed] = run_seed(seeded(cfg, seed), paths, output / "seeds" / f"seed-{seed}", base, output)
    summaries = [run["summary"] for run in per_seed.values()]
    summary, intervals = mean_summary(summaries), interval_summary(summaries)
    curves = mean_curves([run["curves"] for run in per_seed.values()])
    (output / "summary.json").write_text(json.dumps(summary, indent=2))
    (output / "intervals.json").write_text(json.dumps(intervals, indent=2))
    (output / "curves.json").write_text(json.dumps(curves))
    merge_items(output, {seed: run["runs"] for seed, run in per_seed.items()})
    record = {"seeds": list(per_seed), "heldout_split": cfg.eval.heldout_split,
              "shared_base": cfg.experiment.shared_base, "total_seconds": round(time.perf_counter() - start, 1),
              "per_seed": {str(s): {**{k: v for k, v in run.items() if k not in ("summary", "curves", "runs")},
                                    "runs": {name: {k: v for k, v in r.items() if k != "config_key"}
                                             for name, r in run["runs"].items()}}
                           for s, run in per_seed.items()},
              "config": cfg.model_dump(mode="json")}
    (output / "experiment.json").write_text(json.dumps(record, indent=2))
    write_report(summary, curves, output, title="DeRTa toy experiment: refusal position bias",
                 notes=[experiment_notes(record)], intervals=intervals)
    print("\n" + compact_table(summary))
    seconds = [run["total_seconds"] for run in per_seed.values()]
    print(f"\n{len(per_seed)} seed(s) on the {cfg.eval.heldout_split} split; wall time {record['total_seconds']:.0f} s "
          f"(per seed {', '.join(f'{s:.0f}' for s in seconds)} s); report: {output / 'report.md'}", flush=True)
    return summary


def merge_items(output: Path, runs_by_seed: dict[int, dict]) -> None:
    """DIR/items/<model>/<suite>.jsonl: every seed's rows, each with its `seed` (a shared base's rows once)."""
    merged: dict[Path, list[str]] = {}
    for seed, runs in runs_by_seed.items():
        for name, run in runs.items():
            if run.get("eval_dir") and seed != min(runs_by_seed):
                continue  # the shared base was evaluated once
            items = Path(run.get("eval_dir") or output / "seeds" / f"seed-{seed}" / "eval" / name) / "items" / name
            for path in sorted(items.glob("*.jsonl")):
                merged.setdefault(path.relative_to(items.parent), []).extend(
                    json.dumps({"seed": seed, **json.loads(line)}) for line in path.read_text().splitlines())
    for relative, lines in merged.items():
        target = output / "items" / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text("".join(line + "\n" for line in lines))


def experiment_notes(record: dict) -> str:
    lines = [f"Seeds {record['seeds']}; evaluated on the `{record['heldout_split']}` half of the held-out synthetic "
             "data. Base: tiny Llama pre-trained from random init on helpful rows plus harmful completions; vanilla, "
             "recaug and derta are fine-tuned from it with identical steps, learning rate and helpful data. Cells are "
             "the mean over seeds with the 95% t interval in brackets.", "",
             "| seed | model | steps | lr | training rows by kind | train s |", "|---|---|---|---|---|---|"]
    for seed, run in record["per_seed"].items():
        lines += [f"| {seed} | {name} | {r['steps']} | {r['lr']:.2g} | "
                  f"{', '.join(f'{k} {n}' for k, n in r['examples_by_kind'].items())} | "
                  f"{r['seconds']}{' (reused)' if r.get('reused') else ''} |" for name, r in run["runs"].items()]
    lines += ["", "Wall time per seed (s): " + ", ".join(f"seed {s}: {run['total_seconds']} (evaluation "
                                                       f"{run['eval_seconds']})" for s, run in record["per_seed"].items())
              + f"; total {record['total_seconds']} s."]
    return "\n".join(lines)
