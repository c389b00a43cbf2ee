"""A feature pool that lives for the whole run: its actors start (import torch, build the network) once.

Why: the Ray Data pool (`features.pool: ray_data`) starts fresh actors for every pass. On this 2-core machine a
pass over 5,000 images cost 12-18 s of which ~10 s was actor start-up, and a DEC run spends half of its
clustering stage there (979 s of 1,909 s on MNIST). Training and the feature pass never overlap (rank 0 runs
the pass while the other ranks wait), so the pool's actors can time-share the CPUs the training uses: they
reserve no CPU (`num_cpus=0`), or Ray would hold those CPUs idle through training and the training stream's
read tasks would starve. They still run `features.concurrency` at a time, each with `cores / concurrency`
torch threads. On GPU clusters the Ray Data pool stays the default: an actor may only touch a GPU it
reserved, and a reserved GPU is one DDP cannot use.

Work is cut into pieces (a Parquet row group, split further until there are a few pieces per actor), handed
out dynamically (at most two in flight per actor), and returned in piece order, so the blocks reaching the
shard actors are the same run after run: a resumed run clusters exactly the rows an uninterrupted one did.
The weights go once per pass through the object store, fetched once per actor.
"""
from __future__ import annotations

import os
import time
from collections import Counter
from dataclasses import dataclass

import numpy as np
import ray

from raydc.core.extractor import ExtractorSpec, inference_network, load_network
from raydc.engine.ray_data_pool import features_of
from raydc.engine.sealed_spec import open_spec


@dataclass(frozen=True)
class Piece:
    path: str
    row_group: int
    start: int  # rows within the row group
    stop: int


def plan_pieces(paths: list[str], min_pieces: int, align: int = 1) -> list[Piece]:
    """Row groups of every shard, each cut into equal row ranges until there are at least `min_pieces`; cuts
    fall on multiples of `align` rows from the row group's start (`ExtractorSpec.batch_align`)."""
    import pyarrow.parquet as pq

    from raydc.storage import open_input_file

    groups = []
    for p in paths:
        meta = pq.ParquetFile(open_input_file(p)).metadata
        groups += [(p, g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
    total = sum(n for *_, n in groups)
    if not total:
        return []
    target = max(1, -(-total // max(1, min_pieces)))  # rows per piece
    pieces = []
    for p, g, n in groups:
        cuts = max(1, -(-n // target))
        edges = np.linspace(0, n, cuts + 1).round().astype(int)
        if align > 1:
            inner = (edges[1:-1] + align // 2) // align * align
            inner = inner[n - inner >= align]  # a row group's partial last group stays with the one before it
            edges = np.unique(np.concatenate([[0], inner, [n]]))
        pieces += [Piece(p, g, int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]
    return pieces


@ray.remote(num_cpus=0)
class FeatureWorker:
    """One pool actor: keeps the network between passes; reads, decodes and embeds the pieces it is given."""

    def __init__(self, manifest, threads: int):
        import torch

        import raydc  # noqa: F401  (OPENBLAS_CORETYPE before any BLAS loads)

        if threads > 0:
            torch.set_num_threads(threads)
        self.manifest = manifest
        self.spec: ExtractorSpec | None = None
        self.trained = None  # the network as trained: each pass loads its weights into it
        self.model = None    # what the pass runs: `trained`, or its BatchNorm-folded copy (ExtractorSpec)
        self._cached: tuple[tuple[str, int], object] | None = None  # the last row group read
        self.clock: Counter = Counter()  # this pass's seconds: read, decode, embed, busy (whole `run` calls)

    def set_spec(self, spec_ref: list) -> bool:
        spec: ExtractorSpec = open_spec(ray.get(spec_ref[0]))
        try:  # the same network in the same layout as last pass: only the weights change
            if self.trained is None or spec.memory_format != self.spec.memory_format:
                raise RuntimeError("no model yet")
            self.trained.load_state_dict(spec.state)  # copies into the weights, keeping their layout
        except RuntimeError:  # first pass, or another network (DEC's stages)
            self.trained = load_network(spec)
        self.trained.eval()
        self.model = inference_network(self.trained, spec)  # folded afresh from this pass's weights
        self.fn = getattr(self.model, spec.call)
        self.spec = spec
        self.clock = Counter()
        return True

    def pass_clock(self) -> dict[str, float]:
        """Where this actor's time went in the pass since the last `set_spec` (the profile in metrics.jsonl)."""
        return dict(self.clock)

    def _row_group(self, path: str, group: int):
        import pyarrow.parquet as pq

        from raydc.storage import open_input_file

        key = (path, group)
        if self._cached is None or self._cached[0] != key:
            t0 = time.perf_counter()
            self._cached = (key, pq.ParquetFile(open_input_file(path)).read_row_group(group))
            self.clock["read_s"] += time.perf_counter() - t0
        return self._cached[1]

    def run(self, piece: Piece, batch_size: int) -> dict[str, np.ndarray]:
        t0 = time.perf_counter()
        try:
            return self._run(piece, batch_size)
        finally:
            self.clock["busy_s"] += time.perf_counter() - t0

    def _run(self, piece: Piece, batch_size: int) -> dict[str, np.ndarray]:
        table = self._row_group(piece.path, piece.row_group).slice(piece.start, piece.stop - piece.start)
        cols = [c for c in ("row", "id", "image", "label") if c in table.column_names]
        outs = []
        align = max(1, self.spec.batch_align)
        cuts = list(range(0, table.num_rows, batch_size)) + [table.num_rows]
        if align > 1 and len(cuts) > 2 and cuts[-1] - cuts[-2] < align:
            del cuts[-2]  # a partial last group is read out with the group before it, never alone
        for off, stop in zip(cuts[:-1], cuts[1:]):
            part = table.slice(off, stop - off)
            batch = {c: part.column(c).to_numpy(zero_copy_only=False) for c in cols}
            outs.append(features_of(self.fn, self.spec, self.manifest, batch, clock=self.clock))
        outs = [o for o in outs if len(o["id"])]
        if not outs:
            return {"row": np.zeros(0, np.int64), "id": np.zeros(0, np.int64), "feature": np.zeros((0, 0), np.float32)}
        return {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}


class PersistentFeaturePool:
    """Created on the first pass; each later pass only ships the new weights."""

    def __init__(self, manifest, concurrency: int):
        self.manifest = manifest
        self.concurrency = concurrency
        threads = max(1, (os.cpu_count() or 1) // max(1, concurrency))
        header = ray.put(manifest.header())  # one copy in the store, not the shard list in every actor's args
        self.workers = [FeatureWorker.options(scheduling_strategy="SPREAD").remote(header, threads)
                        for _ in range(concurrency)]
        self._pieces: dict[tuple, list[Piece]] = {}  # the shards do not change during a run

    def pieces(self, paths: list[str], align: int = 1) -> list[Piece]:
        """How a pass over `paths` is cut, in order: the i-th block `extract` returns is the i-th piece's rows."""
        key = (*paths, align)
        if key not in self._pieces:  # every shard footer read once per run, not once per pass
            self._pieces[key] = plan_pieces(paths, min_pieces=4 * len(self.workers), align=align)
        return self._pieces[key]

    def extract(self, paths: list[str], spec: ExtractorSpec, batch_size: int, in_flight: int = 2,
                sink=None) -> list:
        """Every image's features, as object refs of numpy blocks in piece order (they stay in the store).
        With `sink`, each block goes to `sink(index, piece, ref)` as soon as it is done and is not kept here
        (`raydc embed`: blocks are written while later pieces are embedded, so the store never holds them all)."""
        spec_ref = ray.put(spec)
        ray.get([w.set_spec.remote([spec_ref]) for w in self.workers])
        align = max(1, spec.batch_align)
        pieces = self.pieces(paths, align)
        batch_size = max(align, batch_size // align * align)  # each call takes whole aligned groups
        out: list = [None] * len(pieces)
        busy: dict = {}  # ref -> worker index
        index_of: dict = {}  # ref -> piece index
        load = [0] * len(self.workers)
        nxt = 0
        while nxt < len(pieces) or busy:
            while nxt < len(pieces) and min(load) < in_flight:
                w = int(np.argmin(load))
                ref = self.workers[w].run.remote(pieces[nxt], batch_size)
                out[nxt], busy[ref], index_of[ref] = ref, w, nxt
                load[w] += 1
                nxt += 1
            done, _ = ray.wait(list(busy), num_returns=1, fetch_local=False)
            for ref in done:
                load[busy.pop(ref)] -= 1
                i = index_of.pop(ref)
                if sink is not None:
                    out[i] = None
                    sink(i, pieces[i], ref)
        return out  # a worker's error surfaces where the shard actors fetch its block

    def pass_clock(self) -> Counter:
        """The last pass's seconds summed over the actors (read, decode, embed, busy)."""
        total: Counter = Counter()
        for c in ray.get([w.pass_clock.remote() for w in self.workers]):
            total.update(c)  # adds, and keeps a key whose seconds are 0
        return total

    def shutdown(self) -> None:
        for w in self.workers:
            ray.kill(w)
        self.workers = []
