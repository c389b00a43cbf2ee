"""Source paths reach the assignment parts: each shard actor looks its rows' paths up in the source shards."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from raydc.engine.source_paths import PathSource, path_sources, paths_for_rows


def _shards(tmp_path, sizes):
    sources, start = [], 0
    for i, n in enumerate(sizes):
        loc = tmp_path / f"shard-{i}.parquet"
        pq.write_table(pa.table({"row": np.arange(start, start + n), "path": [f"d{i}/f{r}.jpg"
                                                                              for r in range(start, start + n)]}), loc)
        sources.append(PathSource(str(loc), start, n))
        start += n
    return sources


def test_paths_for_rows_takes_each_row_from_its_shard(tmp_path):
    sources = _shards(tmp_path, [5, 3, 7])
    rows = np.array([0, 4, 6, 8, 9, 14])  # rows of shards 0, 2 and 1: any subset, sorted
    got = paths_for_rows(rows, list(reversed(sources))).to_pylist()
    assert got == ["d0/f0.jpg", "d0/f4.jpg", "d1/f6.jpg", "d2/f8.jpg", "d2/f9.jpg", "d2/f14.jpg"]
    assert paths_for_rows(np.array([2, 20]), sources).to_pylist() == ["d0/f2.jpg", None]  # no shard: null
    assert paths_for_rows(np.array([1]), []).to_pylist() == [None]


def test_write_part_adds_the_path_column_sorted_by_row(tmp_path):
    from raydc.engine.shard_store import ShardStore

    sources = _shards(tmp_path, [4, 4])
    store = ShardStore(in_ray=False)
    store.rows = np.array([7, 1, 4, 2], np.int64)
    store.ids = store.rows * 10
    store.cols = {"c": np.array([3, 0, 1, 2])}
    part = tmp_path / "part-00000.parquet"
    assert store.write_part(str(part), {"cluster": "c"}, sources) == 4
    t = pq.read_table(part)
    assert t.column_names == ["row", "id", "path", "cluster"]
    assert t.column("path").to_pylist() == ["d0/f1.jpg", "d0/f2.jpg", "d1/f4.jpg", "d1/f7.jpg"]
    assert t.column("cluster").to_pylist() == [0, 2, 1, 3]
    store.write_part(str(part), {"cluster": "c"}, [])  # shards without paths: the column is there, empty
    assert pq.read_table(part).column("path").null_count == 4
    store.write_part(str(part), {"value": "c"})  # a round's labels: no path column at all
    assert pq.read_table(part).column_names == ["row", "id", "value"]


def test_path_sources_follow_the_manifest(tmp_path):
    from raydc.data.manifest import Manifest, ShardInfo

    m = Manifest("folder", "/x", 9, "encoded", None, "RGB", False,
                 shards=[ShardInfo("shard-00000.parquet", 5, "", 0, 4),
                         ShardInfo("shard-00001.parquet", 4, "", 5, 8, 5)])
    assert path_sources(m, str(tmp_path)) is None  # a manifest of an older raydc: no has_paths
    m.has_paths = True
    assert path_sources(m, str(tmp_path)) == [PathSource(str(tmp_path / "shard-00000.parquet"), 0, 5),
                                              PathSource(str(tmp_path / "shard-00001.parquet"), 5, 4)]
    old = Manifest.from_dict({k: v for k, v in m.to_dict().items() if k != "has_paths"})
    assert old.has_paths is False
