"""Corpus -> DeRTa training examples, prepared with Ray tasks into a Ray Dataset.

    sources (JSONL / Parquet / HF save_to_disk / synthetic)
      -> file parts                             local JSONL split into ~read_chunk_mb byte ranges at line starts,
                                                local Parquet into runs of row groups of ~read_chunk_mb (driver
                                                side, `derta.data_read`); other files whole
      -> one Ray task per part                  (derta.data_pieces) read_parts -> normalize_batch (canonical
                                                record, or an `error` naming the field) -> tokenize_blocks (DeRTa
                                                examples: helpful / harmful_prefix / rto, one tokenizer call per
                                                tokenize_batch_size records, one cached Tokenize per worker process)
         object-store URIs pyarrow cannot split: the same steps as Ray Data map_batches after read_binary_files
      -> a materialised Ray Dataset (once)      then per-block Ray tasks: counts, statistics (derta.data_stats),
                                                quarantine.jsonl; mix sampling per kind -> Parquet (Ray Data)
      -> training streams the Parquet files every epoch (`derta.train_data`)

Nothing is dropped silently: malformed rows and rows that lose all loss tokens to truncation are written to the
quarantine file with source, line and reason, and counted in the stats.
"""
from __future__ import annotations

import functools
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np

from derta.config import ConfigError, DataConfig, DertaConfig, SourceConfig, mid_refusal_word
from derta.data_read import EXAMPLE_TYPES, _arrow, _map_args, _present, _scalar, file_parts, read_records
from derta.data_stats import count_source_rows, histogram_percentiles, select_training_block, summarize_task
from derta.schema import RECORD_COLUMNS
from derta.transforms import (KINDS, MODE_KINDS, PromptRenderer, RefusalTokenError, examples_for_records,
                              refusal_token_id)

SYNTHETIC_IN_PROCESS_ROWS = 50_000  # larger synthetic corpora are written by a child process
EXAMPLE_COLUMNS = ("uid", "source", "line", "kind", "category", "input_ids", "labels", "rto_mask", "length",
                   "num_loss_tokens", "prefix_len")


class DataQualityError(RuntimeError):
    pass


def synthetic_sources(data: DataConfig, workdir: Path) -> list[SourceConfig]:
    """Write the synthetic training splits to `workdir` and return them as sources.

    A large corpus is generated in a child process: the generator holds every row (~0.7 GB per million rows),
    which would otherwise stay in the driver's peak memory.
    """
    from derta.synthetic import write_corpus

    synthetic = data.synthetic.model_dump()
    if synthetic["n_helpful"] + synthetic["n_harmful"] + synthetic["n_lookalike"] <= SYNTHETIC_IN_PROCESS_ROWS:
        paths = write_corpus(workdir, **synthetic)
    else:
        paths = _write_corpus_in_child(workdir, synthetic)
    return [SourceConfig(path=str(paths[split])) for split in ("train_helpful", "train_safety")]


def _write_corpus_in_child(workdir: Path, synthetic: dict) -> dict[str, Path]:
    """`write_corpus` in a fresh interpreter (not multiprocessing, which would re-import the caller's __main__)."""
    import subprocess
    import sys

    import derta

    code = ("import json, sys; from derta.synthetic import write_corpus; "
            "print(json.dumps({k: str(v) for k, v in write_corpus(sys.argv[1], **json.loads(sys.argv[2])).items()}))")
    package_root = str(Path(derta.__file__).resolve().parent.parent)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-c", code, str(workdir), json.dumps(synthetic)], env=env,
                          capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"writing the synthetic corpus to {workdir} failed:\n{done.stderr[-2000:]}")
    return {split: Path(path) for split, path in json.loads(done.stdout.splitlines()[-1]).items()}


# ---------------------------------------------------------------------------------------- tokenizing
def mid_refusal_token_id(tokenizer, data: DataConfig) -> int:
    """The token of " " + the refusal word (data.mid_refusal_space): a refusal that starts mid-response. It must be
    that whole word with its leading space, or the transition it trains would be glued or split."""
    word = mid_refusal_word(data.refusal_string)
    ids = tokenizer.encode(word, add_special_tokens=False)
    if not ids or tokenizer.decode(ids[:1]) != word:
        first = tokenizer.decode(ids[:1]) if ids else ""
        raise RefusalTokenError(
            f"data.mid_refusal_space: {word!r} is not one token in this tokenizer (its first token is {first!r}); "
            "for the tiny model set model.tiny.mid_refusal_token: true, or turn data.mid_refusal_space off")
    return ids[0]


class Tokenize:
    """Canonical records -> DeRTa examples, one batched tokenizer call per batch (cached per worker process)."""

    def __init__(self, tokenizer_path: str, data: dict, mode: str):
        from derta.modeling import load_tokenizer

        self.data = DataConfig.model_validate(data)
        self.mode = mode
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.renderer = PromptRenderer(self.tokenizer, self.data.use_chat_template, self.data.plain_template,
                                       self.data.system_prompt)
        self.refusal_id = refusal_token_id(self.tokenizer, self.data.refusal_string)
        self.mid_refusal_id = mid_refusal_token_id(self.tokenizer, self.data) if self.data.mid_refusal_space else None

    def __call__(self, batch: dict) -> dict:
        records = [{column: _present(_scalar(batch[column][i])) for column in RECORD_COLUMNS}
                   for i in range(len(batch["uid"]))]
        outcomes = iter(self._examples([r for r in records if not r["error"]]))
        out = {column: [] for column in EXAMPLE_COLUMNS + ("reason",)}
        for record in records:
            rows = [_bad_row(record, record["error"])] if record["error"] else self._rows(record, next(outcomes))
            for row in rows:
                for column in out:
                    out[column].append(row.get(column))
        return _arrow(out, EXAMPLE_TYPES)

    def _examples(self, records: list[dict]) -> list:
        return examples_for_records(
            records, self.tokenizer, self.renderer, mode=self.mode, refusal_id=self.refusal_id,
            refusal_templates=self.data.refusal_templates, k0_fraction=self.data.k0_fraction,
            max_length=self.data.max_length, seed=self.data.seed, prefix_unit=self.data.prefix_unit,
            rto_after_end=self.data.rto_after_end, mid_refusal_id=self.mid_refusal_id,
            safe_sentences=self.data.safe_sentences)

    def _rows(self, record: dict, examples: list | Exception) -> list[dict]:
        if isinstance(examples, Exception):  # a row the tokenizer/template rejects is quarantined
            return [_bad_row(record, f"cannot tokenize: {type(examples).__name__}: {examples}")]
        rows = []
        for ex in examples:
            num_loss_tokens = ex.num_loss_tokens  # a scan over the labels: once per example
            row = dict(_base_row(record), kind=ex.kind, input_ids=ex.input_ids, labels=ex.labels,
                       rto_mask=ex.rto_mask, length=len(ex.input_ids), num_loss_tokens=num_loss_tokens,
                       prefix_len=ex.prefix_len, reason=None)
            if num_loss_tokens == 0:
                row.update(kind="no_loss", reason=f"{ex.kind} example has no loss tokens after truncation to "
                                                  f"max_length={self.data.max_length} (prompt is "
                                                  f"{ex.prompt_len} tokens)")
            rows.append(row)
        return rows


def _base_row(record: dict) -> dict:
    return {"uid": record["uid"], "source": record["source"], "line": record["line"], "category": record["category"],
            "input_ids": [], "labels": [], "rto_mask": [], "length": 0, "num_loss_tokens": 0, "prefix_len": 0}


def _bad_row(record: dict, reason: str) -> dict:
    return dict(_base_row(record), kind="bad", reason=reason)



@functools.lru_cache(maxsize=4)
def _cached_tokenize(tokenizer_path: str, data_json: str, mode: str) -> Tokenize:
    return Tokenize(tokenizer_path, json.loads(data_json), mode)


def tokenize_batch(batch: dict, tokenizer_path: str, data_json: str, mode: str):
    # tasks reuse worker processes, so the tokenizer loads once per process, without an actor pool's startup
    return _cached_tokenize(tokenizer_path, data_json, mode)(batch)


def tokenize_blocks(batch: dict, tokenizer_path: str, data_json: str, mode: str, batch_size: int):
    """map_batches UDF over a whole block: one `tokenize_batch` call per `batch_size` records."""
    import pyarrow as pa

    n = len(batch["uid"])
    return pa.concat_tables([tokenize_batch({column: values[i:i + batch_size] for column, values in batch.items()},
                                            tokenizer_path, data_json, mode)
                             for i in range(0, max(n, 1), batch_size)])


def tokenize(records, tokenizer_path: str, data: DataConfig, mode: str):
    return records.map_batches(
        tokenize_blocks, fn_kwargs={"tokenizer_path": tokenizer_path, "data_json": data.model_dump_json(),
                                    "mode": mode, "batch_size": data.tokenize_batch_size},
        **_map_args(data))


# ------------------------------------------------------------------------------------------- mixing
def mix_rates(counts: dict[str, int], data: DataConfig) -> dict[str, float]:
    """Sampling rate per training kind of the mode, so each kind lands near its configured target (null = keep all).
    Kinds outside the mode have no rate: they never train."""
    rates = {}
    for kind in MODE_KINDS[data.mode]:
        target = getattr(data.mix, kind)
        available = counts.get(kind, 0)
        rates[kind] = 1.0 if target is None or available == 0 else min(1.0, target / available)
    return rates


# ------------------------------------------------------------------------------------------ pipeline
def prepare_examples(config: DertaConfig, tokenizer_path: str, workdir: Path, inputs: list[str] | None = None):
    """Run the pipeline up to tokenized examples, materialised once in the object store.

    Returns (examples dataset with every row, including bad ones, counts per kind).
    """
    data = config.data
    if inputs:
        sources = [SourceConfig(path=p) for p in inputs]
    elif data.sources:
        sources = data.sources
    else:
        sources = synthetic_sources(data, workdir / "synthetic")
    examples = tokenized_examples(data, sources, tokenizer_path)
    counts = count_kinds(examples)
    return examples, counts


def tokenized_examples(data: DataConfig, sources: list[SourceConfig], tokenizer_path: str):
    """Every example (bad rows included) as a materialised Ray Dataset, blocks in source and piece order.

    Local files are split into pieces (`file_parts`: JSONL byte ranges and Parquet row-group runs of about
    `data.read_chunk_mb`, other files whole), so a large file is read, normalized and tokenized by several tasks at
    once; each piece is one plain Ray task (`derta.data_pieces`). Object-store files pyarrow cannot split go through
    Ray Data's reader, one task per file, and their blocks follow.
    """
    import ray

    from derta.data_pieces import run_pieces
    from derta.progress import Progress, materialize_with_progress

    parts, remote = file_parts(sources, piece_bytes=max(1, int(data.read_chunk_mb * 2**20)))
    if not parts and not remote:
        raise ConfigError("no data sources configured")
    blocks = []
    if parts:
        args = ([s.model_dump() for s in sources], data.model_dump_json(), tokenizer_path, data.mode, data.max_chars,
                data.tokenize_batch_size)
        with Progress("prepare data", unit="examples") as progress:
            blocks = run_pieces(parts, args, data.tokenize_concurrency, progress)
    if remote:
        blocks += materialize_with_progress(
            tokenize(read_records(data, sources, remote), tokenizer_path, data, data.mode),
            "prepare data (object store files)").to_arrow_refs()
    return ray.data.from_arrow_refs(blocks)


def count_kinds(examples) -> dict[str, int]:
    """Examples per kind of a materialized dataset: one small Ray task per block, no Ray Data execution (whose
    start-up, ~0.2-0.4 s on 2 CPUs, costs more than the counting)."""
    import ray

    counts: Counter = Counter()
    for block_counts in ray.get([_kind_counter().remote(block) for block in examples.to_arrow_refs()]):
        counts.update(block_counts)
    return dict(counts)


@functools.cache
def _kind_counter():
    import ray

    return ray.remote(_block_kind_counts)


def _block_kind_counts(table) -> dict[str, int]:
    if table.num_rows == 0:  # Ray Data skips the map functions on an empty block: it may have no columns at all
        return {}
    return dict(Counter(table.column("kind").to_pylist()))


def check_quality(counts: dict[str, int], num_bad_rows: int, num_source_rows: int, data: DataConfig,
                  quarantine_path: Path | None) -> None:
    fraction = num_bad_rows / max(num_source_rows, 1)
    if fraction > data.max_bad_fraction:
        where = f"; see {quarantine_path}" if quarantine_path else ""
        raise DataQualityError(
            f"{num_bad_rows} of {num_source_rows} source rows are malformed ({fraction:.1%}), over "
            f"data.max_bad_fraction={data.max_bad_fraction:.1%}{where}. Fix the rows or raise the limit.")
    if not any(counts.get(kind, 0) for kind in KINDS):
        raise DataQualityError("no usable training rows: every row was malformed or filtered out")


def summarize(examples, counts: dict[str, int], config: DertaConfig, quarantine_path: Path) -> dict:
    """Statistics of the training selection and the quarantine file, from one summary task per block of the
    materialised `examples`; quarantined rows are appended block by block, in dataset order."""
    import ray

    data, train = config.data, config.train
    rates = mix_rates(counts, data)
    task = summarize_task()
    refs = [task.remote(block, rates, data.seed, train.batch_size, train.group_buffer_batches, data.max_length)
            for block in examples.to_arrow_refs()]
    summaries = ray.get([summary for summary, _ in refs])
    quarantine_path.parent.mkdir(parents=True, exist_ok=True)
    malformed = 0
    with quarantine_path.open("w") as f:
        for _, bad_ref in refs:
            bad = ray.get(bad_ref)
            malformed += sum(1 for kind in bad.column("kind").to_pylist() if kind == "bad")
            for row in bad.to_pylist():
                f.write(json.dumps({"source": row["source"], "line": int(row["line"]), "kind": row["kind"],
                                    "reason": row["reason"]}) + "\n")
            del bad
    hist: dict[str, np.ndarray] = {}
    for summary in summaries:
        for kind, values in summary.get("length_hist", {}).items():
            hist[kind] = hist.get(kind, 0) + np.asarray(values, dtype=np.int64)
    real = sum(s.get("real_tokens", 0) for s in summaries)

    def waste(key: str) -> float:
        padded = sum(s.get(key, 0) for s in summaries)
        return 1 - real / padded if padded else 0.0

    return {
        "source_rows": count_source_rows(summaries),
        "malformed": malformed,
        "rates": rates,
        "examples_by_kind": {kind: int(h.sum()) for kind, h in hist.items()},
        "length": histogram_percentiles(sum(hist.values())) if hist else {},
        "length_by_kind": {kind: histogram_percentiles(h) for kind, h in hist.items()},
        "padding_waste": {"length_grouped": waste("padded_grouped"), "random_batches": waste("padded_random"),
                          "batch_size": train.batch_size},
    }


def write_prepared(config: DertaConfig, tokenizer_path: str, output: Path, inputs: list[str] | None = None) -> dict:
    """`derta data prepare`: Parquet examples + stats.json + quarantine.jsonl under `output`.

    The examples are materialised once (in the object store, spilling to disk when large); counting, statistics,
    the quarantine file and the Parquet write each stream over those blocks, so the driver holds only per-block
    summaries. The Parquet files hold the training rows (mode kinds, mix-sampled) in a seeded random block order,
    so that files interleave the sources for training's streaming reads.
    """
    output.mkdir(parents=True, exist_ok=True)
    data = config.data
    examples, counts = prepare_examples(config, tokenizer_path, output / "_work", inputs)
    quarantine = output / "quarantine.jsonl"
    summary = summarize(examples, counts, config, quarantine)
    check_quality(counts, summary["malformed"], summary["source_rows"], data, quarantine)
    if not summary["examples_by_kind"]:
        raise DataQualityError(f"no training rows left for mode={data.mode} after data.mix sampling")
    parquet_dir = output / "examples"
    if parquet_dir.exists():
        import shutil

        shutil.rmtree(parquet_dir)
    from derta.plain_parquet import null_only_columns, plain_block
    from derta.preflight import refusal_start_counts

    examples.randomize_block_order(seed=data.seed).map_batches(
        select_training_block, batch_format="pyarrow", batch_size=None, zero_copy_batch=True,
        fn_kwargs={"rates": summary["rates"], "seed": data.seed}).map_batches(
        plain_block, batch_format="pyarrow", batch_size=None,  # list<int32> ids, no all-null columns
        fn_kwargs={"drop": null_only_columns(examples, ("category",))}).write_parquet(str(parquet_dir))
    refusal_id = _cached_tokenize(tokenizer_path, data.model_dump_json(), data.mode).refusal_id
    stats = {
        "mode": data.mode,
        "source_rows": summary["source_rows"],
        "examples_by_kind": summary["examples_by_kind"],
        "available_by_kind": {k: v for k, v in counts.items() if k in KINDS},
        "quarantined": {"malformed": summary["malformed"], "no_loss_tokens": counts.get("no_loss", 0),
                        "path": str(quarantine)},
        "length": summary["length"],
        "length_by_kind": summary["length_by_kind"],
        "padding_waste": summary["padding_waste"],
        "harmful_prefix_refusal_start": refusal_start_counts(examples, refusal_id),
        "examples_dir": str(parquet_dir),
        "tokenizer": tokenizer_path,
    }
    (output / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats
