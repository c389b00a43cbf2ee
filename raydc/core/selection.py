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
