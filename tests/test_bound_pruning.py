"""The k-means benchmark's pruning measurement (benchmarks.bench_kmeans.bound_pruning) is exact: the rows whose
bounds say "label unchanged" keep the label a full search gives, so its skip fraction is an honest bound on what
an exact pruned assignment could save. On well-separated blobs most searches are skipped."""
from __future__ import annotations

import numpy as np
import pytest

from benchmarks.bench_kmeans import bound_pruning, gaussian_mixture
from raydc.core.kmeans import SEQ_SEARCH_MAX_K, sample_init_centroids

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def blobs(n: int, d: int, k: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((k, d)) * 10
    return (centres[rng.integers(k, size=n)] + rng.standard_normal((n, d))).astype(np.float32)


@pytest.mark.parametrize("k", [SEQ_SEARCH_MAX_K - 2, 3 * SEQ_SEARCH_MAX_K])  # faiss's direct loop, then BLAS
def test_pruned_labels_equal_a_full_search(k):
    for x in (blobs(3000, 32, k, seed=k), gaussian_mixture(3000, 32, 4 * k, seed=k)):
        out = bound_pruning(x, k, 8, sample_init_centroids(x, k, seed=0))
        assert out["labels_farther_than_full_search"] == 0  # differences only at float32 near-ties
        assert out["labels_differ_from_full_search"] <= 5
        assert len(out["skipped_per_iteration"]) == 7


def test_separated_blobs_skip_most_searches():
    x = blobs(3000, 32, 8, seed=1)
    out = bound_pruning(x, 8, 8, sample_init_centroids(x, 8, seed=0))
    assert out["mean_skipped"] > 0.5
    assert out["assignment_speedup_bound"] == pytest.approx(1 / (1 - out["mean_skipped"]))
