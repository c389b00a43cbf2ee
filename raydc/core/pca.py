"""PCA with whitening from reduced moments, so features never have to meet on one machine.

Each shard accumulates (n, sum x, sum x x^T) in float64 (`Moments.from_array`); moments add (`merge`,
`reduce_moments`); the driver turns the total into a projection (`pca_from_moments`) and broadcasts it; each
shard projects and L2-normalises its own rows (`PCAProjection.apply`). The wire cost is d x d float64 per
shard, once per epoch.

This replaces DeepCluster's `faiss.PCAMatrix(d, 256, eigen_power=-0.5)`, which (a) trains on at most
`max_points_per_d * d` = 1000 d rows (a silent subsample; we use every row) and (b) takes its eigenvalues
from the unnormalised scatter matrix, N times the covariance's, so its whitened output has variance 1/N per
axis where ours has 1 (measured with faiss 1.15.1). Subspace and relative per-axis scaling agree; the global
factor disappears in the L2 normalisation that always follows in DeepCluster.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable

import numpy as np

# Rows per float64 chunk: 16k rows x 4096 dims x 8 bytes = 512 MiB at worst, 16 MiB at d=128.
_CHUNK_BYTES = 64 << 20


def _rows_per_chunk(d: int, itemsize: int = 8) -> int:
    return max(1, _CHUNK_BYTES // max(1, d * itemsize))


def check_finite(x: np.ndarray, what: str = "input") -> None:
    """Raise FloatingPointError if x holds NaN or Inf; chunked so no N x d bool array is built at once."""
    x2 = x.reshape(x.shape[0], -1) if x.ndim > 1 else x.reshape(-1, 1)
    step = _rows_per_chunk(x2.shape[1], 1)
    for i in range(0, x2.shape[0], step):
        chunk = x2[i:i + step]
        if not np.isfinite(chunk).all():
            bad = i + int(np.flatnonzero(~np.isfinite(chunk).all(axis=1))[0])
            raise FloatingPointError(f"{what} contains NaN or Inf (first at row {bad})")


@dataclass
class Moments:
    """Sufficient statistics for a covariance: additive over any partition of the rows.

    Raw (uncentred) sums are what makes the reduction a plain sum. In float64 they lose about
    log10(|mean|^2 / variance) of float64's 16 digits when the covariance is formed: irrelevant for network
    features (mean and spread of the same order), worth knowing for data with a huge offset.
    """

    n: int
    s1: np.ndarray  # (d,) float64, sum of rows
    s2: np.ndarray  # (d, d) float64, sum of outer products

    @property
    def d(self) -> int:
        return int(self.s1.shape[0])

    @classmethod
    def zeros(cls, d: int) -> "Moments":
        return cls(0, np.zeros(d, dtype=np.float64), np.zeros((d, d), dtype=np.float64))

    @classmethod
    def from_array(cls, x: np.ndarray) -> "Moments":
        """Moments of the rows of x (N, d), accumulated in float64 chunk by chunk.

        A float32 x is never copied whole to float64: each chunk is converted, and its x^T x runs as one
        float64 GEMM. NaN/Inf raise FloatingPointError here, where the culprit row is still known.
        """
        x = np.asarray(x)
        if x.ndim != 2:
            raise ValueError(f"expected a 2-D array (N, d), got shape {x.shape}")
        n, d = x.shape
        m = cls.zeros(d)
        step = _rows_per_chunk(d)
        for i in range(0, n, step):
            chunk = np.asarray(x[i:i + step], dtype=np.float64)
            if not np.isfinite(chunk).all():
                bad = i + int(np.flatnonzero(~np.isfinite(chunk).all(axis=1))[0])
                raise FloatingPointError(f"features contain NaN or Inf (first at row {bad})")
            m.s1 += chunk.sum(axis=0)
            m.s2 += chunk.T @ chunk
        m.n = int(n)
        return m

    def merge(self, other: "Moments") -> "Moments":
        if self.d != other.d:
            raise ValueError(f"cannot merge moments of dimension {self.d} and {other.d}")
        return Moments(self.n + other.n, self.s1 + other.s1, self.s2 + other.s2)

    def mean(self) -> np.ndarray:
        return self.s1 / self.n

    def covariance(self) -> np.ndarray:
        """Population covariance (divides by n, as faiss does), symmetrised against rounding."""
        if self.n < 1:
            raise ValueError("covariance of zero rows")
        mu = self.mean()
        c = self.s2 / self.n - np.outer(mu, mu)
        return (c + c.T) / 2


def reduce_moments(parts: Iterable[Moments]) -> Moments:
    """Sum of per-shard moments (any order: addition is all there is)."""
    total: Moments | None = None
    for p in parts:
        total = p if total is None else total.merge(p)
    if total is None:
        raise ValueError("reduce_moments got no moments")
    return total


def l2_normalize(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """Rows scaled to unit L2 norm in float32; `+1e-10` keeps all-zero rows at zero instead of NaN.

    Pass `out=x` (a float32 C array) to normalise in place and skip an N x d copy.
    """
    x = np.asarray(x, dtype=np.float32)
    norms = np.sqrt(np.einsum("ij,ij->i", x, x, dtype=np.float64)).astype(np.float32)
    norms += np.float32(1e-10)
    if out is None:
        return x / norms[:, None]
    np.divide(x, norms[:, None], out=out)
    return out


_normalize_rows = l2_normalize  # `PCAProjection.apply` has a parameter of the same name


@dataclass
class PCAProjection:
    """y = (x - mean) @ matrix, then optionally L2-normalised; picklable, so Ray can broadcast it."""

    mean: np.ndarray         # (d,) float32
    matrix: np.ndarray       # (d, out) float32; columns are eigenvectors, scaled by (lambda + eps)^-1/2 if whiten
    eigenvalues: np.ndarray  # (out,) float64, descending
    whiten: bool

    @property
    def d_in(self) -> int:
        return int(self.matrix.shape[0])

    @property
    def d_out(self) -> int:
        return int(self.matrix.shape[1])

    def apply(self, x: np.ndarray, l2_normalize: bool = True) -> np.ndarray:
        """Project x (N, d_in) to float32 (N, d_out).

        Computed as x @ M - mean @ M so no centred N x d copy of x is made. NaN/Inf in x raise
        FloatingPointError (the engine reports it with the epoch): faiss k-means would otherwise fail later
        with a less useful message, or an all-NaN row would silently join some cluster.
        """
        x = np.asarray(x)
        if x.ndim != 2 or x.shape[1] != self.d_in:
            raise ValueError(f"expected an array of shape (N, {self.d_in}), got {x.shape}")
        check_finite(x, "features")
        x = np.asarray(x, dtype=np.float32)
        bias = (self.mean.astype(np.float64) @ self.matrix.astype(np.float64)).astype(np.float32)
        y = x @ self.matrix
        y -= bias
        if l2_normalize:
            _normalize_rows(y, out=y)
        return y


def pca_from_moments(m: Moments, out_dim: int, whiten: bool = True, eps: float = 1e-8) -> PCAProjection:
    """The top `out_dim` principal axes of the reduced moments.

    Whitening divides each axis by sqrt(lambda + eps * lambda_max), i.e. faiss's `eigen_power=-0.5`; the
    relative eps keeps near-null directions (dead ReLU units, d > N) from blowing up to 1/sqrt(0). Each
    eigenvector's sign is fixed (largest-magnitude entry positive) so the same data give the same projection
    whatever LAPACK returns.
    """
    d = m.d
    if not 1 <= out_dim <= d:
        raise ValueError(f"out_dim={out_dim} must be between 1 and the feature dimension d={d}")
    if m.n < 2:
        raise ValueError(f"PCA needs at least 2 rows, got n={m.n}")
    if not (np.isfinite(m.s1).all() and np.isfinite(m.s2).all()):
        raise FloatingPointError("moments contain NaN or Inf")
    cov = m.covariance()
    evals, evecs = np.linalg.eigh(cov)               # ascending
    evals = np.clip(evals[::-1][:out_dim], 0.0, None)
    evecs = evecs[:, ::-1][:, :out_dim]
    pivot = np.argmax(np.abs(evecs), axis=0)
    evecs = evecs * np.sign(evecs[pivot, np.arange(out_dim)])
    if whiten:
        lam_max = max(float(evals[0]), np.finfo(np.float64).tiny)
        evecs = evecs / np.sqrt(evals + eps * lam_max)
    return PCAProjection(
        mean=m.mean().astype(np.float32),
        matrix=np.ascontiguousarray(evecs, dtype=np.float32),
        eigenvalues=evals.astype(np.float64),
        whiten=whiten,
    )


def fit_pca(x: np.ndarray, out_dim: int, whiten: bool = True, eps: float = 1e-8) -> PCAProjection:
    """PCA on all rows of x (unlike faiss.PCAMatrix, which keeps only 1000 * d of them)."""
    return pca_from_moments(Moments.from_array(x), out_dim, whiten=whiten, eps=eps)


def identity_projection(d: int) -> PCAProjection:
    """The no-PCA case (pca_dim=0) as a projection, for code that wants one type.

    It costs a d x d matmul per batch: callers that can should use `l2_normalize` directly.
    """
    return PCAProjection(mean=np.zeros(d, dtype=np.float32), matrix=np.eye(d, dtype=np.float32),
                         eigenvalues=np.ones(d, dtype=np.float64), whiten=False)
