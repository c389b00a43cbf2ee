"""Merging an over-clustering: k fine clusters -> the few clusters a user asked for.

k-means at k = classes cuts a feature space whose classes are curved, elongated manifolds into convex cells, so
it splits one class and joins two others. k-means at k >> classes gives clusters that each sit inside one class
(majority-vote ACC ~0.93 on MNIST), and what is left is to say which of them belong together. Two fine
clusters are neighbours when points lie between them: the co-neighbour graph counts, for every point, the pair
(nearest centroid, second-nearest centroid), the graph a growing neural gas or a topology-representing network
builds. Spectral clustering of that k x k graph then joins the fine clusters along the manifolds (landmark
spectral clustering, Chen & Cai, AAAI 2011, with the centroids as landmarks).

Scale: the counts are a k x k sum over shards (each shard searches its own points), and the spectral step is on
k nodes, so nothing here grows with N.
"""
from __future__ import annotations

import warnings

import numpy as np


def coneighbour_counts(x: np.ndarray, centroids: np.ndarray, use_gpu: str = "never") -> np.ndarray:
    """(k, k) float64: how many rows of `x` have centroid i nearest and j second (symmetrised)."""
    from raydc.core.kmeans import nearest_two

    k = len(centroids)
    counts = np.zeros((k, k), np.float64)
    if len(x) == 0:
        return counts
    first, second = nearest_two(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(centroids, np.float32),
                                use_gpu=use_gpu)
    np.add.at(counts, (first, second), 1.0)
    return counts + counts.T


def spectral_merge(counts: np.ndarray, n_groups: int, seed: int = 0) -> np.ndarray:
    """The group (0..n_groups-1) of each of the k fine clusters, by normalised spectral clustering of the
    co-neighbour graph (a tiny diagonal keeps a node without edges well defined)."""
    from sklearn.cluster import SpectralClustering

    k = counts.shape[0]
    if n_groups >= k:
        return np.arange(k, dtype=np.int64)
    a = np.asarray(counts, np.float64)
    a = a + np.eye(k) * 1e-9  # keeps the Laplacian defined for a node without edges
    sc = SpectralClustering(n_groups, affinity="precomputed", assign_labels="discretize", random_state=seed)
    with warnings.catch_warnings():  # "graph is not fully connected": expected, a group may be an island
        warnings.simplefilter("ignore", UserWarning)
        return sc.fit(a).labels_.astype(np.int64)
