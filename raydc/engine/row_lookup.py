"""Reading a method's sharded per-image values (`raydc.core.rowblocks.RowBlocks`) back by row, on whichever
process needs them (a Train worker joining targets to its stream, a shard actor counting against them): blocks
are fetched from the object store on first use and the most recent ones kept."""
from __future__ import annotations

from collections import OrderedDict

import numpy as np

from raydc.core.rowblocks import RowBlocks


class RowLookup:
    """`lookup(rows)` -> the values of those rows, fetching blocks on first use and keeping the most recent ones
    up to `cache_bytes` (the block just fetched is always kept)."""

    def __init__(self, blocks: RowBlocks, cache_bytes: int = 64 << 20):
        self.blocks = blocks
        self.cache_bytes = cache_bytes
        self._held: OrderedDict[int, np.ndarray] = OrderedDict()
        self._bytes = 0

    @property
    def held(self) -> list[int]:
        """The blocks the cache holds now, least recently used first: what bounds a worker's memory."""
        return list(self._held)

    @property
    def held_bytes(self) -> int:
        return self._bytes

    def _block(self, i: int) -> np.ndarray:
        got = self._held.get(i)
        if got is None:
            ref = self.blocks.refs[i]
            if isinstance(ref, np.ndarray):
                got = ref
            else:
                import ray

                got = ray.get(ref)
            self._held[i] = got
            self._bytes += got.nbytes
            while self._bytes > self.cache_bytes and len(self._held) > 1:
                _, old = self._held.popitem(last=False)
                self._bytes -= old.nbytes
        else:
            self._held.move_to_end(i)
        return got

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        rows = np.asarray(rows, np.int64)
        b = self.blocks
        where = np.searchsorted(b.starts, rows, side="right") - 1
        inside = (where >= 0) & (rows < b.stops[np.maximum(where, 0)]) if len(b.starts) else np.zeros(len(rows), bool)
        out = None
        for i in np.unique(where[inside]):
            vals = self._block(int(i))
            if out is None:
                out = np.full((len(rows), *vals.shape[1:]), b.fill, vals.dtype)
            sel = inside & (where == i)
            out[sel] = vals[rows[sel] - b.starts[i]]
        if out is None:
            out = np.full(len(rows), b.fill, np.int64)
        return out
