"""Benchmark DeRTa data preparation: the Ray Data pipeline vs Hugging Face `datasets.map`, same rows, same code.

    python bench/bench_data.py [--helpful 24000] [--harmful 8000] [--lookalike 2000] [--num-proc 2] [--repeats 2]
                               [--skip-np1] [--skip-conc1] [--skip-tasks]

Both engines run the SAME derta code on the SAME JSONL files (the synthetic corpus from `derta.synthetic.write_corpus`,
train_helpful + train_safety, mode=derta, tiny-preset tokenizer):
    derta.data_read._parse_jsonl -> raw rows (bytes -> {source, line, raw, error}); Ray via read_parts
    derta.data_read.normalize_batch -> canonical records (pydantic validation)
    derta.data.tokenize_batch  -> DeRTa examples (helpful / harmful_prefix / rto), one cached Tokenize per process,
                                  one batched tokenizer call per batch of 256 records (Ray via tokenize_blocks)
Only the engine differs:
  ray_data          derta.data.prepare_examples (JSONL split into ~read_chunk_mb pieces -> one plain Ray task per
                    piece running read+normalize+tokenize (derta.data_pieces) -> a materialised Ray Dataset of the
                    blocks -> count kinds), with the library defaults (tokenize_concurrency=None: as many tasks as
                    Ray has CPUs, read_chunk_mb=2, tokenize_batch_size=256)
  ray_data_conc1    the same with data.tokenize_concurrency=1 (one task at a time, the old default; evidence only)
  ray_tasks         diagnostic: the same pieces through the same functions (read_parts -> normalize_batch ->
                    tokenize_blocks), one plain Ray task each, gathered with ray.data.from_arrow_refs -> count
                    kinds; since prepare_examples runs plain tasks too, it measures the library's progress/ordering
  hf_datasets       datasets.load_dataset("text") per file -> Dataset.map(batched=True, batch_size=256,
                    num_proc=N) calling the functions above -> concatenate -> count kinds   (the named baseline, N=2)
  hf_datasets_np1   the same with num_proc=1
Ray startup (ray.init) and warm-up runs are excluded from the timed section and printed apart: Ray Data on the
timed corpus (so that every Ray worker has loaded the tokenizer), HF on a small corpus (its forked workers inherit
the tokenizer the parent loaded). The machine is shared: hf_datasets, ray_data (and ray_tasks) alternate --repeats
times (ABCABC) and each keeps its best run (contention only adds time); every run is printed, with the load average.
Throughput is SOURCE rows/s (JSONL lines in); examples/s (rows out) is printed too. The ratio is printed last.

Memory: the corpus is written by a child process, Ray runs first, and the bench process's peak RSS
(getrusage RUSAGE_SELF) is printed after the Ray runs: the Ray Data driver's peak (Ray workers, raylet and the
object store are other processes). HF's peak is its map workers' (RUSAGE_CHILDREN after the HF runs).
1M rows (~4 min on a quiet 2-core box): --helpful 1060000 --harmful 118000 --repeats 1 --skip-np1 --skip-conc1
--skip-tasks (the train splits then hold ~1.0M source rows; Ray warms up on the small corpus above 100K rows).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import shutil
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Ray starts its workers at niceness 15 (RAY_worker_niceness); a bench runs them at the priority of the process it
# compares them with, or any niced background work on the machine skews the ratio against Ray.
os.environ.setdefault("RAY_worker_niceness", "0")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from derta.config import SourceConfig, load_config  # noqa: E402
from derta.data import tokenize_batch, tokenize_blocks  # noqa: E402
from derta.data_read import _parse_jsonl, file_parts, normalize_batch, read_parts  # noqa: E402
from derta.modeling import resolve_model_path  # noqa: E402
from derta.synthetic import write_corpus  # noqa: E402


# ------------------------------------------------------------------------------------------ HF datasets
def hf_transform(batch: dict, indices: list[int], *, path: str, source_index: int, sources: list[dict],
                 max_chars: int, tokenizer_path: str, data_json: str, mode: str):
    """One datasets.map batch of JSONL lines -> DeRTa examples, through the same derta functions Ray runs."""
    raw = list(_parse_jsonl(path, "\n".join(batch["text"]).encode("utf-8")))
    if len(raw) != len(indices):  # the corpus has no blank lines; keep the 1:1 line mapping honest
        raise RuntimeError("blank lines in the corpus: line numbers would not match")
    rows = {"source": [r["source"] for r in raw], "line": [i + 1 for i in indices], "raw": [r["raw"] for r in raw],
            "error": [r["error"] for r in raw], "source_index": [source_index] * len(raw)}
    records = normalize_batch(rows, sources, max_chars).to_pydict()
    return tokenize_batch(records, tokenizer_path, data_json, mode)  # a pyarrow Table: datasets accepts it


def run_hf(paths: list[str], cfg, tokenizer_path: str, num_proc: int, cache_dir: Path) -> tuple[float, dict]:
    import datasets

    if cache_dir.exists():
        shutil.rmtree(cache_dir)
    sources = [SourceConfig(path=p).model_dump() for p in paths]
    started = time.perf_counter()
    parts = []
    for index, path in enumerate(paths):
        ds = datasets.load_dataset("text", data_files=path, split="train", cache_dir=str(cache_dir))
        parts.append(ds.map(
            hf_transform, batched=True, batch_size=cfg.data.tokenize_batch_size, with_indices=True,
            num_proc=num_proc if num_proc > 1 else None, remove_columns=["text"], load_from_cache_file=False,
            fn_kwargs={"path": path, "source_index": index, "sources": sources, "max_chars": cfg.data.max_chars,
                       "tokenizer_path": tokenizer_path, "data_json": cfg.data.model_dump_json(),
                       "mode": cfg.data.mode}))
    examples = datasets.concatenate_datasets(parts)
    counts = dict(Counter(examples["kind"]))
    return time.perf_counter() - started, counts


# ------------------------------------------------------------------------------------------- Ray Data
def run_ray(paths: list[str], cfg, tokenizer_path: str, workdir: Path) -> tuple[float, dict]:
    from derta.data import prepare_examples

    started = time.perf_counter()
    examples, counts = prepare_examples(cfg, tokenizer_path, workdir, inputs=paths)
    elapsed = time.perf_counter() - started
    del examples
    return elapsed, counts


def prepare_piece(part: dict, sources: list[dict], data, tokenizer_path: str):
    """One file piece through the same derta functions a fused ray_data task runs, as one plain Ray task."""
    raw = read_parts({column: [value] for column, value in part.items()})
    records = normalize_batch(raw.to_pydict(), sources, data.max_chars)
    return tokenize_blocks(records.to_pydict(), tokenizer_path, data.model_dump_json(), data.mode,
                           data.tokenize_batch_size)


def run_ray_tasks(paths: list[str], cfg, tokenizer_path: str) -> tuple[float, dict]:
    """Diagnostic: ray_data's pieces and work, scheduled as plain Ray tasks instead of by the Ray Data executor."""
    import ray

    from derta.data import count_kinds

    started = time.perf_counter()
    sources = [SourceConfig(path=p) for p in paths]
    parts, _ = file_parts(sources, int(cfg.data.read_chunk_mb * 2**20))
    task = ray.remote(num_cpus=1)(prepare_piece)
    source_dicts = [s.model_dump() for s in sources]
    examples = ray.data.from_arrow_refs([task.remote(part, source_dicts, cfg.data, tokenizer_path)
                                         for part in parts])
    counts = count_kinds(examples)
    return time.perf_counter() - started, counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--helpful", type=int, default=24000)
    parser.add_argument("--harmful", type=int, default=8000)
    parser.add_argument("--lookalike", type=int, default=2000)
    parser.add_argument("--num-proc", type=int, default=2, help="num_proc of the hf_datasets baseline")
    parser.add_argument("--repeats", type=int, default=2, help="hf_datasets/ray_data/ray_tasks runs each, alternating")
    parser.add_argument("--skip-np1", action="store_true", help="skip the num_proc=1 HF run")
    parser.add_argument("--skip-conc1", action="store_true", help="skip the tokenize_concurrency=1 Ray run")
    parser.add_argument("--skip-tasks", action="store_true", help="skip the plain-Ray-tasks diagnostic run")
    args = parser.parse_args()

    import datasets

    datasets.disable_progress_bars()
    datasets.logging.set_verbosity_error()
    cfg = load_config("tiny")
    tokenizer_path = resolve_model_path(cfg.model, cfg.data.synthetic, cfg.data.refusal_string)
    tmp = Path(tempfile.mkdtemp(prefix="derta-bench-data-"))
    try:
        with multiprocessing.get_context("spawn").Pool(1) as pool:  # the generator's rows never enter this process
            corpus = pool.apply(write_corpus, (tmp / "corpus",), dict(n_helpful=args.helpful, n_harmful=args.harmful,
                                                                      n_lookalike=args.lookalike))
        warm = write_corpus(tmp / "warm", n_helpful=1200, n_harmful=800, n_lookalike=100)
        paths = [str(corpus["train_helpful"]), str(corpus["train_safety"])]
        warm_paths = [str(warm["train_helpful"]), str(warm["train_safety"])]
        n_rows = sum(1 for p in paths for line in open(p, encoding="utf-8") if line.strip())
        n_parts = len(file_parts([SourceConfig(path=p) for p in paths], int(cfg.data.read_chunk_mb * 2**20))[0])
        print(f"corpus: {n_rows} source rows (train_helpful + train_safety), mode={cfg.data.mode}, "
              f"tokenize_batch_size={cfg.data.tokenize_batch_size}, cpus={os.cpu_count()}; prepare_examples reads it "
              f"as {n_parts} pieces (read_chunk_mb={cfg.data.read_chunk_mb}); load average {os.getloadavg()[0]:.1f}",
              flush=True)

        import ray

        from derta.runtime import init_ray

        started = time.perf_counter()
        init_ray()
        startup = time.perf_counter() - started
        worker_nice = ray.get(ray.remote(lambda: os.nice(0)).remote())
        print(f"ray startup (init_ray, num_cpus={int(ray.cluster_resources().get('CPU', 0))}): {startup:.2f}s "
              f"(not timed); Ray worker niceness {worker_nice}, this process's {os.nice(0)}", flush=True)
        cfg1 = cfg.model_copy(update={"data": cfg.data.model_copy(update={"tokenize_concurrency": 1})})
        started = time.perf_counter()
        # the timed corpus, not the small one: a Ray Data execution runs one task at a time for its first ~1 s (its
        # executor learns the cluster's CPUs asynchronously), so a short warm-up loads the tokenizer into one worker
        run_ray(paths if n_rows <= 100_000 else warm_paths, cfg, tokenizer_path, tmp / "ray_warm")
        if not args.skip_tasks:
            run_ray_tasks(paths, cfg, tokenizer_path)
        # num_proc=1 loads the tokenizer into this process, so the forked map workers inherit it, as warm as Ray's
        run_hf(warm_paths, cfg, tokenizer_path, 1, tmp / "hf_cache_warm1")
        run_hf(warm_paths, cfg, tokenizer_path, args.num_proc, tmp / "hf_cache_warm")
        print(f"warm-up runs, Ray Data on the timed corpus, HF on a {sum(1 for p in warm_paths for _ in open(p))}-row "
              f"corpus (Ray workers + tokenizer load, HF imports + pool): {time.perf_counter() - started:.2f}s "
              "(not timed)", flush=True)

        labels = {"hf_datasets": f"hf_datasets (num_proc={args.num_proc})",
                  "hf_datasets_np1": "hf_datasets (num_proc=1)",
                  "ray_data": f"ray_data (tokenize_concurrency={cfg.data.tokenize_concurrency})",
                  "ray_data_conc1": "ray_data (tokenize_concurrency=1)",
                  "ray_tasks": "ray_tasks (plain Ray tasks)"}
        # the machine is shared and noisy: the engines alternate (ABCABC...) and each keeps its best run
        runs: dict[str, list[tuple[float, dict]]] = {"hf_datasets": [], "ray_data": []}
        if not args.skip_tasks:
            runs["ray_tasks"] = []
        ray_rss = hf_rss = 0
        for repeat in range(args.repeats):
            runs["ray_data"].append(run_ray(paths, cfg, tokenizer_path, tmp / "ray"))
            ray_rss = ray_rss or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # before any HF run
            print(f"run {repeat + 1}: {labels['ray_data']} "
                  f"{runs['ray_data'][-1][0]:.2f}s (load {os.getloadavg()[0]:.1f})", flush=True)
            runs["hf_datasets"].append(run_hf(paths, cfg, tokenizer_path, args.num_proc, tmp / "hf_cache"))
            hf_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**10
            print(f"run {repeat + 1}: hf_datasets (num_proc={args.num_proc}) {runs['hf_datasets'][-1][0]:.2f}s "
                  f"(load {os.getloadavg()[0]:.1f})", flush=True)
            if not args.skip_tasks:
                runs["ray_tasks"].append(run_ray_tasks(paths, cfg, tokenizer_path))
                print(f"run {repeat + 1}: {labels['ray_tasks']} {runs['ray_tasks'][-1][0]:.2f}s "
                      f"(load {os.getloadavg()[0]:.1f})", flush=True)
        if not args.skip_np1:
            runs["hf_datasets_np1"] = [run_hf(paths, cfg, tokenizer_path, 1, tmp / "hf_cache1")]
            print(f"hf_datasets (num_proc=1) {runs['hf_datasets_np1'][0][0]:.2f}s (load {os.getloadavg()[0]:.1f})",
                  flush=True)
        if not args.skip_conc1:
            runs["ray_data_conc1"] = [run_ray(paths, cfg1, tokenizer_path, tmp / "ray1")]
            print(f"{labels['ray_data_conc1']} {runs['ray_data_conc1'][0][0]:.2f}s (load {os.getloadavg()[0]:.1f})",
                  flush=True)
        ray.shutdown()
        results = {name: min(measured, key=lambda r: r[0]) for name, measured in runs.items()}

        reference = results["ray_data"][1]
        for name, (_, counts) in results.items():
            if counts != reference:
                raise SystemExit(f"{name} produced different examples per kind: {counts} vs ray_data {reference}")
        n_examples = sum(reference.values())
        print(f"\nexamples per kind (identical in every run): {reference}; load average {os.getloadavg()[0]:.1f} "
              f"at the end (2 cores: above ~2 means other work shared the machine)")
        print(f"{'engine (best run)':<38}{'seconds':>9}{'source rows/s':>15}{'examples/s':>12}")
        for name, (seconds, _) in results.items():
            every = ", ".join(f"{n_rows / s:.0f}" for s, _ in runs[name])
            print(f"{labels[name]:<38}{seconds:>9.2f}{n_rows / seconds:>15.0f}{n_examples / seconds:>12.0f}   "
                  f"runs (rows/s): {every}")
        rate = {name: n_rows / seconds for name, (seconds, _) in results.items()}
        if "hf_datasets_np1" in rate:
            print(f"ratio ray_data/hf_datasets_np1 = {rate['ray_data'] / rate['hf_datasets_np1']:.2f}x")
        if "ray_data_conc1" in rate:
            print(f"ratio ray_data_conc1/hf_datasets = {rate['ray_data_conc1'] / rate['hf_datasets']:.2f}x")
        if "ray_tasks" in rate:
            print(f"ratio ray_tasks/hf_datasets = {rate['ray_tasks'] / rate['hf_datasets']:.2f}x (diagnostic: the "
                  "same pieces without the Ray Data executor)")
        print(f"peak RSS: ray_data driver (this process, before any HF run) {ray_rss:.0f} MB; hf_datasets map workers "
              f"{hf_rss:.0f} MB")
        print(f"baseline hf_datasets = datasets.map(batched=True, num_proc={args.num_proc})")
        print(f"ratio ray_data/hf_datasets = {rate['ray_data'] / rate['hf_datasets']:.2f}x")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
