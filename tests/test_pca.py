from __future__ import annotations

import numpy as np
import pytest
from sklearn.decomposition import PCA

from raydc.core.faiss_backend import import_faiss
from raydc.core.pca import (Moments, fit_pca, identity_projection, l2_normalize, pca_from_moments,
                            reduce_moments)


def _data(n: int = 3000, d: int = 24, seed: int = 0) -> np.ndarray:
    """Correlated data with distinct variances (so eigenvectors are well defined) and an offset."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, d)) * np.linspace(5.0, 0.5, d)
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    return (z @ q.T + 3.0).astype(np.float32)


def test_moments_reduced_over_shards_equal_whole():
    x = _data()
    parts = [Moments.from_array(s) for s in np.array_split(x, [700, 2100])]
    total = reduce_moments(reversed(parts))
    whole = Moments.from_array(x)
    assert total.n == whole.n == x.shape[0]
    np.testing.assert_allclose(total.s1, whole.s1, rtol=1e-12)
    np.testing.assert_allclose(total.s2, whole.s2, rtol=1e-12)
    np.testing.assert_allclose(whole.covariance(), np.cov(x.astype(np.float64).T, bias=True), atol=1e-9)
    assert reduce_moments([Moments.zeros(x.shape[1]), whole]).n == whole.n


def test_from_array_is_chunked(monkeypatch):
    import raydc.core.pca as pca_mod

    x = _data(n=500, d=8)
    monkeypatch.setattr(pca_mod, "_CHUNK_BYTES", 8 * 8 * 37)  # 37 rows per chunk
    chunked = Moments.from_array(x)
    monkeypatch.undo()
    whole = Moments.from_array(x)
    np.testing.assert_allclose(chunked.s2, whole.s2, rtol=1e-12)


def test_subspace_agrees_with_sklearn():
    x = _data()
    out = 10
    ours = fit_pca(x, out, whiten=False)
    sk = PCA(n_components=out, svd_solver="full").fit(x.astype(np.float64))
    cos = np.abs(np.sum(ours.matrix.astype(np.float64) * sk.components_.T, axis=0))
    np.testing.assert_allclose(cos, 1.0, atol=1e-5)
    # sklearn's explained_variance_ uses n-1; ours divides by n like faiss.
    n = x.shape[0]
    np.testing.assert_allclose(ours.eigenvalues, sk.explained_variance_ * (n - 1) / n, rtol=1e-5)


def test_matches_faiss_pcamatrix_up_to_sign_and_global_scale():
    faiss = import_faiss()
    x = _data(n=2000, d=16)  # <= 1000 * d rows: faiss trains on all of them
    out = 8
    ours = fit_pca(x, out, whiten=True, eps=0.0).apply(x, l2_normalize=False)
    pm = faiss.PCAMatrix(16, out, -0.5)
    pm.train(x)
    theirs = pm.apply(x)
    signs = np.sign(np.sum(ours * theirs, axis=0))
    scale = np.linalg.norm(theirs) / np.linalg.norm(ours)
    np.testing.assert_allclose(ours * signs * scale, theirs, atol=1e-4 * np.abs(theirs).max())
    # faiss's eigenvalues are N times the covariance's: its whitened axes have std 1/sqrt(N).
    assert scale == pytest.approx(1 / np.sqrt(x.shape[0]), rel=1e-3)
    # After the L2 normalisation DeepCluster applies, the two are the same up to sign.
    np.testing.assert_allclose(l2_normalize(ours * signs), l2_normalize(theirs), atol=1e-4)


def test_whitened_output_has_identity_covariance_and_unit_rows():
    x = _data()
    proj = fit_pca(x, 12)
    y = proj.apply(x, l2_normalize=False)
    assert y.dtype == np.float32 and y.shape == (x.shape[0], 12)
    np.testing.assert_allclose(np.cov(y.astype(np.float64).T, bias=True), np.eye(12), atol=1e-4)
    np.testing.assert_allclose(y.mean(axis=0), 0.0, atol=1e-4)
    z = proj.apply(x)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, atol=1e-5)
    assert np.all(np.diff(proj.eigenvalues) <= 0)


def test_sharded_projection_equals_whole():
    x = _data()
    whole = fit_pca(x, 6)
    sharded = pca_from_moments(reduce_moments(Moments.from_array(s) for s in np.array_split(x, 3)), 6)
    np.testing.assert_allclose(sharded.apply(x), whole.apply(x), atol=1e-5)


def test_rank_deficient_data_stays_finite():
    x = _data(n=400, d=10)
    x[:, 3] = 0.0                      # a dead unit
    x[:, 7] = x[:, 2]                  # a duplicated one
    y = fit_pca(x, 10).apply(x)
    assert np.isfinite(y).all()


def test_nan_and_bad_sizes_raise():
    x = _data(n=200, d=8)
    proj = fit_pca(x, 4)
    bad = x.copy()
    bad[17, 3] = np.nan
    with pytest.raises(FloatingPointError, match="row 17"):
        proj.apply(bad)
    bad[17, 3] = np.inf
    with pytest.raises(FloatingPointError):
        Moments.from_array(bad)
    with pytest.raises(ValueError, match="out_dim=9"):
        fit_pca(x, 9)
    with pytest.raises(ValueError, match="shape"):
        proj.apply(x[:, :5])


def test_l2_normalize_guards_zero_rows_and_identity():
    x = np.array([[3.0, 4.0], [0.0, 0.0]], dtype=np.float32)
    y = l2_normalize(x)
    np.testing.assert_allclose(y, [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)
    assert x[0, 0] == 3.0  # not modified unless out= is given
    np.testing.assert_allclose(identity_projection(2).apply(x), y, atol=1e-7)
