"""DeepCluster's uniform sampling over pseudo-labels, exact and streaming.

DeepCluster draws each epoch's images so that every non-empty cluster contributes about equally, its
defence against a few huge clusters swallowing the training signal (`UnifLabelSampler`, `util.py`).
`uniform_label_indices` is that sampler. `poisson_repeats` is its streaming form for Ray Data: each row is
repeated Poisson(n_total / (k_nonempty |c|)) times, so a cluster's expected share is n_total / k_nonempty as
in the exact sampler, but the decision for a row needs only its label, the global cluster sizes and a
uniform derived from (seed, epoch, row id) by `hash_uniforms`, whichever worker streams the row.
"""
from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MASK64 = (1 << 64) - 1


def uniform_label_indices(labels: np.ndarray, n_total: int, rng: np.random.Generator) -> np.ndarray:
    """Exactly n_total dataset indices (int64), about n_total / k_nonempty from each non-empty cluster.

    As the reference: each non-empty cluster gets size = int(n_total / k_nonempty) + 1 draws, without
    replacement when it has more members than that and with replacement otherwise; the draws are
    concatenated, shuffled and cut to n_total. Rows labelled < 0 are unassigned and never drawn. Empty
    clusters are skipped (the original crashed with "'a' cannot be empty" before commit 483391c).
    """
    labels = np.asarray(labels)
    if labels.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {labels.shape}")
    if n_total < 0:
        raise ValueError(f"n_total must be >= 0, got {n_total}")
    if n_total == 0:
        return np.zeros(0, dtype=np.int64)
    assigned = np.flatnonzero(labels >= 0)
    if assigned.size == 0:
        raise ValueError("no row has a cluster label (all labels < 0): nothing to sample")
    # Members of each cluster, in cluster-id order then dataset order, by one stable sort.
    order = assigned[np.argsort(labels[assigned], kind="stable")]
    _, starts, sizes = np.unique(labels[order], return_index=True, return_counts=True)
    size = int(n_total / sizes.size) + 1
    draws = [rng.choice(order[s:s + m], size, replace=bool(m <= size)) for s, m in zip(starts, sizes)]
    res = np.concatenate(draws).astype(np.int64, copy=False)
    rng.shuffle(res)
    if res.size >= n_total:
        return res[:n_total]
    return np.resize(res, n_total)  # unreachable (size * k_nonempty > n_total), kept for the contract


def poisson_lambdas(cluster_sizes: np.ndarray, n_total: int) -> np.ndarray:
    """(k,) float64 Poisson mean per row of each cluster: n_total / (k_nonempty |c|), 0 for empty clusters."""
    sizes = np.asarray(cluster_sizes)
    if sizes.ndim != 1 or (sizes.size and sizes.min() < 0):
        raise ValueError("cluster_sizes must be a 1-D array of non-negative counts")
    nonempty = sizes > 0
    k_nonempty = int(nonempty.sum())
    lam = np.zeros(sizes.shape, dtype=np.float64)
    if k_nonempty:
        lam[nonempty] = n_total / (k_nonempty * sizes[nonempty].astype(np.float64))
    return lam


def poisson_ppf(u: np.ndarray, lam: np.ndarray) -> np.ndarray:
    """Inverse Poisson CDF: the smallest integer m with P(X <= m) >= u, as int64 (0 where lam = 0 or u = 0).

    Same algorithm as `scipy.stats.poisson.ppf` (a continuous inverse through `pdtrik`, then one
    correction step with `pdtr`) without the distribution machinery, and with u = 0 mapped to 0 rather than
    scipy's -1.
    """
    u = np.asarray(u, dtype=np.float64)
    lam = np.asarray(lam, dtype=np.float64)
    out = np.zeros(np.broadcast(u, lam).shape, dtype=np.int64)
    live = (lam > 0) & (u > 0)
    if not live.any():
        return out
    from scipy import special  # here, not at the top: every Ray worker that imports the sampler would pay for it

    ul, ll = np.broadcast_to(u, out.shape)[live], np.broadcast_to(lam, out.shape)[live]
    m = np.ceil(special.pdtrik(ul, ll))
    below = np.maximum(m - 1, 0)
    m = np.where(special.pdtr(below, ll) >= ul, below, m)
    out[live] = m.astype(np.int64)
    return out


def poisson_repeats(row_labels: np.ndarray, cluster_sizes: np.ndarray, n_total: int,
                    uniforms: np.ndarray) -> np.ndarray:
    """How many times (int64) each streamed row appears in the epoch: Poisson(lambda of its cluster).

    `cluster_sizes` are the global sizes (k,), `uniforms` one value in [0, 1) per row, usually
    `hash_uniforms(ids, seed, epoch)`. Rows with label < 0 get 0. The expected total is n_total and each
    non-empty cluster's expected total is n_total / k_nonempty, as in `uniform_label_indices`; the actual
    epoch length varies by about sqrt(n_total).
    """
    row_labels = np.asarray(row_labels)
    uniforms = np.asarray(uniforms, dtype=np.float64)
    if row_labels.shape != uniforms.shape or row_labels.ndim != 1:
        raise ValueError(f"row_labels and uniforms must be 1-D of equal length, got {row_labels.shape} "
                         f"and {uniforms.shape}")
    if uniforms.size and (uniforms.min() < 0 or uniforms.max() >= 1):
        raise ValueError("uniforms must lie in [0, 1)")
    lam_k = poisson_lambdas(cluster_sizes, n_total)
    k = lam_k.size
    assigned = row_labels >= 0
    if assigned.any() and row_labels[assigned].max() >= k:
        raise ValueError(f"label {int(row_labels[assigned].max())} is out of range for {k} cluster sizes")
    lam = np.zeros(row_labels.shape, dtype=np.float64)
    lam[assigned] = lam_k[row_labels[assigned]]
    if np.any(assigned & (lam == 0)):
        raise ValueError("a row is labelled with a cluster whose size is 0: cluster_sizes do not match the labels")
    return poisson_ppf(uniforms, lam)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser over uint64 (wrapping arithmetic is the point)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def _mix_scalar(z: int) -> int:
    z &= _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def _key(seed: int, epoch: int, stream: int) -> int:
    """One 64-bit key per (seed, epoch, stream), each part mixed in so nearby values give unrelated keys."""
    z = _mix_scalar(seed + 0x9E3779B97F4A7C15)
    z = _mix_scalar(z ^ (epoch & _MASK64))
    return _mix_scalar(z ^ ((stream * 0xD1B54A32D192ED03) & _MASK64))


def hash_uniforms(ids: np.ndarray, seed: int, epoch: int, stream: int = 0) -> np.ndarray:
    """float64 uniforms in [0, 1), one per id, a pure function of (id, seed, epoch, stream).

    Counter-based (splitmix64 of key + id * golden gamma, as Java's SplittableRandom), so a row gets the same
    value whatever its position, batch or worker: the property the streaming sampler needs. The top 53 bits
    make the double, so 1.0 is never returned.
    """
    ids = np.asarray(ids)
    if ids.dtype.kind not in "iu":
        raise ValueError(f"ids must be integers, got dtype {ids.dtype}")
    z = ids.astype(np.int64, copy=False).view(np.uint64)
    with np.errstate(over="ignore"):
        h = _splitmix64(z * _GOLDEN + np.uint64(_key(seed, epoch, stream)))
    return (h >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


def hash_uniform_columns(ids: np.ndarray, seed: int, epoch: int, first_stream: int, n: int) -> np.ndarray:
    """(len(ids), n) float64 uniforms: column j is `hash_uniforms` of stream first_stream + j, the draws one
    augmentation takes per image (an angle, a shift, ...), each independent of the others."""
    return np.stack([hash_uniforms(ids, seed, epoch, first_stream + j) for j in range(n)], axis=1)
