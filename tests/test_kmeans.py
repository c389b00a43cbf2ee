from __future__ import annotations

import os

import numpy as np
import pytest

from raydc.core.kmeans import (SPLIT_EPS, KMeansResult, kmeans, lloyd, nearest_centroids, partial_sums,
                               sample_init_centroids, update_centroids)
from raydc.core.metrics import nmi
from raydc.errors import UserError


def _blobs(n: int = 3000, k: int = 12, d: int = 16, spread: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, d)).astype(np.float32) * 8
    y = rng.integers(0, k, n)
    x = (centers[y] + spread * rng.standard_normal((n, d))).astype(np.float32)
    return x, y, centers


def _true_sse(x: np.ndarray, c: np.ndarray, labels: np.ndarray) -> float:
    return float(((x.astype(np.float64) - c[labels].astype(np.float64)) ** 2).sum())


def test_lloyd_over_shards_matches_faiss():
    # Overlapping blobs and random-row init: 15 iterations of real movement, no cluster empties.
    x, y, _ = _blobs(spread=3.0, seed=0)
    init = sample_init_centroids(x, 12, seed=0)
    ref = kmeans(x, 12, niter=15, init_centroids=init)
    ours = lloyd(np.array_split(x, [1000, 1700]), 12, niter=15, init_centroids=init)
    assert ref.n_split == ours.n_split == 0
    assert len(ref.objective) == len(ours.objective) == 15
    assert ref.objective[0] > 1.5 * ref.objective[-1]   # the test is not trivially at a fixed point
    np.testing.assert_allclose(ours.objective, ref.objective, rtol=1e-4)
    assert nmi(ref.labels, ours.labels) >= 0.99
    np.testing.assert_allclose(ours.centroids, ref.centroids, atol=1e-3)
    assert ours.final_objective == pytest.approx(ref.final_objective, rel=1e-4)


def test_both_stop_at_the_fixed_point():
    x, y, centers = _blobs()
    init = centers + 0.5                      # converges in two steps
    ref = kmeans(x, 12, niter=8, init_centroids=init)
    ours = lloyd(np.array_split(x, 3), 12, niter=8, init_centroids=init)
    # faiss >= 1.15 stops once the objective repeats; lloyd does the same so the engine can too.
    assert 2 <= len(ref.objective) == len(ours.objective) < 8
    assert ours.objective[-1] == ours.objective[-2]
    np.testing.assert_allclose(ours.objective, ref.objective, rtol=1e-4)
    assert nmi(y, ours.labels) > 0.99 and nmi(ref.labels, ours.labels) >= 0.99


def test_kmeans_result_fields_and_final_assignment():
    x, _, centers = _blobs(n=1200, k=6, d=8)
    seen: list[tuple[int, float]] = []
    r = kmeans(x, 6, niter=4, seed=1, on_iteration=lambda i, o: seen.append((i, o)))
    assert isinstance(r, KMeansResult)
    assert r.centroids.shape == (6, 8) and r.centroids.dtype == np.float32
    assert r.labels.dtype == np.int64 and r.labels.shape == (1200,)
    assert r.distances.dtype == np.float32
    assert [i for i, _ in seen] == [0, 1, 2, 3] and [o for _, o in seen] == r.objective
    assert r.backend.startswith("faiss-") and r.seconds > 0
    # Labels are the nearest final centroid, distances the squared L2 to it.
    d2 = ((x[:, None, :].astype(np.float64) - r.centroids[None].astype(np.float64)) ** 2).sum(-1)
    np.testing.assert_array_equal(r.labels, d2.argmin(1))
    np.testing.assert_allclose(r.distances, d2.min(1), rtol=1e-3, atol=1e-3)


def test_init_centroids_are_used():
    x, _, centers = _blobs(n=800, k=5, d=4)
    init = centers + 0.25
    r = kmeans(x, 5, niter=1, init_centroids=init)
    lab, dist = nearest_centroids(x, init)
    assert r.objective[0] == pytest.approx(float(dist.sum(dtype=np.float64)), rel=1e-5)


def test_kmeans_never_subsamples():
    # N = 300 * k > faiss's default cap of 256 * k: with subsampling the centroids would be means of a
    # subset, and the first-iteration objective would cover only 256 * k points.
    k, d = 4, 3
    x, _, centers = _blobs(n=300 * k, k=k, d=d, seed=4)
    init = centers + 0.1
    r = kmeans(x, k, niter=1, init_centroids=init)
    _, dist = nearest_centroids(x, init)
    assert r.objective[0] == pytest.approx(float(dist.sum(dtype=np.float64)), rel=1e-5)
    lab0, _ = nearest_centroids(x, init)
    sums, counts = partial_sums(x, lab0, k)
    np.testing.assert_allclose(r.centroids, sums / counts[:, None], rtol=1e-5, atol=1e-5)


def test_n_init_keeps_best_restart():
    x, _, _ = _blobs(n=1500, k=10, d=6, spread=2.5, seed=7)
    finals = [kmeans(x, 10, niter=6, seed=s).final_objective for s in (11, 11 + 15486557, 11 + 2 * 15486557)]
    best = kmeans(x, 10, niter=6, seed=11, n_init=3)
    assert best.final_objective == pytest.approx(min(finals), rel=1e-6)
    with pytest.raises(ValueError, match="n_init"):
        kmeans(x, 10, n_init=2, init_centroids=x[:10])


def test_validation():
    x, _, _ = _blobs(n=30, k=3, d=4)
    with pytest.raises(ValueError, match=r"k=50.*N=30"):
        kmeans(x, 50)
    with pytest.raises(ValueError, match=r"k=50.*N=30"):
        lloyd([x[:10], x[10:]], 50, init_centroids=None)
    with pytest.raises(ValueError, match="k must be >= 2"):
        kmeans(x, 1)
    bad = x.copy()
    bad[3, 1] = np.nan
    with pytest.raises(FloatingPointError):
        kmeans(bad, 3)
    if _no_gpu():
        with pytest.raises(UserError, match="use_gpu='always'"):
            kmeans(x, 3, use_gpu="always")
    with pytest.raises(ValueError, match="use_gpu"):
        kmeans(x, 3, use_gpu="yes")
    # float64 / Fortran-ordered input is converted.
    r = kmeans(np.asfortranarray(x.astype(np.float64)), 3, niter=2)
    assert r.centroids.dtype == np.float32


def _no_gpu() -> bool:
    from raydc.core.faiss_backend import faiss_gpu_count

    return faiss_gpu_count() == 0


def test_partial_sums_and_reduction():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((500, 7)).astype(np.float32)
    lab = rng.integers(0, 9, 500)
    lab[lab == 4] = 5                       # cluster 4 empty
    sums, counts = partial_sums(x, lab, 9)
    assert sums.dtype == np.float64 and counts.dtype == np.int64
    ref = np.zeros((9, 7))
    np.add.at(ref, lab, x.astype(np.float64))
    np.testing.assert_allclose(sums, ref, rtol=1e-12, atol=1e-12)
    assert counts.tolist() == np.bincount(lab, minlength=9).tolist() and counts[4] == 0
    with pytest.raises(ValueError, match="labels"):
        partial_sums(x, lab + 5, 9)


def test_partial_sums_add_rows_in_row_order_whatever_the_chunk(monkeypatch):
    # The sums are exact float64 in the rows' order, so sharded and star reductions, and any chunk size, give
    # the same bits; np.add.at is that sequential order. Widely spread magnitudes make reordering visible.
    import raydc.core.kmeans as km

    rng = np.random.default_rng(3)
    x = (rng.standard_normal((5000, 33)) * np.exp(rng.uniform(-8, 8, (5000, 1)))).astype(np.float32)
    lab = rng.integers(0, 17, 5000)
    ref = np.zeros((17, 33))
    np.add.at(ref, lab, x.astype(np.float64))
    for chunk_bytes in (8 * 33, 8 * 33 * 7, 1 << 20):
        monkeypatch.setattr(km, "_CHUNK_BYTES", chunk_bytes)
        sums, _ = partial_sums(x, lab, 17)
        assert np.array_equal(sums, ref), chunk_bytes
    backwards = np.zeros((17, 33))
    np.add.at(backwards, lab[::-1], x[::-1].astype(np.float64))
    assert not np.array_equal(backwards, ref)   # the data do tell one order from another


def test_update_centroids_splits_empty_clusters_like_faiss():
    d = 6
    up = np.where(np.arange(d) % 2 == 0, 1 + SPLIT_EPS, 1 - SPLIT_EPS)
    down = np.where(np.arange(d) % 2 == 0, 1 - SPLIT_EPS, 1 + SPLIT_EPS)
    sums = np.array([[2.0] * d, [0.0] * d, [30.0] * d])
    # Cluster 1 is empty; cluster 0 has one point, so p_0 = 0 and only cluster 2 (p = 9/8 > 1) can be split.
    c, n_split = update_centroids(sums, np.array([1, 0, 10]), np.random.default_rng(0))
    assert n_split == 1 and c.dtype == np.float32
    np.testing.assert_allclose(c[0], 2.0)
    np.testing.assert_allclose(c[1], 3.0 * up, rtol=1e-6)    # the copy, pushed up on even dimensions
    np.testing.assert_allclose(c[2], 3.0 * down, rtol=1e-6)  # the original, pushed the other way

    # Two empty clusters: the second split picks cluster 1 or 2 (counts 5 and 5 after the first split).
    sums = np.array([[2.0] * d, [0.0] * d, [30.0] * d, [0.0] * d])
    for seed in range(5):
        c, n_split = update_centroids(sums, np.array([1, 0, 10, 0]), np.random.default_rng(seed))
        assert n_split == 2 and len({tuple(r) for r in c.tolist()}) == 4
    with pytest.raises(ValueError, match="k=4"):
        update_centroids(sums, np.array([1, 0, 2, 0]), np.random.default_rng(0))
    assert update_centroids(sums, np.array([1, 2, 10, 3]), np.random.default_rng(0))[1] == 0


def test_split_choice_follows_faiss_scan():
    # With counts (1+a, 1+b, ...) the first scanned cluster with uniform < (h - 1) / (n - k) wins: cluster 0 is
    # chosen with probability p0 / (1 - (1 - p0)(1 - p1)), not p0 / (p0 + p1).
    from raydc.core.kmeans import _pick_cluster_to_split

    h = np.array([3.0, 3.0, 0.0])           # n = 6, k = 3, p = (2/3, 2/3, -1/3)
    rng = np.random.default_rng(0)
    picks = np.array([_pick_cluster_to_split(h, 6, 3, rng) for _ in range(4000)])
    p = 2 / 3
    assert np.mean(picks == 0) == pytest.approx(p / (1 - (1 - p) ** 2), abs=0.03)   # 0.75, not 0.5
    assert set(picks.tolist()) <= {0, 1}


def test_duplicate_init_gets_split_and_no_cluster_stays_empty():
    x, _, centers = _blobs(n=2000, k=8, d=8, seed=2)
    init = centers.copy()
    init[5] = init[4]                        # a duplicate centroid: ties go to 4, so 5 starts empty
    r = lloyd(np.array_split(x, 3), 8, niter=6, init_centroids=init, seed=0)
    assert r.n_split >= 1
    assert np.bincount(r.labels, minlength=8).min() > 0
    f = kmeans(x, 8, niter=6, init_centroids=init)
    assert f.n_split >= 1 and np.bincount(f.labels, minlength=8).min() > 0


def test_sample_init_centroids_distinct_rows_and_deterministic():
    x = np.arange(200, dtype=np.float32).reshape(100, 2)
    c = sample_init_centroids(x, 10, seed=3)
    assert c.shape == (10, 2) and c.dtype == np.float32
    assert len(np.unique(c[:, 0])) == 10
    np.testing.assert_array_equal(c, sample_init_centroids(x, 10, seed=3))
    r = lloyd([x[:50], x[50:]], 10, niter=2, init_centroids=None, seed=3)
    assert r.objective[0] > 0


def test_faiss_backend_describes_what_runs(monkeypatch, caplog):
    import types

    import raydc.core.faiss_backend as fb

    if not fb.is_gpu_build():
        assert fb.faiss_gpu_count() == 0
        assert fb.describe_faiss().startswith("faiss-cpu ") and "OPENBLAS_CORETYPE=" in fb.describe_faiss()
    # A GPU build that sees no GPU (the official faiss-gpu wheel on a CPU box): warn once, say "on CPU".
    fake = types.SimpleNamespace(__version__="9.9", StandardGpuResources=object, get_num_gpus=lambda: 0)
    monkeypatch.setattr(fb, "import_faiss", lambda: fake)
    monkeypatch.setattr(fb, "_warned_gpu_build_without_gpu", False)
    with caplog.at_level("WARNING", logger="raydc.core.faiss_backend"):
        assert fb.faiss_gpu_count() == 0
        assert "on CPU (no GPU visible" in fb.describe_faiss()
    assert sum("sees no GPU" in r.message for r in caplog.records) == 1
    with pytest.raises(UserError, match="sees no GPU"):
        fb.want_gpu("always")
    fake.get_num_gpus = lambda: 2
    assert fb.describe_faiss() == "faiss-gpu 9.9 on 2 GPUs" and fb.want_gpu("auto") == 2


def test_few_centroids_take_faiss_direct_distance_loop():
    # Rows a hair from large centroids: the BLAS path's |x|^2 + |c|^2 - 2 x.c cancels catastrophically, the
    # direct loop (taken for k <= SEQ_SEARCH_MAX_K) does not. The process-wide threshold is left as it was.
    import raydc.core.kmeans as km
    from raydc.core.faiss_backend import import_faiss

    cvar = import_faiss().cvar
    before = cvar.distance_compute_blas_threshold
    rng = np.random.default_rng(0)

    def rel_error(k: int) -> float:
        c = (rng.standard_normal((k, 64)) * 100).astype(np.float32)
        x = np.repeat(c, 400, axis=0) + np.float32(1e-2) * rng.standard_normal((400 * k, 64)).astype(np.float32)
        lab, dist = nearest_centroids(x, c, use_gpu="never")
        true = ((x.astype(np.float64) - c[lab].astype(np.float64)) ** 2).sum(1)
        return float(np.median(np.abs(dist - true) / true))

    assert rel_error(km.SEQ_SEARCH_MAX_K) < 1e-4
    assert rel_error(4 * km.SEQ_SEARCH_MAX_K) > 1e-2   # the BLAS path: what the test tells apart
    assert cvar.distance_compute_blas_threshold == before


# ---- bf16 assignment (issue #27) ---------------------------------------------------------------------------


def _near_ties(n: int = 6000, k: int = 128, d: int = 48, seed: int = 3):
    """Many centroids close together, points among them: plenty of rows whose two nearest centroids are within
    bf16's rounding of each other."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((k, d)).astype(np.float32) * 0.3 + 2.0  # off-centre: bigger norms, bigger bf16 error
    x = (c[rng.integers(0, k, n)] + 0.5 * rng.standard_normal((n, d))).astype(np.float32)
    return x, c


def _exact_nearest(x: np.ndarray, c: np.ndarray) -> np.ndarray:
    return ((x[:, None, :].astype(np.float64) - c[None].astype(np.float64)) ** 2).sum(-1).argmin(1)


def test_bf16_assignment_reranks_to_the_exact_nearest():
    from raydc.core.kmeans import Bf16Assigner

    x, c = _near_ties()
    exact = _exact_nearest(x, c)
    top1 = Bf16Assigner(x, candidates=1)
    lab1, _ = top1(c)
    # One candidate is the bare bf16 GEMM: near-ties go wrong, which is what the re-rank is for.
    assert (lab1 != exact).sum() > 0
    a = Bf16Assigner(x)
    lab, dist = a(c)
    np.testing.assert_array_equal(lab, exact)
    assert a.last_top1_changed > 0            # the bf16 nearest was not always the answer
    d2 = ((x.astype(np.float64) - c[lab].astype(np.float64)) ** 2).sum(1)
    np.testing.assert_allclose(dist, d2, rtol=1e-5)
    faiss_lab, _ = nearest_centroids(x, c, use_gpu="never")
    np.testing.assert_array_equal(lab, faiss_lab)


def test_bf16_kmeans_is_bitwise_repeatable_and_agrees_with_faiss():
    x, _, _ = _blobs(n=4000, k=80, d=24, spread=3.0, seed=5)
    init = sample_init_centroids(x, 80, seed=0)
    a = kmeans(x, 80, niter=8, init_centroids=init, assign_precision="bf16")
    b = kmeans(x, 80, niter=8, init_centroids=init, assign_precision="bf16")
    ref = kmeans(x, 80, niter=8, init_centroids=init, assign_precision="fp32")
    assert "bf16" in a.backend and ref.backend.startswith("faiss-")
    assert a.centroids.tobytes() == b.centroids.tobytes() and np.array_equal(a.labels, b.labels)
    assert a.objective == b.objective
    # Same start, same iteration: equal up to rounding until an empty-cluster split (faiss's RNG and numpy's
    # choose differently) or a float32 near-tie sends them apart, then equally good.
    np.testing.assert_allclose(a.objective[:3], ref.objective[:3], rtol=1e-5)
    assert a.final_objective == pytest.approx(ref.final_objective, rel=1e-3)
    assert nmi(a.labels, ref.labels) >= 0.95
    np.testing.assert_array_equal(a.labels, _exact_nearest(x, a.centroids))
    # Without init_centroids both start from faiss's rows for the seed.
    s_bf16 = kmeans(x, 80, niter=1, seed=7, assign_precision="bf16")
    s_fp32 = kmeans(x, 80, niter=1, seed=7, assign_precision="fp32")
    assert s_bf16.objective[0] == pytest.approx(s_fp32.objective[0], rel=1e-5)


def test_assign_precision_choice(monkeypatch):
    from raydc.core import kmeans as km
    from raydc.core.kmeans import BF16_MIN_K, _assign_precision, cpu_bf16_flag

    assert _assign_precision("auto", 10, 0) == "fp32"
    assert _assign_precision("auto", BF16_MIN_K, 0) == ("bf16" if km.BF16_AUTO and cpu_bf16_flag() else "fp32")
    monkeypatch.setattr(km, "BF16_AUTO", True)
    assert _assign_precision("auto", BF16_MIN_K, 0) == ("bf16" if cpu_bf16_flag() else "fp32")
    assert _assign_precision("auto", BF16_MIN_K - 1, 0) == "fp32"
    assert _assign_precision("auto", 1000, 1) == "fp32"          # a GPU: faiss's float32 search
    assert _assign_precision("fp32", 1000, 0) == "fp32"
    with pytest.raises(ValueError, match="assign_precision"):
        _assign_precision("fp16", 100, 0)
    with pytest.raises(ValueError, match="GPU"):
        _assign_precision("bf16", 100, 1)


def test_a_shard_process_loads_torch_only_when_it_needs_it_and_then_with_its_threads():
    """The shard actors run faiss: importing their module and taking the cores must not load torch (seconds of
    CPU in every shard process of every run), and neither must the distributed Lloyd's exact float64 sums. When
    torch does load (the bf16 path, a method's function), it runs on the cores `use_all_cores` took, not the
    OMP_NUM_THREADS=1 Ray gives a 0-CPU actor."""
    import subprocess
    import sys

    code = ("import sys; import numpy as np; import raydc.engine.shard_store; "
            "from raydc.core.kmeans import partial_sums; partial_sums(np.ones((4, 2), np.float32), "
            "np.zeros(4, np.int64), 1); "
            "from raydc.core.faiss_backend import use_all_cores; use_all_cores(2); loaded = 'torch' in sys.modules; "
            "{}; print(loaded, sys.modules['torch'].get_num_threads())")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # through the bf16 assignment (core.kmeans imports torch there), and a plain import (a method's function)
    for load in ("from raydc.core.kmeans import Bf16Assigner; Bf16Assigner(np.ones((4, 2), np.float32))",
                 "import torch"):
        out = subprocess.run([sys.executable, "-c", code.format(load)], env=env, capture_output=True, text=True,
                             check=True)
        assert out.stdout.split() == ["False", "2"], (load, out.stderr)
