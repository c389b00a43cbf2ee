"""The Ray clustering service against single-process faiss on the same features."""
from __future__ import annotations

import numpy as np
import pytest

from raydc.core import kmeans as km
from raydc.core.metrics import nmi
from raydc.core.pca import fit_pca

pytestmark = pytest.mark.ray


def blobs(n=6000, d=32, k=8, seed=0):
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 4, (k, d))
    y = rng.integers(0, k, n)
    return (centers[y] + rng.normal(0, 1, (n, d))).astype(np.float32), y


@pytest.fixture(scope="module")
def service(ray_local):
    from raydc.engine.clustering import ClusteringService

    s = ClusteringService(num_shards=3, log=lambda m: None)
    yield s
    s.shutdown()


def load(service, x, y, blocks=7):
    import ray

    ids = np.arange(len(x), dtype=np.int64)
    refs = [ray.put({"id": i, "feature": f, "label": l})
            for i, f, l in zip(np.array_split(ids, blocks), np.array_split(x, blocks), np.array_split(y, blocks))]
    return service.load(refs)


def by_id(out):
    order = np.argsort(out.ids)
    return out.labels[order], out.distances[order]


def test_distributed_lloyd_matches_faiss_from_the_same_init(service):
    x, y = blobs()
    info = load(service, x, y)
    assert info == {"n": 6000, "dim": 32, "finite": True}
    service.project(None, False)
    init = km.sample_init_centroids(x, 8, seed=3)
    ref = km.kmeans(x, 8, niter=20, init_centroids=init)
    out = service.kmeans(8, niter=20, seed=3, mode="distributed", init_centroids=init)
    assert out.mode == "distributed"
    assert len(out.objective) == len(ref.objective)
    np.testing.assert_allclose(out.objective, ref.objective, rtol=1e-4)
    labels, dist = by_id(out)
    assert nmi(ref.labels, labels) >= 0.99
    np.testing.assert_allclose(dist, ref.distances, rtol=1e-3, atol=1e-3)
    assert set(np.unique(out.true_labels)) == set(range(8))


def test_single_actor_mode_is_faiss(service):
    x, y = blobs(seed=1)
    load(service, x, y)
    service.project(None, False)
    init = km.sample_init_centroids(x, 8, seed=4)
    ref = km.kmeans(x, 8, niter=20, init_centroids=init)
    out = service.kmeans(8, niter=20, seed=4, mode="single", init_centroids=init)
    labels, _ = by_id(out)
    assert out.mode == "single" and out.backend.startswith("faiss")
    assert nmi(ref.labels, labels) == pytest.approx(1.0)
    assert out.objective[-1] == pytest.approx(ref.objective[-1], rel=1e-5)


def test_sharded_pca_equals_whole_data_pca(service):
    x, y = blobs(d=48, seed=2)
    load(service, x, y)
    proj = service.fit_projection(16, True)
    ref = fit_pca(x, 16, whiten=True)
    cos = np.abs(np.sum(proj.matrix / np.linalg.norm(proj.matrix, axis=0)
                        * ref.matrix / np.linalg.norm(ref.matrix, axis=0), axis=0))
    assert cos.min() > 0.999
    assert service.project(proj, True)
    _, feats, _ = service.gather_features()
    np.testing.assert_allclose(np.linalg.norm(feats, axis=1), 1.0, rtol=1e-5)


def test_k_larger_than_n_is_refused(service):
    x, y = blobs(n=50)
    load(service, x, y)
    service.project(None, False)
    with pytest.raises(ValueError, match="cluster.k"):
        service.kmeans(51, niter=5, seed=0)


def test_nan_features_are_reported(service):
    x, y = blobs(n=100)
    x[3, 2] = np.nan
    assert load(service, x, y)["finite"] is False


def test_shard_actors_use_every_core(ray_local):
    """Ray gives a 0-CPU actor OMP_NUM_THREADS=1: a shard actor must not run faiss on one core. Alone (single-
    actor k-means) it uses every core; in distributed steps the node's shards split the cores between them."""
    import os

    import ray

    from raydc.engine.clustering import ClusteringService

    s = ClusteringService(num_shards=2, log=lambda m: None)
    try:
        cores = os.cpu_count()
        got = ray.get([a.threads.remote() for a in s.shards])
        assert all(g == {"faiss": cores, "torch": cores, "cores": cores, "busy_peers": 2} for g in got), got
        x, y = blobs(n=2000, d=8, k=4)
        load(s, x, y)
        s.project(None, False)
        s.kmeans(4, niter=3, seed=0, mode="distributed")
        assert ray.get(s.shards[0].threads.remote())["faiss"] == max(1, cores // 2)
        s.kmeans(4, niter=3, seed=0, mode="single")
        assert ray.get(s.shards[0].threads.remote())["faiss"] == cores
    finally:
        s.shutdown()
