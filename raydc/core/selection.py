"""Label-free scores of a clustering, for choosing k or thresholds without labels (sweeps).

Computed on a fixed random sample of the final clustered features: silhouette is O(n^2 d), so the sample size
bounds its cost whatever N is, and a sample drawn from the run seed makes two trials' scores comparable. The
k-means objective is not among them: it falls as k grows, so it cannot compare trials of different k.
"""
from __future__ import annotations

import numpy as np


def label_free_scores(x: np.ndarray, labels: np.ndarray) -> dict:
    """{"silhouette", "calinski_harabasz"} of the partition `labels` of the rows of `x` (NaN when fewer than two
    clusters, or as many clusters as rows, are present: both scores are undefined there)."""
    from sklearn.metrics import calinski_harabasz_score, silhouette_score

    x = np.asarray(x, np.float32)
    labels = np.asarray(labels)
    n_clusters = len(np.unique(labels))
    if len(labels) < 3 or not 2 <= n_clusters < len(labels):
        return {"silhouette": float("nan"), "calinski_harabasz": float("nan")}
    return {"silhouette": float(silhouette_score(x, labels)),
            "calinski_harabasz": float(calinski_harabasz_score(x, labels))}


def kmeans_stability(x: np.ndarray, k: int, seed: int = 0, pairs: int = 3, fraction: float = 0.8,
                     niter: int = 20, n_init: int = 3) -> float:
    """How reproducible k-means with k clusters is on `x`: the mean adjusted Rand index, over `pairs` pairs of
    random subsamples (`fraction` of the rows each, different seeds), between the two clusterings of all rows
    that the two subsamples' centroids give (Ben-Hur et al. 2002; Lange et al. 2004). At the data's own number
    of clusters both subsamples find the same groups; with too few, which groups get joined is a coin toss, and
    with too many, where a group gets cut is one. Unlike silhouette it does not grow as DEC's sharpening pulls
    any k into tight clusters, provided it is measured before that sharpening (on the autoencoder's embedding).
    A function of (x, k, seed)."""
    from sklearn.cluster import KMeans

    from raydc.core import metrics as M

    x = np.ascontiguousarray(x, np.float32)
    n = len(x)
    m = round(fraction * n)
    if not 2 <= k <= m:
        return float("nan")
    rng = np.random.default_rng(seed)
    scores = []
    for _ in range(pairs):
        labels = []
        for _ in range(2):
            sub = np.sort(rng.choice(n, m, replace=False))
            # k-means++ seeding: with random seeding, restarts that land in different local optima at the
            # right k would read as instability of k itself
            fit = KMeans(k, n_init=n_init, max_iter=niter, random_state=int(rng.integers(1 << 30))).fit(x[sub])
            labels.append(fit.predict(x))
        scores.append(M.ari(labels[0], labels[1]))
    return float(np.mean(scores))


def manifold_silhouette(x: np.ndarray, k: int, seed: int = 0, *, dims: int = 10, n_neighbors: int = 20,
                        metric: str = "euclidean", n_init: int = 3) -> float:
    """How cleanly `x` falls into k groups along its manifolds: the silhouette, on a UMAP of `x` (min_dist 0, from
    its exact neighbour graph), of a k-component Gaussian mixture fitted there (N2D's readout,
    raydc.core.merge.manifold_clusters). A function of (x, k, seed).

    Why not silhouette or k-means' stability on `x` itself: an autoencoder's embedding holds its classes as
    curved, touching manifolds, and on it both scores can favour the fewest, largest groups (stability picks
    k = 5 on DEC's MNIST autoencoder pretrained on the 10,000 images it clusters, where this picks 10;
    benchmarks/RESULTS.md, "Sweeps"). On an autoencoder trained only briefly this too picks 5.
    UMAP packs each manifold into a separate blob: too few clusters then join blobs that lie apart, too many cut
    a compact one, and either lowers the silhouette there. Euclidean for an autoencoder's embedding, as N2D."""
    from raydc.core.merge import exact_neighbors, manifold_embedding, mixture_clusters

    x = np.ascontiguousarray(x, np.float32)
    if not 2 <= k < len(x) or len(x) <= n_neighbors:
        return float("nan")
    graph = exact_neighbors(x, n_neighbors + 1, metric)
    z = manifold_embedding(x, dims=dims, n_neighbors=n_neighbors, seed=seed, metric=metric, neighbors=graph)
    return label_free_scores(z, mixture_clusters(z, k, seed=seed, n_init=n_init))["silhouette"]
