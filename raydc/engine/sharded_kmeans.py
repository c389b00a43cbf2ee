"""k-means over the features the shard actors hold: one shard with faiss while the points fit in one process
(the others hand it their rows), else a distributed Lloyd (centroids out, per-cluster sums and counts back,
empty clusters split exactly as the in-process reference `raydc.core.kmeans.lloyd` does; a star or a sharded
reduction), or DeeperCluster's two levels for very large k. Each shard keeps its rows' clusters as a column;
what comes back is O(k x d). A shard lost mid-Lloyd is waited for and the iteration resumes from its checkpoint.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from raydc.core import kmeans as km
from raydc.engine.ray_errors import shard_lost
from raydc.engine.shard_set import ShardSet
from raydc.methods.api import ClusterOutcome


@dataclass
class LloydState:
    """Where a distributed Lloyd stands: the centroids at the start of step `it`, the split RNG, the objective so
    far. A copy taken between steps is a checkpoint: resumed from it, the run ends exactly as without the loss."""

    centroids: np.ndarray
    rng: np.random.Generator
    it: int = 0
    objective: list[float] = field(default_factory=list)
    n_split: int = 0
    done: bool = False

    def record(self, objective: float) -> bool:
        """Add a step's objective; True at a fixed point (it equals the previous one exactly)."""
        self.objective.append(objective)
        self.done = len(self.objective) > 1 and objective == self.objective[-2]
        return self.done

    def copy(self) -> "LloydState":
        import copy

        return LloydState(self.centroids.copy(), copy.deepcopy(self.rng), self.it, list(self.objective),
                          self.n_split, self.done)

    def take(self, other: "LloydState") -> None:
        c = other.copy()
        self.centroids, self.rng, self.it, self.objective, self.n_split, self.done = (
            c.centroids, c.rng, c.it, c.objective, c.n_split, c.done)



class ShardedKMeans:
    """The k-means algorithms over a `ShardSet`."""

    def __init__(self, shard_set: ShardSet):
        self.set = shard_set  # the shard actors and their bookkeeping this job reads and updates

    def choose_mode(self, mode: str, single_max_bytes: int) -> str:
        if mode != "auto":
            return mode
        fits = self.set.n * self.set.dim * 4 <= single_max_bytes
        return "single" if fits or len(self.set.shards) == 1 else "distributed"

    def kmeans(self, k: int, *, niter: int, seed: int, n_init: int = 1, mode: str = "single",
               init_centroids: np.ndarray | None = None, col: str = "cluster", reduction: str = "auto",
               star_max_bytes: int = 64 << 20, hierarchical: str = "never", hierarchical_min_k: int = 50_000,
               super_k: int = 0) -> ClusterOutcome:
        """k-means of every held row; each shard keeps its rows' clusters as column `col`."""
        if k > self.set.n:
            raise ValueError(f"cluster.k = {k} is larger than the number of images ({self.set.n})")
        if init_centroids is None and (hierarchical == "always" or (hierarchical == "auto"
                                                                    and k >= hierarchical_min_k)):
            return self._two_level(k, niter=niter, seed=seed, mode=mode, col=col, super_k=super_k,
                                   reduction=reduction, star_max_bytes=star_max_bytes)
        if mode == "single" or len(self.set.shards) == 1:
            if len(self.set.shards) > 1 and not self.set.single:
                self.set.get(self.set.shards[0].absorb.remote([s.take.remote() for s in self.set.shards[1:]],
                                                              list(range(1, len(self.set.shards)))))
                self.set.sizes = [self.set.n] + [0] * (len(self.set.shards) - 1)
                self.set.single = True
            res = self.set.get(self.set.shards[0].kmeans.remote(k, niter, seed, n_init, self.set.use_gpu,
                                                                init_centroids, col))
            for s in self.set.shards[1:]:  # the empty shards get empty columns, so every shard has `col`
                self.set.get(s.label_nearest.remote(res["centroids"], self.set.use_gpu, col))
            return ClusterOutcome(res["centroids"], res["sizes"], res["objective"], res["n_split"], res["backend"],
                                  "single", col)
        return self._distributed(k, niter=niter, seed=seed, init_centroids=init_centroids, col=col,
                                 reduction=self.choose_reduction(k, reduction, star_max_bytes))

    def _two_level(self, k: int, *, niter: int, seed: int, mode: str, col: str, super_k: int, reduction: str,
                   star_max_bytes: int) -> ClusterOutcome:
        """Two-level k-means (DeeperCluster's, for very large k): k-means into `super_k` super clusters (default
        sqrt(k)) over all shards, each super cluster's rows moved to one shard (balanced by size, shard to shard
        through the object store), then faiss k-means within each super cluster with a share of k proportional
        to its size. Each point's cluster is the nearest centroid of its own super cluster, which is not always
        the nearest of all k: the price of never holding a k x N problem. The k x d centroids come here once."""
        import time

        from raydc.core.seeding import derive_seed

        t0 = time.perf_counter()
        k1 = min(super_k or max(2, int(round(np.sqrt(k)))), k, self.set.n)
        first = self.kmeans(k1, niter=niter, seed=seed, mode=mode, col="super", reduction=reduction,
                            star_max_bytes=star_max_bytes)
        sizes1 = np.asarray(first.sizes)
        k_of = km.allocate_subclusters(k, sizes1)
        offsets = np.concatenate([[0], np.cumsum(k_of)[:-1]])
        owner_of, load = np.zeros(k1, np.int64), np.zeros(len(self.set.shards))
        for c in np.argsort(-sizes1, kind="stable"):  # largest first, each to the least loaded shard
            owner_of[c] = int(np.argmin(load))
            load[owner_of[c]] += sizes1[c]
        routed = self.set.get([s.route.remote("super", owner_of, len(self.set.shards)) for s in self.set.shards])
        self.set.sizes = self.set.get([s.gather.remote([r[j] for r in routed], "super")
                                       for j, s in enumerate(self.set.shards)])
        self.set.single = False
        groups = [{int(c): (int(k_of[c]), int(offsets[c]), derive_seed(seed, int(c), 71))
                   for c in np.flatnonzero((owner_of == j) & (k_of > 0))} for j in range(len(self.set.shards))]
        parts = self.set.get([s.sub_kmeans.remote(g, niter, self.set.use_gpu, "super", col)
                              for s, g in zip(self.set.shards, groups)])
        d = first.centroids.shape[1]
        centroids, sizes, n_split = np.zeros((k, d), np.float32), np.zeros(k, np.int64), first.n_split
        for part in parts:
            for c, (cent, size, split) in part.items():
                centroids[offsets[c]:offsets[c] + k_of[c]], sizes[offsets[c]:offsets[c] + k_of[c]] = cent, size
                n_split += split
        objective = self.set.column_total(col + "_distance")
        self.set.log(f"  two-level k-means: {k1} super clusters, then {k} clusters within them "
                     f"({time.perf_counter() - t0:.1f} s)")
        return ClusterOutcome(centroids, sizes, [objective], n_split,
                              f"two-level: {first.backend} into {k1}, then faiss within each", "hierarchical", col,
                              bytes_per_iteration=first.bytes_per_iteration)

    def choose_reduction(self, k: int, reduction: str, star_max_bytes: int) -> str:
        """star: every shard's k x d sums come to this process (one round trip per iteration); sharded: a
        reduce-scatter in which each shard adds up one range of clusters and the shards fetch each other's
        centroid chunks (two round trips, and no process receives more than about k x d x 12 bytes, whatever
        the number of shards). auto takes the star while what it brings here stays below `star_max_bytes`."""
        if reduction != "auto":
            return reduction
        star_bytes = len(self.set.shards) * (k * max(self.set.dim, 1) * 8 + k * 8 + 8)
        return "star" if star_bytes <= star_max_bytes or len(self.set.shards) == 1 else "sharded"

    def _distributed(self, k: int, *, niter: int, seed: int, init_centroids, col: str,
                     reduction: str = "star") -> ClusterOutcome:
        rng = np.random.default_rng(seed)
        if init_centroids is None:
            init_centroids = self.set.sample_rows(k, rng)
        state = LloydState(np.ascontiguousarray(init_centroids, np.float32), rng)
        step = self._lloyd_sharded if reduction == "sharded" else self._lloyd_star
        recoveries = 0
        while True:
            checkpoint = state.copy()
            try:
                traffic = step(state, niter, checkpoint)
                sizes = self.label_nearest(state.centroids, col)
                break
            except Exception as e:  # noqa: BLE001 - only losses (`shard_lost`) are resumed, the rest re-raised
                if self.set.local or not shard_lost(e) or recoveries >= self.set.recovery.max_restarts:
                    raise
                recoveries += 1
                self.set.log(f"  k-means: a shard was lost at iteration {state.it + 1} ({type(e).__name__}); "
                             f"resuming from iteration {checkpoint.it + 1} once the shards are back")
                self.set.await_shards()
                state = checkpoint
        traffic["recoveries"] = recoveries
        return ClusterOutcome(state.centroids, sizes, state.objective, state.n_split,
                              f"distributed Lloyd over {len(self.set.shards)} actors ({reduction} reduction)",
                              "distributed", col, bytes_per_iteration=traffic)

    def _log_iteration(self, it: int, niter: int, objective: float, split: int) -> None:
        self.set.log(f"  k-means iter {it + 1}/{niter}: objective {objective:.6g}"
                     + (f", split {split} empty" if split else ""))

    def _lloyd_star(self, st: "LloydState", niter: int, checkpoint: "LloydState") -> dict:
        """Centroids out through the object store, every shard's k x d sums back to this process. The
        centroids are here after every step, so every step is a checkpoint."""
        received = 0
        while st.it < niter and not st.done:
            c_ref = self.set.put(st.centroids)
            parts = self.set.get([s.partial.remote(c_ref, self.set.use_gpu) for s in self.set.shards])
            received = sum(p[0].nbytes + p[1].nbytes + 8 for p in parts)
            sums = np.sum([p[0] for p in parts], axis=0)
            counts = np.sum([p[1] for p in parts], axis=0)
            if st.record(float(sum(p[2] for p in parts))):
                break  # a fixed point: faiss >= 1.15 stops here too (early_stop_threshold = 0)
            st.centroids, split = km.update_centroids(sums, counts, st.rng)
            st.n_split += split
            self._log_iteration(st.it, niter, st.objective[-1], split)
            st.it += 1
            checkpoint.take(st)
        # Per iteration: the centroids go out once to the object store and each shard fetches them; every
        # shard's k x d sums come back here, so this process is the busiest and grows with the shards.
        return {"reduction": "star", "shards": len(self.set.shards), "received": int(received),
                "coordinator_received": int(received), "shard_received_max": int(st.centroids.nbytes),
                "centroids_out": int(st.centroids.nbytes)}

    def _lloyd_sharded(self, st: "LloydState", niter: int, checkpoint: "LloydState") -> dict:
        """Reduce-scatter over the shards: shard j owns clusters [b_j, b_j+1), adds every shard's piece of them
        and keeps the means in the object store; the shards fetch the chunks directly from each other. Only the
        k counts and the objective shares come here: the split plan is drawn from the counts (`split_plan`)
        and replayed by every shard, which gives `update_centroids` exactly. The chunks live on the shards, so
        every `recovery.checkpoint_every` steps they are gathered here (k x d x 4 bytes) as the checkpoint a
        lost shard resumes from."""
        shards = self.set.shards
        bounds = km.chunk_bounds(len(st.centroids), len(shards))
        chunk_refs = [self.set.put(np.ascontiguousarray(st.centroids[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]
        plan: list = []
        shard_in = np.zeros(len(shards), np.int64)
        coord_in = 0

        def gather() -> np.ndarray:
            return km.apply_splits(np.concatenate(self.set.get(chunk_refs)).astype(np.float32, copy=False), plan)

        while st.it < niter and not st.done:
            steps = self.set.get([s.lloyd_step.remote(chunk_refs, plan, bounds, self.set.use_gpu, i)
                                  for i, s in enumerate(shards)])
            if st.record(float(sum(x[1] for x in steps))):
                break  # a fixed point: the centroids of this step are the result
            reduced = self.set.get([s.lloyd_reduce.remote([x[0][j] for x in steps], j) for j, s in enumerate(shards)])
            counts = np.concatenate([r[1] for r in reduced])
            plan = km.split_plan(counts, st.rng)
            chunk_refs = [r[0] for r in reduced]
            st.n_split += len(plan)
            shard_in = np.array([x[2] for x in steps]) + np.array([r[2] for r in reduced])
            coord_in = int(counts.nbytes) + 8 * len(shards)
            self._log_iteration(st.it, niter, st.objective[-1], len(plan))
            st.it += 1
            if st.it % max(1, self.set.recovery.checkpoint_every) == 0 and not self.set.local:
                st.centroids = gather()
                checkpoint.take(st)
        st.centroids = gather()
        if not self.set.local:
            checkpoint.take(st)  # a loss in the final assignment resumes here, not steps back
        # Per iteration, measured on the payloads: each shard fetches the other shards' pieces of its cluster
        # range and the other reducers' centroid chunks; this process gets the counts and objective shares.
        busiest = max(int(shard_in.max()) if len(shard_in) else 0, coord_in)
        return {"reduction": "sharded", "shards": len(shards), "received": busiest,
                "coordinator_received": coord_in, "shard_received_max": int(shard_in.max()),
                "centroids_out": 0, "checkpoint_every": int(self.set.recovery.checkpoint_every)}

    def label_nearest(self, centroids: np.ndarray, col: str = "cluster") -> np.ndarray:
        """Nearest-centroid assignment of every held row, kept on the shards as `col`; returns the sizes."""
        c_ref = self.set.put(np.ascontiguousarray(centroids, np.float32))
        sizes = self.set.get([s.label_nearest.remote(c_ref, self.set.use_gpu, col) for s in self.set.shards])
        return np.sum(sizes, axis=0)
