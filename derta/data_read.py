"""Reading corpus files into raw rows and canonical records (the first half of `derta.data`'s pipeline).

    local JSONL    -> byte ranges of ~read_chunk_mb split at line starts (`jsonl_pieces`)
    local Parquet  -> runs of row groups of ~read_chunk_mb (`parquet_pieces`)
    other files    -> whole files, through Ray Data's `read_binary_files` (`read_remote`)
    each piece     -> raw rows {source, line, raw, error} -> `normalize_batch` -> canonical records (`derta.schema`)

Line numbers travel with every row so a bad row is reported as file:line.
"""
from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from derta.config import ConfigError, DataConfig, SourceConfig
from derta.schema import RECORD_COLUMNS, normalize_record

RAW_COLUMNS = ("source", "line", "raw", "error", "source_index")
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4", ".br")  # what Arrow (and Ray Data's readers) decompress


def _types():
    import pyarrow as pa

    ints = pa.list_(pa.int32())
    raw = {"line": pa.int64(), "source_index": pa.int64()}
    record = {"line": pa.int64(), "target_harmful": pa.bool_()}
    example = {"line": pa.int64(), "input_ids": ints, "labels": ints, "rto_mask": pa.list_(pa.int8()),
               "length": pa.int32(), "num_loss_tokens": pa.int32(), "prefix_len": pa.int32()}
    return raw, record, example


RAW_TYPES, RECORD_TYPES, EXAMPLE_TYPES = _types()


def detect_format(path: Path) -> str:
    if path.is_dir():
        return "hf_disk" if (path / "state.json").exists() else "dir"
    suffix = "".join(path.suffixes[-2:]) if path.suffix == ".gz" else path.suffix
    if suffix in (".jsonl", ".json", ".jsonl.gz", ".ndjson"):
        return "jsonl"
    if suffix == ".parquet":
        return "parquet"
    raise ConfigError(f"{path}: unknown file type {path.suffix!r}; expected .jsonl, .json, .parquet, "
                      "or a directory of them / an HF save_to_disk directory (set `format` to override)")


def expand_source(source: SourceConfig) -> list[tuple[str, str]]:
    """(file path, format) pairs for one configured source."""
    if "://" in source.path:  # object store URI (s3://, gs://, ...): Ray Data reads it on the workers
        fmt = source.format if source.format != "auto" else detect_format(Path(source.path.split("://", 1)[1]))
        return [(source.path, fmt)]
    path = Path(os.path.expanduser(source.path))
    if not path.exists():
        raise ConfigError(f"data source not found: {source.path}")
    fmt = source.format if source.format != "auto" else detect_format(path)
    if fmt == "dir":
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".jsonl", ".json", ".parquet"))
        if not files:
            raise ConfigError(f"{path}: directory has no .jsonl/.json/.parquet files")
        return [(str(p), detect_format(p)) for p in files]
    if fmt == "hf_disk":
        state = json.loads((path / "state.json").read_text())
        return [(str(path / f["filename"]), "arrow") for f in state["_data_files"]]
    return [(str(path), fmt)]


def parse_file(path: str, data: bytes, fmt: str) -> list[dict]:
    """Raw rows of one file: {source, line, raw} or {source, line, error}. Lines/rows are 1-based."""
    if fmt == "jsonl":
        return list(_parse_jsonl(path, data))
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        if fmt == "parquet":
            table = pq.read_table(io.BytesIO(data))
        else:
            table = pa.ipc.open_stream(io.BytesIO(data)).read_all()
    except Exception as err:  # noqa: BLE001 - any unreadable file becomes one quarantined row
        return [{"source": path, "line": 0, "raw": None, "error": f"unreadable {fmt} file: {err}"}]
    return _table_rows(path, table)


def parquet_row_groups(path: str, file: str, groups, first_line: int) -> list[dict]:
    """Raw rows of some row groups of a Parquet file; `first_line` is the 1-based file row of the first one."""
    import pyarrow.parquet as pq

    try:
        table = _parquet_file(file).read_row_groups(list(groups))
    except Exception as err:  # noqa: BLE001 - an unreadable piece becomes one quarantined row
        return [{"source": path, "line": first_line, "raw": None, "error": f"unreadable parquet row groups "
                                                                            f"{groups.start}-{groups.stop - 1}: {err}"}]
    return _table_rows(path, table, first_line)


def _arrow_filesystem(uri: str):
    """(pyarrow filesystem, path) for a URI pyarrow can open (s3://, gs://, hdfs://, file://), else None."""
    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(uri)
    except Exception:  # noqa: BLE001 - unknown scheme or missing credentials: Ray Data's reader handles it
        return None


def _parquet_file(file: str):
    import pyarrow.parquet as pq

    if "://" not in file:
        return pq.ParquetFile(file)
    filesystem, path = _arrow_filesystem(file)
    return pq.ParquetFile(filesystem.open_input_file(path))


def _table_rows(path: str, table, first_line: int = 1) -> list[dict]:
    return [{"source": path, "line": first_line + i, "raw": json.dumps(row, default=str), "error": None}
            for i, row in enumerate(table.to_pylist())]


def _parse_jsonl(path: str, data: bytes, first_line: int = 1):
    for number, line in enumerate(data.split(b"\n"), start=first_line):
        if not line.strip():
            continue
        row = {"source": path, "line": number, "raw": None, "error": None}
        try:
            text = line.decode("utf-8")
            json.loads(text)
            row["raw"] = text
        except UnicodeDecodeError as err:
            row["error"] = f"not UTF-8: {err}"
        except json.JSONDecodeError as err:
            row["error"] = f"bad JSON: {err.msg} at column {err.colno}"
        yield row


def jsonl_pieces(path: str, piece_bytes: int) -> list[tuple[int, int, int]]:
    """(start, end, first_line) byte ranges covering an uncompressed JSONL file, each about `piece_bytes` long.

    Every range but the last ends just after a newline, so no line is split and the 1-based number of a range's
    first line is one more than the newlines before it. This pass reads the file once on the driver (0.25 s for
    400 MB from the page cache, else disk speed); the workers then read only their own range.
    """
    size = os.path.getsize(path)
    pieces, start, first_line, offset, newlines = [], 0, 1, 0, 0
    with open(path, "rb") as f:
        while block := f.read(piece_bytes):
            count = block.count(b"\n")
            cut = block.rfind(b"\n")
            if cut >= 0 and offset + len(block) < size:  # the last block stays with the current piece
                end = offset + cut + 1
                pieces.append((start, end, first_line))
                start, first_line = end, newlines + count + 1
            newlines += count
            offset += len(block)
    pieces.append((start, size, first_line))
    return pieces


def file_parts(sources: list[SourceConfig], piece_bytes: int) -> tuple[list[dict], list[tuple[str, str, int]]]:
    """Read tasks (one per JSONL piece, Parquet row-group run or other local file) and the object-store files left
    to Ray Data's reader (path, format, source)."""
    parts, remote = [], []
    for index, source in enumerate(sources):
        for path, fmt in expand_source(source):
            if "://" in path and not (fmt == "parquet" and _arrow_filesystem(path)):
                remote.append((path, fmt, index))
                continue
            part = {"source": path, "file": path if "://" in path else os.path.abspath(path), "format": fmt,
                    "source_index": index,
                    "start": 0, "end": -1, "first_line": 1}  # end -1: the whole file
            if fmt == "jsonl" and not path.endswith(COMPRESSED_SUFFIXES):
                parts += [dict(part, start=start, end=end, first_line=first_line)
                          for start, end, first_line in jsonl_pieces(path, piece_bytes)]
            elif fmt == "parquet":
                pieces = parquet_pieces(path, piece_bytes)
                if "://" in path and pieces[0][1] < 0:  # footer unreadable here: Ray Data's reader reports it
                    remote.append((path, fmt, index))
                    continue
                parts += [dict(part, start=start, end=end, first_line=first_line)
                          for start, end, first_line in pieces]
            else:
                parts.append(part)
    return parts, remote


def parquet_pieces(path: str, piece_bytes: int) -> list[tuple[int, int, int]]:
    """(first row group, end row group, first row) ranges of a Parquet file, each about `piece_bytes` of
    uncompressed data (a row group is the smallest unit Parquet reads; a file of one row group is one piece).
    Reads only the footer. An unreadable file stays one whole-file piece, quarantined by the worker."""
    import pyarrow.parquet as pq

    try:
        metadata = _parquet_file(path).metadata
    except Exception:  # noqa: BLE001 - parse_file reports it with the reason
        return [(0, -1, 1)]
    pieces, start, first_row, rows, size = [], 0, 1, 0, 0
    for group in range(metadata.num_row_groups):
        rows += metadata.row_group(group).num_rows
        size += metadata.row_group(group).total_byte_size
        if size >= piece_bytes or group == metadata.num_row_groups - 1:
            pieces.append((start, group + 1, first_row))
            start, first_row, size = group + 1, rows + 1, 0
    return pieces or [(0, -1, 1)]


def read_parts(batch: dict):
    """map_batches UDF: raw rows of the file parts in `batch` (rows from `file_parts`)."""
    rows = []
    for i in range(len(batch["file"])):
        part = {column: _scalar(values[i]) for column, values in batch.items()}
        rows += [dict(row, source_index=part["source_index"]) for row in _parse_part(part)]
    return _raw_table(rows)


def _parse_part(part: dict) -> list[dict]:
    import pyarrow as pa

    if part["format"] == "parquet" and part["end"] >= 0:  # a range of row groups
        return parquet_row_groups(part["source"], part["file"], range(part["start"], part["end"]),
                                  part["first_line"])
    if part["end"] < 0:  # Arrow decompresses by file extension, as Ray Data's file readers do
        with pa.input_stream(part["file"], compression="detect") as stream:
            return parse_file(part["source"], stream.read(), part["format"])
    with open(part["file"], "rb") as f:
        f.seek(part["start"])
        data = f.read(part["end"] - part["start"])
    return list(_parse_jsonl(part["source"], data, first_line=part["first_line"]))


def parse_binary_files(batch: dict, fmt: str, source_index: int):
    """map_batches UDF after `read_binary_files` (object-store files): raw rows, one file per input row."""
    rows = [dict(row, source_index=source_index)
            for path, data in zip(batch["path"], batch["bytes"]) for row in parse_file(str(path), data, fmt)]
    return _raw_table(rows)


def _raw_table(rows: list[dict]):
    return _arrow({column: [row[column] for row in rows] for column in RAW_COLUMNS}, RAW_TYPES)


def read_remote(data: DataConfig, remote: list[tuple[str, str, int]]):
    """A Ray Dataset of raw rows of the object-store files `file_parts` leaves to Ray Data's reader (URIs pyarrow
    cannot split: one task per file). Local files and splittable Parquet URIs never come here: they are pieces
    (`derta.data_pieces`)."""
    import ray

    datasets = [ray.data.read_binary_files(path, include_paths=True).map_batches(
        parse_binary_files, fn_kwargs={"fmt": fmt, "source_index": index}, **_map_args(data))
        for path, fmt, index in remote]
    return datasets[0].union(*datasets[1:]) if len(datasets) > 1 else datasets[0]


def _map_args(data: DataConfig) -> dict:
    """Identical options for every map step, so Ray Data fuses read -> normalize -> tokenize into one task per file.

    No `batch_size` here: Ray Data turns it into a minimum number of input rows per task, which for the fused
    steps means files, and would pack many files into one task. `tokenize_blocks` batches by itself.
    """
    import ray

    return {"batch_size": None, "compute": ray.data.TaskPoolStrategy(size=data.tokenize_concurrency),
            "num_cpus": 1}


def normalize_batch(batch: dict, sources: list[dict], max_chars: int) -> dict:
    out = {column: [] for column in RECORD_COLUMNS}
    for i in range(len(batch["source"])):
        source = sources[int(batch["source_index"][i])]
        error = _present(batch["error"][i])
        if error is not None:
            record = dict.fromkeys(RECORD_COLUMNS)
            record["error"] = error
        else:
            record = normalize_record(json.loads(batch["raw"][i]), kind=source["kind"], columns=source["columns"],
                                      instruction_regex=source["instruction_regex"],
                                      strip_suffixes=source["strip_suffixes"], max_chars=max_chars)
        record.update(source=batch["source"][i], line=int(batch["line"][i]))
        record["uid"] = f"{record['source']}:{record['line']}"
        if record["error"]:
            record["kind"] = "bad"
        for column in RECORD_COLUMNS:
            out[column].append(record[column])
    return _arrow(out, RECORD_TYPES)


def _arrow(columns: dict, types: dict):
    """Typed Arrow batch: an all-null column must stay a string column, not become float NaN."""
    import pyarrow as pa

    return pa.table({name: pa.array(values, type=types.get(name, pa.string())) for name, values in columns.items()})


def read_records(data: DataConfig, sources: list[SourceConfig], remote: list[tuple[str, str, int]]):
    """Canonical records (with `error` on bad rows) of the `remote` files, as a Ray Dataset."""
    source_dicts = [s.model_dump() for s in sources]
    return read_remote(data, remote).map_batches(
        normalize_batch, fn_kwargs={"sources": source_dicts, "max_chars": data.max_chars}, **_map_args(data))


def _present(value):
    """None for missing values, which Ray may hand over as None or (all-null column) float NaN."""
    if value is None or (isinstance(value, (float, np.floating)) and np.isnan(value)):
        return None
    return value


def _scalar(value):
    return value.item() if hasattr(value, "item") and not isinstance(value, (list, str)) else value
