"""The clustering coordinator and the shard actors run a DeepCluster round without loading torch: the network
travels sealed (`raydc.engine.sealed_spec`), a config section unpickles without assembling `Config` (which
imports every method), and the final merge's per-shard functions live in a module that imports no torch.
torch in those processes is seconds of CPU per run and a few hundred MB each, for nothing they use."""
from __future__ import annotations

import numpy as np
import pytest


@pytest.mark.ray
def test_a_round_through_the_coordinator_loads_no_torch_there_or_on_the_shards(ray_local, tmp_path):
    import functools
    import sys

    import ray
    import torch

    from raydc.config import FeatureConfig
    from raydc.core.extractor import ExtractorSpec
    from raydc.core.merge import shard_group, shard_knn_edges
    from raydc.core.models import small_convnet
    from raydc.data.manifest import load_manifest
    from raydc.data.prepare import prepare
    from raydc.engine.clustering import CoordinatorProxy

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "src.npz", images=rng.integers(0, 256, (300, 28, 28), dtype=np.uint8),
             labels=rng.integers(0, 3, 300))
    prepare("npz", tmp_path / "shards", root=tmp_path / "src.npz", rows_per_shard=150, progress=False)
    manifest = load_manifest(tmp_path / "shards")
    torch.manual_seed(0)
    build = functools.partial(small_convnet, 1, sobel=True)
    spec = ExtractorSpec(build=build, state=build().state_dict(), input_size=28)

    def loaded_torch(*_) -> bool:  # defined here, so it is pickled by value and imports nothing itself
        return "torch" in sys.modules

    proxy = CoordinatorProxy(2)
    try:
        info = proxy.extract(spec, str(tmp_path / "shards"), manifest, FeatureConfig(), l2_normalize=True)
        assert info.n == 300 and info.finite
        out = proxy.kmeans(3, niter=5, seed=0, mode="distributed")
        ids, x, cols = proxy.sample_features(100, 0, (out.col,))
        edges = proxy.apply(shard_knn_edges, out.col, x, np.asarray(cols[out.col], np.int64), ids, 3, 5)
        assert sum(e.sum() for e in edges if e is not None) > 0
        proxy.apply(shard_group, out.col, "final", np.array([0, 0, 1]))
        assert ray.get(proxy.handle.__ray_call__.remote(loaded_torch)) is False
        assert proxy.apply(loaded_torch) == [False, False]
        # the features the pool computed from the sealed spec are the network's: a second pass agrees
        assert proxy.extract(spec, str(tmp_path / "shards"), manifest, FeatureConfig(), l2_normalize=True).n == 300
    finally:
        proxy.shutdown()
