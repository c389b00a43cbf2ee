"""Per-image values kept as blocks of contiguous rows (raydc.core.rowblocks), in process."""
from __future__ import annotations

import numpy as np
import pytest

from raydc.core.rowblocks import RowBlocks, contiguous_runs, put_runs
from raydc.engine.row_lookup import RowLookup


def test_runs_split_where_rows_are_not_consecutive():
    assert contiguous_runs(np.array([3, 4, 5, 9, 10, 20])) == [(0, 3), (3, 5), (5, 6)]
    assert contiguous_runs(np.zeros(0, np.int64)) == []


def test_put_runs_then_lookup_in_any_order():
    rows = np.array([12, 10, 11, 40, 41, 3])          # a shard's rows, in the order it holds them
    values = rows * 100
    b = put_runs(rows, values, put=lambda v: v.copy())
    assert b.starts.tolist() == [3, 10, 40] and b.stops.tolist() == [4, 13, 42] and b.rows == 6
    look = RowLookup(b)
    q = np.array([41, 3, 10, 12, 11, 40])
    assert look(q).tolist() == (q * 100).tolist()
    assert look(np.array([5, 10, 99])).tolist() == [-1, 1000, -1]  # rows no block covers get the fill
    with pytest.raises(ValueError, match="twice"):
        put_runs(np.array([1, 2, 2]), np.zeros(3), put=lambda v: v)


def test_merge_orders_blocks_and_refuses_overlap():
    a = put_runs(np.array([10, 11]), np.array([1, 2]), put=lambda v: v)
    b = put_runs(np.array([0, 1, 2]), np.array([7, 8, 9]), put=lambda v: v)
    m = RowBlocks.merge([a, b, None])
    assert m.starts.tolist() == [0, 10] and RowLookup(m)(np.array([11, 0, 2])).tolist() == [2, 7, 9]
    with pytest.raises(ValueError, match="overlap"):
        RowBlocks.merge([a, put_runs(np.array([11, 12]), np.array([0, 0]), put=lambda v: v)])


def test_two_dimensional_values_and_a_bounded_cache():
    """DEC's P: k floats per row. The cache holds at most cache_bytes of blocks (always the last one)."""
    rows = np.arange(1000)
    p = np.random.default_rng(0).random((1000, 4)).astype(np.float32)
    b = RowBlocks.merge([put_runs(rows[a:a + 100], p[a:a + 100], put=lambda v: v) for a in range(0, 1000, 100)
                         if a != 300], fill=0.0)
    look = RowLookup(b, cache_bytes=2 * 100 * 4 * 4)  # two blocks' worth
    out = look(rows)
    np.testing.assert_array_equal(out[rows // 100 != 3], p[rows // 100 != 3])
    assert (out[300:400] == 0.0).all()                 # the missing block's rows: fill
    assert look.held == [7, 8] and look.held_bytes == 2 * 100 * 4 * 4  # the two most recent, nothing more
    look(np.arange(0, 10))
    assert look.held == [8, 0]


def test_parts_are_written_and_read_back_a_row_group_at_a_time(tmp_path):
    """What bounds the driver's memory in the report and `raydc evaluate`: a shard's part holds row groups of
    PART_ROW_GROUP rows, and the readers never hold more than one, whatever N / shards is."""
    import pyarrow.parquet as pq

    from raydc.engine.clustering import ShardStore
    from raydc.engine.rundir import PART_ROW_GROUP, RunDir

    n = 2 * PART_ROW_GROUP + 123
    rng = np.random.default_rng(0)
    store = ShardStore(in_ray=False)
    store.rows = rng.permutation(n).astype(np.int64)
    store.ids = rng.integers(-(1 << 62), 1 << 62, n)
    store.cols = {"c": rng.integers(0, 7, n), "d": rng.random(n, dtype=np.float32)}
    run = RunDir(tmp_path / "run")
    part = tmp_path / "run" / "assignments" / "part-00000.parquet"
    part.parent.mkdir(parents=True)
    assert run.assignments_dir == str(part.parent)
    assert store.write_part(str(part), {"cluster": "c", "distance": "d"}) == n
    meta = pq.ParquetFile(part).metadata
    assert meta.num_row_groups == 3 and max(meta.row_group(g).num_rows for g in range(3)) == PART_ROW_GROUP
    batches = list(run.assignment_batches())
    assert max(len(b["row"]) for b in batches) <= PART_ROW_GROUP
    rows = np.concatenate([b["row"] for b in batches])
    assert np.array_equal(rows, np.arange(n))  # sorted by row, every row once
    order = np.argsort(store.rows)
    assert np.array_equal(np.concatenate([b["cluster"] for b in batches]), store.cols["c"][order])
