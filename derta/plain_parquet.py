"""Prepared examples as Parquet any tool reads: `input_ids`, `labels`, `rto_mask` as plain `list<int32>`, `kind`
and the other text columns as strings, no all-null columns.

Ray Data hands numpy batches back as its own tensor extension types (a `{data, shape}` struct of int64 that
HF `datasets`, pandas, DuckDB and polars see as a struct); `plain_block` turns them back into plain Arrow lists.
"""
from __future__ import annotations

import numpy as np
import pyarrow as pa

ID_LISTS = ("input_ids", "labels", "rto_mask")
INT32_LIST = pa.list_(pa.int32())


def _list_storage(chunk: pa.Array) -> pa.Array:
    """The plain list array under a Ray tensor extension array (variable- or fixed-shape), or the array itself."""
    if isinstance(chunk.type, pa.ExtensionType):
        chunk = chunk.storage
    if pa.types.is_struct(chunk.type):  # variable-shaped tensors: struct<data: list<...>, shape: list<int64>>
        chunk = chunk.field("data")
    return chunk


def int32_lists(column: pa.ChunkedArray | pa.Array) -> pa.ChunkedArray:
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    return pa.chunked_array([_list_storage(chunk).cast(INT32_LIST) for chunk in chunks], type=INT32_LIST)


def _text(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """A string column; float NaN (what an all-null object column becomes) is null."""
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return column
    values = [None if v is None or (isinstance(v, float) and np.isnan(v)) else str(v) for v in column.to_pylist()]
    return pa.chunked_array([pa.array(values, type=pa.string())])


def plain_block(table: pa.Table, text_columns: tuple[str, ...] = ("uid", "source", "kind", "category"),
                drop: tuple[str, ...] = ()) -> pa.Table:
    columns = {}
    for name in table.column_names:
        if name in drop:
            continue
        column = table.column(name)
        if name in ID_LISTS:
            column = int32_lists(column)
        elif name in text_columns:
            column = _text(column)
        columns[name] = column
    return pa.table(columns)


def null_only_columns(dataset, columns: tuple[str, ...]) -> tuple[str, ...]:
    """Which of `columns` hold no value in any row of a (materialized) Ray dataset; scans only those columns."""
    present = [c for c in columns if c in dataset.columns()]
    seen = set()
    for batch in dataset.select_columns(present).iter_batches(batch_format="pyarrow", batch_size=None):
        for name in present:
            if name not in seen and _text(batch.column(name)).null_count < batch.num_rows:
                seen.add(name)
        if len(seen) == len(present):
            break
    return tuple(c for c in present if c not in seen)


def write_plain_parquet(dataset, directory: str, drop: tuple[str, ...] = ()) -> None:
    """`dataset.write_parquet` with plain column types (see the module docstring); all-null text columns dropped."""
    drop = tuple(drop) + null_only_columns(dataset, ("category",))
    dataset.map_batches(plain_block, fn_kwargs={"drop": drop}, batch_format="pyarrow",
                        batch_size=None).write_parquet(directory)
