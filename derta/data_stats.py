"""Statistics of prepared examples as streaming aggregates.

One small Ray task per materialised block returns its counts, a length histogram per kind, padded-token sums and
its quarantined rows; the driver only adds the summaries up and appends the quarantined rows to a file block by
block, so its memory does not grow with the number of examples. Every statistic is O(n log n) or better:
percentiles come from the exact length histogram (lengths are bounded by `data.max_length`), padding waste from
a vectorised simulation of the batching (sort within windows, max per batch).
"""
from __future__ import annotations

import functools

import numpy as np

from derta.transforms import unit_hash

QUARANTINE_COLUMNS = ("source", "line", "kind", "reason")
BAD_KINDS = ("bad", "no_loss")


# ------------------------------------------------------------------------------------- batching simulation
def padded_tokens(lengths: np.ndarray, batch_size: int, window: int | None = None) -> int:
    """Tokens after padding every batch to its longest row. Batches are cut in order (the last may be short); with
    `window` (a multiple of batch_size) each run of `window` rows is sorted by length first, as length-grouped
    batching does. O(n log window), no Python loop over rows or batches."""
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths)
    if n == 0:
        return 0
    if window:
        full = n - n % window
        head = np.sort(lengths[:full].reshape(-1, window), axis=1).ravel()
        lengths = np.concatenate([head, np.sort(lengths[full:])])
    padded = np.concatenate([lengths, np.zeros((-n) % batch_size, dtype=np.int64)]).reshape(-1, batch_size)
    sizes = np.full(len(padded), batch_size)
    sizes[-1] = n - batch_size * (len(padded) - 1)
    return int((padded.max(axis=1) * sizes).sum())


def padding_waste(lengths: np.ndarray, batch_size: int, group_buffer_batches: int | None, seed: int = 0) -> float:
    """Fraction of padded tokens when batching `lengths` in a seeded random order (length-grouped in windows of
    batch_size * group_buffer_batches rows when group_buffer_batches is set), as `derta.batching` batches them."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) == 0:
        return 0.0
    order = np.random.default_rng(seed).permutation(len(lengths))
    window = batch_size * group_buffer_batches if group_buffer_batches else None
    return 1 - int(lengths.sum()) / padded_tokens(lengths[order], batch_size, window)


# ------------------------------------------------------------------------------------------- percentiles
def histogram_percentiles(hist: np.ndarray) -> dict[str, float]:
    """p50/p90/p99/max/mean of the values a count histogram describes (hist[v] = rows of length v); the same numbers
    as np.percentile (linear interpolation) over the expanded values, without expanding them."""
    hist = np.asarray(hist, dtype=np.int64)
    n = int(hist.sum())
    if n == 0:
        return {}
    values = np.arange(len(hist))
    cumulative = np.cumsum(hist)

    def value_at(rank: int) -> int:  # the rank-th smallest value, 0-based
        return int(np.searchsorted(cumulative, rank, side="right"))

    out = {}
    for q in (50, 90, 99):
        position = q / 100 * (n - 1)
        low, frac = int(np.floor(position)), position - np.floor(position)
        out[f"p{q}"] = float(value_at(low) + frac * (value_at(min(low + 1, n - 1)) - value_at(low)))
    return out | {"max": int(values[hist > 0].max()), "mean": float((values * hist).sum() / n)}


# -------------------------------------------------------------------------------------------- selection
def training_mask(uids, kinds, rates: dict[str, float], seed: int) -> np.ndarray:
    """Rows that train: kinds with a rate (the mode's kinds), sampled per kind at that rate by a hash of
    uid|kind (the same decision wherever and however often it is made)."""
    kinds = np.asarray(kinds, dtype=object)
    mask = np.isin(kinds, list(rates))
    for kind, rate in rates.items():
        if rate >= 1.0:
            continue  # the common case (no mix target) costs no hashing
        rows = np.flatnonzero(kinds == kind)
        mask[rows] = [unit_hash(seed, f"{uids[i]}|{kind}", "mix") < rate for i in rows]
    return mask


def select_training_block(batch, rates: dict[str, float], seed: int):
    """map_batches UDF (pyarrow): the training rows of a block, without the quarantine-only `reason` column."""
    table = batch.drop_columns(["reason"]) if "reason" in batch.column_names else batch
    if table.num_rows == 0 or "kind" not in table.column_names:
        return table
    return table.filter(training_mask(table.column("uid").to_pylist(), table.column("kind").to_pylist(),
                                      rates, seed))


# -------------------------------------------------------------------------------------------- summaries
def summarize_block(table, rates: dict[str, float], seed: int, batch_size: int, group_buffer_batches: int | None,
                    max_length: int):
    """(summary dict, quarantined rows as an Arrow table) of one block of examples."""
    import pyarrow as pa
    import pyarrow.compute as pc

    empty = pa.table({c: pa.array([], type=pa.int64() if c == "line" else pa.string()) for c in QUARANTINE_COLUMNS})
    if table.num_rows == 0 or "kind" not in table.column_names:
        return {"rows": 0}, empty
    uids, kinds = table.column("uid").to_pylist(), table.column("kind").to_pylist()
    keep = training_mask(uids, kinds, rates, seed)
    lengths = table.column("length").to_numpy().astype(np.int64)
    kind_array = np.asarray(kinds, dtype=object)
    hist = {kind: np.bincount(lengths[keep & (kind_array == kind)], minlength=max_length + 1).tolist()
            for kind in rates if (keep & (kind_array == kind)).any()}
    kept = lengths[keep][np.random.default_rng(seed).permutation(int(keep.sum()))]
    window = batch_size * group_buffer_batches if group_buffer_batches else None
    summary = {
        "rows": table.num_rows,
        "length_hist": hist,
        "real_tokens": int(kept.sum()),
        "padded_grouped": padded_tokens(kept, batch_size, window),
        "padded_random": padded_tokens(kept, batch_size, None),
        # a source row's examples are adjacent; a block boundary may cut through them (see `count_source_rows`)
        "distinct_uids": len(pc.unique(table.column("uid"))),
        "boundary_uids": sorted({uids[0], uids[-1]}),
    }
    bad = table.filter(pc.is_in(table.column("kind"), pa.array(BAD_KINDS)))
    return summary, bad.select(list(QUARANTINE_COLUMNS))


def count_source_rows(summaries: list[dict]) -> int:
    """Distinct uids over all blocks: a uid split across k blocks is a boundary uid of each and was counted k times."""
    from collections import Counter

    boundary = Counter(uid for s in summaries for uid in s.get("boundary_uids", ()))
    return sum(s.get("distinct_uids", 0) for s in summaries) - sum(c - 1 for c in boundary.values())


@functools.cache
def summarize_task():
    import ray

    return ray.remote(num_returns=2)(summarize_block)
