"""The feature pass: every image through the current network onto the shard actors, reduced on the way (a PCA
fitted on a sample of the raw features, then projection, L2, cast inside the pool's workers).

The pool is the persistent one on CPU (`raydc.engine.persistent_pool`, started once per run) or Ray Data's
(`raydc.engine.ray_data_pool`); either way the blocks go from the pool to the shards through the object
store, and nothing per image reaches this process.
"""
from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path

from raydc.core.pca import PCAProjection, pca_from_moments, reduce_moments
from raydc.engine.shard_set import ShardSet
from raydc.methods.api import ExtractInfo


def _pool_kind(f) -> str:
    """The feature pool a `features` config runs: Ray Data's on GPUs, the persistent one on CPU (auto)."""
    return f.pool if f.pool != "auto" else ("ray_data" if f.num_gpus > 0 else "persistent")



class FeaturePass:
    """Runs a method's `ExtractorSpec` over every image into the shard set; owns the pool between passes."""

    def __init__(self, shard_set: ShardSet):
        self.set = shard_set  # the shard actors and their bookkeeping this job reads and updates
        self.pool = None  # the persistent feature pool, started on the first pass

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
            sample_spec = dataclasses.replace(spec, reduction=FeatureReduction(keep_fraction=frac, seed=seed))
            info = self._pass(sample_spec, shard_dir, manifest, f, clock)
            if not info["finite"]:
                return ExtractInfo(info["n"], info["dim"], False, clock=clock)
            t_fit = time.perf_counter()
            parts = [m for m in self.set.get([s.moments.remote() for s in self.set.shards]) if m is not None]
            moments = reduce_moments(parts)
            pca_rows = int(moments.n)
            proj = pca_from_moments(moments, pca_dim, whiten=whiten)
            if frac >= 1.0:  # the sample is every image (N <= pca_sample): project what the shards hold
                finite = all(self.set.get([s.project.remote(proj, l2_normalize, f.dtype) for s in self.set.shards]))
                self.set.dim = pca_dim
                return ExtractInfo(info["n"], pca_dim, finite, proj, pca_rows, time.perf_counter() - t_fit, clock)
            self.set.release()
        pca_seconds = time.perf_counter() - t0
        spec = dataclasses.replace(spec, reduction=FeatureReduction(projection=proj, l2_normalize=l2_normalize,
                                                                    dtype=f.dtype))
        info = self._pass(spec, shard_dir, manifest, f, clock)
        return ExtractInfo(info["n"], info["dim"], info["finite"], proj, pca_rows, pca_seconds, clock)

    def _pass(self, spec, shard_dir: str, manifest, f, clock: Counter) -> dict:
        """One pool pass onto the shards, its seconds added to `clock`."""
        import time

        t0 = time.perf_counter()
        refs = self._run_pool(spec, shard_dir, manifest, f)
        t1 = time.perf_counter()
        info = self.set.load(refs)
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

    def shutdown(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None
