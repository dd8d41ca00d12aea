"""Training-side data: the prepared Parquet -> each Ray Train worker's rows, batches and tensors.

Determinism is the point of this module: the same prepared data, seed and number of workers give every rank the
same rows in the same batches, in every run and after every restart (a run resumed from a checkpoint skips the
batches it already trained by index, so it must see exactly the batches of its first run).

- **Split**: the prepared Parquet files, sorted by name, are one global row sequence; rank r of W reads rows
  [r * N // W ... (r + 1) * N // W) (N // W rows each, the remainder dropped as Ray's equal split does), taking only
  the row groups overlapping its range. This depends on the rows alone, not on how the files cut them into row
  groups, nor on the cluster's CPUs or on timing, which decide how Ray Data's `streaming_split` hands blocks to
  workers (the reason the training loop does not ingest through `get_dataset_shard`).
- **Order**: a seeded shuffle buffer per epoch (`shuffled`, seed and epoch), then length grouping
  (`derta.batching`): a new order every epoch, the same order when an epoch is re-run.
- **Memory**: a worker holds one Parquet record batch plus its shuffle buffer, never its whole share.

The files must be readable by every worker (a local run, or the run's output on shared storage, as checkpoints).
"""
from __future__ import annotations

import random
from pathlib import Path

from derta.batching import grouped_batches

# rows a worker shuffles together, in length-grouping windows (batch_size * group_buffer_batches rows each)
SHUFFLE_BUFFER_WINDOWS = 8
TRAIN_COLUMNS = ("uid", "kind", "input_ids", "labels", "rto_mask")
READ_BATCH_ROWS = 1024


def prepare_training_data(config, tokenizer_path: str, output: Path) -> dict:
    """Prepare the examples once into `output` (Parquet + stats.json + quarantine.jsonl, as `derta data prepare`
    writes them; content-addressed, so an unchanged corpus is reused) and return the stats; `stats["examples_dir"]`
    is what the workers stream every epoch."""
    from derta.data import write_prepared
    from derta.datacache import cached_prepare

    return cached_prepare(write_prepared, config, tokenizer_path, output)


def parquet_files(examples_dir: str | Path) -> list[Path]:
    files = sorted(Path(examples_dir).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{examples_dir}: no prepared .parquet files")
    return files


def count_rows(examples_dir: str | Path) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(file).metadata.num_rows for file in parquet_files(examples_dir))


def rank_pieces(examples_dir: str | Path, rank: int, world: int) -> list[tuple[str, int, int, int]]:
    """(file, row group, first row, end row) pieces, rows relative to the row group, covering rank's share
    [rank * N // world, (rank + 1) * N // world) of the global row sequence. Reads only the files' footers."""
    import pyarrow.parquet as pq

    groups = []
    for file in parquet_files(examples_dir):
        metadata = pq.ParquetFile(file).metadata
        groups += [(str(file), g, metadata.row_group(g).num_rows) for g in range(metadata.num_row_groups)]
    share = sum(rows for _, _, rows in groups) // world
    lo, hi = rank * share, (rank + 1) * share
    pieces, offset = [], 0
    for file, group, rows in groups:
        start, end = max(lo, offset), min(hi, offset + rows)
        if start < end:
            pieces.append((file, group, start - offset, end - offset))
        offset += rows
    return pieces


def rank_rows(pieces: list[tuple[str, int, int, int]], columns=TRAIN_COLUMNS):
    """Stream the rows (dicts) of `pieces` in order, one record batch of READ_BATCH_ROWS at a time."""
    import pyarrow.parquet as pq

    for file, group, start, end in pieces:
        position = 0
        parquet = pq.ParquetFile(file)
        names = [c for c in columns if c in parquet.schema_arrow.names]
        for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS, row_groups=[group], columns=names):
            lo, hi = max(start - position, 0), min(end - position, batch.num_rows)
            if lo < hi:
                yield from batch.slice(lo, hi - lo).to_pylist()
            position += batch.num_rows
            if position >= end:
                break


def shuffled(rows, buffer_size: int, seed: int):
    """A seeded streaming shuffle: fill a buffer of `buffer_size` rows, then emit a random buffered row per row
    read (the buffer drains at the end). Same rows and seed -> same order."""
    rng = random.Random(seed)
    buffer: list = []
    for row in rows:
        if len(buffer) < buffer_size:
            buffer.append(row)
            continue
        index = rng.randrange(buffer_size)
        buffer[index], row = row, buffer[index]
        yield row
    rng.shuffle(buffer)
    yield from buffer


def epoch_batches(pieces, batch_size: int, group_buffer_batches: int, seed: int, epoch: int):
    """One epoch of length-grouped batches (lists of row dicts) of this rank's `pieces` (`rank_pieces`)."""
    window = batch_size * group_buffer_batches
    rows = shuffled(rank_rows(pieces), window * SHUFFLE_BUFFER_WINDOWS, seed * 100_003 + epoch)
    return grouped_batches(rows, batch_size, group_buffer_batches, seed=seed + epoch)
