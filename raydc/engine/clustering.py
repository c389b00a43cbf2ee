"""Sharded PCA and k-means over features held by a few long-lived Ray actors.

The feature pool leaves its output blocks in the object store; `FeatureShard` actors take them round-robin.
PCA needs one pass: each shard reduces its blocks to moments (n, Σx, Σxxᵀ), the caller sums them and derives
the whitening projection (d×d floats on the wire per shard), the shards project and L2-normalise in place.
k-means then runs either on one actor with faiss on all of its points (fast while they fit in one process),
or as a distributed Lloyd: centroids go out, per-cluster sums and counts come back, the caller splits empty
clusters exactly as the in-process reference (`raydc.core.kmeans.lloyd`) does, so both agree.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray

from raydc.core import kmeans as km
from raydc.core.pca import Moments, PCAProjection, l2_normalize, pca_from_moments, reduce_moments


@ray.remote(num_cpus=0)
class FeatureShard:
    """Holds one slice of the features (and the ids and, when present, evaluation labels) between phases."""

    def __init__(self, threads: int = 0):
        from raydc.core.faiss_backend import use_all_cores

        self.cores = use_all_cores(threads or None)  # Ray gave this 0-CPU actor OMP_NUM_THREADS=1
        self.threads_now = self.cores
        self.busy_peers = 1  # shard actors of this node that work at the same time (distributed steps)
        self.clear()

    def node(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def set_peers(self, n: int) -> None:
        self.busy_peers = max(1, int(n))

    def _threads(self, alone: bool) -> None:
        """All cores when this actor works alone (single-actor k-means), its share when every shard of the
        node works at once (distributed Lloyd steps, assignment), so they never oversubscribe the cores.
        Called every Lloyd iteration: the thread pools are only touched when the count changes."""
        from raydc.core.faiss_backend import use_all_cores

        want = self.cores if alone else max(1, self.cores // self.busy_peers)
        if want != self.threads_now:
            self.threads_now = use_all_cores(want)

    def threads(self) -> dict:
        from raydc.core.faiss_backend import import_faiss

        import torch

        return {"faiss": import_faiss().omp_get_max_threads(), "torch": torch.get_num_threads(),
                "cores": self.cores, "busy_peers": self.busy_peers}

    def clear(self) -> None:
        self.blocks: list = []
        self.ids = np.zeros(0, np.int64)
        self.labels: np.ndarray | None = None
        self.x: np.ndarray | None = None

    def load(self, block_refs: list) -> dict:
        """Keep the block refs (not copies) until projection, which is when the raw features can go."""
        self.clear()
        blocks = ray.get(block_refs)
        self.blocks = [b for b in blocks if len(b["id"])]
        self.ids = np.concatenate([b["id"] for b in self.blocks]) if self.blocks else np.zeros(0, np.int64)
        if self.blocks and "label" in self.blocks[0]:
            self.labels = np.concatenate([b["label"] for b in self.blocks])
        finite = all(np.isfinite(b["feature"]).all() for b in self.blocks)
        dim = int(self.blocks[0]["feature"].shape[1]) if self.blocks else 0
        return {"n": int(len(self.ids)), "dim": dim, "finite": bool(finite)}

    def moments(self) -> Moments | None:
        parts = [Moments.from_array(np.asarray(b["feature"], np.float32)) for b in self.blocks]
        return reduce_moments(parts) if parts else None

    def project(self, proj: PCAProjection | None, l2: bool) -> bool:
        outs = []
        for b in self.blocks:
            f = np.asarray(b["feature"], np.float32)
            outs.append(proj.apply(f, l2_normalize=l2) if proj is not None else (l2_normalize(f) if l2 else f))
        self.blocks = []
        self.x = np.ascontiguousarray(np.concatenate(outs)) if outs else np.zeros((0, 0), np.float32)
        return bool(np.isfinite(self.x).all())

    def take(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """Hand over this shard's rows (for single-actor k-means) and forget them."""
        out = (self.ids, self.x, self.labels)
        self.clear()
        return out

    def absorb(self, part_refs: list) -> int:
        parts = [(self.ids, self.x, self.labels)] + ray.get(list(part_refs))
        parts = [p for p in parts if p[1] is not None and len(p[0])]
        self.ids = np.concatenate([p[0] for p in parts])
        self.x = np.ascontiguousarray(np.concatenate([p[1] for p in parts]))
        self.labels = np.concatenate([p[2] for p in parts]) if parts[0][2] is not None else None
        return len(self.ids)

    def rows(self, positions: np.ndarray) -> np.ndarray:
        return self.x[positions]

    def size(self) -> int:
        """Rows held now: projected ones, or raw feature blocks not projected yet."""
        if self.x is not None:
            return int(len(self.ids))
        return int(sum(len(b["id"]) for b in self.blocks))

    def sample(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.x is not None:
            return self.ids[positions], np.asarray(self.x[positions], np.float32)
        feats = np.concatenate([np.asarray(b["feature"], np.float32) for b in self.blocks])
        return self.ids[positions], feats[positions]

    def kmeans(self, k: int, niter: int, seed: int, n_init: int, use_gpu: str,
               init_centroids: np.ndarray | None = None) -> km.KMeansResult:
        # faiss prints one line per iteration (time, objective, splits): the k-means progress in the job log.
        self._threads(alone=True)
        return km.kmeans(self.x, k, niter=niter, seed=seed, n_init=n_init, use_gpu=use_gpu,
                         init_centroids=init_centroids, verbose=True)

    def partial(self, centroids: np.ndarray, use_gpu: str) -> tuple[np.ndarray, np.ndarray, float]:
        if not len(self.ids):  # more shards than feature blocks: an empty shard contributes nothing
            k, d = centroids.shape
            return np.zeros((k, d)), np.zeros(k, np.int64), 0.0
        self._threads(alone=False)
        labels, dist = km.assign(self.x, centroids, use_gpu=use_gpu)
        sums, counts = km.partial_sums(self.x, labels, len(centroids))
        return sums, counts, float(dist.sum(dtype=np.float64))

    def assign(self, centroids: np.ndarray, use_gpu: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray | None]:
        if not len(self.ids):
            return self.ids, np.zeros(0, np.int64), np.zeros(0, np.float32), self.labels
        self._threads(alone=False)
        labels, dist = km.assign(self.x, centroids, use_gpu=use_gpu)
        return self.ids, labels, dist, self.labels

    def features(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        return self.ids, self.x, self.labels

    def meta(self) -> tuple[np.ndarray, np.ndarray | None]:
        return self.ids, self.labels

    def apply(self, fn, *args):
        """Run a method-specific pure function on this shard's arrays (DEC's soft assignment, for one)."""
        return fn(self.ids, self.x, self.labels, *args)


@dataclass
class ClusterOutcome:
    """A full clustering of the dataset, gathered by id."""

    ids: np.ndarray
    labels: np.ndarray
    distances: np.ndarray
    centroids: np.ndarray
    objective: list[float]
    n_split: int
    backend: str
    mode: str
    true_labels: np.ndarray | None = None
    projection: PCAProjection | None = None
    groups: np.ndarray | None = None  # a merged clustering: the cluster of each centroid (labels = groups[nearest])


class ClusteringService:
    """Owns the shard actors for the whole run (created once; each round only moves data through them)."""

    def __init__(self, num_shards: int, num_gpus: float = 0.0, use_gpu: str = "auto", log=print):
        self.shards = [FeatureShard.options(num_gpus=num_gpus).remote() for _ in range(num_shards)]
        nodes = ray.get([s.node.remote() for s in self.shards])
        ray.get([s.set_peers.remote(nodes.count(n)) for s, n in zip(self.shards, nodes)])
        self.use_gpu = use_gpu
        self.log = log
        self.n = 0
        self.dim = 0
        self.sizes: list[int] = []
        self.single = False
        self.pool = None  # the persistent feature pool, started on the first extract

    def load(self, block_refs: list) -> dict:
        """Distribute feature blocks round-robin; fail early on NaN/Inf."""
        groups = [block_refs[i::len(self.shards)] for i in range(len(self.shards))]
        infos = ray.get([s.load.remote(g) for s, g in zip(self.shards, groups)])
        self.sizes = [i["n"] for i in infos]
        self.n = sum(self.sizes)
        self.dim = max(i["dim"] for i in infos)
        self.single = False
        return {"n": self.n, "dim": self.dim, "finite": all(i["finite"] for i in infos)}

    def fit_projection(self, pca_dim: int, whiten: bool) -> PCAProjection | None:
        if not pca_dim:
            return None
        parts = [m for m in ray.get([s.moments.remote() for s in self.shards]) if m is not None]
        return pca_from_moments(reduce_moments(parts), pca_dim, whiten=whiten)

    def project(self, proj: PCAProjection | None, l2: bool) -> bool:
        ok = ray.get([s.project.remote(proj, l2) for s in self.shards])
        if proj is not None:
            self.dim = proj.matrix.shape[1]
        return all(ok)

    def choose_mode(self, mode: str, single_max_bytes: int) -> str:
        if mode != "auto":
            return mode
        return "single" if self.n * self.dim * 4 <= single_max_bytes or len(self.shards) == 1 else "distributed"

    def kmeans(self, k: int, *, niter: int, seed: int, n_init: int = 1, mode: str = "single",
               init_centroids: np.ndarray | None = None) -> ClusterOutcome:
        if k > self.n:
            raise ValueError(f"cluster.k = {k} is larger than the number of images ({self.n})")
        if mode == "single" or len(self.shards) == 1:
            if len(self.shards) > 1 and not self.single:
                ray.get(self.shards[0].absorb.remote([s.take.remote() for s in self.shards[1:]]))
                self.single = True
            res: km.KMeansResult = ray.get(self.shards[0].kmeans.remote(
                k, niter, seed, n_init, self.use_gpu, init_centroids))
            ids, true = ray.get(self.shards[0].meta.remote())
            return ClusterOutcome(ids, res.labels, res.distances, res.centroids, list(res.objective), res.n_split,
                                  res.backend, "single", true)
        return self._distributed(k, niter=niter, seed=seed, init_centroids=init_centroids)

    def _distributed(self, k: int, *, niter: int, seed: int, init_centroids) -> ClusterOutcome:
        rng = np.random.default_rng(seed)
        if init_centroids is None:
            init_centroids = self.sample_rows(k, rng)
        centroids = np.ascontiguousarray(init_centroids, np.float32)
        objective, n_split = [], 0
        for it in range(niter):
            c_ref = ray.put(centroids)
            parts = ray.get([s.partial.remote(c_ref, self.use_gpu) for s in self.shards])
            sums = np.sum([p[0] for p in parts], axis=0)
            counts = np.sum([p[1] for p in parts], axis=0)
            objective.append(float(sum(p[2] for p in parts)))
            if it > 0 and objective[-1] == objective[-2]:
                break  # a fixed point: faiss >= 1.15 stops here too (early_stop_threshold = 0)
            centroids, split = km.update_centroids(sums, counts, rng)
            n_split += split
            self.log(f"  k-means iter {it + 1}/{niter}: objective {objective[-1]:.6g}"
                     + (f", split {split} empty" if split else ""))
        c_ref = ray.put(centroids)
        parts = ray.get([s.assign.remote(c_ref, self.use_gpu) for s in self.shards])
        ids = np.concatenate([p[0] for p in parts])
        labelled = [p[3] for p in parts if p[3] is not None]
        true = np.concatenate(labelled) if labelled and len(labelled) == sum(len(p[0]) > 0 for p in parts) else None
        return ClusterOutcome(ids, np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts]),
                              centroids, objective, n_split, f"distributed Lloyd over {len(self.shards)} actors",
                              "distributed", true)

    def sample_rows(self, k: int, rng: np.random.Generator) -> np.ndarray:
        """k distinct rows drawn uniformly over all shards (the same rule as faiss' random init)."""
        picks = np.sort(rng.choice(self.n, size=k, replace=False))
        bounds = np.cumsum([0] + self.sizes)
        out = []
        for i, s in enumerate(self.shards):
            local = picks[(picks >= bounds[i]) & (picks < bounds[i + 1])] - bounds[i]
            if len(local):
                out.append(ray.get(s.rows.remote(local)))
        rows = np.concatenate(out)
        return rows[rng.permutation(len(rows))]

    def assign_to(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Nearest-centroid assignment of every held row to given centroids: (ids, clusters, distances)."""
        c_ref = ray.put(np.ascontiguousarray(centroids, np.float32))
        parts = ray.get([s.assign.remote(c_ref, self.use_gpu) for s in self.shards])
        parts = [p for p in parts if len(p[0])]
        return tuple(np.concatenate([p[i] for p in parts]) for i in range(3))

    def sample_features(self, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
        """(ids, features) of at most n rows drawn uniformly, without replacement, from what the shards hold now
        (after `load`, `project` or single-actor k-means alike): a bounded sample, whatever N is."""
        sizes = ray.get([s.size.remote() for s in self.shards])
        total = int(sum(sizes))
        if total == 0:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        picks = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
        bounds = np.cumsum([0] + sizes)
        refs = [s.sample.remote(picks[(picks >= lo) & (picks < hi)] - lo)
                for s, lo, hi in zip(self.shards, bounds[:-1], bounds[1:]) if ((picks >= lo) & (picks < hi)).any()]
        parts = ray.get(refs)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def gather_features(self) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        parts = ray.get([s.features.remote() for s in self.shards])
        parts = [p for p in parts if p[1] is not None and len(p[0])]
        true = np.concatenate([p[2] for p in parts]) if parts and parts[0][2] is not None else None
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), true

    def apply(self, fn, *args) -> list:
        return ray.get([s.apply.remote(fn, *args) for s in self.shards])

    def release(self) -> None:
        ray.get([s.clear.remote() for s in self.shards])

    def extract(self, spec, shard_dir: str, manifest, features_cfg) -> dict:
        """Run the feature pool over every image and spread its output blocks over the shards."""
        from raydc.engine.features import extract_features

        f = features_cfg
        pool = f.pool if f.pool != "auto" else ("ray_data" if f.num_gpus > 0 else "persistent")
        if pool == "ray_data":
            refs = extract_features(shard_dir, manifest, spec, concurrency=f.concurrency, num_cpus=f.num_cpus,
                                    num_gpus=f.num_gpus, batch_size=f.batch_size)
        else:
            from raydc.engine.datasets import check_shard_footers
            from raydc.engine.feature_pool import PersistentFeaturePool

            if self.pool is None or self.pool.concurrency != f.concurrency:
                if self.pool is not None:
                    self.pool.shutdown()
                check_shard_footers(manifest, shard_dir)  # a clear error before the pool plans its pieces
                self.pool = PersistentFeaturePool(manifest, f.concurrency)
            paths = [str(Path(p).resolve()) for p in manifest.shard_paths(shard_dir)]
            refs = self.pool.extract(paths, spec, f.batch_size)
        return self.load(refs)

    def shutdown(self) -> None:
        for s in self.shards:
            ray.kill(s)
        self.shards = []
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None


@ray.remote(num_cpus=0)
class ClusterCoordinator:
    """The clustering service as an actor of its own, outside the training workers' placement group.

    Why not run it in rank 0 directly: Ray Data sizes its budget to the placement group of the process that
    starts it, and a Train worker's bundle is all used by the worker itself, so a feature pass started from
    rank 0 waits forever for a CPU ("Cluster resources are not enough..."). Created with the default
    scheduling strategy, this actor and everything it starts escape that placement group."""

    def __init__(self, num_shards: int, num_gpus: float, use_gpu: str):
        from raydc.engine.runtime import configure_data_context

        configure_data_context()
        self.service = ClusteringService(num_shards, num_gpus, use_gpu)

    def call(self, name: str, *args, **kwargs):
        return getattr(self.service, name)(*args, **kwargs)


class CoordinatorProxy:
    """Lets rank 0 call the coordinator as if it were a local ClusteringService."""

    def __init__(self, num_shards: int, num_gpus: float = 0.0, use_gpu: str = "auto"):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.handle = ClusterCoordinator.options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=None)).remote(
            num_shards, num_gpus, use_gpu)

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
