"""Per-image arrays (pseudo-labels, DEC's target P) that stay sharded: blocks of contiguous rows in the object
store, found by row range, fetched by whichever training worker streams those rows.

Why not one array by id: at 10^9 images an int64 label per image is 8 GB, copied to every worker and into
every checkpoint; DEC's P with k = 100 is 400 GB. Here each shard actor puts its own rows' values (one block
per contiguous run of rows, so about one per feature piece), and what travels to the workers is only the
index, O(blocks). A worker's stream reads whole Parquet row groups, i.e. contiguous rows, so each batch touches
one or two blocks; the last few fetched are kept. Rows are the dense index written by `raydc prepare`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class RowBlocks:
    """Where the values of every row live: block i holds rows starts[i] .. stops[i] - 1, in order."""

    starts: np.ndarray                 # (B,) int64, sorted
    stops: np.ndarray                  # (B,) int64
    refs: list = field(default_factory=list)  # ObjectRefs (on Ray) or arrays (in process), one per block
    fill: Any = -1                     # the value of a row no block covers (an image the clustering never saw)

    @classmethod
    def merge(cls, parts: list["RowBlocks"], fill: Any = -1) -> "RowBlocks":
        parts = [p for p in parts if p is not None and len(p.starts)]
        if not parts:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), [], fill)
        starts = np.concatenate([p.starts for p in parts])
        stops = np.concatenate([p.stops for p in parts])
        refs = [r for p in parts for r in p.refs]
        order = np.argsort(starts, kind="stable")
        if len(order) > 1 and (stops[order][:-1] > starts[order][1:]).any():
            raise ValueError("row blocks overlap: two shards hold the same row")
        return cls(starts[order], stops[order], [refs[i] for i in order], fill)

    @property
    def rows(self) -> int:
        return int((self.stops - self.starts).sum())


def contiguous_runs(sorted_rows: np.ndarray) -> list[tuple[int, int]]:
    """[(a, b)] position ranges of `sorted_rows` whose rows are consecutive integers."""
    if sorted_rows.size == 0:
        return []
    breaks = np.flatnonzero(np.diff(sorted_rows) != 1) + 1
    edges = np.concatenate([[0], breaks, [sorted_rows.size]])
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:])]


def put_runs(rows: np.ndarray, values: np.ndarray, put, fill: Any = -1) -> RowBlocks:
    """Cut `values` (aligned with `rows`, any order) into blocks of contiguous rows and `put` each one."""
    order = np.argsort(rows, kind="stable")
    srt = rows[order]
    if srt.size > 1 and (srt[1:] == srt[:-1]).any():
        raise ValueError("a row appears twice in one shard")
    runs = contiguous_runs(srt)
    starts = np.array([srt[a] for a, _ in runs], np.int64)
    stops = np.array([srt[b - 1] + 1 for _, b in runs], np.int64)
    refs = [put(np.ascontiguousarray(values[order[a:b]])) for a, b in runs]
    return RowBlocks(starts, stops, refs, fill)
