"""The final readout that turns an over-clustering into the few clusters a user asked for (raydc.core.merge):
the old co-neighbour merge against the k-NN graph one on a set where two classes touch through a few points."""
from __future__ import annotations

import numpy as np
import pytest

from raydc.core.merge import (
    coneighbour_counts,
    fine_graph,
    graph_merge,
    knn_edge_counts,
    modularity,
    normalized_cut,
    paga_connectivity,
    spectral_merge,
)

GAP = 0.8  # between the two classes; each fine cluster is 1 wide along its class


def ladder(seed: int = 0, per_class: int = 1500, bridges: int = 6):
    """Two classes, two parallel dense strokes GAP apart, each cut into 10 fine clusters of width 1 along it,
    joined by a few bridge points across the gap. Wider than the gap is, each fine cluster's second-nearest
    centroid is mostly the one facing it in the other class: the co-neighbour graph is a ladder whose rungs
    outweigh its rails, though no point but the bridges lies between the classes."""
    rng = np.random.default_rng(seed)
    x = [np.c_[rng.uniform(0, 10, per_class), c * GAP + rng.normal(0, 0.03, per_class)] for c in (0, 1)]
    x.append(np.c_[np.full(bridges, 5.0), np.linspace(0.1, 0.9, bridges) * GAP])
    x = np.concatenate(x).astype(np.float32)
    centroids = np.array([[i + 0.5, c * GAP] for c in (0, 1) for i in range(10)], np.float32)
    fine = ((x[:, None] - centroids[None]) ** 2).sum(-1).argmin(1)
    return x, centroids, fine


def knn_groups(x, fine, k=20, seed=0, sample=None, graph="counts", score="modularity"):
    sample = np.arange(len(x)) if sample is None else sample
    ids = np.arange(len(x))
    edges = knn_edge_counts(x, fine, x[sample], fine[sample], k, 15, ids=ids, sample_ids=ids[sample])
    return graph_merge(fine_graph(edges, np.bincount(fine[sample], minlength=k), graph), 2, seed=seed, score=score)


@pytest.mark.parametrize("graph,score", [("counts", "modularity"), ("paga", "ncut")])
def test_bridge_points_do_not_join_two_classes_but_the_one_edge_merge_does(graph, score):
    x, centroids, fine = ladder()
    classes = np.repeat([0, 1], 10)  # fine cluster -> its class (centroids 0-9 on stroke 0, 10-19 on stroke 1)
    new = knn_groups(x, fine, graph=graph, score=score).groups
    assert all(len(set(new[classes == c])) == 1 for c in (0, 1)) and new[0] != new[10], new
    old = spectral_merge(coneighbour_counts(x, centroids), 2)
    # the old merge cuts the ladder across its rails: each of its groups holds fine clusters of both classes
    assert all(len(set(classes[old == g])) == 2 for g in (0, 1)), old


def test_the_readout_is_a_function_of_its_seed_and_a_sample_is_enough():
    x, _, fine = ladder(seed=1)
    a, b = knn_groups(x, fine, seed=5), knn_groups(x, fine, seed=5)
    np.testing.assert_array_equal(a.groups, b.groups)
    assert a.scores == b.scores and a.candidate == b.candidate
    # neighbours searched in a 20 % sample of the points give the same partition
    sample = np.sort(np.random.default_rng(0).choice(len(x), len(x) // 5, replace=False))
    part = knn_groups(x, fine, sample=sample).groups
    assert len({(int(p), int(q)) for p, q in zip(part, a.groups)}) == 2


def test_knn_edges_skip_the_point_itself_and_batches_do_not_matter():
    x = np.array([[0.0], [0.1], [5.0], [5.1]], np.float32)
    fine = np.array([0, 0, 1, 1])
    ids = np.arange(4)
    e = knn_edge_counts(x, fine, x, fine, 2, 1, ids=ids, sample_ids=ids)
    np.testing.assert_array_equal(e, [[2, 0], [0, 2]])  # each point's nearest other point, never itself
    e_all = knn_edge_counts(x, fine, x, fine, 2, 3, ids=ids, sample_ids=ids)
    np.testing.assert_array_equal(e_all, knn_edge_counts(x, fine, x, fine, 2, 3, ids=ids, sample_ids=ids, batch=1))
    assert e_all.sum() == 12 and e_all[0, 1] == 4  # 3 neighbours each; the two far ones of class 0 are class 1


def test_paga_divides_by_what_chance_gives():
    # cluster 0 is 9x larger than 2: the same 10 edges link 1 with 2 more strongly than 1 with 0
    edges = np.array([[900, 10, 0], [10, 80, 10], [0, 10, 80]], np.float64)
    conn = paga_connectivity(edges, np.array([900, 100, 100]))
    assert conn[1, 2] > conn[0, 1] > 0 and conn[0, 2] == 0 and np.all(np.diag(conn) == 0)
    np.testing.assert_allclose(conn, conn.T)


def test_both_scores_prefer_the_weak_cut():
    w = np.zeros((4, 4))
    w[0, 1] = w[1, 0] = w[2, 3] = w[3, 2] = 1.0
    w[1, 2] = w[2, 1] = 0.1
    good, bad = np.array([0, 0, 1, 1]), np.array([0, 1, 1, 0])
    assert normalized_cut(w, good) < normalized_cut(w, bad)
    assert modularity(w, good) > modularity(w, bad)
    np.testing.assert_allclose(modularity(w, np.zeros(4, int)), 0.0, atol=1e-12)  # one group: nothing gained
