"""Each training worker's rows of the prepared Parquet: a deterministic split, a new order every epoch, the same
batches when an epoch is re-run, whatever the file / row-group layout of the same rows."""
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from derta.train_data import count_rows, epoch_batches, rank_pieces, rank_rows, shuffled


def _write(directory: Path, rows: list[dict], files: int, row_group_size: int) -> Path:
    directory.mkdir(parents=True)
    per_file = -(-len(rows) // files)
    for index in range(files):
        table = pa.Table.from_pylist(rows[index * per_file:(index + 1) * per_file])
        pq.write_table(table, directory / f"part_{index:06d}.parquet", row_group_size=row_group_size)
    return directory


def _rows(n: int) -> list[dict]:
    return [{"uid": f"u{i}", "kind": "helpful", "input_ids": list(range(1 + i % 23)), "labels": [0] * (1 + i % 23),
             "rto_mask": [0] * (1 + i % 23), "extra": i} for i in range(n)]


def _ids(batches) -> list[list[str]]:
    return [[row["uid"] for row in batch] for batch in batches]


def test_rank_split_and_batches_depend_on_the_rows_not_on_the_file_layout(tmp_path):
    rows = _rows(1003)
    layouts = [_write(tmp_path / "a", rows, files=1, row_group_size=1003),
               _write(tmp_path / "b", rows, files=5, row_group_size=7),
               _write(tmp_path / "c", rows, files=3, row_group_size=64)]
    assert {count_rows(d) for d in layouts} == {1003}
    for world in (1, 2, 3):
        shares = [[row["uid"] for row in rank_rows(rank_pieces(layouts[0], rank, world))] for rank in range(world)]
        share = 1003 // world
        # contiguous, equal, disjoint shares of the global sequence (the remainder is dropped, as an equal split)
        assert shares == [[f"u{i}" for i in range(r * share, (r + 1) * share)] for r in range(world)]
        for layout in layouts[1:]:
            for rank in range(world):
                pieces = rank_pieces(layout, rank, world)
                assert [row["uid"] for row in rank_rows(pieces)] == shares[rank]
                assert set(next(rank_rows(pieces))) == {"uid", "kind", "input_ids", "labels", "rto_mask"}
        for rank in range(world):
            epochs = [_ids(epoch_batches(rank_pieces(layout, rank, world), 4, 3, seed=5, epoch=e))
                      for layout in layouts for e in (0, 1)]
            assert epochs[0] == epochs[2] == epochs[4] and epochs[1] == epochs[3] == epochs[5]  # any layout
            assert epochs[0] != epochs[1]  # reshuffled per epoch
            for batches in epochs[:2]:
                seen = [uid for batch in batches for uid in batch]
                assert all(len(batch) == 4 for batch in batches) and len(seen) == len(set(seen))
                assert set(seen) <= set(shares[rank]) and len(seen) > share - 4 * 3  # drop_last per window
    assert _ids(epoch_batches(rank_pieces(layouts[1], 0, 2), 4, 3, seed=6, epoch=0)) != \
        _ids(epoch_batches(rank_pieces(layouts[1], 0, 2), 4, 3, seed=5, epoch=0))


def test_shuffle_buffer_is_a_seeded_permutation():
    items = list(range(100))
    assert sorted(shuffled(iter(items), 16, seed=1)) == items
    assert list(shuffled(iter(items), 16, seed=1)) == list(shuffled(iter(items), 16, seed=1))
    assert list(shuffled(iter(items), 16, seed=1)) != list(shuffled(iter(items), 16, seed=2)) != items
    assert sorted(shuffled(iter(items[:5]), 16, seed=1)) == items[:5]  # fewer rows than the buffer


def test_missing_prepared_data_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        rank_pieces(tmp_path, 0, 2)


@pytest.mark.usefixtures("ray_session")
def test_separately_prepared_runs_give_every_rank_the_same_batches(tiny_config, tiny_path, tmp_path, monkeypatch):
    from derta.train_data import prepare_training_data

    monkeypatch.setenv("DERTA_CACHE_DIR", "off")  # prepare twice, from scratch
    small = tiny_config.data.synthetic.model_copy(update={"n_helpful": 300, "n_harmful": 100, "n_lookalike": 20})
    data = tiny_config.data.model_copy(update={"synthetic": small, "read_chunk_mb": 0.02})  # several files
    cfg = tiny_config.model_copy(update={"data": data})
    runs = []
    for run in ("a", "b"):
        stats = prepare_training_data(cfg, tiny_path, tmp_path / run / "data")
        n = sum(stats["examples_by_kind"].values())
        assert len(list(Path(stats["examples_dir"]).glob("*.parquet"))) > 1
        assert count_rows(stats["examples_dir"]) == n
        shares = [[(row["uid"], row["kind"]) for row in rank_rows(rank_pieces(stats["examples_dir"], rank, 2))]
                  for rank in (0, 1)]
        assert len(shares[0]) == len(shares[1]) == n // 2 and not set(shares[0]) & set(shares[1])
        # rows by content (uids name the run's own copy of the synthetic files)
        runs.append([[[(row["kind"], tuple(row["input_ids"])) for row in batch] for batch in epoch_batches(
            rank_pieces(stats["examples_dir"], rank, 2), 8, 4, seed=0, epoch=1)] for rank in (0, 1)])
    assert runs[0] == runs[1]
