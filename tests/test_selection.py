"""Label-free scores for choosing the number of clusters (raydc.core.selection)."""
from __future__ import annotations

import numpy as np

from raydc.core.selection import kmeans_stability


def test_stability_ranks_the_planted_k_above_five_fewer_and_five_more():
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 2.0, (10, 10))
    x = centres[rng.integers(0, 10, 1500)] + rng.normal(0, 0.5, (1500, 10))
    s = {k: kmeans_stability(x, k, seed=0, pairs=2) for k in (5, 10, 15)}
    assert s[10] > s[5] and s[10] > s[15], s
    assert kmeans_stability(x, 10, seed=0, pairs=2) == s[10]  # a function of its seed


def test_stability_is_undefined_below_two_clusters_or_beyond_the_sample():
    x = np.random.default_rng(1).normal(size=(20, 2))
    assert np.isnan(kmeans_stability(x, 1)) and np.isnan(kmeans_stability(x, 17))


def test_manifold_silhouette_is_undefined_below_two_clusters_or_without_enough_rows():
    from raydc.core.selection import manifold_silhouette

    x = np.random.default_rng(1).normal(size=(20, 2))
    assert np.isnan(manifold_silhouette(x, 1)) and np.isnan(manifold_silhouette(x, 20))
    assert np.isnan(manifold_silhouette(x, 3, n_neighbors=20))
