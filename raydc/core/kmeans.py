"""k-means: faiss on one process, and the primitives of the same Lloyd iteration over shards.

`kmeans` is DeepCluster's `run_kmeans`: `faiss.Clustering` with subsampling disabled, a flat L2 index
(multi-GPU when present), then a final `index.search` against the last centroids. `lloyd` runs the same
iteration from `nearest_centroids` / `partial_sums` / `update_centroids`, the pieces the Ray engine spreads over shard
actors: the driver only ever holds k x d centroids and sums.

The two agree from the same initial centroids: faiss's iteration_stats[i].obj is the sum of squared distances
of the assignment made with the centroids at the *start* of iteration i, which is what `lloyd` records, and
both stop before `niter` once the objective repeats exactly (a fixed point; faiss >= 1.15 behaviour).
They differ only in rounding (faiss sums in float32, we sum in float64) and in the random choice made when a
cluster empties (faiss's RNG is re-seeded with 1234 at every split; ours is a numpy Generator).

`kmeans(..., assign_precision="bf16")` runs `lloyd`'s iteration in-process with `Bf16Assigner` instead of
faiss's search (meant for CPUs with bf16 matrix instructions and many centroids, see BF16_AUTO): the distance GEMM
in bfloat16 (torch, oneDNN: AMX where present) picks each point's `BF16_CANDIDATES` nearest centroids, and an
exact float32 distance to each of them (faiss's `knn_L2sqr_by_idx`) picks the label. The GEMM is where a
k = 1000 iteration spends most of its time; the re-rank costs a few candidates per point.
"""
from __future__ import annotations

import functools
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Sequence

import numpy as np

from raydc.core.faiss_backend import describe_faiss, import_faiss, want_gpu
from raydc.core.pca import check_finite

if TYPE_CHECKING:  # torch is imported where it is used: a shard actor that only runs faiss never loads it
    import torch

log = logging.getLogger(__name__)

# faiss/Clustering.cpp: "a bit above machine epsilon for float16".
SPLIT_EPS = 1.0 / 1024.0
# faiss derives the initial permutation of restart r from seed + 1 + r * 15486557; we reuse the stride.
_REDO_STRIDE = 15486557
# Up to this many centroids, faiss's flat search takes its direct SIMD distance loop (`exhaustive_L2sqr_seq`: one
# pass over the rows, no norms, no GEMM) instead of the BLAS path its size threshold would pick: with a handful
# of centroids the GEMM is too thin to pay for its extra passes. The crossover, measured over d = 16..256 on 1
# and 2 threads, lies between 10 and 32 centroids (benchmarks/RESULTS.md, "flat search path").
SEQ_SEARCH_MAX_K = 12
_INT_MAX = 2**31 - 1
# Rows widened to float64 at a time in partial_sums: a few MiB, so a chunk is still in cache when it is added.
_CHUNK_BYTES = 4 << 20
# The bf16 assignment: candidates re-ranked exactly per point. A bf16 score is off by its inputs' rounding (8
# significant bits) and its own, so the float32 nearest can rank a few places down in bf16 order; the k-means
# benchmark counts, per k, the labels that differ from float32 with 1, 2, 4 and 8 candidates (`bf16_assignment`
# in benchmarks/results/kmeans.json). 8 is twice the fewest that gave none there.
BF16_CANDIDATES = 8
# Whether `kmeans(..., assign_precision="auto")` takes the bf16 assignment (for k >= BF16_MIN_K, on a CPU with bf16
# instructions). Off: measured on an unloaded machine with AMX, the whole bf16 iteration was slower than faiss's
# float32 one at k = 100 and k = 1000 (benchmarks/RESULTS.md, k-means: `raydc_bf16`). The bf16 GEMM itself is
# the cheap part there; choosing the candidates from its k scores per row (a heap or a top-k) and widening them
# cost more than the float32 GEMM saves. assign_precision="bf16" runs it regardless.
BF16_AUTO = False
# With fewer centroids the GEMM is thin and faiss's own search is as fast (see SEQ_SEARCH_MAX_K).
BF16_MIN_K = 64
_BF16_BLOCK_ROWS = 2048  # rows per GEMM block: a block's bf16 and float32 scores stay within a few MiB

OnIteration = Callable[[int, float], None]


@dataclass
class KMeansResult:
    centroids: np.ndarray   # (k, d) float32
    labels: np.ndarray      # (N,) int64, nearest final centroid
    distances: np.ndarray   # (N,) float32, squared L2 to that centroid
    objective: list[float] = field(default_factory=list)  # per iteration, before that iteration's update
    n_split: int = 0        # empty clusters split during training, total
    backend: str = ""
    seconds: float = 0.0

    @property
    def final_objective(self) -> float:
        """Sum of squared distances of the final assignment (one step past `objective[-1]`)."""
        return float(self.distances.sum(dtype=np.float64))


# ----------------------------------------------------------------------------------------------------------
# validation


def _as_points(x: np.ndarray, name: str = "x") -> np.ndarray:
    """float32 C-contiguous (N, d), the only layout faiss takes without a hidden copy; NaN/Inf rejected."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (N, d), got shape {x.shape}")
    x = np.ascontiguousarray(x, dtype=np.float32)
    check_finite(x, name)
    return x


def _check_k(k: int, n: int) -> None:
    if k < 2:
        raise ValueError(f"k must be >= 2, got k={k}")
    if n < k:
        raise ValueError(f"k-means needs at least k points: k={k} clusters but N={n} points")


def _as_centroids(c: np.ndarray, k: int, d: int) -> np.ndarray:
    c = _as_points(c, "init_centroids")
    if c.shape != (k, d):
        raise ValueError(f"init_centroids must have shape (k, d) = ({k}, {d}), got {c.shape}")
    return c


# ----------------------------------------------------------------------------------------------------------
# faiss k-means


_GPU_INDEXES: dict[tuple[int, int], object] = {}  # (d, ngpu) -> this process's reusable GPU flat index


def _flat_index(d: int, ngpu: int, reuse: bool = False):
    """A flat L2 index. On GPUs, `reuse` hands back this process's index for (d, ngpu), emptied: building one
    allocates each GPU's scratch memory and streams, which a distributed Lloyd would otherwise pay at every
    step of every shard. The caller adds its centroids and searches; a shard's steps run one at a time."""
    faiss = import_faiss()
    if ngpu > 0 and reuse:
        index = _GPU_INDEXES.get((d, ngpu))
        if index is None:
            index = _GPU_INDEXES[(d, ngpu)] = _flat_index(d, ngpu)
        index.reset()
        return index
    index = faiss.IndexFlatL2(d)
    if ngpu > 0:
        # Exact float32 distances (DeepCluster: useFloat16=False, the cloner's default).
        index = faiss.index_cpu_to_all_gpus(index, ngpu=ngpu)
    return index


@contextmanager
def _search_path(k: int, ngpu: int):
    """faiss's flat search on the path that is faster for k centroids (see SEQ_SEARCH_MAX_K). The threshold is
    process-wide: it is restored on exit, and a process runs one search at a time (a shard actor's tasks run
    one by one)."""
    if ngpu > 0 or k > SEQ_SEARCH_MAX_K:
        yield
        return
    cvar = import_faiss().cvar
    old = cvar.distance_compute_blas_threshold
    cvar.distance_compute_blas_threshold = _INT_MAX
    try:
        yield
    finally:
        cvar.distance_compute_blas_threshold = old


def _one_run(x: np.ndarray, k: int, niter: int, seed: int, init: np.ndarray | None, ngpu: int,
             verbose: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[float], int]:
    faiss = import_faiss()
    n, d = x.shape
    clus = faiss.Clustering(d, k)
    clus.niter = niter
    clus.seed = seed
    clus.nredo = 1
    clus.verbose = verbose
    # DeepCluster trains on every point; faiss's default would sample 256 * k of them.
    clus.max_points_per_centroid = 10**9
    clus.min_points_per_centroid = 1     # N >= k is checked; no "please provide more points" warning
    if hasattr(clus, "check_input_data_for_NaNs"):
        clus.check_input_data_for_NaNs = False  # `_as_points` checked already, with the row named
    if init is not None:
        # A non-empty `centroids` vector is used as the starting point (Clustering.cpp: n_input_centroids).
        faiss.copy_array_to_vector(init.ravel(), clus.centroids)
    index = _flat_index(d, ngpu)
    with _search_path(k, ngpu):
        clus.train(x, index)
        # The index holds the final centroids after train(): this is DeepCluster's final `index.search(x, 1)`.
        dist, lab = index.search(x, 1)
    stats = clus.iteration_stats
    objective = [float(stats.at(i).obj) for i in range(stats.size())]
    n_split = sum(int(stats.at(i).nsplit) for i in range(stats.size()))
    centroids = faiss.vector_to_array(clus.centroids).reshape(k, d).astype(np.float32, copy=False)
    return centroids, lab[:, 0].astype(np.int64), dist[:, 0].copy(), objective, n_split


@functools.lru_cache(maxsize=1)
def cpu_bf16_flag() -> str | None:
    """The CPU's bf16 matrix/dot-product instruction set ("amx_bf16", "avx512_bf16") from /proc/cpuinfo, or None.

    torch's `get_cpu_capability()` reports "AVX512" on AMX machines too, so the kernel's flags are the source."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    for name in ("amx_bf16", "avx512_bf16"):
                        if name in flags:
                            return name
                    return None
    except OSError:
        pass
    return None


def _assign_precision(precision: str, k: int, ngpu: int) -> str:
    if precision not in ("auto", "fp32", "bf16"):
        raise ValueError(f"assign_precision must be 'auto', 'fp32' or 'bf16', got {precision!r}")
    if precision == "auto":
        return "bf16" if BF16_AUTO and ngpu == 0 and k >= BF16_MIN_K and cpu_bf16_flag() else "fp32"
    if precision == "bf16" and ngpu > 0:
        raise ValueError("assign_precision='bf16' is the CPU path: with a GPU, faiss searches in float32")
    return precision


def _split_bf16(v: torch.Tensor, parts: int = 3) -> list[torch.Tensor]:
    """bf16 terms whose float32 sum is v (float64) to about 24 bits: v's float32 value in GEMM columns."""
    import torch

    out = []
    for _ in range(parts):
        h = v.to(torch.bfloat16)
        out.append(h)
        v = v - h.double()
    return out


class Bf16Assigner:
    """Nearest centroid of each row of a fixed x: a bf16 GEMM picks candidates, float32 distances decide.

    x is converted once (the Lloyd iteration assigns the same points every time): rows [x, 1, 1, 1] in bf16,
    against centroid rows [-2c, |c|^2 in three bf16 terms], so one GEMM gives |c|^2 - 2 x.c (the squared
    distance less |x|^2, which does not change the order) with no pass to add the norms. The GEMM accumulates in
    float32 and rounds its output to bf16. A faiss heap keeps each row's `candidates` smallest scores; the
    candidates, sorted by index, are re-ranked with exact float32 squared distances (`knn_L2sqr_by_idx`,
    computed as sum((x - c)^2)), so an exact tie goes to the lowest index as in faiss's search.
    `last_top1_changed` counts the rows whose bf16 nearest (exact bf16 ties broken by heap position) was not the
    re-ranked one, for the record.
    """

    def __init__(self, x: np.ndarray, candidates: int = BF16_CANDIDATES, block_rows: int = _BF16_BLOCK_ROWS):
        self.x = _as_points(x)
        n, d = self.x.shape
        self.candidates = int(candidates)
        self.block_rows = int(block_rows)
        import torch

        xa = torch.empty((n, d + 3), dtype=torch.bfloat16)
        xa[:, :d] = torch.from_numpy(self.x)
        xa[:, d:] = 1.0
        self.xa = xa
        self.last_top1_changed = 0

    def __call__(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        faiss = import_faiss()
        c = _as_points(centroids, "centroids")
        n, d = self.x.shape
        k = c.shape[0]
        if c.shape[1] != d:
            raise ValueError(f"centroids have dimension {c.shape[1]}, points {d}")
        m = min(self.candidates, k)
        import torch

        ct = torch.from_numpy(c)
        norms = _split_bf16((ct.double() ** 2).sum(1))
        ca = torch.cat([(-2.0 * ct).to(torch.bfloat16), *(t[:, None] for t in norms)], 1)
        cat = ca.t()
        cand = np.empty((n, m), dtype=np.int64)
        score = np.empty((n, m), dtype=np.float32)
        heaps = faiss.float_maxheap_array_t()
        heaps.k, heaps.nh = m, n
        heaps.val, heaps.ids = faiss.swig_ptr(score), faiss.swig_ptr(cand)
        heaps.heapify()
        for i in range(0, n, self.block_rows):
            s = torch.mm(self.xa[i:i + self.block_rows], cat).float().numpy()
            heaps.addn(k, faiss.swig_ptr(s), 0, i, s.shape[0])
        top1 = cand[np.arange(n), score.argmin(1)]
        cand.sort(axis=1)
        labels = np.empty(n, dtype=np.int64)
        dist = np.empty(n, dtype=np.float32)
        # ld_subset must be given: its default (-1) is not read as "nsubset" by this faiss build.
        faiss.knn_L2sqr_by_idx(faiss.swig_ptr(self.x), faiss.swig_ptr(c), faiss.swig_ptr(cand), d, n, k, m, 1,
                               faiss.swig_ptr(dist), faiss.swig_ptr(labels), m)
        self.last_top1_changed = int((top1 != labels).sum())
        return labels, dist


def faiss_initial_centroids(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """The k rows faiss's Clustering starts from for `seed` (its training with no iteration)."""
    faiss = import_faiss()
    clus = faiss.Clustering(x.shape[1], k)
    clus.niter, clus.seed, clus.nredo = 0, seed, 1
    clus.max_points_per_centroid, clus.min_points_per_centroid = 10**9, 1
    clus.train(x, faiss.IndexFlatL2(x.shape[1]))
    return faiss.vector_to_array(clus.centroids).reshape(k, x.shape[1]).astype(np.float32, copy=True)


def _bf16_run(x: np.ndarray, k: int, niter: int, seed: int, init: np.ndarray | None, assigner: Bf16Assigner,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[float], int]:
    """One restart of `_one_run`'s contract with the bf16 assignment: `lloyd`'s iteration on one shard, from
    faiss's initial centroids for the seed. Everything after the GEMM's candidate choice is exact and in a fixed
    order (float32 distances, float64 sums added in row order), so the centroids are bitwise reproducible."""
    centroids = faiss_initial_centroids(x, k, seed) if init is None else init.copy()
    rng = np.random.default_rng(seed)
    objective: list[float] = []
    n_split = 0
    labels = dist = None
    for it in range(niter):
        labels, dist = assigner(centroids)
        obj = float(dist.sum(dtype=np.float64))
        objective.append(obj)
        if it > 0 and obj == objective[-2]:
            break  # a fixed point: the centroids would not move, and `labels` are already final
        sums, counts = partial_sums(x, labels, k)
        centroids, ns = update_centroids(sums, counts, rng)
        n_split += ns
        labels = None
    if labels is None:
        labels, dist = assigner(centroids)
    return centroids, labels, dist, objective, n_split


def kmeans(x: np.ndarray, k: int, *, niter: int = 20, seed: int = 0, init_centroids: np.ndarray | None = None,
           n_init: int = 1, use_gpu: str = "auto", verbose: bool = False,
           on_iteration: OnIteration | None = None, assign_precision: str = "auto") -> KMeansResult:
    """faiss k-means on all points of x (never subsampled), final assignment to the final centroids.

    Restarts (`n_init`) are run one by one rather than through faiss's `nredo`, for two reasons: faiss
    compares restarts by the objective *before* the last update and keeps a stats list that mixes all
    restarts; we keep the restart whose final assignment has the lowest sum of squared distances, with its
    own stats. Restart r uses seed + r * 15486557 (mod 2^31 - 1), so its initial centroids are those of
    faiss's redo r; the modulo also keeps the seed non-negative, since recent faiss (1.15.1 here) seeds a
    negative one from the clock.
    faiss has no per-iteration callback: `on_iteration(i, obj)` is called after training, once per recorded
    iteration of the kept restart. `verbose` turns on faiss's own progress lines.

    `assign_precision`: "fp32" is faiss's Clustering throughout; "bf16" runs the same Lloyd iteration with
    `Bf16Assigner` (CPU only; float64 centroid sums and numpy's RNG for empty-cluster splits, as `lloyd`);
    "auto" takes bf16 where BF16_AUTO allows it (k >= BF16_MIN_K, a CPU with bf16 instructions), fp32 elsewhere.
    Either way the labels are the nearest centroid by float32 distance; `backend` says which ran.
    """
    t0 = time.perf_counter()
    x = _as_points(x)
    n, d = x.shape
    _check_k(k, n)
    if niter < 0:
        raise ValueError(f"niter must be >= 0, got {niter}")
    if n_init < 1:
        raise ValueError(f"n_init must be >= 1, got {n_init}")
    init = None if init_centroids is None else _as_centroids(init_centroids, k, d)
    if init is not None and n_init > 1:
        raise ValueError(f"n_init={n_init} with init_centroids would repeat the same run: "
                         "faiss starts every restart from the given centroids")
    ngpu = want_gpu(use_gpu)
    precision = _assign_precision(assign_precision, k, ngpu)
    assigner = Bf16Assigner(x) if precision == "bf16" else None

    best: tuple | None = None
    best_obj = np.inf
    for r in range(n_init):
        run_seed = (seed + r * _REDO_STRIDE) % (2**31 - 1)
        if assigner is not None:
            res = _bf16_run(x, k, niter, run_seed, init, assigner)
        else:
            res = _one_run(x, k, niter, run_seed, init, ngpu, verbose)
        obj = float(res[2].sum(dtype=np.float64))
        if n_init > 1:
            log.info("k-means restart %d/%d (seed %d): final objective %.6g", r + 1, n_init, run_seed, obj)
        if obj < best_obj or best is None:
            best, best_obj = res, obj
    assert best is not None
    centroids, labels, distances, objective, n_split = best
    if on_iteration is not None:
        for i, obj in enumerate(objective):
            on_iteration(i, obj)
    backend = describe_faiss(ngpu)
    if assigner is not None:
        import torch

        backend = (f"Lloyd with bf16 GEMM ({cpu_bf16_flag() or 'no bf16 instructions'}) + float32 re-rank of "
                   f"{assigner.candidates} candidates, torch {torch.__version__}; {backend}")
    return KMeansResult(centroids=centroids, labels=labels, distances=distances, objective=objective,
                        n_split=n_split, backend=backend, seconds=time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------------
# primitives of a distributed Lloyd


def sample_init_centroids(x: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k distinct rows of x (distinct indices: duplicate rows in x can still give equal centroids)."""
    x = np.asarray(x)
    _check_k(k, x.shape[0])
    idx = np.sort(np.random.default_rng(seed).choice(x.shape[0], size=k, replace=False))
    return np.ascontiguousarray(x[idx], dtype=np.float32)


def nearest_centroids(x: np.ndarray, centroids: np.ndarray, use_gpu: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest centroid (labels int64) and squared L2 distance (float32) with a faiss flat index.

    This is the same search faiss runs inside Clustering.train, so a shard's distances are the ones faiss
    would compute for those rows.
    """
    x = _as_points(x)
    c = _as_points(centroids, "centroids")
    if c.shape[1] != x.shape[1]:
        raise ValueError(f"centroids have dimension {c.shape[1]}, points {x.shape[1]}")
    if x.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32)
    ngpu = want_gpu(use_gpu)
    index = _flat_index(x.shape[1], ngpu, reuse=True)
    index.add(c)
    with _search_path(len(c), ngpu):
        dist, lab = index.search(x, 1)
    return lab[:, 0].astype(np.int64), dist[:, 0].copy()


def nearest_two(x: np.ndarray, centroids: np.ndarray, use_gpu: str = "auto") -> tuple[np.ndarray, np.ndarray]:
    """Each row's nearest and second-nearest centroid (int64 each), with the same flat index as `nearest_centroids`."""
    x = _as_points(x)
    c = _as_points(centroids, "centroids")
    if x.shape[0] == 0:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
    ngpu = want_gpu(use_gpu)
    index = _flat_index(x.shape[1], ngpu, reuse=True)
    index.add(c)
    with _search_path(len(c), ngpu):
        _, lab = index.search(x, 2)
    return lab[:, 0].astype(np.int64), lab[:, 1].astype(np.int64)


def partial_sums(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-cluster sums (k, d) float64 and counts (k,) int64 of a shard: what the driver reduces.

    Exact float64 accumulation (faiss accumulates in float32), each cluster's rows added one after another in row
    order, so the sums are the same bits whatever the chunking, and no N x d float64 copy ever exists. A chunk of
    rows is widened to float64 and transposed behind the running sums, and `np.bincount` with weights adds each
    feature column in array order: first the cluster's running sum (0 + s = s exactly), then the chunk's rows,
    which continues the sequential sum across chunks to the bit. This is `np.add.at(sums, labels, x)`'s order
    (the test holds both), at a fraction of its time: `add.at` dispatches per row, bincount runs one C loop per
    column (benchmarks/RESULTS.md, k-means: `raydc_lloyd`, `raydc_distributed`). numpy and not torch's
    `index_add_`: a shard actor of the distributed Lloyd then never loads torch.
    """
    x = np.asarray(x)
    labels = np.asarray(labels)
    if x.ndim != 2 or labels.shape != (x.shape[0],):
        raise ValueError(f"x must be (N, d) and labels (N,), got {x.shape} and {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= k):
        raise ValueError(f"labels must lie in [0, {k}), got range [{labels.min()}, {labels.max()}]")
    n, d = x.shape
    labels = np.ascontiguousarray(labels, dtype=np.int64)
    sums_t = np.zeros((d, k), dtype=np.float64)  # one row per feature: bincount's output, contiguous
    # At least k rows a chunk, so the k running sums carried in front of each chunk stay a small share of it.
    step = max(k, _CHUNK_BYTES // max(1, 8 * d))
    owners = np.empty(0, dtype=np.int64)
    buf = np.empty((d, 0), dtype=np.float64)
    for i in range(0, n, step):
        rows = labels[i:i + step]
        if len(owners) != k + len(rows):  # the first chunk and a shorter last one
            owners = np.concatenate([np.arange(k, dtype=np.int64), rows])
            buf = np.empty((d, k + len(rows)), dtype=np.float64)
        else:
            owners[k:] = rows
        buf[:, :k] = sums_t
        buf[:, k:] = x[i:i + step].T
        for j in range(d):
            sums_t[j] = np.bincount(owners, weights=buf[j], minlength=k)
    counts = np.bincount(labels, minlength=k).astype(np.int64)
    return np.ascontiguousarray(sums_t.T), counts


def _pick_cluster_to_split(h: np.ndarray, n: int, k: int, rng: np.random.Generator) -> int:
    """faiss's choice: scan cj = 0, 1, ... cyclically, stop at the first with uniform < (h_cj - 1) / (n - k).

    This favours low indices slightly over a choice exactly proportional to h_cj - 1; we keep it for parity
    with faiss. The scan is drawn in blocks of uniforms; the result has the same law as faiss's loop.
    """
    p = (h - 1.0) / float(n - k) if n > k else np.where(h > 1.0, np.inf, -np.inf)
    block = min(k, 8192)
    while True:
        for start in range(0, k, block):
            pb = p[start:start + block]
            hits = np.flatnonzero(rng.random(pb.size) < pb)
            if hits.size:
                return start + int(hits[0])


def split_plan(counts: np.ndarray, rng: np.random.Generator) -> list[tuple[int, int]]:
    """faiss's empty-cluster splits as (ci, cj) pairs, in the order they apply: empty cluster ci becomes a copy
    of cj. The choice depends on the counts alone, so the process that holds the k counts (not the k x d
    centroids) can make it, and every holder of the centroids replays it with `apply_splits`.

    cj's count is shared in halves after each split (as floats, like faiss's `hassign`), which lowers its
    chance of being split again."""
    counts = np.asarray(counts)
    k = counts.shape[0]
    n = int(counts.sum())
    if n < k:
        raise ValueError(f"cannot have k={k} non-empty clusters with N={n} points")
    h = counts.astype(np.float64)
    plan = []
    for ci in np.flatnonzero(h == 0):
        cj = _pick_cluster_to_split(h, n, k, rng)
        plan.append((int(ci), cj))
        h[ci] = h[cj] / 2
        h[cj] -= h[ci]
    return plan


def apply_splits(centroids: np.ndarray, plan: Sequence[tuple[int, int]]) -> np.ndarray:
    """Replay a `split_plan` in place: even dimensions ci = cj * (1+EPS), cj *= 1-EPS, odd ones the reverse,
    EPS = 1/1024 (faiss/Clustering.cpp)."""
    if not plan:
        return centroids
    d = centroids.shape[1]
    up = np.where(np.arange(d) % 2 == 0, 1 + SPLIT_EPS, 1 - SPLIT_EPS).astype(np.float32)
    down = np.where(np.arange(d) % 2 == 0, 1 - SPLIT_EPS, 1 + SPLIT_EPS).astype(np.float32)
    for ci, cj in plan:
        centroids[ci] = centroids[cj] * up
        centroids[cj] = centroids[cj] * down
    return centroids


def chunk_means(sums: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Means (float32) of the non-empty clusters of a range of clusters; empty ones stay zero until the
    splits fill them."""
    sums = np.asarray(sums, dtype=np.float64)
    h = np.asarray(counts).astype(np.float64)
    out = np.zeros(sums.shape, dtype=np.float32)
    nonempty = h > 0
    out[nonempty] = (sums[nonempty] / h[nonempty, None]).astype(np.float32)
    return out


def chunk_bounds(k: int, parts: int) -> np.ndarray:
    """Cluster ranges [b[j], b[j+1]) of a reduce-scatter over `parts` reducers (np.array_split's sizes)."""
    sizes = np.full(parts, k // parts, dtype=np.int64)
    sizes[: k % parts] += 1
    return np.concatenate([[0], np.cumsum(sizes)])


def allocate_subclusters(k: int, sizes: np.ndarray) -> np.ndarray:
    """How many of k clusters each super cluster gets in a two-level k-means: in proportion to its size (largest
    remainders), at least one for a non-empty super cluster, never more than its points. Sums to k."""
    sizes = np.asarray(sizes, dtype=np.int64)
    n = int(sizes.sum())
    if n < k:
        raise ValueError(f"cannot make k={k} clusters of N={n} points")
    if int((sizes > 0).sum()) > k:
        raise ValueError(f"{int((sizes > 0).sum())} non-empty super clusters cannot share k={k} clusters")
    share = k * sizes / max(n, 1)
    out = np.clip(np.floor(share).astype(np.int64), (sizes > 0).astype(np.int64), sizes)
    rest = share - np.floor(share)
    while out.sum() < k:
        room = np.flatnonzero(out < sizes)
        i = room[np.argmax(rest[room])]
        out[i] += 1
        rest[i] = -1.0
    while out.sum() > k:
        spare = np.flatnonzero(out > 1)
        i = spare[np.argmin(rest[spare])]
        out[i] -= 1
        rest[i] = 2.0
    return out


def update_centroids(sums: np.ndarray, counts: np.ndarray, rng: np.random.Generator,
                     ) -> tuple[np.ndarray, int]:
    """New centroids (k, d) float32 from reduced sums/counts, splitting empty clusters as faiss does.

    For each empty cluster ci (in index order), a cluster cj is chosen (see `_pick_cluster_to_split`), ci
    becomes a copy of cj, and both are pushed apart (`apply_splits`). The sharded reduction computes the same
    thing in pieces: `chunk_means` per cluster range, `split_plan` from the counts, `apply_splits` on every
    holder. Returns the centroids and the number of splits.
    """
    sums = np.asarray(sums, dtype=np.float64)
    counts = np.asarray(counts)
    k, d = sums.shape
    if counts.shape != (k,):
        raise ValueError(f"counts must have shape ({k},), got {counts.shape}")
    plan = split_plan(counts, rng)
    return apply_splits(chunk_means(sums, counts), plan), len(plan)


def lloyd(shards: Sequence[np.ndarray], k: int, *, niter: int = 20, init_centroids: np.ndarray | None,
          seed: int = 0, on_iteration: OnIteration | None = None) -> KMeansResult:
    """The distributed Lloyd iteration, run in-process: the reference the Ray engine must reproduce.

    Per iteration: every shard assigns its rows to the current centroids; the objective is the sum of all
    distances (float64); per-shard (sums, counts) are added; `update_centroids` makes the next centroids.
    When the objective equals the previous iteration's exactly, the assignment has not changed and neither
    will the centroids: the loop stops there, as faiss >= 1.15 does (its `early_stop_threshold` = 0), so
    `objective` can be shorter than `niter` in both.
    A final assignment against the last centroids gives labels and distances (concatenated in shard order).
    `init_centroids=None` samples k rows of the concatenated shards with `seed`; `seed` also drives the
    empty-cluster splits.
    """
    t0 = time.perf_counter()
    shards = [_as_points(s, f"shard {i}") for i, s in enumerate(shards)]
    if not shards:
        raise ValueError("lloyd needs at least one shard")
    d = shards[0].shape[1]
    for i, s in enumerate(shards):
        if s.shape[1] != d:
            raise ValueError(f"shard {i} has dimension {s.shape[1]}, shard 0 has {d}")
    n = sum(s.shape[0] for s in shards)
    _check_k(k, n)
    if niter < 0:
        raise ValueError(f"niter must be >= 0, got {niter}")
    if init_centroids is None:
        centroids = sample_init_centroids(np.concatenate(shards), k, seed)
    else:
        centroids = _as_centroids(init_centroids, k, d)
    rng = np.random.default_rng(seed)
    objective: list[float] = []
    n_split = 0
    for it in range(niter):
        sums = np.zeros((k, d), dtype=np.float64)
        counts = np.zeros(k, dtype=np.int64)
        obj = 0.0
        for s in shards:
            lab, dist = nearest_centroids(s, centroids, use_gpu="never")
            obj += float(dist.sum(dtype=np.float64))
            ps, pc = partial_sums(s, lab, k)
            sums += ps
            counts += pc
        objective.append(obj)
        if on_iteration is not None:
            on_iteration(it, obj)
        if it > 0 and obj == objective[-2]:
            break  # a fixed point: faiss >= 1.15 stops here too (early_stop_threshold = 0)
        centroids, ns = update_centroids(sums, counts, rng)
        n_split += ns
    parts = [nearest_centroids(s, centroids, use_gpu="never") for s in shards]
    labels = np.concatenate([p[0] for p in parts])
    distances = np.concatenate([p[1] for p in parts])
    return KMeansResult(centroids=centroids, labels=labels, distances=distances, objective=objective,
                        n_split=n_split, backend=f"lloyd over {len(shards)} shards, {describe_faiss(0)}",
                        seconds=time.perf_counter() - t0)
