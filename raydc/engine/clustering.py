"""The clustering service rank 0 calls between rounds, and the actor it runs in.

Nothing per image passes through the caller (the coordinator actor, rank 0, the driver). The service is three
jobs over one set of shard actors, each in a module of its own:
- `raydc.engine.shard_set.ShardSet`: the actors (placement, restarts), the blocks each holds, and every
  per-image result kept on them as columns (pair counts, Parquet parts, a bounded sample, `apply`);
- `raydc.engine.feature_pass.FeaturePass`: the network over every image into the shards, with the PCA fitted
  on a sample (the pool's workers project, so only reduced features travel);
- `raydc.engine.sharded_kmeans.ShardedKMeans`: faiss on one shard, a distributed Lloyd, or two levels.
The shards' side lives in `raydc.engine.shard_store` (`ShardStore`, run as the `FeatureShard` actor or in
process through `LocalShard`), placement and recovery in `raydc.engine.shard_placement`. What a method may call
is `raydc.methods.api.ShardService`; the rest is the engine's.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import ray

from raydc.core.metrics import PairCounts
from raydc.core.pca import PCAProjection
from raydc.core.rowblocks import RowBlocks
from raydc.engine.feature_pass import FeaturePass
from raydc.engine.shard_placement import ShardPlacement, ShardRecovery
from raydc.engine.shard_set import ShardSet
from raydc.engine.shard_store import FeatureShard, LocalShard, ShardStore
from raydc.engine.sharded_kmeans import LloydState, ShardedKMeans
from raydc.methods.api import TRUE, ClusterOutcome, ExtractInfo, ShardView

__all__ = ["TRUE", "ClusterCoordinator", "ClusterOutcome", "ClusteringService", "CoordinatorProxy", "ExtractInfo",
           "FeatureShard", "LloydState", "LocalShard", "ShardPlacement", "ShardRecovery", "ShardStore", "ShardView",
           "local_service"]


class ClusteringService:
    """The shard set, the feature pass and k-means over it, as the one service the coordinator actor runs for the
    whole run (created once; each round only moves data through it). Every call is one line to the job that owns
    it."""

    def __init__(self, num_shards: int, num_gpus: float = 0.0, use_gpu: str = "auto", log=print,
                 shards: list | None = None, placement: ShardPlacement | None = None,
                 recovery: ShardRecovery | None = None):
        self.shard_set = ShardSet(num_shards, num_gpus, use_gpu, log, shards, placement, recovery)
        self.features = FeaturePass(self.shard_set)
        self.kmeans_over = ShardedKMeans(self.shard_set)

    # what the set holds
    shards = property(lambda self: self.shard_set.shards)
    local = property(lambda self: self.shard_set.local)
    n = property(lambda self: self.shard_set.n)
    dim = property(lambda self: self.shard_set.dim)
    sizes = property(lambda self: self.shard_set.sizes)
    pool = property(lambda self: self.features.pool)

    # ---- features
    def extract(self, spec, shard_dir: str, manifest, features_cfg, *, pca_dim: int = 0, whiten: bool = False,
                l2_normalize: bool = False, seed: int = 0, projection: PCAProjection | None = None) -> ExtractInfo:
        return self.features.extract(spec, shard_dir, manifest, features_cfg, pca_dim=pca_dim, whiten=whiten,
                                     l2_normalize=l2_normalize, seed=seed, projection=projection)

    def load(self, block_refs: list) -> dict:
        return self.shard_set.load(block_refs)

    # ---- k-means
    def choose_mode(self, mode: str, single_max_bytes: int) -> str:
        return self.kmeans_over.choose_mode(mode, single_max_bytes)

    def choose_reduction(self, k: int, reduction: str, star_max_bytes: int) -> str:
        return self.kmeans_over.choose_reduction(k, reduction, star_max_bytes)

    def kmeans(self, k: int, **kwargs) -> ClusterOutcome:
        return self.kmeans_over.kmeans(k, **kwargs)

    def label_nearest(self, centroids: np.ndarray, col: str = "cluster") -> np.ndarray:
        return self.kmeans_over.label_nearest(centroids, col)

    # ---- per-image results, kept on the shards
    def counts(self, a, b) -> PairCounts | None:
        return self.shard_set.counts(a, b)

    def publish(self, col: str, dtype: str | None = None, fill: Any = -1) -> RowBlocks:
        return self.shard_set.publish(col, dtype, fill)

    def write_parts(self, directory: str, columns: dict[str, str], paths: list | None = None) -> list[str]:
        return self.shard_set.write_parts(directory, columns, paths)

    def read_parts(self, directory: str, column: str, dtype: str | None = None, fill: Any = -1) -> RowBlocks:
        return self.shard_set.read_parts(directory, column, dtype, fill)

    def sample_features(self, n: int, seed: int, cols: tuple[str, ...] = ()) -> tuple[np.ndarray, np.ndarray, dict]:
        return self.shard_set.sample_features(n, seed, cols)

    def sample_rows(self, k: int, rng: np.random.Generator) -> np.ndarray:
        return self.shard_set.sample_rows(k, rng)

    def column_total(self, col: str) -> float:
        return self.shard_set.column_total(col)

    def apply(self, fn: Callable, *args) -> list:
        return self.shard_set.apply(fn, *args)

    # ---- lifecycle
    def await_shards(self) -> None:
        self.shard_set.await_shards()

    def peak_rss(self) -> list[dict]:
        return self.shard_set.peak_rss()

    def nodes(self) -> list[str]:
        return self.shard_set.nodes()

    def release(self) -> None:
        self.shard_set.release()

    def shutdown(self) -> None:
        self.features.shutdown()
        self.shard_set.shutdown()


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

    def extract(self, spec, *args, **kwargs) -> ExtractInfo:
        """The feature pass, its network sealed (raydc.engine.sealed_spec): the coordinator never opens it."""
        from raydc.engine.sealed_spec import seal_spec

        return ray.get(self.handle.call.remote("extract", seal_spec(spec), *args, **kwargs))

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

