"""Prepared training data, cached by content: a second `derta train` on the same data skips preparation.

The key is a hash of everything the prepared examples depend on:
  sources     the content (sha256) of every source file, and each source's settings; for the bundled synthetic
              corpus, its settings (the corpus is generated deterministically from them)
  tokenizer   the content of the tokenizer's files (tokenizer.json, tokenizer_config.json, ...)
  config      the whole `data` section, plus the batch settings the stats report depends on
  code        the derta package's source, so a code change never reuses examples made by older code
A hit copies stats.json and quarantine.jsonl into the run's data directory and trains from the cached Parquet.
Sources that cannot be hashed locally (object-store URIs, hub tokenizers) are never cached.

Where: DERTA_CACHE_DIR, else `.derta-cache/` next to the run directory (on a cluster that is the shared storage the
run directory is on, so workers can read the cached files). DERTA_CACHE_DIR=off disables the cache. The newest
KEEP entries are kept.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Callable

from derta.config import DertaConfig

CACHE_ENV = "DERTA_CACHE_DIR"
KEEP = 4
PACKAGE = Path(__file__).resolve().parent
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "tokenizer.model", "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json")
COPIED = ("stats.json", "quarantine.jsonl")


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_key(config: DertaConfig, tokenizer_path: str, inputs: list[str] | None = None) -> str | None:
    """The content key of the prepared examples, or None when an input cannot be hashed locally."""
    from derta.config import SourceConfig
    from derta.data_read import expand_source

    data = config.data
    sources = [SourceConfig(path=p) for p in inputs] if inputs else data.sources
    source_keys = []
    for source in sources:
        if "://" in source.path:
            return None
        files = expand_source(source)
        source_keys.append([source.model_dump(), [[path, fmt, _file_digest(Path(path))] for path, fmt in files]])
    tokenizer_dir = Path(os.path.expanduser(tokenizer_path))
    if not tokenizer_dir.is_dir():
        return None
    tokenizer = {name: _file_digest(tokenizer_dir / name) for name in TOKENIZER_FILES
                 if (tokenizer_dir / name).is_file()}
    code = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(PACKAGE.glob("*.py")))).hexdigest()
    payload = {"sources": source_keys, "tokenizer": tokenizer, "data": data.model_dump(mode="json"),
               "batch": [config.train.batch_size, config.train.group_buffer_batches], "code": code}
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def cache_root(run_data_dir: Path) -> Path | None:
    setting = os.environ.get(CACHE_ENV, "").strip()
    if setting.lower() in ("off", "0", "none", "false"):
        return None
    return Path(setting).expanduser() if setting else Path(run_data_dir).resolve().parent.parent / ".derta-cache"


def cached_prepare(prepare: Callable[..., dict], config: DertaConfig, tokenizer_path: str, output: Path,
                   inputs: list[str] | None = None) -> dict:
    """`prepare(config, tokenizer_path, directory, inputs) -> stats` (stats["examples_dir"]: the Parquet), through
    the cache. On a hit nothing is prepared; stats.json and quarantine.jsonl land in `output` either way."""
    from derta.progress import say

    output = Path(output)
    root = cache_root(output)
    key = cache_key(config, tokenizer_path, inputs) if root else None
    if key is None:
        return prepare(config, tokenizer_path, output, inputs)
    entry = root / "prepared" / key
    if not (entry / "stats.json").exists():
        tmp = entry.with_name(f"{key}.tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            stats = prepare(config, tokenizer_path, tmp, inputs)
        except BaseException:  # bad data is reported, never cached
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        # paths in the stats (examples_dir, the quarantine file) name the entry the directory is about to become
        (tmp / "stats.json").write_text(json.dumps(stats, indent=2).replace(str(tmp), str(entry)))
        try:
            tmp.rename(entry)
        except OSError:  # another run with the same key finished first: its files are the same
            shutil.rmtree(tmp, ignore_errors=True)
        _evict(root / "prepared")
    else:
        os.utime(entry)  # most recently used
        say(f"prepared data: cached ({entry})")
    output.mkdir(parents=True, exist_ok=True)
    for name in COPIED:
        if (entry / name).exists():
            shutil.copy(entry / name, output / name)
    stats = json.loads((entry / "stats.json").read_text())
    if isinstance(stats.get("quarantined"), dict) and "path" in stats["quarantined"]:
        stats["quarantined"]["path"] = str(output / "quarantine.jsonl")  # the run's copy
    stats["cache"] = str(entry)
    (output / "stats.json").write_text(json.dumps(stats, indent=2))
    return stats


def _evict(prepared: Path) -> None:
    entries = sorted((p for p in prepared.iterdir() if p.is_dir() and ".tmp" not in p.name),
                     key=lambda p: p.stat().st_mtime, reverse=True)
    for old in entries[KEEP:]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in prepared.glob("*.tmp*"):  # a crashed run's half-written entry, after a day
        if time.time() - stale.stat().st_mtime > 86400:
            shutil.rmtree(stale, ignore_errors=True)
