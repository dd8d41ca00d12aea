"""Streaming statistics: the vectorised batching simulation and histogram percentiles agree with the direct
computations they replace, and block summaries add up to the whole-dataset numbers (no Ray needed)."""
import numpy as np
import pyarrow as pa
import pytest

from derta.batching import plan_batches
from derta.data_stats import (count_source_rows, histogram_percentiles, padded_tokens, padding_waste, summarize_block,
                              training_mask)


def _padded_by_plan(lengths, batch_size, group_buffer_batches):
    """The direct O(n^2 / B) computation: plan the batches, pad each to its longest row."""
    return sum(max(lengths[i] for i in batch) * len(batch)
               for batch in plan_batches(list(lengths), batch_size, group_buffer_batches, drop_last=False))


@pytest.mark.parametrize("n", [1, 7, 16, 100, 513, 1000])
@pytest.mark.parametrize("batch_size,group", [(1, None), (4, None), (16, 32), (8, 3), (5, 1)])
def test_padded_tokens_matches_planned_batches(n, batch_size, group):
    lengths = np.random.default_rng(n).integers(1, 300, size=n)
    window = batch_size * group if group else None
    assert padded_tokens(lengths, batch_size, window) == _padded_by_plan(lengths, batch_size, group)


def test_padding_waste_grouping_helps_and_is_deterministic():
    lengths = np.random.default_rng(0).integers(5, 250, size=20_000)
    grouped = padding_waste(lengths, 16, 32, seed=3)
    assert grouped == padding_waste(lengths, 16, 32, seed=3)
    assert 0 <= grouped < padding_waste(lengths, 16, None, seed=3) < 1
    assert padding_waste(np.full(100, 7), 16, None) == 0.0 and padding_waste(np.array([]), 16, 32) == 0.0


@pytest.mark.parametrize("seed", range(5))
def test_histogram_percentiles_equal_numpy(seed):
    values = np.random.default_rng(seed).integers(0, 64, size=int(np.random.default_rng(seed).integers(1, 500)))
    expected = {f"p{q}": float(np.percentile(values, q)) for q in (50, 90, 99)}
    got = histogram_percentiles(np.bincount(values, minlength=70))
    assert got == pytest.approx(expected | {"max": int(values.max()), "mean": float(values.mean())})
    assert histogram_percentiles(np.zeros(10)) == {}


def _block(rows):
    columns = ("uid", "source", "line", "kind", "length", "reason")
    return pa.table({c: [r[i] for r in rows] for i, c in enumerate(columns)})


def test_block_summaries_add_up_across_split_records():
    rows = [("f:1", "f", 1, "helpful", 10, None), ("f:2", "f", 2, "harmful_prefix", 20, None),
            ("f:2", "f", 2, "rto", 30, None), ("f:3", "f", 3, "bad", 0, "bad JSON"),
            ("f:4", "f", 4, "harmful_prefix", 40, None), ("f:4", "f", 4, "no_loss", 0, "no loss tokens")]
    rates = {"helpful": 1.0, "harmful_prefix": 1.0, "rto": 1.0}
    whole, whole_bad = summarize_block(_block(rows), rates, 0, 2, 2, 64)
    for cut in range(1, len(rows)):  # a block boundary anywhere, also inside a record's examples
        parts = [summarize_block(_block(part), rates, 0, 2, 2, 64) for part in (rows[:cut], rows[cut:])]
        assert count_source_rows([s for s, _ in parts]) == count_source_rows([whole]) == 4
        assert sum(s["real_tokens"] for s, _ in parts) == whole["real_tokens"] == 100
        hist = {k: np.add(*[s["length_hist"].get(k, np.zeros(65)) for s, _ in parts]) for k in rates}
        assert all(np.array_equal(hist[k], whole["length_hist"][k]) for k in rates)
        assert sum(bad.num_rows for _, bad in parts) == whole_bad.num_rows == 2
    assert whole_bad.column("reason").to_pylist() == ["bad JSON", "no loss tokens"]


def test_training_mask_keeps_mode_kinds_and_samples_by_rate():
    uids = [f"f:{i}" for i in range(4000)]
    kinds = ["helpful", "rto", "bad", "no_loss"] * 1000
    mask = training_mask(uids, kinds, {"helpful": 0.25, "rto": 1.0}, seed=1)
    assert mask[1::4].all() and not mask[2::4].any() and not mask[3::4].any()
    assert 200 < mask[0::4].sum() < 300
    assert np.array_equal(mask, training_mask(uids, kinds, {"helpful": 0.25, "rto": 1.0}, seed=1))


def test_large_synthetic_corpus_is_written_by_a_child_process_with_the_same_rows(tiny_config, tmp_path, monkeypatch):
    import derta.data as data

    small = tiny_config.data.model_copy(update={"synthetic": tiny_config.data.synthetic.model_copy(
        update={"n_helpful": 40, "n_harmful": 10, "n_lookalike": 5})})
    in_process = data.synthetic_sources(small, tmp_path / "a")
    monkeypatch.setattr(data, "SYNTHETIC_IN_PROCESS_ROWS", 0)
    child = data.synthetic_sources(small, tmp_path / "b")
    assert [s.path.replace("/b/", "/a/") for s in child] == [s.path for s in in_process]
    for a, b in zip(in_process, child):
        assert open(a.path).read() == open(b.path).read() and open(a.path).read().count("\n") > 0
