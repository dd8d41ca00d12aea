"""Prepared Parquet is plain: list<int32> id columns, string kind, no all-null columns; HF datasets and pandas read
it back as lists of ints."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from derta.plain_parquet import INT32_LIST, plain_block


def ray_tensor_table(rows: list[list[int]]) -> pa.Table:
    """What Ray Data's numpy batches turn ragged id lists into: its variable-shaped tensor extension type."""
    from ray.data._internal.tensor_extensions.arrow import ArrowTensorArray

    arrays = np.empty(len(rows), dtype=object)
    arrays[:] = [np.asarray(r, dtype=np.int64) for r in rows]
    column = ArrowTensorArray.from_numpy(arrays)
    return pa.table({"input_ids": column, "labels": column, "rto_mask": column,
                     "kind": pa.array(["helpful", "rto", "harmful_prefix"]),
                     "category": pa.array([np.nan, np.nan, np.nan]), "length": pa.array([2, 3, 1], pa.int32())})


def test_plain_block_turns_tensor_extensions_into_int32_lists(tmp_path):
    rows = [[5, 6], [128009, -100, 7], [1]]
    table = ray_tensor_table(rows)
    assert isinstance(table.column("input_ids").type, pa.ExtensionType)
    plain = plain_block(table, drop=("category",))
    assert plain.column_names == ["input_ids", "labels", "rto_mask", "kind", "length"]
    for name in ("input_ids", "labels", "rto_mask"):
        assert plain.column(name).type == INT32_LIST and plain.column(name).to_pylist() == rows
    assert plain.column("kind").type == pa.string()
    pq.write_table(plain, tmp_path / "part.parquet")

    import datasets
    import pandas as pd

    hf = datasets.load_dataset("parquet", data_files=str(tmp_path / "part.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert hf.features["input_ids"].feature.dtype == "int32" and hf[1]["labels"] == rows[1]
    frame = pd.read_parquet(tmp_path / "part.parquet")
    assert [list(v) for v in frame["input_ids"]] == rows and frame["kind"].tolist()[1] == "rto"


def test_nan_category_becomes_a_null_string_column():
    plain = plain_block(ray_tensor_table([[1], [2], [3]]))
    assert plain.column("category").type == pa.string() and plain.column("category").null_count == 3
