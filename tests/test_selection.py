"""Label-free scores for choosing the number of clusters (raydc.core.selection)."""
from __future__ import annotations

import numpy as np
import pytest

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


def _five_pairs(n: int = 900, seed: int = 0) -> np.ndarray:
    """Ten tight clusters in five close pairs: the pairs lie far apart, the two halves of a pair less so."""
    rng = np.random.default_rng(seed)
    middle, offset = rng.normal(0, 3.0, (5, 10)), rng.normal(0, 0.5, (5, 10))
    centres = np.concatenate([middle + offset, middle - offset])
    return centres[rng.integers(0, 10, n)] + rng.normal(0, 0.3, (n, 10))


def test_manifold_silhouette_ranks_the_planted_k_where_stability_and_silhouette_prefer_the_pairs():
    """Joining each pair is as reproducible as separating it, so k-means' stability scores k = 5 as high as the
    planted 10, and the silhouette of the same mixture on the points themselves prefers the five pairs; the
    silhouette on the UMAP ranks 10 above 5 and 15 (and is a function of its seed)."""
    pytest.importorskip("umap")
    from raydc.core.merge import mixture_clusters
    from raydc.core.selection import label_free_scores, manifold_silhouette

    x = _five_pairs()
    assert kmeans_stability(x, 5, seed=0, pairs=2) >= kmeans_stability(x, 10, seed=0, pairs=2) - 1e-9
    plain = {k: label_free_scores(x, mixture_clusters(x, k, n_init=3))["silhouette"] for k in (5, 10)}
    assert plain[5] > plain[10], plain
    s = {k: manifold_silhouette(x, k, seed=0) for k in (5, 10, 15)}
    assert s[10] > s[5] + 0.2 and s[10] > s[15] + 0.2, s
    assert manifold_silhouette(x, 10, seed=0) == s[10]


def test_manifold_silhouette_is_undefined_below_two_clusters_or_without_enough_rows():
    from raydc.core.selection import manifold_silhouette

    x = np.random.default_rng(1).normal(size=(20, 2))
    assert np.isnan(manifold_silhouette(x, 1)) and np.isnan(manifold_silhouette(x, 20))
    assert np.isnan(manifold_silhouette(x, 3, n_neighbors=20))
