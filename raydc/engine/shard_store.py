"""One slice of the images between phases, held by a shard actor: rows, ids, reduced features, evaluation
labels and the per-row result columns (clusters, distances, a method's own), and the shard-side half of every
clustering step (k-means on one actor, the distributed Lloyd's steps, the two-level k-means' move).

`ShardStore` is the plain class; on Ray it runs as the `FeatureShard` actor, and in process (the method tests)
the same class is called directly through `LocalShard`, so both run the same code. The coordinator side is
`raydc.engine.clustering.ClusteringService`.
"""
from __future__ import annotations


import numpy as np
import ray

from raydc.core import kmeans as km
from raydc.core.metrics import PairCounts
from raydc.core.pca import Moments, PCAProjection
from raydc.core.rowblocks import RowBlocks, put_runs
from raydc.engine.row_lookup import RowLookup
from raydc.methods.api import TRUE, ShardView



class ShardStore:
    """One slice of the images between phases: rows, ids, features, evaluation labels and result columns.

    Why one class of this size: it is the body of one actor, and every method is one remote call on the data
    that actor holds (load, k-means steps, counts, parts); splitting it would split the state each call needs
    across actors, or add a layer of forwarding that every per-shard call pays for."""

    def __init__(self, threads: int = 0, in_ray: bool = True, recovery_dir: str | None = None, index: int = 0):
        from raydc.core.faiss_backend import use_all_cores

        self.in_ray = in_ray
        self.cores = use_all_cores(threads or None) if in_ray else 0  # Ray gave this 0-CPU actor 1 OMP thread
        self.threads_now = self.cores
        self.busy_peers = 1  # shard actors of this node that work at the same time (distributed steps)
        self.recovery_dir = recovery_dir  # where this shard saves what it holds (see raydc.engine.shard_recovery)
        self.index = index
        if in_ray:
            from raydc.engine.memory import start_sampler

            start_sampler()
        self._set_empty()
        if in_ray and recovery_dir and ray.get_runtime_context().was_current_actor_reconstructed:
            self._restore()

    def _restore(self) -> None:
        """Back after a lost process or node: the rows this shard held, from its saved parts."""
        from raydc.engine import shard_recovery

        got = shard_recovery.restore(self.recovery_dir, self.index)
        if got is not None:
            holdings, blocks = got
            self._hold(blocks)
            self.holdings = holdings

    def _save(self, own: bool) -> None:
        """Record what this shard holds: its own rows as a part (`own`, after a load or a projection), and the
        list of parts it holds (after a load, a hand-over or a clear)."""
        if not self.recovery_dir:
            return
        from raydc.engine import shard_recovery

        if own:
            shard_recovery.save_part(self.recovery_dir, self.index, self._block())
        shard_recovery.save_holdings(self.recovery_dir, self.index, self.holdings)

    def _put(self, value):
        return ray.put(value) if self.in_ray else value

    def _get(self, refs):
        return ray.get(refs) if self.in_ray else refs

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id() if self.in_ray else "local"

    def set_peers(self, n: int) -> None:
        self.busy_peers = max(1, int(n))

    def _threads(self, alone: bool) -> None:
        """All cores when this actor works alone (single-actor k-means), its share when every shard of the
        node works at once (distributed Lloyd steps, assignment), so they never oversubscribe the cores."""
        if not self.in_ray:
            return
        from raydc.core.faiss_backend import use_all_cores

        want = self.cores if alone else max(1, self.cores // self.busy_peers)
        if want != self.threads_now:
            self.threads_now = use_all_cores(want)

    def threads(self) -> dict:
        """The thread counts faiss and torch run with here (torch loaded for the answer, as the sums load it)."""
        import torch

        from raydc.core.faiss_backend import import_faiss

        return {"faiss": import_faiss().omp_get_max_threads(), "torch": torch.get_num_threads(),
                "cores": self.cores, "busy_peers": self.busy_peers}

    def peak_rss(self) -> dict:
        """This process's peak and current memory (bytes), for the scaling benchmark."""
        from raydc.engine.memory import peak

        return peak()

    def _set_empty(self) -> None:
        self.rows = np.zeros(0, np.int64)
        self.ids = np.zeros(0, np.int64)
        self.true: np.ndarray | None = None
        self.x: np.ndarray | None = None
        self.cols: dict[str, np.ndarray] = {}
        self.holdings: list[int] = []

    def clear(self) -> None:
        self._set_empty()
        self._save(own=False)

    def _block(self, mask: np.ndarray | None = None) -> dict[str, np.ndarray]:
        """The held rows (those of `mask`, or all) as a block, the format the pool emits and `_hold` takes."""
        sel = slice(None) if mask is None else mask
        block = {"row": self.rows[sel], "id": self.ids[sel],
                 "feature": self.x[sel] if self.x is not None else np.zeros((0, 0), np.float32)}
        if self.true is not None:
            block["label"] = self.true[sel]
        return block

    def _hold(self, blocks: list[dict], col: str | None = None) -> None:
        """Hold exactly these blocks' rows (row, id, feature[, label][, col]), in block order; no columns else."""
        blocks = [b for b in blocks if len(b["id"])]
        self._set_empty()
        if blocks:
            self.rows = np.concatenate([b["row"] for b in blocks])
            self.ids = np.concatenate([b["id"] for b in blocks])
            self.x = np.ascontiguousarray(np.concatenate([b["feature"] for b in blocks]))
            if "label" in blocks[0]:
                self.true = np.concatenate([b["label"] for b in blocks])
            if col is not None:
                self.cols[col] = np.concatenate([b[col] for b in blocks])

    # ---- loading ----------------------------------------------------------------------------------
    def load(self, block_refs: list) -> dict:
        """The pool's output blocks (row, id, feature[, label]), already reduced by the workers."""
        self._hold(self._get(list(block_refs)))
        self.holdings = [self.index]
        self._save(own=True)
        finite = bool(np.isfinite(self.x).all()) if self.x is not None else True
        return {"n": int(len(self.ids)), "dim": int(self.x.shape[1]) if self.x is not None else 0, "finite": finite}

    def moments(self) -> Moments | None:
        return Moments.from_array(np.asarray(self.x, np.float32)) if self.x is not None and len(self.x) else None

    def project(self, proj: PCAProjection | None, l2: bool, dtype: str) -> bool:
        """Reduce held raw features in place (the small-N path of `extract`, where the sample is everything)."""
        from raydc.core.extractor import FeatureReduction, reduce_features

        if self.x is not None and len(self.x):
            self.x = np.ascontiguousarray(reduce_features(np.asarray(self.x, np.float32),
                                                          FeatureReduction(proj, l2, dtype)))
            self._save(own=True)
        return bool(np.isfinite(self.x).all()) if self.x is not None else True

    def take(self) -> dict:
        """Hand over this shard's rows (for single-actor k-means) as a block and forget them."""
        out = self._block()
        self.clear()
        return out

    def absorb(self, block_refs: list, from_shards: list[int] | None = None) -> int:
        holdings = self.holdings + list(from_shards or [])
        self._hold([self._block()] + list(self._get(list(block_refs))))
        self.holdings = holdings
        self._save(own=False)
        return len(self.ids)

    def size(self) -> int:
        return int(len(self.ids))

    # ---- k-means ----------------------------------------------------------------------------------
    def rows_at(self, positions: np.ndarray) -> np.ndarray:
        return np.asarray(self.x[positions], np.float32)

    def kmeans(self, k: int, niter: int, seed: int, n_init: int, use_gpu: str, init_centroids, col: str) -> dict:
        # faiss prints one line per iteration (time, objective, splits): the k-means progress in the job log.
        self._threads(alone=True)
        res = km.kmeans(np.asarray(self.x, np.float32), k, niter=niter, seed=seed, n_init=n_init, use_gpu=use_gpu,
                        init_centroids=init_centroids, verbose=self.in_ray)
        self.cols[col], self.cols[col + "_distance"] = res.labels.astype(np.int64), res.distances
        return {"centroids": res.centroids, "objective": list(res.objective), "n_split": res.n_split,
                "backend": res.backend, "sizes": np.bincount(res.labels, minlength=k)}

    def partial(self, centroids: np.ndarray, use_gpu: str) -> tuple[np.ndarray, np.ndarray, float]:
        if not len(self.ids):  # more shards than feature blocks: an empty shard contributes nothing
            k, d = centroids.shape
            return np.zeros((k, d)), np.zeros(k, np.int64), 0.0
        self._threads(alone=False)
        x = np.asarray(self.x, np.float32)
        labels, dist = km.nearest_centroids(x, centroids, use_gpu=use_gpu)
        sums, counts = km.partial_sums(x, labels, len(centroids))
        return sums, counts, float(dist.sum(dtype=np.float64))

    def lloyd_step(self, chunk_refs: list, plan: list, bounds: np.ndarray, use_gpu: str, me: int) -> tuple:
        """One step of the sharded reduction: the centroids from their chunks (each reducer's, fetched) with the
        round's splits replayed, this shard's assignment, and its sums and counts cut at `bounds`, one piece
        per reducer, put in the object store by this actor so they travel shard to shard. Returns the pieces'
        refs, this shard's objective share and the bytes it fetched from other processes."""
        chunks = self._get(list(chunk_refs))
        fetched = sum(int(c.nbytes) for j, c in enumerate(chunks) if j != me)
        centroids = km.apply_splits(np.concatenate(chunks).astype(np.float32, copy=False), plan)
        k, d = centroids.shape
        if len(self.ids):
            self._threads(alone=False)
            x = np.asarray(self.x, np.float32)
            labels, dist = km.nearest_centroids(x, centroids, use_gpu=use_gpu)
            sums, counts = km.partial_sums(x, labels, k)
            obj = float(dist.sum(dtype=np.float64))
        else:  # more shards than feature blocks: an empty shard contributes nothing
            sums, counts, obj = np.zeros((k, d)), np.zeros(k, np.int64), 0.0
        pieces = [self._put((sums[a:b], counts[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]
        return pieces, obj, fetched

    def lloyd_reduce(self, piece_refs: list, me: int) -> tuple:
        """This shard's range of clusters: every shard's piece added (in shard order, as the star adds whole
        sums, so the result is the same to the bit), the means kept in the object store for the next step.
        Returns the chunk's ref, its counts (what the coordinator's split plan needs) and the bytes fetched."""
        pieces = self._get(list(piece_refs))
        fetched = sum(int(p[0].nbytes + p[1].nbytes) for i, p in enumerate(pieces) if i != me)
        sums = np.sum([p[0] for p in pieces], axis=0)
        counts = np.sum([p[1] for p in pieces], axis=0)
        return self._put(km.chunk_means(sums, counts)), counts, fetched

    # ---- two-level k-means --------------------------------------------------------------------------
    def route(self, col: str, owner_of: np.ndarray, n_shards: int) -> list:
        """This shard's rows cut by the shard that owns their `col` (super cluster), one piece per shard, put
        in the object store by this actor so they travel shard to shard."""
        dest = owner_of[self.cols[col]] if len(self.ids) else np.zeros(0, np.int64)
        return [self._put({**self._block(dest == j), col: self.cols[col][dest == j] if len(self.ids)
                           else np.zeros(0, np.int64)}) for j in range(n_shards)]

    def gather(self, piece_refs: list, col: str) -> int:
        """Take the rows routed here (every super cluster this shard owns), keeping their `col`."""
        self._hold(self._get(list(piece_refs)), col)
        self.holdings = [self.index]
        self._save(own=True)  # a restarted shard must come back with the rows it holds now
        return int(len(self.ids))

    def sub_kmeans(self, groups: dict, niter: int, use_gpu: str, super_col: str, col: str) -> dict:
        """faiss k-means within each super cluster this shard owns: {c: (k_c, offset, seed)}; labels are
        offset + the local cluster. Returns each super cluster's centroids and sizes."""
        self._threads(alone=False)
        labels = np.zeros(len(self.ids), np.int64)
        dist = np.zeros(len(self.ids), np.float32)
        out = {}
        for c, (k_c, offset, seed) in groups.items():
            m = np.flatnonzero(self.cols[super_col] == c)
            xs = np.asarray(self.x[m], np.float32)
            if k_c == 1:  # a small super cluster keeps its own mean (faiss wants k >= 2)
                cent = xs.mean(axis=0, dtype=np.float64).astype(np.float32)[None]
                lab, dd = km.nearest_centroids(xs, cent, use_gpu=use_gpu)
                labels[m], dist[m] = offset, dd
                out[c] = (cent, np.array([len(m)]), 0)
                continue
            res = km.kmeans(xs, int(k_c), niter=niter, seed=int(seed), use_gpu=use_gpu)
            labels[m], dist[m] = res.labels + offset, res.distances
            out[c] = (res.centroids, np.bincount(res.labels, minlength=int(k_c)), res.n_split)
        self.cols[col], self.cols[col + "_distance"] = labels, dist
        return out

    def label_nearest(self, centroids: np.ndarray, use_gpu: str, col: str) -> np.ndarray:
        """Nearest centroid of every row, kept as column `col` (and `col`_distance); returns the sizes."""
        k = len(centroids)
        if not len(self.ids):
            self.cols[col], self.cols[col + "_distance"] = np.zeros(0, np.int64), np.zeros(0, np.float32)
            return np.zeros(k, np.int64)
        self._threads(alone=False)
        labels, dist = km.nearest_centroids(np.asarray(self.x, np.float32), centroids, use_gpu=use_gpu)
        self.cols[col], self.cols[col + "_distance"] = labels.astype(np.int64), dist
        return np.bincount(labels, minlength=k)

    # ---- results ----------------------------------------------------------------------------------
    def apply(self, fn, *args):
        """Run a method-specific pure function on this shard (DEC's soft assignment, for one)."""
        return fn(ShardView(self.rows, self.ids, self.x, self.true, self.cols), *args)

    def _column(self, spec) -> np.ndarray | None:
        if isinstance(spec, RowBlocks):
            return RowLookup(spec)(self.rows)
        if spec == TRUE:
            return self.true
        return self.cols.get(spec)

    def counts(self, a, b) -> PairCounts | None:
        """Pair counts of two labellings of this shard's rows: column names, TRUE, or RowBlocks (looked up).
        A shard without rows counts nothing; one that lacks a labelling answers None."""
        if not len(self.ids):
            return PairCounts.of(np.zeros(0, np.int64), np.zeros(0, np.int64))
        ca, cb = self._column(a), self._column(b)
        if ca is None or cb is None:
            return None
        return PairCounts.of(ca, cb)

    def publish(self, col: str, dtype: str | None, fill) -> RowBlocks:
        values = self.cols[col]
        if dtype is not None:
            values = values.astype(dtype)
        return put_runs(self.rows, values, self._put, fill)

    def write_part(self, path: str, columns: dict[str, str], paths: list | None = None) -> int:
        """This shard's rows as one Parquet file, sorted by row: `row`, `id`, then {name: column}; with `paths`
        (a list of `raydc.engine.source_paths.PathSource`, possibly empty) a `path` column after `id`, each
        row's source file read from those shards (null where unknown). A shard without rows writes nothing and
        returns 0."""
        if not len(self.ids):
            return 0
        import pyarrow as pa
        import pyarrow.parquet as pq

        from raydc import storage
        from raydc.engine.rundir import PART_ROW_GROUP

        order = np.argsort(self.rows, kind="stable")
        data = {"row": pa.array(self.rows[order]), "id": pa.array(self.ids[order])}
        if paths is not None:
            from raydc.engine.source_paths import paths_for_rows

            data["path"] = paths_for_rows(self.rows[order], paths)
        for name, col in columns.items():
            data[name] = pa.array(np.asarray(self._column(col))[order])
        sink = pa.BufferOutputStream()
        pq.write_table(pa.table(data), sink, compression="zstd", row_group_size=PART_ROW_GROUP)  # readers go by group
        storage.write_bytes_atomic(path, sink.getvalue().to_pybytes())
        return int(len(order))

    def read_parts(self, paths: list[str], column: str, dtype: str | None, fill) -> RowBlocks:
        """Saved parts back into the object store (a resumed run's previous labels)."""
        import pyarrow.parquet as pq

        from raydc import storage

        blocks = []
        for p in paths:
            with storage.open_input_file(p) as f:
                t = pq.read_table(f, columns=["row", column])
            values = t.column(column).to_numpy()
            blocks.append(put_runs(t.column("row").to_numpy(), values.astype(dtype) if dtype else values,
                                   self._put, fill))
        return RowBlocks.merge(blocks, fill)

    def sample(self, positions: np.ndarray, cols: tuple[str, ...]) -> tuple:
        values = {c: self._column(c) for c in cols}
        return (self.ids[positions], np.asarray(self.x[positions], np.float32),
                {c: v[positions] for c, v in values.items() if v is not None})


FeatureShard = ray.remote(num_cpus=0)(ShardStore)


class LocalShard:
    """A ShardStore called in process with the actor's calling convention (`handle.method.remote(...)`)."""

    def __init__(self, store: ShardStore):
        self.store = store

    def __getattr__(self, name: str):
        fn = getattr(self.store, name)

        class _Remote:
            @staticmethod
            def remote(*args, **kwargs):
                return fn(*args, **kwargs)

        return _Remote
