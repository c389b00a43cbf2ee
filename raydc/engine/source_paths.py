"""Each image's source path, looked up by row when results are written: how a cluster maps back to a file.

Paths are strings of any length, so they are never carried through the feature pool or held on the shard
actors for a whole run (at 10^8 images that would be several GB of Python strings across the actors). A shard
actor that writes its part of the assignments instead reads the `path` column of the source shards its rows
fall in, one shard at a time: rows are dense and each shard holds a contiguous range of them
(`ShardInfo.row_start`), so a row's path is one `take` away.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa


@dataclass(frozen=True)
class PathSource:
    """One source shard's row range: where a shard actor looks up the paths of rows in it."""

    location: str
    row_start: int
    rows: int


def path_sources(manifest, shard_dir: str) -> list[PathSource] | None:
    """The shards to read paths from, or None when they carry no `path` column (array sources, and folder
    shards written before raydc kept paths)."""
    if not getattr(manifest, "has_paths", False):
        return None
    return [PathSource(loc, s.row_start, s.rows) for s, loc in zip(manifest.shards, manifest.shard_paths(shard_dir))]


def paths_for_rows(rows: np.ndarray, sources: list[PathSource]) -> pa.Array:
    """The path of each of `rows` (sorted ascending), null where no source covers it. Reads only the `path`
    column of the shards that hold some of the rows, one at a time."""
    import pyarrow.parquet as pq

    from raydc import storage

    pieces, covered = [], 0
    for src in sorted(sources, key=lambda s: s.row_start):
        lo = int(np.searchsorted(rows, src.row_start, "left"))
        hi = int(np.searchsorted(rows, src.row_start + src.rows, "left"))
        if hi <= lo:
            continue
        if lo > covered:
            pieces.append(pa.nulls(lo - covered, pa.string()))
        with storage.open_input_file(src.location) as f:
            column = pq.read_table(f, columns=["path"]).column("path").combine_chunks()
        pieces.append(column.take(pa.array(rows[lo:hi] - src.row_start)))
        covered = hi
    if covered < len(rows):
        pieces.append(pa.nulls(len(rows) - covered, pa.string()))
    return pa.concat_arrays(pieces) if pieces else pa.array([], pa.string())
