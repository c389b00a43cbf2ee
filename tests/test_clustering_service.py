"""The Ray clustering service against single-process faiss on the same features, and the per-image results
that stay on its shard actors (columns, pair counts, row blocks, parts) with ids that are arbitrary int64."""
from __future__ import annotations

import numpy as np
import pytest

from raydc.core import kmeans as km
from raydc.core import metrics as M
from raydc.core.pca import fit_pca, pca_from_moments, reduce_moments

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


def random_ids(n, seed=0):
    """Hashed ids as users have them: any int64, negatives included, in no order."""
    rng = np.random.default_rng(seed)
    ids = np.unique(rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, 2 * n, dtype=np.int64))
    return rng.permutation(ids)[:n]


def load(service, x, y, blocks=7, ids=None):
    """Blocks of contiguous rows (as the pool's pieces are), dealt round-robin to the shards."""
    import ray

    rows = np.arange(len(x), dtype=np.int64)
    ids = random_ids(len(x)) if ids is None else ids
    refs = [ray.put({"row": r, "id": ids[r], "feature": x[r], "label": y[r]}) for r in np.array_split(rows, blocks)]
    return service.load(refs), ids


def column_by_row(service, col, n):
    """The column gathered through the object store by row (the test's view; the engine never does this)."""
    from raydc.engine.row_lookup import RowLookup

    return RowLookup(service.publish(col))(np.arange(n))


def test_distributed_lloyd_matches_faiss_from_the_same_init(service):
    x, y = blobs()
    info, _ = load(service, x, y)
    assert info == {"n": 6000, "dim": 32, "finite": True}
    init = km.sample_init_centroids(x, 8, seed=3)
    ref = km.kmeans(x, 8, niter=20, init_centroids=init)
    out = service.kmeans(8, niter=20, seed=3, mode="distributed", init_centroids=init)
    assert out.mode == "distributed" and out.col == "cluster"
    assert len(out.objective) == len(ref.objective)
    np.testing.assert_allclose(out.objective, ref.objective, rtol=1e-4)
    labels = column_by_row(service, "cluster", len(x))
    assert M.nmi(ref.labels, labels) >= 0.99
    np.testing.assert_allclose(column_by_row(service, "cluster_distance", len(x)), ref.distances, rtol=1e-3,
                               atol=1e-3)
    assert np.array_equal(out.sizes, np.bincount(labels, minlength=8))
    # scores from pair counts reduced over the shards equal the scores of the gathered labels
    pairs = service.counts("true", "cluster")
    assert M.evaluate_counts(pairs) == M.evaluate(y, labels)


def test_sharded_reduction_on_actors_gives_the_star_result(service):
    """The reduce-scatter moves pieces shard to shard through the object store; the coordinator sees only the
    counts, and the centroids are the star's to the bit (empty clusters split included)."""
    x, y = blobs(n=5000, k=8, seed=7)
    load(service, x, y)
    init = x[:12].copy()
    init[1] = init[0]
    star = service.kmeans(12, niter=10, seed=2, mode="distributed", init_centroids=init, reduction="star")
    star_labels = column_by_row(service, "cluster", len(x))
    sharded = service.kmeans(12, niter=10, seed=2, mode="distributed", init_centroids=init, reduction="sharded")
    assert sharded.n_split >= 1 and sharded.n_split == star.n_split
    assert np.array_equal(sharded.centroids, star.centroids) and sharded.objective == star.objective
    assert np.array_equal(column_by_row(service, "cluster", len(x)), star_labels)
    assert sharded.bytes_per_iteration["coordinator_received"] == 12 * 8 + 3 * 8


def test_two_level_kmeans_on_actors_moves_rows_shard_to_shard(service):
    """The super clusters' rows travel between the actors through the object store; every row is still held
    once, with its own id and label, and the pair counts against the labels see all of them."""
    x, y = blobs(n=4000, k=8, seed=9)
    _, ids = load(service, x, y)
    out = service.kmeans(40, niter=10, seed=1, mode="distributed", hierarchical="always", super_k=8)
    assert out.mode == "hierarchical" and out.sizes.sum() == len(x)
    labels = column_by_row(service, "cluster", len(x))
    assert np.array_equal(np.bincount(labels, minlength=40), out.sizes)
    assert service.counts("true", "cluster").n == len(x)
    got_ids, feats, cols = service.sample_features(300, seed=0, cols=("cluster",))
    row_of = {int(i): r for r, i in enumerate(ids)}
    rows = np.array([row_of[int(i)] for i in got_ids])
    np.testing.assert_array_equal(feats, x[rows])
    np.testing.assert_array_equal(cols["cluster"], labels[rows])


def test_single_actor_mode_is_faiss(service):
    x, y = blobs(seed=1)
    load(service, x, y)
    init = km.sample_init_centroids(x, 8, seed=4)
    ref = km.kmeans(x, 8, niter=20, init_centroids=init)
    out = service.kmeans(8, niter=20, seed=4, mode="single", init_centroids=init)
    assert out.mode == "single" and out.backend.startswith("faiss")
    assert M.nmi(ref.labels, column_by_row(service, "cluster", len(x))) == pytest.approx(1.0)
    assert out.objective[-1] == pytest.approx(ref.objective[-1], rel=1e-5)
    assert service.counts("true", "cluster").n == len(x)  # the emptied shards hold empty columns, not none


def test_sharded_moments_give_the_whole_data_pca(service):
    x, y = blobs(d=48, seed=2)
    load(service, x, y)
    moments = service.shard_set.get([s.moments.remote() for s in service.shards])
    proj = pca_from_moments(reduce_moments([m for m in moments if m is not None]), 16, whiten=True)
    ref = fit_pca(x, 16, whiten=True)
    cos = np.abs(np.sum(proj.matrix / np.linalg.norm(proj.matrix, axis=0)
                        * ref.matrix / np.linalg.norm(ref.matrix, axis=0), axis=0))
    assert cos.min() > 0.999


def test_previous_clustering_by_row_blocks_and_parts(service, tmp_path):
    """NMI(t-1, t) and DEC's label change compare a column with an earlier one by row: published blocks now, or
    parts on disk after a resume. Both give the counts of the gathered arrays."""
    import pyarrow.parquet as pq

    x, y = blobs(n=3000, seed=5)
    _, ids = load(service, x, y)
    service.kmeans(8, niter=5, seed=0, mode="distributed")
    first = column_by_row(service, "cluster", len(x))
    blocks = service.publish("cluster", dtype="int32")
    assert blocks.rows == len(x) and len(blocks.starts) == 7  # one block per contiguous run of rows
    parts = service.write_parts(str(tmp_path / "round=0000"), {"value": "cluster"})
    assert len(parts) == 3
    back = service.read_parts(str(tmp_path / "round=0000"), "value")
    service.kmeans(8, niter=5, seed=1, mode="distributed")
    second = column_by_row(service, "cluster", len(x))
    want = M.PairCounts.of(first, second)
    for prev in (blocks, back):
        got = service.counts(prev, "cluster")
        assert M.nmi_counts(got) == pytest.approx(M.nmi(first, second))
        assert got.agreement() == pytest.approx(want.agreement())
    # the parts cover every id exactly once, each with its own row's cluster
    t = [pq.read_table(p) for p in parts]
    rows = np.concatenate([p.column("row").to_numpy() for p in t])
    assert np.array_equal(np.sort(rows), np.arange(len(x)))
    got_ids = np.concatenate([p.column("id").to_numpy() for p in t])
    assert np.array_equal(got_ids, ids[rows])  # random int64 ids come back with their own rows
    assert np.array_equal(np.concatenate([p.column("value").to_numpy() for p in t]), first[rows])


def test_a_sample_carries_its_rows_columns(service):
    x, y = blobs(n=2000, seed=6)
    _, ids = load(service, x, y)
    service.kmeans(8, niter=3, seed=0, mode="distributed")
    labels = column_by_row(service, "cluster", len(x))
    got_ids, feats, cols = service.sample_features(500, seed=1, cols=("cluster",))
    assert len(got_ids) == 500 == len(np.unique(got_ids))
    row_of = {int(i): r for r, i in enumerate(ids)}
    rows = np.array([row_of[int(i)] for i in got_ids])
    np.testing.assert_array_equal(feats, x[rows])
    np.testing.assert_array_equal(cols["cluster"], labels[rows])


def test_k_larger_than_n_is_refused(service):
    x, y = blobs(n=50)
    load(service, x, y)
    with pytest.raises(ValueError, match="cluster.k"):
        service.kmeans(51, niter=5, seed=0)


def test_nan_features_are_reported(service):
    x, y = blobs(n=100)
    x[3, 2] = np.nan
    assert load(service, x, y)[0]["finite"] is False


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
        s.kmeans(4, niter=3, seed=0, mode="distributed")
        assert ray.get(s.shards[0].threads.remote())["faiss"] == max(1, cores // 2)
        s.kmeans(4, niter=3, seed=0, mode="single")
        assert ray.get(s.shards[0].threads.remote())["faiss"] == cores
    finally:
        s.shutdown()
