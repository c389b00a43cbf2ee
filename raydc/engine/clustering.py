"""Sharded PCA and k-means over features held by a few long-lived shard actors, and every per-image result.

Nothing per image passes through the caller (the coordinator actor, rank 0, the driver). The feature pool's
workers emit reduced features (PCA fitted on a sample, see `ClusteringService.extract`); the shard actors take
the blocks, run k-means (one actor with faiss while the points fit in one process, else a distributed Lloyd:
centroids go out, per-cluster sums and counts come back, and empty clusters are split exactly as the
in-process reference `raydc.core.kmeans.lloyd` does), and keep each image's cluster as a column of their own.
What leaves them is small: sizes (k), pair counts against the labels or the previous round (<= k x C), a bounded
sample, `RowBlocks` indexes (the values themselves stay in the object store, see raydc.core.rowblocks), and
Parquet parts each shard writes itself (labels per round, the final assignments).

The shards' side lives in `raydc.engine.shard_store` (`ShardStore`, run as the `FeatureShard` actor or in
process through `LocalShard`), placement and recovery in `raydc.engine.shard_placement`; this module is the
coordinator's side, which only ever holds O(k x d).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import ray

from raydc.core import kmeans as km
from raydc.core.metrics import PairCounts
from raydc.core.pca import PCAProjection, pca_from_moments, reduce_moments
from raydc.core.rowblocks import RowBlocks
from raydc.engine.shard_placement import ShardPlacement, ShardRecovery, _lost, _placement_group
from raydc.engine.shard_store import FeatureShard, LocalShard, ShardStore, ShardView
from raydc.methods.api import TRUE, ClusterOutcome, ExtractInfo

__all__ = ["TRUE", "ClusterCoordinator", "ClusterOutcome", "ClusteringService", "CoordinatorProxy", "ExtractInfo",
           "FeatureShard", "LloydState", "LocalShard", "ShardPlacement", "ShardRecovery", "ShardStore", "ShardView",
           "local_service"]

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


def _pool_kind(f) -> str:
    """The feature pool a `features` config runs: Ray Data's on GPUs, the persistent one on CPU (auto)."""
    return f.pool if f.pool != "auto" else ("ray_data" if f.num_gpus > 0 else "persistent")


class ClusteringService:
    """Owns the shard actors for the whole run (created once; each round only moves data through them)."""

    def __init__(self, num_shards: int, num_gpus: float = 0.0, use_gpu: str = "auto", log=print,
                 shards: list | None = None, placement: ShardPlacement | None = None,
                 recovery: ShardRecovery | None = None):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.local = shards is not None
        self.pg = None
        self.recovery = recovery or ShardRecovery()
        if shards is None:
            placement = placement or ShardPlacement("none")
            if placement.strategy != "none":
                self.pg = _placement_group(num_shards, num_gpus, placement)
            rec = self.recovery
            if rec.directory:
                from raydc import storage

                storage.makedirs(rec.directory)
            # max_task_retries: a call in flight when the actor died runs again on the restarted one, which has
            # reloaded its rows (ShardStore.__init__), so most losses cost one call, not the round.
            shards = [FeatureShard.options(
                num_gpus=num_gpus, max_restarts=rec.max_restarts, max_task_retries=rec.max_restarts,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, i)
                if self.pg is not None else None).remote(0, True, rec.directory, i) for i in range(num_shards)]
        self.shards = shards
        self.shard_nodes = self.nodes()
        self._get([s.set_peers.remote(self.shard_nodes.count(n)) for s, n in zip(self.shards, self.shard_nodes)])
        self.use_gpu = use_gpu
        self.log = log
        self.n = 0
        self.dim = 0
        self.sizes: list[int] = []
        self.single = False
        self.pool = None  # the persistent feature pool, started on the first extract

    def _get(self, refs):
        """ray.get that never hangs on a lost shard: while a shard actor is not alive (its node gone, Ray
        restarting it in its placement group bundle) the wait is bounded by `recovery.timeout_s`, then a clear
        error says which shard and why."""
        if self.local:
            return refs
        many = isinstance(refs, list)
        pending = list(refs) if many else [refs]
        down_since: float | None = None
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=2.0)
            if not pending:
                break
            down = self._shards_down()
            if not down:
                down_since = None
                continue
            import time

            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > self.recovery.timeout_s:
                from raydc.errors import UserError

                raise UserError(
                    f"shard actor(s) {', '.join(f'{i} ({st})' for i, st in down)} lost and not back within "
                    f"cluster.recovery_timeout_s = {self.recovery.timeout_s:g} s: the cluster has no node left for "
                    f"their placement group bundles (add nodes, or lower cluster.num_shards)")
        return ray.get(refs)

    def _shards_down(self) -> list[tuple[int, str]]:
        """(index, state) of the shard actors the GCS does not report ALIVE."""
        from ray._private import state

        out = []
        for i, s in enumerate(self.shards):
            st = state.actors(s._actor_id.hex()).get("State", "ALIVE")
            if st != "ALIVE":
                out.append((i, st))
        return out

    def _put(self, value):
        return value if self.local else ray.put(value)

    def await_shards(self) -> None:
        """After a loss: every shard answers (restarted ones have reloaded their rows) and holds what it held
        before, else a clear error (a restarted shard without saved features cannot rejoin the round)."""
        short = [(i, got, want) for i, (got, want) in enumerate(zip(self._sizes_now(), self.sizes)) if got != want]
        if short:
            from raydc.errors import UserError

            i, got, want = short[0]
            raise UserError(f"shard actor {i} was restarted holding {got} rows instead of {want}: "
                            + ("its saved features are missing or stale" if self.recovery.directory else
                               "cluster.persist_features is off, so a lost shard cannot rejoin the round"))

    # ---- features ---------------------------------------------------------------------------------
    def load(self, block_refs: list) -> dict:
        """Hand the feature blocks to the shards, each where possible to a shard on the node that holds it
        (`block_placement`); fail early on NaN/Inf. With every shard on one node there is nothing to prefer, and
        the blocks go round-robin, so the rows each shard holds do not depend on the object store's state."""
        from raydc.engine.block_placement import assign_blocks, round_robin

        owner = round_robin(len(block_refs), len(self.shards))
        local = None
        if not self.local:
            self.shard_nodes = self.nodes()  # a restarted shard may be on another node now
        if not self.local and len(set(self.shard_nodes)) > 1 and block_refs:
            where = ray.experimental.get_object_locations(list(block_refs))
            nodes = [where.get(r, {}).get("node_ids") or [] for r in block_refs]
            sizes = [int(where.get(r, {}).get("object_size") or 0) for r in block_refs]
            owner = assign_blocks(nodes, sizes, self.shard_nodes)
            local = sum(self.shard_nodes[o] in n for o, n in zip(owner, nodes)) / len(block_refs)
        groups = [[r for r, o in zip(block_refs, owner) if o == i] for i in range(len(self.shards))]
        infos = self._get([s.load.remote(g) for s, g in zip(self.shards, groups)])
        self.sizes = [i["n"] for i in infos]
        self.n = sum(self.sizes)
        self.dim = max(i["dim"] for i in infos)
        self.single = False
        out = {"n": self.n, "dim": self.dim, "finite": all(i["finite"] for i in infos)}
        if local is not None:
            out["local_blocks"] = local  # share of blocks taken by a shard on their own node
        return out

    def extract(self, spec, shard_dir: str, manifest, features_cfg, *, pca_dim: int = 0, whiten: bool = False,
                l2_normalize: bool = False, seed: int = 0, projection: PCAProjection | None = None) -> ExtractInfo:
        """Every image's reduced features onto the shards. With PCA, a first pass embeds a uniform sample of
        `features.pca_sample` images (raw features, sample-sized), the shards reduce it to moments and the
        projection is fitted from their sum; the full pass then projects inside the pool's workers. A given
        `projection` (`raydc assign`: the run's own) is applied without fitting."""
        from raydc.core.extractor import FeatureReduction

        import time

        f = features_cfg
        proj, pca_rows = projection, 0
        clock: Counter = Counter()
        t0 = time.perf_counter()
        if pca_dim and proj is None:
            frac = 1.0 if not f.pca_sample or f.pca_sample >= manifest.count else f.pca_sample / manifest.count
            spec.reduction = FeatureReduction(keep_fraction=frac, seed=seed)
            info = self._pass(spec, shard_dir, manifest, f, clock)
            if not info["finite"]:
                return ExtractInfo(info["n"], info["dim"], False, clock=clock)
            t_fit = time.perf_counter()
            parts = [m for m in self._get([s.moments.remote() for s in self.shards]) if m is not None]
            moments = reduce_moments(parts)
            pca_rows = int(moments.n)
            proj = pca_from_moments(moments, pca_dim, whiten=whiten)
            if frac >= 1.0:  # the sample is every image (N <= pca_sample): project what the shards hold
                finite = all(self._get([s.project.remote(proj, l2_normalize, f.dtype) for s in self.shards]))
                self.dim = pca_dim
                return ExtractInfo(info["n"], pca_dim, finite, proj, pca_rows, time.perf_counter() - t_fit, clock)
            self.release()
        pca_seconds = time.perf_counter() - t0
        spec.reduction = FeatureReduction(projection=proj, l2_normalize=l2_normalize, dtype=f.dtype)
        info = self._pass(spec, shard_dir, manifest, f, clock)
        return ExtractInfo(info["n"], info["dim"], info["finite"], proj, pca_rows, pca_seconds, clock)

    def _pass(self, spec, shard_dir: str, manifest, f, clock: Counter) -> dict:
        """One pool pass onto the shards, its seconds added to `clock`."""
        import time

        t0 = time.perf_counter()
        refs = self._run_pool(spec, shard_dir, manifest, f)
        t1 = time.perf_counter()
        info = self.load(refs)
        clock["pool"] += t1 - t0
        clock["load"] += time.perf_counter() - t1
        if _pool_kind(f) == "persistent" and self.pool is not None:  # (a test's in-process pool has no clock)
            clock.update(self.pool.pass_clock())  # Counter.update adds
        return info

    def _run_pool(self, spec, shard_dir: str, manifest, f) -> list:
        from raydc.engine.ray_data_pool import extract_features

        if _pool_kind(f) == "ray_data":
            return extract_features(shard_dir, manifest, spec, concurrency=f.concurrency, num_cpus=f.num_cpus,
                                    num_gpus=f.num_gpus, batch_size=f.batch_size)
        from raydc.engine.datasets import check_shard_footers
        from raydc.engine.persistent_pool import PersistentFeaturePool

        if self.pool is None or self.pool.concurrency != f.concurrency:
            if self.pool is not None:
                self.pool.shutdown()
            check_shard_footers(manifest, shard_dir)  # a clear error before the pool plans its pieces
            self.pool = PersistentFeaturePool(manifest, f.concurrency)
        from raydc.storage import is_uri

        paths = manifest.shard_paths(shard_dir)
        if not is_uri(str(shard_dir)):
            paths = [str(Path(p).resolve()) for p in paths]
        return self.pool.extract(paths, spec, f.batch_size)

    # ---- k-means ----------------------------------------------------------------------------------
    def choose_mode(self, mode: str, single_max_bytes: int) -> str:
        if mode != "auto":
            return mode
        return "single" if self.n * self.dim * 4 <= single_max_bytes or len(self.shards) == 1 else "distributed"

    def kmeans(self, k: int, *, niter: int, seed: int, n_init: int = 1, mode: str = "single",
               init_centroids: np.ndarray | None = None, col: str = "cluster", reduction: str = "auto",
               star_max_bytes: int = 64 << 20, hierarchical: str = "never", hierarchical_min_k: int = 50_000,
               super_k: int = 0) -> ClusterOutcome:
        """k-means of every held row; each shard keeps its rows' clusters as column `col`."""
        if k > self.n:
            raise ValueError(f"cluster.k = {k} is larger than the number of images ({self.n})")
        if init_centroids is None and (hierarchical == "always" or (hierarchical == "auto"
                                                                    and k >= hierarchical_min_k)):
            return self._two_level(k, niter=niter, seed=seed, mode=mode, col=col, super_k=super_k,
                                   reduction=reduction, star_max_bytes=star_max_bytes)
        if mode == "single" or len(self.shards) == 1:
            if len(self.shards) > 1 and not self.single:
                self._get(self.shards[0].absorb.remote([s.take.remote() for s in self.shards[1:]],
                                                       list(range(1, len(self.shards)))))
                self.sizes = [self.n] + [0] * (len(self.shards) - 1)
                self.single = True
            res = self._get(self.shards[0].kmeans.remote(k, niter, seed, n_init, self.use_gpu, init_centroids, col))
            for s in self.shards[1:]:  # the empty shards get empty columns, so every shard has `col`
                self._get(s.assign.remote(res["centroids"], self.use_gpu, col))
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
        k1 = min(super_k or max(2, int(round(np.sqrt(k)))), k, self.n)
        first = self.kmeans(k1, niter=niter, seed=seed, mode=mode, col="super", reduction=reduction,
                            star_max_bytes=star_max_bytes)
        sizes1 = np.asarray(first.sizes)
        k_of = km.allocate_subclusters(k, sizes1)
        offsets = np.concatenate([[0], np.cumsum(k_of)[:-1]])
        owner_of, load = np.zeros(k1, np.int64), np.zeros(len(self.shards))
        for c in np.argsort(-sizes1, kind="stable"):  # largest first, each to the least loaded shard
            owner_of[c] = int(np.argmin(load))
            load[owner_of[c]] += sizes1[c]
        routed = self._get([s.route.remote("super", owner_of, len(self.shards)) for s in self.shards])
        self.sizes = self._get([s.gather.remote([r[j] for r in routed], "super") for j, s in enumerate(self.shards)])
        self.single = False
        groups = [{int(c): (int(k_of[c]), int(offsets[c]), derive_seed(seed, int(c), 71))
                   for c in np.flatnonzero((owner_of == j) & (k_of > 0))} for j in range(len(self.shards))]
        parts = self._get([s.sub_kmeans.remote(g, niter, self.use_gpu, "super", col)
                           for s, g in zip(self.shards, groups)])
        d = first.centroids.shape[1]
        centroids, sizes, n_split = np.zeros((k, d), np.float32), np.zeros(k, np.int64), first.n_split
        for part in parts:
            for c, (cent, size, split) in part.items():
                centroids[offsets[c]:offsets[c] + k_of[c]], sizes[offsets[c]:offsets[c] + k_of[c]] = cent, size
                n_split += split
        objective = self.column_total(col + "_distance")
        self.log(f"  two-level k-means: {k1} super clusters, then {k} clusters within them "
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
        star_bytes = len(self.shards) * (k * max(self.dim, 1) * 8 + k * 8 + 8)
        return "star" if star_bytes <= star_max_bytes or len(self.shards) == 1 else "sharded"

    def _distributed(self, k: int, *, niter: int, seed: int, init_centroids, col: str,
                     reduction: str = "star") -> ClusterOutcome:
        rng = np.random.default_rng(seed)
        if init_centroids is None:
            init_centroids = self.sample_rows(k, rng)
        state = LloydState(np.ascontiguousarray(init_centroids, np.float32), rng)
        step = self._lloyd_sharded if reduction == "sharded" else self._lloyd_star
        recoveries = 0
        while True:
            checkpoint = state.copy()
            try:
                traffic = step(state, niter, checkpoint)
                sizes = self.assign_to(state.centroids, col)
                break
            except Exception as e:  # noqa: BLE001 - only losses (`_lost`) are resumed, the rest re-raised
                if self.local or not _lost(e) or recoveries >= self.recovery.max_restarts:
                    raise
                recoveries += 1
                self.log(f"  k-means: a shard was lost at iteration {state.it + 1} ({type(e).__name__}); "
                         f"resuming from iteration {checkpoint.it + 1} once the shards are back")
                self.await_shards()
                state = checkpoint
        traffic["recoveries"] = recoveries
        return ClusterOutcome(state.centroids, sizes, state.objective, state.n_split,
                              f"distributed Lloyd over {len(self.shards)} actors ({reduction} reduction)",
                              "distributed", col, bytes_per_iteration=traffic)

    def _log_iteration(self, it: int, niter: int, objective: float, split: int) -> None:
        self.log(f"  k-means iter {it + 1}/{niter}: objective {objective:.6g}"
                 + (f", split {split} empty" if split else ""))

    def _lloyd_star(self, st: "LloydState", niter: int, checkpoint: "LloydState") -> dict:
        """Centroids out through the object store, every shard's k x d sums back to this process. The
        centroids are here after every step, so every step is a checkpoint."""
        received = 0
        while st.it < niter and not st.done:
            c_ref = self._put(st.centroids)
            parts = self._get([s.partial.remote(c_ref, self.use_gpu) for s in self.shards])
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
        return {"reduction": "star", "shards": len(self.shards), "received": int(received),
                "coordinator_received": int(received), "shard_received_max": int(st.centroids.nbytes),
                "centroids_out": int(st.centroids.nbytes)}

    def _lloyd_sharded(self, st: "LloydState", niter: int, checkpoint: "LloydState") -> dict:
        """Reduce-scatter over the shards: shard j owns clusters [b_j, b_j+1), adds every shard's piece of them
        and keeps the means in the object store; the shards fetch the chunks directly from each other. Only the
        k counts and the objective shares come here: the split plan is drawn from the counts (`split_plan`)
        and replayed by every shard, which gives `update_centroids` exactly. The chunks live on the shards, so
        every `recovery.checkpoint_every` steps they are gathered here (k x d x 4 bytes) as the checkpoint a
        lost shard resumes from."""
        shards = self.shards
        bounds = km.chunk_bounds(len(st.centroids), len(shards))
        chunk_refs = [self._put(np.ascontiguousarray(st.centroids[a:b])) for a, b in zip(bounds[:-1], bounds[1:])]
        plan: list = []
        shard_in = np.zeros(len(shards), np.int64)
        coord_in = 0

        def gather() -> np.ndarray:
            return km.apply_splits(np.concatenate(self._get(chunk_refs)).astype(np.float32, copy=False), plan)

        while st.it < niter and not st.done:
            steps = self._get([s.lloyd_step.remote(chunk_refs, plan, bounds, self.use_gpu, i)
                               for i, s in enumerate(shards)])
            if st.record(float(sum(x[1] for x in steps))):
                break  # a fixed point: the centroids of this step are the result
            reduced = self._get([s.lloyd_reduce.remote([x[0][j] for x in steps], j) for j, s in enumerate(shards)])
            counts = np.concatenate([r[1] for r in reduced])
            plan = km.split_plan(counts, st.rng)
            chunk_refs = [r[0] for r in reduced]
            st.n_split += len(plan)
            shard_in = np.array([x[2] for x in steps]) + np.array([r[2] for r in reduced])
            coord_in = int(counts.nbytes) + 8 * len(shards)
            self._log_iteration(st.it, niter, st.objective[-1], len(plan))
            st.it += 1
            if st.it % max(1, self.recovery.checkpoint_every) == 0 and not self.local:
                st.centroids = gather()
                checkpoint.take(st)
        st.centroids = gather()
        if not self.local:
            checkpoint.take(st)  # a loss in the final assignment resumes here, not steps back
        # Per iteration, measured on the payloads: each shard fetches the other shards' pieces of its cluster
        # range and the other reducers' centroid chunks; this process gets the counts and objective shares.
        busiest = max(int(shard_in.max()) if len(shard_in) else 0, coord_in)
        return {"reduction": "sharded", "shards": len(shards), "received": busiest,
                "coordinator_received": coord_in, "shard_received_max": int(shard_in.max()),
                "centroids_out": 0, "checkpoint_every": int(self.recovery.checkpoint_every)}

    def sample_rows(self, k: int, rng: np.random.Generator) -> np.ndarray:
        """k distinct rows drawn uniformly over all shards (the same rule as faiss' random init)."""
        picks = np.sort(rng.choice(self.n, size=k, replace=False))
        bounds = np.cumsum([0] + self.sizes)
        out = []
        for i, s in enumerate(self.shards):
            local = picks[(picks >= bounds[i]) & (picks < bounds[i + 1])] - bounds[i]
            if len(local):
                out.append(self._get(s.rows_at.remote(local)))
        rows = np.concatenate(out)
        return rows[rng.permutation(len(rows))]

    def assign_to(self, centroids: np.ndarray, col: str = "cluster") -> np.ndarray:
        """Nearest-centroid assignment of every held row, kept on the shards as `col`; returns the sizes."""
        c_ref = self._put(np.ascontiguousarray(centroids, np.float32))
        return np.sum(self._get([s.assign.remote(c_ref, self.use_gpu, col) for s in self.shards]), axis=0)

    # ---- per-image results, kept on the shards ----------------------------------------------------------
    def counts(self, a, b) -> PairCounts | None:
        """(a, b) pair counts summed over the shards; a and b are column names, TRUE, or RowBlocks. None when
        a shard lacks one of them (no evaluation labels, say)."""
        parts = self._get([s.counts.remote(a, b) for s in self.shards])
        if any(p is None for p in parts):
            return None
        merged = PairCounts.merge(parts)
        return merged if merged.n else None

    def _sizes_now(self) -> list[int]:
        return self._get([s.size.remote() for s in self.shards])

    def publish(self, col: str, dtype: str | None = None, fill: Any = -1) -> RowBlocks:
        """Column `col` of every shard into the object store, by contiguous row range."""
        return RowBlocks.merge(self._get([s.publish.remote(col, dtype, fill) for s in self.shards]), fill)

    def write_parts(self, directory: str, columns: dict[str, str], paths: list | None = None) -> list[str]:
        """Each shard writes its rows to `directory`/part-NNNNN.parquet (columns: row, id[, path], then
        `columns`; `paths`: see ShardStore.write_part)."""
        from raydc import storage

        storage.makedirs(directory)
        parts = [storage.join(directory, f"part-{i:05d}.parquet") for i in range(len(self.shards))]
        written = self._get([s.write_part.remote(p, columns, paths) for s, p in zip(self.shards, parts)])
        return [p for p, n in zip(parts, written) if n]

    def read_parts(self, directory: str, column: str, dtype: str | None = None, fill: Any = -1) -> RowBlocks:
        """Parts written by `write_parts` back into the object store, spread over the shards."""
        from raydc import storage

        paths = [p for p in storage.list_files(directory, suffix=".parquet")
                 if p.rsplit("/", 1)[-1].startswith("part-")]
        groups = [paths[i::len(self.shards)] for i in range(len(self.shards))]
        return RowBlocks.merge(self._get([s.read_parts.remote(g, column, dtype, fill)
                                          for s, g in zip(self.shards, groups) if g]), fill)

    def sample_features(self, n: int, seed: int, cols: tuple[str, ...] = ()) -> tuple[np.ndarray, np.ndarray, dict]:
        """(ids, features, {col: values}) of at most n rows drawn uniformly, without replacement, from what the
        shards hold now: a bounded sample, whatever N is."""
        sizes = self._sizes_now()
        total = int(sum(sizes))
        if total == 0:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32), {}
        picks = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
        bounds = np.cumsum([0] + sizes)
        refs = [s.sample.remote(picks[(picks >= lo) & (picks < hi)] - lo, cols)
                for s, lo, hi in zip(self.shards, bounds[:-1], bounds[1:]) if ((picks >= lo) & (picks < hi)).any()]
        parts = self._get(refs)
        values = {c: np.concatenate([p[2][c] for p in parts]) for c in cols if all(c in p[2] for p in parts)}
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), values

    def column_total(self, col: str) -> float:
        """The float64 sum of a per-row column over every shard (the final k-means objective: `col`_distance)."""
        return float(np.sum(self.apply(_distance_sum, col)))

    def apply(self, fn: Callable, *args) -> list:
        # a large array goes into the object store once, not once per shard (Ray copies a by-value argument
        # into each task)
        args = tuple(self._put(a) if isinstance(a, np.ndarray) and a.nbytes > (1 << 20) else a for a in args)
        return self._get([s.apply.remote(fn, *args) for s in self.shards])

    def peak_rss(self) -> list[dict]:
        from raydc.engine.memory import peak

        return self._get([s.peak_rss.remote() for s in self.shards]) + [{"coordinator": True, **peak()}]

    def release(self) -> None:
        self._get([s.clear.remote() for s in self.shards])

    def nodes(self) -> list[str]:
        """The node id of each shard actor."""
        return self._get([s.node.remote() for s in self.shards])

    def shutdown(self) -> None:
        if not self.local:
            for s in self.shards:
                ray.kill(s)
        self.shards = []
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
            self.pg = None
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None


def _distance_sum(view: ShardView, col: str) -> float:
    return float(np.asarray(view.cols[col], np.float64).sum()) if len(view.ids) else 0.0


def local_service(num_shards: int = 2, log=print) -> ClusteringService:
    """The service over in-process shards (the method tests' stand-in for the actors)."""
    return ClusteringService(num_shards, log=log, shards=[LocalShard(ShardStore(in_ray=False))
                                                          for _ in range(num_shards)])


@ray.remote(num_cpus=0)
class ClusterCoordinator:
    """The clustering service as an actor of its own, outside the training workers' placement group.

    Why not run it in rank 0 directly: Ray Data sizes its budget to the placement group of the process that
    starts it, and a Train worker's bundle is all used by the worker itself, so a feature pass started from
    rank 0 waits forever for a CPU ("Cluster resources are not enough..."). Created with the default
    scheduling strategy, this actor and everything it starts escape that placement group."""

    def __init__(self, num_shards: int, num_gpus: float, use_gpu: str, placement: ShardPlacement | None = None,
                 recovery: ShardRecovery | None = None):
        from raydc.engine.memory import start_sampler
        from raydc.engine.runtime import configure_data_context

        start_sampler()
        configure_data_context()
        self.service = ClusteringService(num_shards, num_gpus, use_gpu, placement=placement, recovery=recovery)

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def call(self, name: str, *args, **kwargs):
        return getattr(self.service, name)(*args, **kwargs)


class CoordinatorProxy:
    """Lets rank 0 call the coordinator as if it were a local ClusteringService."""

    def __init__(self, num_shards: int, num_gpus: float = 0.0, use_gpu: str = "auto",
                 placement: ShardPlacement | None = None, resource: str | None = None,
                 recovery: ShardRecovery | None = None):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.handle = ClusterCoordinator.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None),
            resources={resource: 0.001} if resource else None).remote(num_shards, num_gpus, use_gpu, placement,
                                                                      recovery)

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)

        def call(*args, **kwargs):
            return ray.get(self.handle.call.remote(name, *args, **kwargs))

        return call

    def shutdown(self) -> None:
        try:
            ray.get(self.handle.call.remote("shutdown"))
        finally:
            ray.kill(self.handle)

