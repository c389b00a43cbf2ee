from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from raydc.core.metrics import (NMI_METHODS, acc, ari, cluster_table, evaluate, majority_acc, nmi,
                                size_histogram)


def _random_pairs(n_cases: int = 6):
    rng = np.random.default_rng(0)
    for i in range(n_cases):
        n = int(rng.integers(50, 2000))
        c, k = int(rng.integers(2, 12)), int(rng.integers(2, 20))
        y = rng.integers(0, c, n)
        # Half the cases are correlated so NMI/ARI are far from 0.
        p = np.where(rng.random(n) < 0.6, y % k, rng.integers(0, k, n)) if i % 2 else rng.integers(0, k, n)
        yield y, p


@pytest.mark.parametrize("method", NMI_METHODS)
def test_nmi_matches_sklearn(method):
    for y, p in _random_pairs():
        assert nmi(y, p, method) == pytest.approx(
            skm.normalized_mutual_info_score(y, p, average_method=method), abs=1e-12)


def test_ari_matches_sklearn():
    for y, p in _random_pairs():
        assert ari(y, p) == pytest.approx(skm.adjusted_rand_score(y, p), abs=1e-12)


def test_permuted_labels_score_one():
    y = np.array([0, 2, 2, 1, 1, 0])
    p = np.array([2, 1, 1, 0, 0, 2])
    r = evaluate(y, p)
    assert r["acc"] == 1.0 and r["nmi"] == pytest.approx(1.0) and r["ari"] == pytest.approx(1.0)
    assert r["nmi_method"] == "arithmetic" and r["n_clusters"] == 3 and r["n_classes"] == 3
    for m in NMI_METHODS:
        assert nmi(y, p, m) == pytest.approx(1.0)


def test_acc_hand_worked_matrix():
    # Contingency (rows = clusters, cols = classes):
    #   cluster 0: 5 of class 0, 1 of class 1
    #   cluster 1: 4 of class 0, 3 of class 1
    # Greedy (cluster 0 -> class 0) gives 5 + 3 = 8; Hungarian also picks 0->0, 1->1 = 8 over 1+4 = 5.
    y = np.array([0] * 5 + [1] + [0] * 4 + [1] * 3)
    p = np.array([0] * 6 + [1] * 7)
    assert acc(y, p) == pytest.approx(8 / 13)
    # A case where greedy and optimal differ: cluster 0 = {a:3, b:2}, cluster 1 = {a:3, b:0}.
    # Greedy 0->a, 1->b gives 3 + 0; optimal 0->b, 1->a gives 2 + 3 = 5 of 8.
    y = np.array([0, 0, 0, 1, 1, 0, 0, 0])
    p = np.array([0, 0, 0, 0, 0, 1, 1, 1])
    assert acc(y, p) == pytest.approx(5 / 8)


def test_acc_with_more_clusters_than_classes():
    # 3 clusters, 2 classes: at most 2 clusters can be matched; cluster 2's points count as wrong.
    y = np.array([0, 0, 0, 1, 1, 1, 1, 0])
    p = np.array([0, 0, 0, 1, 1, 1, 2, 2])
    assert acc(y, p) == pytest.approx(6 / 8)
    # Majority mapping lets cluster 2 map to its majority (a tie 1/1): 3 + 3 + 1 = 7 of 8.
    assert majority_acc(y, p) == pytest.approx(7 / 8)
    # Fewer clusters than classes: 1 cluster, 3 classes -> the largest class.
    assert acc(np.array([0, 0, 1, 2]), np.zeros(4, dtype=int)) == pytest.approx(0.5)


def test_acc_matches_bruteforce_and_label_values_do_not_matter():
    from itertools import permutations

    rng = np.random.default_rng(1)
    y = rng.integers(0, 4, 200)
    p = np.where(rng.random(200) < 0.5, y, rng.integers(0, 4, 200))
    best = max(np.mean(np.array(perm)[p] == y) for perm in permutations(range(4)))
    assert acc(y, p) == pytest.approx(best)
    # Arbitrary (large, negative) label values: compacted, not used as table indices.
    assert acc(y * 1000 - 7, p * 10**9) == pytest.approx(best)


def test_degenerate_labellings_follow_sklearn():
    one = np.zeros(10, dtype=int)
    spread = np.arange(10)
    assert nmi(one, one) == 1.0
    assert nmi(one, spread) == pytest.approx(skm.normalized_mutual_info_score(one, spread))
    assert ari(one, one) == 1.0
    assert ari(spread, spread) == 1.0
    assert ari(one, spread) == pytest.approx(skm.adjusted_rand_score(one, spread))


def test_geometric_and_arithmetic_differ_under_overclustering():
    rng = np.random.default_rng(2)
    y = rng.integers(0, 3, 3000)
    p = y * 10 + rng.integers(0, 10, 3000)
    assert nmi(y, p, "geometric") > nmi(y, p, "arithmetic")
    with pytest.raises(ValueError, match="average_method"):
        nmi(y, p, "harmonic")


def test_cluster_table_and_histogram():
    y = np.array([0, 0, 1, 1, 1, 2, 2])
    p = np.array([5, 5, 5, 3, 3, 3, 3])
    rows = cluster_table(y, p)
    assert [r["cluster"] for r in rows] == [3, 5]
    assert rows[0] == {"cluster": 3, "size": 4, "majority_label": 1, "purity": 0.5}  # tie 1/2 -> lower label
    assert rows[1] == {"cluster": 5, "size": 3, "majority_label": 0, "purity": pytest.approx(2 / 3)}
    assert cluster_table(None, p) == [{"cluster": 3, "size": 4}, {"cluster": 5, "size": 3}]
    h = size_histogram(np.array([0, 2, 2, -1, 4]), 6)
    assert h.dtype == np.int64 and h.tolist() == [1, 0, 2, 0, 1, 0]
    with pytest.raises(ValueError, match="k=3"):
        size_histogram(np.array([0, 3]), 3)


def test_input_checks():
    with pytest.raises(ValueError, match="length"):
        acc(np.zeros(3, dtype=int), np.zeros(4, dtype=int))
    with pytest.raises(ValueError, match="integer"):
        nmi(np.zeros(3), np.zeros(3, dtype=int))


def test_matched_confusion_names_classes_and_clusters_by_their_own_ids():
    """Rows are the class values, columns the cluster ids (square when there are fewer clusters than classes),
    and the matched cells add up to the Hungarian ACC; uint8 labels do not wrap."""
    from raydc.core.metrics import matched_confusion

    y = np.array([0] * 5 + [1] * 5 + [2] * 5, np.uint8)
    c = np.array([1] * 5 + [0] * 4 + [1] + [1] * 5, np.uint8)  # classes 0 and 2 share cluster 1
    counts, matched = matched_confusion(y, c)
    assert counts.shape == (3, 3) and counts.sum() == 15
    assert counts[1, 0] == 4 and counts[1, 1] == 1 and counts[0, 1] == 5 and counts[2, 1] == 5
    assert matched[1] == 0 and {matched[0], matched[2]} == {1, 2}
    assert counts[np.arange(3), matched].sum() / 15 == pytest.approx(acc(y, c))
    big = np.full(300, 250, np.uint8)
    counts, matched = matched_confusion(big, big)
    assert counts[250, 250] == 300 and matched[250] == 250
    with pytest.raises(ValueError):
        matched_confusion(np.array([0, 1]), np.array([0]))
