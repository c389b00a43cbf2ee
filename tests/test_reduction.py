"""The distributed Lloyd's two reductions (star through the coordinator, sharded reduce-scatter among the shards)
on in-process shards: the same centroids to the bit, and what the busiest process receives per iteration."""
from __future__ import annotations

import numpy as np
import pytest

from raydc.core import kmeans as km
from raydc.engine.clustering import local_service


def _data(n=4000, d=24, k=40, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 3, (k, d))
    return (centres[rng.integers(0, k, n)] + rng.normal(0, 1, (n, d))).astype(np.float32)


def _service(x, shards, blocks=12):
    svc = local_service(shards, log=lambda m: None)
    svc.load([{"row": r, "id": r, "feature": x[r]} for r in np.array_split(np.arange(len(x)), blocks)])
    return svc


@pytest.mark.parametrize("shards", [2, 5, 64])
def test_sharded_reduction_equals_the_star_and_the_reference_bit_for_bit(shards):
    x = _data()
    k = 40
    init = x[:k].copy()
    init[1] = init[0]
    init[7] = init[3]  # duplicated centroids: clusters empty out and are split, through the plan
    svc = _service(x, shards)
    star = svc.kmeans(k, niter=12, seed=5, mode="distributed", init_centroids=init, reduction="star")
    sharded = svc.kmeans(k, niter=12, seed=5, mode="distributed", init_centroids=init, reduction="sharded")
    ref = km.lloyd([x[r] for r in np.array_split(np.arange(len(x)), 12)], k, niter=12, init_centroids=init, seed=5)
    assert sharded.n_split >= 2 and sharded.n_split == star.n_split == ref.n_split
    assert np.array_equal(sharded.centroids, star.centroids) and np.array_equal(sharded.centroids, ref.centroids)
    assert sharded.objective == star.objective
    np.testing.assert_allclose(sharded.objective, ref.objective, rtol=1e-12)
    assert np.array_equal(sharded.sizes, np.bincount(ref.labels, minlength=k))
    assert "sharded reduction" in sharded.backend and "star reduction" in star.backend


def test_what_the_busiest_process_receives_stays_flat_in_the_shards():
    x = _data(n=3000, d=16, k=64)
    k, d = 64, 16
    got = {}
    for shards in (3, 16, 64):
        svc = _service(x, shards, blocks=64)
        for red in ("star", "sharded"):
            got[red, shards] = svc.kmeans(k, niter=3, seed=0, mode="distributed", init_centroids=x[:k],
                                          reduction=red).bytes_per_iteration
    for shards in (3, 16, 64):
        star, sharded = got["star", shards], got["sharded", shards]
        assert star["received"] == star["coordinator_received"] == shards * (k * d * 8 + k * 8 + 8)
        # each shard: the other shards' pieces of its clusters, and the other reducers' centroid chunks
        per = -(-k // shards)
        assert sharded["shard_received_max"] <= (shards - 1) * per * (d * 8 + 8) + k * d * 4
        assert sharded["coordinator_received"] == k * 8 + 8 * shards  # the counts and the objective shares
        assert sharded["received"] == max(sharded["shard_received_max"], sharded["coordinator_received"])
    assert got["sharded", 64]["received"] < 2 * got["sharded", 3]["received"]
    assert got["star", 64]["received"] > 20 * got["star", 3]["received"]


def test_auto_takes_the_star_while_it_brings_little_to_the_coordinator():
    svc = _service(_data(n=500, d=8, k=10), 4, blocks=4)
    assert svc.choose_reduction(10, "auto", 64 << 20) == "star"
    assert svc.choose_reduction(10, "auto", 100) == "sharded"
    assert svc.choose_reduction(10, "sharded", 64 << 20) == "sharded"
    assert svc.choose_reduction(10, "star", 0) == "star"


def test_split_plan_and_its_replay_are_update_centroids():
    rng_data = np.random.default_rng(3)
    sums = rng_data.normal(size=(30, 6))
    counts = rng_data.integers(1, 4, 30)
    counts[[2, 9, 17]] = 0
    c_ref, n_ref = km.update_centroids(sums, counts, np.random.default_rng(11))
    plan = km.split_plan(counts, np.random.default_rng(11))
    bounds = km.chunk_bounds(30, 4)
    chunks = [km.chunk_means(sums[a:b], counts[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    assert len(plan) == n_ref == 3 and [ci for ci, _ in plan] == [2, 9, 17]
    assert np.array_equal(km.apply_splits(np.concatenate(chunks), plan), c_ref)
    assert list(km.chunk_bounds(10, 4)) == [0, 3, 6, 8, 10] and list(km.chunk_bounds(2, 4)) == [0, 1, 2, 2, 2]


def test_blocks_go_to_the_shard_on_their_node_while_that_stays_balanced():
    from raydc.engine.block_placement import assign_blocks

    shard_nodes = ["a", "b", "c"]
    # every node made its share: each block stays home
    assert assign_blocks([["a"], ["b"], ["c"], ["a"], ["b"], ["c"]], [10] * 6, shard_nodes) == [0, 1, 2, 0, 1, 2]
    # node a made everything: it keeps its share (plus a block of slack), the rest goes to the others, evenly
    got = assign_blocks([["a"]] * 9, [10] * 9, shard_nodes)
    assert got.count(0) <= 4 and got.count(1) >= 2 and got.count(2) >= 2
    # blocks without a known location (inlined small objects) go to the least loaded shard
    assert assign_blocks([[], [], []], [5, 5, 5], shard_nodes) == [0, 1, 2]
    # two shards on one node share its blocks
    assert sorted(assign_blocks([["a"]] * 4, [1] * 4, ["a", "a", "b"])[:2]) == [0, 1]


def test_two_level_kmeans_moves_each_super_cluster_to_one_shard_and_clusters_within_it():
    from raydc.engine.row_lookup import RowLookup

    rng = np.random.default_rng(4)
    n, d, k = 6000, 8, 120
    x = (rng.normal(0, 6, (12, d))[rng.integers(0, 12, n)] + rng.normal(0, 1, (n, d))).astype(np.float32)
    svc = _service(x, 3)
    flat = svc.kmeans(k, niter=15, seed=0, mode="distributed", reduction="star")
    two = svc.kmeans(k, niter=15, seed=0, mode="distributed", hierarchical="always", super_k=12)
    assert two.mode == "hierarchical" and two.centroids.shape == (k, d) and two.sizes.sum() == n
    labels = RowLookup(svc.publish("cluster"))(np.arange(n))
    supers = RowLookup(svc.publish("super"))(np.arange(n))
    assert labels.min() >= 0 and labels.max() < k and np.array_equal(np.bincount(labels, minlength=k), two.sizes)
    # after the move, every super cluster lives on one shard, and the shards stay balanced
    held = [sh.store for sh in svc.shards]
    assert sum(len(h.ids) for h in held) == n and max(len(h.ids) for h in held) < 0.6 * n
    for c in range(12):
        assert sum(bool((h.cols["super"] == c).any()) for h in held) <= 1
    # each point's cluster is the nearest centroid among its own super cluster's
    for c in range(12):
        mine = np.unique(labels[supers == c])
        dist = ((x[supers == c][:, None, :] - two.centroids[mine][None]) ** 2).sum(-1)
        assert np.array_equal(mine[dist.argmin(1)], labels[supers == c])
    # the objective it pays for that: close to the flat k-means on the same points
    assert two.objective[-1] <= 1.25 * flat.objective[-1]
    assert two.objective[-1] == pytest.approx(float(((x - two.centroids[labels]) ** 2).sum()), rel=1e-4)


def test_two_level_is_chosen_from_hierarchical_min_k_on():
    x = _data(n=2000, d=8, k=10)
    svc = _service(x, 2)
    assert svc.kmeans(40, niter=5, seed=0, mode="distributed", hierarchical="auto",
                      hierarchical_min_k=40).mode == "hierarchical"
    assert svc.kmeans(40, niter=5, seed=0, mode="distributed", hierarchical="auto",
                      hierarchical_min_k=41).mode == "distributed"


def test_allocate_subclusters_shares_k_by_size_within_bounds():
    got = km.allocate_subclusters(10, np.array([50, 30, 20]))
    assert list(got) == [5, 3, 2]
    got = km.allocate_subclusters(7, np.array([1, 1, 100, 0]))
    assert list(got) == [1, 1, 5, 0]  # at least one for a non-empty super cluster, none for an empty one
    assert list(km.allocate_subclusters(9, np.array([3, 3, 3]))) == [3, 3, 3]  # never more than its points
    with pytest.raises(ValueError, match="non-empty super clusters"):
        km.allocate_subclusters(3, np.array([10, 1, 1, 1]))
