"""Clustering metrics against ground-truth labels, and cluster-size diagnostics.

Everything is computed from the contingency table of (true, predicted) pairs. NMI and ARI only need its
non-zero cells, which are found with one `np.unique` over pair codes, so memory stays O(N + non-zero cells)
even for k = 10^5 clusters; ACC needs the dense K x C table for the Hungarian algorithm.
Labels may be any integers (negative ones included): they are compacted with `np.unique` first, so the
`max(label) + 1`-sized tables of the classic DEC code are never built.

At scale the labels never meet in one process: each shard counts its own (a, b) pairs (`PairCounts.of`), the
counts are summed (`PairCounts.merge`: at most K x C cells whatever N is), and every score here is computed from
the merged table (`evaluate_counts`, `nmi_counts`, ...), giving the same numbers as on the gathered labels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NMI_METHODS = ("arithmetic", "geometric", "min", "max")


@dataclass
class _Contingency:
    """Sparse contingency table: cell (row[i], col[i]) holds count[i] > 0."""

    n: int
    row: np.ndarray       # (nnz,) int64, compact true-label index
    col: np.ndarray       # (nnz,) int64, compact predicted-label index
    count: np.ndarray     # (nnz,) int64
    row_sums: np.ndarray  # (C,) int64
    col_sums: np.ndarray  # (K,) int64
    classes: np.ndarray   # (C,) the true labels
    clusters: np.ndarray  # (K,) the predicted labels

    def dense(self) -> np.ndarray:
        """(C, K) int64 table."""
        w = np.zeros((self.row_sums.size, self.col_sums.size), dtype=np.int64)
        w[self.row, self.col] = self.count
        return w


def _as_labels(y: np.ndarray, name: str) -> np.ndarray:
    y = np.asarray(y)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {y.shape}")
    if y.dtype.kind not in "iub":
        raise ValueError(f"{name} must hold integer labels, got dtype {y.dtype}")
    return y


@dataclass
class PairCounts:
    """How many rows carry each (a, b) label pair: the non-zero cells of a contingency table, small enough
    (<= K x C) to send between processes and sum."""

    a: np.ndarray      # (cells,) int64
    b: np.ndarray      # (cells,) int64
    count: np.ndarray  # (cells,) int64

    @classmethod
    def of(cls, a: np.ndarray, b: np.ndarray) -> "PairCounts":
        a = _as_labels(a, "a").astype(np.int64, copy=False)
        b = _as_labels(b, "b").astype(np.int64, copy=False)
        if a.shape != b.shape:
            raise ValueError(f"a and b differ in length: {a.size} vs {b.size}")
        if a.size == 0:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
        pairs, count = np.unique(np.stack([a, b], axis=1), axis=0, return_counts=True)
        return cls(pairs[:, 0].copy(), pairs[:, 1].copy(), count.astype(np.int64))

    @classmethod
    def merge(cls, parts) -> "PairCounts":
        parts = [p for p in parts if p is not None and p.count.size]
        if not parts:
            return cls(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
        a = np.concatenate([p.a for p in parts])
        b = np.concatenate([p.b for p in parts])
        c = np.concatenate([p.count for p in parts])
        pairs, inverse = np.unique(np.stack([a, b], axis=1), axis=0, return_inverse=True)
        return cls(pairs[:, 0].copy(), pairs[:, 1].copy(), np.bincount(inverse.ravel(), weights=c).astype(np.int64))

    @property
    def n(self) -> int:
        return int(self.count.sum())

    def b_sizes(self, k: int) -> np.ndarray:
        """(k,) rows per b label (b in 0..k-1: cluster sizes when b is the clustering)."""
        return np.bincount(self.b, weights=self.count, minlength=k).astype(np.int64)

    def agreement(self) -> float:
        """Fraction of rows whose a and b label are equal (1 - DEC's label change between two updates)."""
        return float(self.count[self.a == self.b].sum() / max(self.n, 1))

    def dense(self, ka: int, kb: int) -> np.ndarray:
        """(ka, kb) table for labels in 0..ka-1 and 0..kb-1."""
        w = np.zeros((ka, kb), np.int64)
        w[self.a, self.b] = self.count
        return w

    def table(self) -> "_Contingency":
        if self.count.size == 0:
            raise ValueError("cannot score an empty labelling")
        classes, ri = np.unique(self.a, return_inverse=True)
        clusters, ci = np.unique(self.b, return_inverse=True)
        ri, ci = ri.ravel().astype(np.int64), ci.ravel().astype(np.int64)
        return _Contingency(n=self.n, row=ri, col=ci, count=self.count,
                            row_sums=np.bincount(ri, weights=self.count, minlength=classes.size).astype(np.int64),
                            col_sums=np.bincount(ci, weights=self.count, minlength=clusters.size).astype(np.int64),
                            classes=classes, clusters=clusters)


def evaluate_counts(counts: PairCounts, average_method: str = "arithmetic") -> dict:
    """`evaluate` from (true, predicted) pair counts summed over shards."""
    return _evaluate(counts.table(), average_method)


def nmi_counts(counts: PairCounts, average_method: str = "arithmetic") -> float:
    return _nmi(counts.table(), average_method)


def majority_acc_counts(counts: PairCounts) -> float:
    """`majority_acc` from (true, predicted) pair counts."""
    return _majority(counts.table())


def transition_counts(counts: PairCounts, share: float = 0.1) -> dict:
    """How one clustering became the next, from (earlier, later) pair counts: `splits`, earlier clusters that two
    or more later clusters each took at least `share` of; `merges`, later clusters that drew at least `share` of
    themselves from each of two or more earlier clusters; `moved`, the fraction of images outside the later
    cluster that took most of their earlier one. Drift that NMI(t-1, t) only hints at, named by kind."""
    t = counts.table()
    m = np.zeros((t.classes.size, t.clusters.size), np.float64)
    np.add.at(m, (t.row, t.col), t.count)
    rows = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    cols = m / np.maximum(m.sum(axis=0, keepdims=True), 1)
    return {"splits": int(((rows >= share).sum(axis=1) >= 2).sum()),
            "merges": int(((cols >= share).sum(axis=0) >= 2).sum()),
            "moved": float(1.0 - m.max(axis=1).sum() / max(m.sum(), 1))}


def size_stats_counts(sizes: np.ndarray) -> dict:
    """`size_stats` from the (k,) cluster sizes."""
    sizes = np.asarray(sizes, np.int64)
    return {"n_empty": int((sizes == 0).sum()), "size_min": int(sizes.min()), "size_max": int(sizes.max()),
            "size_histogram": sizes.tolist()}


def _contingency(y_true: np.ndarray, y_pred: np.ndarray) -> _Contingency:
    y_true = _as_labels(y_true, "y_true")
    y_pred = _as_labels(y_pred, "y_pred")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred differ in length: {y_true.size} vs {y_pred.size}")
    if y_true.size == 0:
        raise ValueError("cannot score an empty labelling")
    classes, ti = np.unique(y_true, return_inverse=True)
    clusters, pi = np.unique(y_pred, return_inverse=True)
    k = np.int64(clusters.size)
    cells, count = np.unique(ti.astype(np.int64) * k + pi, return_counts=True)
    return _Contingency(
        n=int(y_true.size), row=cells // k, col=cells % k, count=count.astype(np.int64),
        row_sums=np.bincount(ti, minlength=classes.size).astype(np.int64),
        col_sums=np.bincount(pi, minlength=clusters.size).astype(np.int64),
        classes=classes, clusters=clusters,
    )


def acc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unsupervised accuracy: the best one-to-one map clusters -> classes (Hungarian algorithm).

    With K != C the table is rectangular and `linear_sum_assignment` matches min(K, C) pairs: the points of
    unmatched clusters (K > C) count as wrong. For over-clustering, `majority_acc` is the usual protocol.
    """
    return _acc(_contingency(y_true, y_pred))


def _acc(t: _Contingency) -> float:
    w = t.dense()
    from scipy.optimize import linear_sum_assignment  # here: scipy.optimize is a tenth of a second for every
    # Ray worker that imports this module, and only the evaluation calls it

    r, c = linear_sum_assignment(w, maximize=True)
    return float(w[r, c].sum() / t.n)


def matched_confusion(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(counts, matched): the classes x clusters table indexed by the label values themselves (so a row is
    class `i` and a column cluster `c`, as a report names them; square at least, so every class can be
    matched), and each class's cluster under the Hungarian map `acc` scores (-1: none). What a reader of a
    run asks next: which classes share a cluster."""
    from scipy.optimize import linear_sum_assignment

    y = _as_labels(y_true, "y_true").astype(np.int64)  # uint8 labels times the width would wrap
    c = _as_labels(y_pred, "y_pred").astype(np.int64)
    if y.shape != c.shape or y.size == 0 or min(int(y.min()), int(c.min())) < 0:
        raise ValueError("matched_confusion takes two equally long, non-empty labellings of ids >= 0")
    n_classes = int(y.max()) + 1
    n_cols = max(int(c.max()) + 1, n_classes)
    counts = np.bincount(y * n_cols + c, minlength=n_classes * n_cols).reshape(n_classes, n_cols)
    rows, cols = linear_sum_assignment(counts, maximize=True)
    matched = np.full(n_classes, -1, np.int64)
    matched[rows] = cols
    return counts.astype(np.int64), matched


def majority_acc(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Accuracy of the many-to-one map sending each cluster to its majority class (for K > C).

    It reaches 1 when every point is its own cluster, so only compare runs with the same K.
    """
    return _majority(_contingency(y_true, y_pred))


def _majority(t: _Contingency) -> float:
    best = np.zeros(t.col_sums.size, dtype=np.int64)
    np.maximum.at(best, t.col, t.count)
    return float(best.sum() / t.n)


def _entropy(counts: np.ndarray, n: int) -> float:
    p = counts[counts > 0] / n
    return float(-(p * np.log(p)).sum())


def nmi(y_true: np.ndarray, y_pred: np.ndarray, average_method: str = "arithmetic") -> float:
    """Normalised mutual information I(U;V) / mean(H(U), H(V)).

    `average_method` picks the mean: "arithmetic" (sklearn's default since 0.22, used by SCAN-era papers),
    "geometric" (sklearn's behaviour before 0.22: the normalisation behind 2016-2018 numbers such as DEC
    and DAC), "min" or "max". Always record which one a number used. Two labellings with one cluster each
    score 1, as in sklearn.
    """
    if average_method not in NMI_METHODS:
        raise ValueError(f"average_method must be one of {NMI_METHODS}, got {average_method!r}")
    return _nmi(_contingency(y_true, y_pred), average_method)


def _nmi(t: _Contingency, average_method: str) -> float:
    if t.row_sums.size == t.col_sums.size == 1:
        return 1.0
    n = t.n
    # I = sum_ij n_ij/N log(N n_ij / (a_i b_j)), in float64 (products of counts overflow int64 near N=3e9).
    nij = t.count.astype(np.float64)
    outer = t.row_sums[t.row].astype(np.float64) * t.col_sums[t.col].astype(np.float64)
    mi = float((nij / n * (np.log(nij) + np.log(n) - np.log(outer))).sum())
    mi = max(mi, 0.0)  # rounding can leave -1e-17 for independent labellings
    hu, hv = _entropy(t.row_sums, n), _entropy(t.col_sums, n)
    if average_method == "arithmetic":
        norm = (hu + hv) / 2
    elif average_method == "geometric":
        norm = float(np.sqrt(hu * hv))
    elif average_method == "min":
        norm = min(hu, hv)
    else:
        norm = max(hu, hv)
    return float(mi / max(norm, np.finfo(np.float64).eps))


def ari(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Adjusted Rand index (Hubert & Arabie 1985): ~0 for random labellings, 1 for equal partitions.

    Pair counts are taken in float64: C(N, 2) products overflow int64 well before N = 10^9.
    """
    return _ari(_contingency(y_true, y_pred))


def _ari(t: _Contingency) -> float:
    def comb2(v: np.ndarray) -> float:
        v = v.astype(np.float64)
        return float((v * (v - 1) / 2).sum())

    index = comb2(t.count)
    sum_a, sum_b = comb2(t.row_sums), comb2(t.col_sums)
    total = t.n * (t.n - 1) / 2
    expected = sum_a * sum_b / total if total > 0 else 0.0
    max_index = (sum_a + sum_b) / 2
    if max_index == expected:  # both partitions trivial (one cluster, or all singletons): identical
        return 1.0
    return float((index - expected) / (max_index - expected))


def evaluate(y_true: np.ndarray, y_pred: np.ndarray, average_method: str = "arithmetic") -> dict:
    """ACC (Hungarian), NMI (with its normalisation named) and ARI in one dict, ready for metrics.jsonl."""
    return _evaluate(_contingency(y_true, y_pred), average_method)


def _evaluate(t: _Contingency, average_method: str) -> dict:
    if average_method not in NMI_METHODS:
        raise ValueError(f"average_method must be one of {NMI_METHODS}, got {average_method!r}")
    return {
        "acc": _acc(t),
        "nmi": _nmi(t, average_method),
        "ari": _ari(t),
        "nmi_method": average_method,
        "n_clusters": int(t.clusters.size),
        "n_classes": int(t.classes.size),
    }


def cluster_table(y_true: np.ndarray | None, y_pred: np.ndarray) -> list[dict]:
    """One row per non-empty cluster, largest first: {cluster, size[, majority_label, purity]}.

    Ties in size keep cluster-id order, so the table is deterministic.
    """
    y_pred = _as_labels(y_pred, "y_pred")
    if y_true is None:
        clusters, sizes = np.unique(y_pred, return_counts=True)
        order = np.argsort(-sizes, kind="stable")
        return [{"cluster": int(clusters[i]), "size": int(sizes[i])} for i in order]
    t = _contingency(y_true, y_pred)
    best = np.zeros(t.col_sums.size, dtype=np.int64)
    np.maximum.at(best, t.col, t.count)
    # The majority class of each cluster: among its cells, the one with the largest count (lowest label on ties).
    order_cells = np.lexsort((t.row, -t.count, t.col))
    first = np.ones(order_cells.size, dtype=bool)
    first[1:] = t.col[order_cells][1:] != t.col[order_cells][:-1]
    majority = np.empty(t.col_sums.size, dtype=np.int64)
    majority[t.col[order_cells][first]] = t.row[order_cells][first]
    rows = []
    for j in np.argsort(-t.col_sums, kind="stable"):
        label = t.classes[majority[j]]
        rows.append({"cluster": int(t.clusters[j]), "size": int(t.col_sums[j]),
                     "majority_label": label.item(), "purity": float(best[j] / t.col_sums[j])})
    return rows


def size_histogram(labels: np.ndarray, k: int) -> np.ndarray:
    """(k,) int64 points per cluster, zeros for empty ones; labels < 0 (unassigned) are not counted."""
    labels = _as_labels(labels, "labels")
    if labels.size and labels.max() >= k:
        raise ValueError(f"label {int(labels.max())} is out of range for k={k}")
    return np.bincount(labels[labels >= 0], minlength=k).astype(np.int64)


def size_stats(labels: np.ndarray, k: int) -> dict:
    """Cluster-size diagnostics for a metrics row: empty clusters, smallest and largest, the histogram."""
    return size_stats_counts(size_histogram(labels, k))
