"""Prepared-data cache: hit only when sources, tokenizer, data config and code are the same."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from derta import datacache
from derta.config import load_config


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv(datacache.CACHE_ENV, str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text(json.dumps({"instruction": "Say hi.", "response": "Hi."}) + "\n")
    tokenizer = tmp_path / "tok"
    tokenizer.mkdir()
    (tokenizer / "tokenizer.json").write_text('{"v": 1}')
    (tokenizer / "tokenizer_config.json").write_text("{}")
    calls = []

    def prepare(config, tokenizer_path, directory, inputs=None):
        calls.append(directory)
        (directory / "examples").mkdir(parents=True)
        (directory / "examples" / "part-0.parquet").write_bytes(b"rows")
        (directory / "quarantine.jsonl").write_text('{"line": 3}\n')
        stats = {"examples_dir": str(directory / "examples"), "examples_by_kind": {"helpful": 1},
                 "quarantined": {"path": str(directory / "quarantine.jsonl")}}
        (directory / "stats.json").write_text(json.dumps(stats))
        return stats

    cfg = load_config("tiny", [f"data.sources=[{{path: {corpus}}}]"])
    return cfg, str(tokenizer), corpus, prepare, calls


def run(setup, tmp_path, cfg=None, name="run"):
    base, tokenizer, _, prepare, _ = setup
    return datacache.cached_prepare(prepare, cfg or base, tokenizer, tmp_path / "runs" / name / "data")


def test_second_run_hits_and_gets_stats_and_quarantine(setup, tmp_path):
    first = run(setup, tmp_path, name="a")
    second = run(setup, tmp_path, name="b")
    assert len(setup[4]) == 1, "the second run prepared again"
    assert second["examples_dir"] == first["examples_dir"]
    assert Path(first["cache"]).parent.parent == tmp_path / "cache"
    assert open(f"{second['examples_dir']}/part-0.parquet", "rb").read() == b"rows"
    out = tmp_path / "runs" / "b" / "data"
    assert (out / "quarantine.jsonl").read_text() == '{"line": 3}\n'
    assert json.loads((out / "stats.json").read_text())["quarantined"]["path"] == str(out / "quarantine.jsonl")
    assert ".tmp" not in json.dumps(second)  # no path of the temporary directory survives


@pytest.mark.parametrize("change", ["source", "tokenizer", "config"])
def test_any_input_change_misses(setup, tmp_path, change):
    cfg, tokenizer, corpus, _, calls = setup
    run(setup, tmp_path, name="a")
    if change == "source":
        corpus.write_text(corpus.read_text() + json.dumps({"instruction": "Two?", "response": "2"}) + "\n")
    elif change == "tokenizer":
        (tmp_path / "tok" / "tokenizer.json").write_text('{"v": 2}')
    else:
        cfg = load_config("tiny", [f"data.sources=[{{path: {corpus}}}]", "data.max_length=128"])
    run(setup, tmp_path, cfg=cfg, name="b")
    assert len(calls) == 2


def test_off_and_unhashable_inputs_bypass_the_cache(setup, tmp_path, monkeypatch):
    cfg, tokenizer, _, _, calls = setup
    monkeypatch.setenv(datacache.CACHE_ENV, "off")
    run(setup, tmp_path, name="a")
    run(setup, tmp_path, name="b")
    assert len(calls) == 2 and not (tmp_path / "cache").exists()
    assert datacache.cache_key(cfg, "org/hub-tokenizer") is None
    remote = load_config("tiny", ["data.sources=[{path: 's3://bucket/x.jsonl'}]"])
    assert datacache.cache_key(remote, tokenizer) is None


def test_default_location_is_next_to_the_run_directory(tmp_path, monkeypatch):
    monkeypatch.delenv(datacache.CACHE_ENV, raising=False)
    assert datacache.cache_root(tmp_path / "runs" / "tiny" / "data") == (tmp_path / "runs" / ".derta-cache")


def test_failed_preparation_is_not_cached(setup, tmp_path):
    cfg, tokenizer, _, _, _ = setup

    def broken(config, tokenizer_path, directory, inputs=None):
        (directory / "examples").mkdir(parents=True)
        raise ValueError("3 of 3 source rows are malformed")

    with pytest.raises(ValueError):
        datacache.cached_prepare(broken, cfg, tokenizer, tmp_path / "runs" / "a" / "data")
    assert not list((tmp_path / "cache" / "prepared").iterdir())
