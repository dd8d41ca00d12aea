"""Length-grouped batching: sort a window of rows by length, cut batches, shuffle batch order.

Padding only to the longest row of each batch (rounded up to `pad_multiple`), never to the block size.
`derta.train_data.epoch_batches` feeds the training loop: each rank's rows of the prepared Parquet, a seeded shuffle
that differs per epoch, then length grouping within windows.
"""
from __future__ import annotations

import numpy as np
import torch

from derta.transforms import IGNORE_INDEX


def plan_batches(lengths: list[int], batch_size: int, group_buffer_batches: int | None,
                 seed: int = 0, drop_last: bool = True) -> list[list[int]]:
    """Index lists, one per batch, over `lengths` in order (full batches only unless drop_last=False)."""
    window = batch_size * group_buffer_batches if group_buffer_batches else batch_size
    rng = np.random.default_rng(seed)
    batches = []
    last_start = len(lengths) - batch_size + 1 if drop_last else len(lengths)
    for start in range(0, max(last_start, 0), window):
        idx = np.arange(start, min(start + window, len(lengths)))
        if group_buffer_batches:
            idx = idx[np.argsort([lengths[i] for i in idx], kind="stable")]
        stop = len(idx) - batch_size + 1 if drop_last else len(idx)
        chunk = [idx[i:i + batch_size].tolist() for i in range(0, max(stop, 0), batch_size)]
        rng.shuffle(chunk)
        batches.extend(chunk)
    return batches


def collate(rows: list[dict], pad_id: int, pad_multiple: int = 1) -> dict[str, torch.Tensor]:
    longest = max(len(r["input_ids"]) for r in rows)
    width = -(-longest // pad_multiple) * pad_multiple
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    rto_mask = torch.zeros((len(rows), width), dtype=torch.bool)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[i, :n] = torch.tensor(row["input_ids"])
        labels[i, :n] = torch.tensor(row["labels"])
        rto_mask[i, :n] = torch.tensor(row["rto_mask"], dtype=torch.bool)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "rto_mask": rto_mask, "attention_mask": attention_mask}


def grouped_batches(row_iter, batch_size: int, group_buffer_batches: int, seed: int = 0):
    """Stream rows -> length-grouped batches (lists of rows). The trailing partial window still yields
    its full batches; leftover rows that cannot fill a batch are dropped (drop_last)."""
    window = batch_size * group_buffer_batches
    buffer: list[dict] = []
    round_ = 0
    for row in row_iter:
        buffer.append(row)
        if len(buffer) == window:
            yield from _emit(buffer, batch_size, group_buffer_batches, seed + round_)
            buffer, round_ = [], round_ + 1
    if buffer:
        yield from _emit(buffer, batch_size, group_buffer_batches, seed + round_)


def _emit(buffer, batch_size, group_buffer_batches, seed):
    for batch in plan_batches([len(r["input_ids"]) for r in buffer], batch_size, group_buffer_batches, seed):
        yield [buffer[i] for i in batch]
