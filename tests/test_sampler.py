from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from raydc.core.sampler import (hash_uniforms, poisson_lambdas, poisson_ppf, poisson_repeats,
                                uniform_label_indices)


def _skewed_labels(n: int = 5000, k: int = 10, seed: int = 0) -> np.ndarray:
    """Cluster sizes from ~2500 down to a handful, cluster 3 empty, some rows unassigned (-1)."""
    rng = np.random.default_rng(seed)
    p = 0.5 ** np.arange(k)
    p[3] = 0
    labels = rng.choice(k, size=n, p=p / p.sum())
    labels[rng.random(n) < 0.02] = -1
    return labels


def test_uniform_label_indices_balances_non_empty_clusters():
    labels = _skewed_labels()
    sizes = np.bincount(labels[labels >= 0], minlength=10)
    nonempty = np.flatnonzero(sizes)
    n_total = labels.size
    idx = uniform_label_indices(labels, n_total, np.random.default_rng(1))
    assert idx.dtype == np.int64 and idx.shape == (n_total,)
    assert np.all(labels[idx] >= 0)                     # unassigned rows never drawn
    drawn = np.bincount(labels[idx], minlength=10)
    assert drawn[3] == 0                                # the empty cluster is skipped, not a crash
    per = int(n_total / nonempty.size) + 1
    # Each non-empty cluster gets `per` draws before truncation; truncation removes < k_nonempty * per - N.
    assert drawn[nonempty].max() <= per
    assert drawn[nonempty].min() >= per - (per * nonempty.size - n_total)
    # Big clusters are sub-sampled without replacement, small ones over-sampled with replacement.
    big = int(np.argmax(sizes))
    assert len(np.unique(idx[labels[idx] == big])) == drawn[big]
    small = int(nonempty[np.argmin(sizes[nonempty])])
    assert set(np.unique(idx[labels[idx] == small])) == set(np.flatnonzero(labels == small))


def test_uniform_label_indices_edge_cases():
    rng = np.random.default_rng(0)
    labels = np.array([5, 5, 5, -1, 9])                 # sparse ids with gaps (empty clusters 0-4, 6-8)
    idx = uniform_label_indices(labels, 7, rng)
    assert idx.shape == (7,) and set(labels[idx].tolist()) <= {5, 9}
    assert uniform_label_indices(labels, 0, rng).shape == (0,)
    with pytest.raises(ValueError, match="no row"):
        uniform_label_indices(np.full(4, -1), 3, rng)
    a = uniform_label_indices(labels, 7, np.random.default_rng(3))
    b = uniform_label_indices(labels, 7, np.random.default_rng(3))
    np.testing.assert_array_equal(a, b)


def test_poisson_ppf_matches_scipy():
    u = np.random.default_rng(0).random(2000)
    lam = np.exp(np.random.default_rng(1).uniform(np.log(0.01), np.log(500.0), 2000))
    ref = stats.poisson.ppf(u, lam)
    np.testing.assert_array_equal(poisson_ppf(u, lam), ref.astype(np.int64))
    assert poisson_ppf(np.array([0.0]), np.array([3.0]))[0] == 0   # scipy says -1
    assert poisson_ppf(np.array([0.7]), np.array([0.0]))[0] == 0


def test_poisson_repeats_expected_totals():
    labels = _skewed_labels(n=20000, seed=4)
    sizes = np.bincount(labels[labels >= 0], minlength=10)
    k_nonempty = int((sizes > 0).sum())
    n_total = 20000
    ids = np.arange(labels.size, dtype=np.int64)
    totals, per_cluster = [], []
    for epoch in range(20):
        r = poisson_repeats(labels, sizes, n_total, hash_uniforms(ids, seed=7, epoch=epoch))
        assert r.dtype == np.int64 and r.min() >= 0
        assert np.all(r[labels < 0] == 0)
        totals.append(r.sum())
        per_cluster.append(np.bincount(labels[labels >= 0], weights=r[labels >= 0], minlength=10))
    # Var(total) = n_total; the mean of 20 epochs has sd sqrt(n_total / 20) ~ 32: allow 6 sd.
    assert abs(np.mean(totals) - n_total) < 6 * np.sqrt(n_total / 20)
    means = np.mean(per_cluster, axis=0)
    target = n_total / k_nonempty
    assert means[3] == 0
    # A cluster's epoch total has variance |c| * lambda_c = target (~2200): the mean over 20 epochs has a
    # relative sd of ~0.5 %, so 8 % is a generous, non-flaky bound (and the uniforms are a fixed hash anyway).
    np.testing.assert_allclose(means[sizes > 0], target, rtol=0.08)


def test_poisson_repeats_lambdas_and_checks():
    lam = poisson_lambdas(np.array([10, 0, 30]), 80)
    np.testing.assert_allclose(lam, [80 / (2 * 10), 0.0, 80 / (2 * 30)])
    with pytest.raises(ValueError, match="size is 0"):
        poisson_repeats(np.array([1]), np.array([10, 0, 30]), 80, np.array([0.5]))
    with pytest.raises(ValueError, match="out of range"):
        poisson_repeats(np.array([3]), np.array([10, 0, 30]), 80, np.array([0.5]))
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        poisson_repeats(np.array([0]), np.array([10, 0, 30]), 80, np.array([1.0]))


def test_poisson_repeats_independent_of_batching():
    labels = _skewed_labels(n=3000, seed=5)
    sizes = np.bincount(labels[labels >= 0], minlength=10)
    ids = np.arange(1000, 4000, dtype=np.int64)
    whole = poisson_repeats(labels, sizes, 3000, hash_uniforms(ids, 1, 2))
    perm = np.random.default_rng(0).permutation(ids.size)
    parts = np.empty_like(whole)
    for chunk in np.array_split(perm, 7):               # any order, any batch size, any worker
        parts[chunk] = poisson_repeats(labels[chunk], sizes, 3000, hash_uniforms(ids[chunk], 1, 2))
    np.testing.assert_array_equal(whole, parts)


def test_hash_uniforms_deterministic_and_uniform():
    ids = np.arange(200_000, dtype=np.int64)
    u = hash_uniforms(ids, seed=31, epoch=0)
    assert u.dtype == np.float64 and u.min() >= 0.0 and u.max() < 1.0
    np.testing.assert_array_equal(u, hash_uniforms(ids, seed=31, epoch=0))
    np.testing.assert_array_equal(u[12345:12400], hash_uniforms(ids[12345:12400], 31, 0))
    assert stats.kstest(u, "uniform").pvalue > 1e-4
    # Different epochs / seeds / streams give unrelated streams.
    for other in (hash_uniforms(ids, 31, 1), hash_uniforms(ids, 32, 0), hash_uniforms(ids, 31, 0, stream=1)):
        assert abs(np.corrcoef(u, other)[0, 1]) < 0.01
        assert np.mean(u == other) < 1e-4
    # Neighbouring ids are not correlated either.
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.01
    # Negative and uint64 ids are accepted.
    assert hash_uniforms(np.array([-1, 2**62], dtype=np.int64), 0, 0).shape == (2,)
    with pytest.raises(ValueError, match="integers"):
        hash_uniforms(np.array([0.5]), 0, 0)
