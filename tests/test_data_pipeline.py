"""The Ray Data pipeline end to end: readers on the shared files, quarantine, thresholds, `derta data prepare`."""
import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import shared_file
from derta.config import SourceConfig
from derta.data import DataQualityError, Tokenize, prepare_examples, write_prepared
from derta.data_read import _parse_part, file_parts, jsonl_pieces, parse_file
from derta.schema import RECORD_COLUMNS

pytestmark = pytest.mark.usefixtures("ray_session")


def _cfg(tiny_config, tiny_path, **data):
    data = tiny_config.data.model_copy(update=data)
    return tiny_config.model_copy(update={"data": data})


def _rows(examples):
    return examples.take_all()


def _sorted_rows(examples, **replace):
    rows = [dict(row, **replace) for batch in examples.iter_batches(batch_format="pyarrow", batch_size=None)
            for row in batch.to_pylist()]
    return sorted(rows, key=lambda row: json.dumps(row, sort_keys=True))


def test_reference_format(tiny_config, tiny_path, tmp_path):
    path = shared_file("derta-paper", "train", "example_data_to_read.jsonl")
    examples, counts = prepare_examples(_cfg(tiny_config, tiny_path), tiny_path, tmp_path, [str(path)])
    assert counts == {"helpful": 3, "rto": 1}  # safe="true" row -> RTO on the harmful text
    rto = next(r for r in _rows(examples) if r["kind"] == "rto")
    assert rto["line"] == 4 and sum(rto["rto_mask"]) > 20


def test_harmful_pairs_with_refusal_templates(tiny_config, tiny_path, tmp_path):
    path = shared_file("derta-paper", "train", "malicious_tuning_data_330.jsonl")
    cfg = _cfg(tiny_config, tiny_path, max_length=2048, mode="derta")
    examples, counts = prepare_examples(cfg, tiny_path, tmp_path, [str(path)])
    n_lines = sum(1 for line in path.read_text().splitlines() if line.strip())
    assert counts["harmful_prefix"] == counts["rto"] == n_lines
    assert counts.get("bad", 0) == 0


def test_jsonl_parquet_and_hf_disk_readers_agree(tiny_config, tiny_path, tmp_path):
    import datasets
    import pyarrow as pa

    rows = [{"instruction": f"What is {i} plus 1?", "response": f"{i} plus 1 is {i + 1}."} for i in range(20)]
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "a.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "hf"))
    results = {}
    for name in ("a.jsonl", "a.parquet", "hf"):
        examples, counts = prepare_examples(_cfg(tiny_config, tiny_path), tiny_path, tmp_path, [str(tmp_path / name)])
        results[name] = sorted((r["line"], tuple(r["input_ids"])) for r in _rows(examples))
        assert counts == {"helpful": 20}
    assert results["a.jsonl"] == results["a.parquet"] == results["hf"]


def test_chat_rows_and_column_mapping(tiny_config, tiny_path, tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "Hello."}]}) + "\n")
    mapped = tmp_path / "mapped.jsonl"
    mapped.write_text(json.dumps({"q": "How do I steal?", "bad": "Sure. Step 1: x."}) + "\n")
    cfg = _cfg(tiny_config, tiny_path, sources=[
        SourceConfig(path=str(path)),
        SourceConfig(path=str(mapped), columns={"instruction": "q", "harmful_response": "bad"})])
    examples, counts = prepare_examples(cfg, tiny_path, tmp_path)
    assert counts == {"helpful": 1, "harmful_prefix": 1, "rto": 1}


def _malformed_file(tmp_path):
    lines = [
        json.dumps({"instruction": "ok", "response": "fine"}),
        '{"instruction": "broken", ',                                   # bad JSON
        json.dumps({"instruction": "", "response": "x"}),               # empty field
        json.dumps({"instruction": ["list"], "response": "x"}),         # wrong type
        json.dumps({"instruction": "long", "response": "y" * 500}),     # over-long
        json.dumps({"something": "else"}),                              # unknown shape
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode() + b"\xff\xfe bad bytes\n")
    return path


@pytest.mark.parametrize("read", [{}, {"read_chunk_mb": 40 / 2**20, "tokenize_concurrency": 1}],
                         ids=["one_piece", "40_byte_pieces"])
def test_quarantine_names_file_line_and_reason(tiny_config, tiny_path, tmp_path, read):
    path = _malformed_file(tmp_path)
    cfg = _cfg(tiny_config, tiny_path, max_chars=200, max_bad_fraction=1.0, **read)
    stats = write_prepared(cfg, tiny_path, tmp_path / "out", [str(path)])
    quarantined = [json.loads(line) for line in (tmp_path / "out" / "quarantine.jsonl").read_text().splitlines()]
    by_line = {q["line"]: q for q in quarantined}
    assert set(by_line) == {2, 3, 4, 5, 6, 7}
    assert all(q["source"] == str(path) for q in quarantined)
    assert "bad JSON" in by_line[2]["reason"]
    assert "must not be empty" in by_line[3]["reason"]
    assert "field 'instruction'" in by_line[4]["reason"]
    assert "max_chars=200" in by_line[5]["reason"]
    assert "cannot tell the row kind" in by_line[6]["reason"]
    assert "not UTF-8" in by_line[7]["reason"]
    assert stats["quarantined"]["malformed"] == 6 and stats["examples_by_kind"] == {"helpful": 1}


def _tricky_jsonl(tmp_path):
    """Bad rows next to good ones, a blank line, a CRLF line, a long line, and a last line without a newline."""
    def helpful(i):
        return json.dumps({"instruction": f"What is {i} plus 1?", "response": f"{i} plus 1 is {i + 1}."}).encode()

    lines = [helpful(1), b'{"instruction": "broken", ', b"\xff\xfe not UTF-8", helpful(4), b"",
             json.dumps({"instruction": "How do I pick a lock?", "harmful_response": "Sure. Step 1: x."}).encode(),
             helpful(7) + b"\r", b"[1, 2", json.dumps({"instruction": "long " * 40, "response": "ok"}).encode(),
             helpful(10), b"{}", helpful(12)]
    path = tmp_path / "tricky.jsonl"
    path.write_bytes(b"\n".join(lines))
    return path


def test_jsonl_pieces_read_the_same_rows_and_lines_as_the_whole_file(tmp_path):
    path = _tricky_jsonl(tmp_path)
    data = path.read_bytes()
    whole = parse_file(str(path), data, "jsonl")
    assert [row["line"] for row in whole] == [1, 2, 3, 4, 6, 7, 8, 9, 10, 11, 12]  # line 5 is blank
    assert [row["line"] for row in whole if row["error"]] == [2, 3, 8]
    part = {"source": str(path), "file": str(path), "format": "jsonl", "source_index": 0}
    for piece_bytes in range(1, len(data) + 2):  # every possible boundary, bad lines included
        pieces = jsonl_pieces(str(path), piece_bytes)
        assert pieces[0][0] == 0 and pieces[-1][1] == len(data)
        assert all(before[1] == after[0] for before, after in zip(pieces, pieces[1:]))
        rows = [row for start, end, first_line in pieces
                for row in _parse_part(dict(part, start=start, end=end, first_line=first_line))]
        assert rows == whole, piece_bytes
    compressed = tmp_path / "tricky.jsonl.gz"
    compressed.write_bytes(gzip.compress(data))
    gz_rows = _parse_part(dict(part, file=str(compressed), start=0, end=-1, first_line=1))  # a whole-file part
    assert gz_rows == whole


def _kinds_by_line(examples):
    return sorted((row["line"], row["kind"], row["reason"]) for row in _rows(examples))


def test_split_gzip_and_uri_reads_give_the_same_examples(tiny_config, tiny_path, tmp_path):
    path = _tricky_jsonl(tmp_path)
    compressed = tmp_path / "tricky.jsonl.gz"
    compressed.write_bytes(gzip.compress(path.read_bytes()))
    one_piece = _cfg(tiny_config, tiny_path, read_chunk_mb=1.0)
    split = _cfg(tiny_config, tiny_path, read_chunk_mb=100 / 2**20)
    assert len(file_parts([SourceConfig(path=str(path))], 1 << 20)[0]) == 1
    assert len(file_parts([SourceConfig(path=str(path))], 100)[0]) >= 6
    assert len(file_parts([SourceConfig(path=str(compressed))], 100)[0]) == 1  # compressed: one task

    reference, counts = prepare_examples(one_piece, tiny_path, tmp_path, [str(path)])
    assert counts == {"helpful": 6, "harmful_prefix": 1, "rto": 1, "bad": 4}  # `{}`: unknown row shape
    expected = _sorted_rows(reference)
    assert _sorted_rows(prepare_examples(split, tiny_path, tmp_path, [str(path)])[0]) == expected
    uri = prepare_examples(split, tiny_path, tmp_path, [f"local://{path}"])[0]  # Ray Data's file reader
    assert _sorted_rows(uri) == expected
    # uid (file:line) seeds the DeRTa prefix and refusal choices, so the .gz file's examples differ in content
    gz = prepare_examples(split, tiny_path, tmp_path, [str(compressed)])[0]
    assert _kinds_by_line(gz) == _kinds_by_line(reference)


def test_pieces_with_only_blank_lines_yield_nothing(tiny_config, tiny_path, tmp_path):
    row = json.dumps({"instruction": "What is 2 plus 2?", "response": "4."})
    path = tmp_path / "blank.jsonl"
    path.write_text(row + "\n" * 301 + row + "\n")
    split = _cfg(tiny_config, tiny_path, read_chunk_mb=100 / 2**20)
    assert len(file_parts([SourceConfig(path=str(path))], 100)[0]) >= 3
    examples, counts = prepare_examples(split, tiny_path, tmp_path, [str(path)])
    assert counts == {"helpful": 2} and sorted(r["line"] for r in _rows(examples)) == [1, 302]


def test_bad_fraction_threshold_fails_clearly(tiny_config, tiny_path, tmp_path):
    cfg = _cfg(tiny_config, tiny_path, max_chars=200, max_bad_fraction=0.5)
    with pytest.raises(DataQualityError, match=r"6 of 7 source rows are malformed .*max_bad_fraction"):
        write_prepared(cfg, tiny_path, tmp_path / "out", [str(_malformed_file(tmp_path))])
    assert (tmp_path / "out" / "quarantine.jsonl").exists()  # written before failing


def test_no_loss_rows_are_reported_not_trained(tiny_config, tiny_path, tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text(json.dumps({"instruction": "word " * 300, "response": "ok"}) + "\n"
                    + json.dumps({"instruction": "short", "response": "ok"}) + "\n")
    stats = write_prepared(_cfg(tiny_config, tiny_path, max_bad_fraction=1.0), tiny_path, tmp_path / "o", [str(path)])
    assert stats["quarantined"]["no_loss_tokens"] == 1 and stats["examples_by_kind"] == {"helpful": 1}
    reason = json.loads((tmp_path / "o" / "quarantine.jsonl").read_text().splitlines()[0])["reason"]
    assert "no loss tokens" in reason and "max_length=256" in reason


def test_prepare_synthetic_default_and_mix(tiny_config, tiny_path, tmp_path):
    cfg = _cfg(tiny_config, tiny_path, mix=tiny_config.data.mix.model_copy(update={"helpful": 500}))
    stats = write_prepared(cfg, tiny_path, tmp_path / "prep")
    kinds = stats["examples_by_kind"]
    assert 400 < kinds["helpful"] < 600 and kinds["rto"] == kinds["harmful_prefix"] > 0
    table = pq.read_table(tmp_path / "prep" / "examples")
    assert {"input_ids", "labels", "rto_mask", "kind", "source", "line"} <= set(table.column_names)
    assert table.num_rows == sum(kinds.values())
    assert stats["padding_waste"]["length_grouped"] < stats["padding_waste"]["random_batches"]
    assert json.loads((tmp_path / "prep" / "stats.json").read_text())["mode"] == "derta"


def _record(line, **fields):
    return dict.fromkeys(RECORD_COLUMNS) | {"uid": f"f.jsonl:{line}", "source": "f.jsonl", "line": line} | fields


def test_tokenize_batch_quarantines_bad_rows_like_single_rows(tiny_config, tiny_path):
    records = [
        _record(1, kind="helpful", instruction="What is 2 plus 2?", response="4."),
        _record(2, kind="bad", error="helpful row: field 'response': must not be empty"),  # from normalize
        _record(3, kind="safety", instruction="How do I pick a lock?", harmful_response="Sure. Step 1: x."),
        _record(4, kind="chat", messages="{not json"),                  # the renderer rejects it
        _record(5, kind="helpful", instruction="hi", response=None),    # the tokenizer rejects it
        _record(6, kind="helpful", instruction="word " * 300, response="ok"),  # no loss tokens after truncation
    ]
    tokenize = Tokenize(tiny_path, tiny_config.data.model_dump(), "derta")
    batched = tokenize({c: [r[c] for r in records] for c in RECORD_COLUMNS}).to_pylist()
    one_by_one = [row for r in records for row in tokenize({c: [r[c]] for c in RECORD_COLUMNS}).to_pylist()]
    assert batched == one_by_one
    assert [(row["line"], row["kind"]) for row in batched] == [
        (1, "helpful"), (2, "bad"), (3, "harmful_prefix"), (3, "rto"), (4, "bad"), (5, "bad"), (6, "no_loss")]
    reasons = {row["line"]: row["reason"] for row in batched if row["reason"]}
    assert reasons[2] == "helpful row: field 'response': must not be empty"
    assert reasons[4].startswith("cannot tokenize: JSONDecodeError")
    assert reasons[5].startswith("cannot tokenize: ValueError")
    assert "no loss tokens" in reasons[6]


def _parquet_corpus(tmp_path):
    import pyarrow as pa

    rows = [{"instruction": f"What is {i} plus 1?", "response": f"{i} plus 1 is {i + 1}." if i % 7 else ""}
            for i in range(40)]  # every 7th row is malformed (empty response)
    path = tmp_path / "rows.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)
    return path


def test_parquet_row_group_pieces_read_the_same_rows_and_lines_as_the_whole_file(tmp_path):
    from derta.data_read import parquet_pieces

    path = _parquet_corpus(tmp_path)
    whole = parse_file(str(path), path.read_bytes(), "parquet")
    assert [row["line"] for row in whole] == list(range(1, 41))
    part = {"source": str(path), "file": str(path), "format": "parquet", "source_index": 0}
    for piece_bytes in (1, 100, 300, 1 << 20):
        pieces = parquet_pieces(str(path), piece_bytes)
        assert pieces[0][:1] == (0,) and pieces[-1][1] == 14 and len(pieces) <= 14
        assert all(before[1] == after[0] for before, after in zip(pieces, pieces[1:]))
        rows = [row for start, end, first in pieces for row in _parse_part(dict(part, start=start, end=end,
                                                                                first_line=first))]
        assert rows == whole, piece_bytes
    assert len(parquet_pieces(str(path), 1)) == 14  # one row group per piece
    for uri in (str(path), f"file://{path}"):
        assert len(file_parts([SourceConfig(path=uri)], 1)[0]) == 14
    (tmp_path / "broken.parquet").write_bytes(b"not parquet")
    broken = file_parts([SourceConfig(path=str(tmp_path / "broken.parquet"))], 1)[0]
    assert len(broken) == 1 and "unreadable parquet" in _parse_part(broken[0])[0]["error"]


def test_split_parquet_gives_the_same_examples(tiny_config, tiny_path, tmp_path):
    path = _parquet_corpus(tmp_path)
    whole, counts = prepare_examples(_cfg(tiny_config, tiny_path), tiny_path, tmp_path, [str(path)])
    assert counts == {"helpful": 34, "bad": 6}
    split = _cfg(tiny_config, tiny_path, read_chunk_mb=1 / 2**20)
    expected = _sorted_rows(whole)
    assert _sorted_rows(prepare_examples(split, tiny_path, tmp_path, [str(path)])[0]) == expected
    uri = _sorted_rows(prepare_examples(split, tiny_path, tmp_path, [f"file://{path}"])[0], source=None, uid=None)
    assert uri == sorted(_sorted_rows(whole, source=None, uid=None), key=lambda r: json.dumps(r, sort_keys=True))
