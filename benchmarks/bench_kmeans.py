"""k-means: raydc (faiss in-process, one Ray actor, distributed Lloyd over 2 Ray actors, in-process Lloyd over
2 shards) against scikit-learn's Lloyd and faiss called directly, from the same initial centroids, plus the
fp32 GEMM ceiling the assignment step is bounded by.

Every implementation runs to final labels: `niter` iterations (assignment + update) and one last assignment
against the final centroids (DeepCluster's `index.search(x, 1)`; scikit-learn's closing E-step). Seconds per
iteration = total seconds / iterations actually run (faiss >= 1.15, raydc's Lloyd and scikit-learn with
tol=0 all stop early at an exact fixed point; the data are a Gaussian mixture with overlapping components so
that none does within `niter`, and the counts are recorded).

Every implementation runs in a process of its own (a Ray actor, `num_cpus=0`, the points read zero-copy from
the object store) and times itself there; the driver only orchestrates the round robin. Measured first with
all of them in the driver process: faiss, torch, scikit-learn and OpenBLAS each bring an OpenMP/BLAS thread
pool, and on 2 loaded cores they slowed each other by up to 7x (faiss with 2 threads in the driver ran
k=10 at 587 ms/it against 79 ms/it in an actor), which measures the co-tenancy, not the libraries.
`in_driver` reproduces that setting for one implementation (raydc's faiss k-means) to keep it visible.
"""
from __future__ import annotations

import time

import numpy as np

from benchmarks.common import Context, interleaved, ratio, summarize

NAME = "kmeans"
NEEDS_RAY = True

CONFIGS = {
    "quick": {"n": 10_000, "d": 32, "ks": [10, 100], "niter": 5, "repeats": 3, "gemm_repeats": 5,
              "path_ds": [32], "path_ks": [10, 64]},
    "full": {"n": 100_000, "d": 256, "ks": [10, 100, 1000], "niter": 20, "repeats": 3, "gemm_repeats": 5,
             "path_ds": [16, 64, 256], "path_ks": [4, 10, 16, 24, 32, 64]},
}

IMPLS = {
    "raydc_faiss": "raydc.core.kmeans.kmeans (assign_precision='auto': faiss, or the bf16 assignment where "
                   "BF16_AUTO allows it) in a process of its own",
    "raydc_bf16": "raydc.core.kmeans.kmeans(assign_precision='bf16'): bf16 GEMM + float32 re-rank (Bf16Assigner), "
                  "in a process of its own",
    "raydc_faiss_in_driver": "raydc.core.kmeans.kmeans in the driver process (beside torch/sklearn pools)",
    "raydc_actor": "ClusteringService(1 actor), mode=single (faiss in a Ray actor)",
    "raydc_distributed": "ClusteringService(2 actors), mode=distributed (Lloyd over Ray)",
    "raydc_lloyd": "raydc.core.kmeans.lloyd over 2 shards (the no-Ray reference, one process)",
    "faiss": "faiss.Kmeans direct (max_points_per_centroid raised)",
    "faiss_1thread": "faiss.Kmeans direct, 1 OpenMP thread",
    "sklearn": "sklearn KMeans(algorithm='lloyd', n_init=1, tol=0)",
}


def gaussian_mixture(n: int, d: int, components: int, seed: int, spread: float = 0.5) -> np.ndarray:
    """Overlapping isotropic Gaussians (centre spread `spread` per axis, unit noise): Lloyd keeps moving
    boundary points for many iterations, so no implementation stops early."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((components, d), dtype=np.float32) * np.float32(spread)
    x = rng.standard_normal((n, d), dtype=np.float32)
    x += centres[rng.integers(components, size=n)]
    return x


def gemm_ceiling(n: int, d: int, ks: list[int], repeats: int) -> dict:
    """fp32 torch.mm FLOP/s for (n x d) @ (d x k), and for a square 2048^3 product (the box's peak)."""
    import torch

    out = {"threads": torch.get_num_threads(), "shapes": {}}
    g = torch.Generator().manual_seed(0)
    shapes = [(f"{n}x{d}x{k}", n, d, k) for k in ks] + [("2048x2048x2048", 2048, 2048, 2048)]
    for label, m, kk, nn in shapes:
        a = torch.randn(m, kk, generator=g)
        b = torch.randn(kk, nn, generator=g)
        c = torch.empty(m, nn)
        torch.mm(a, b, out=c)  # warm-up
        samples = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            torch.mm(a, b, out=c)
            samples.append(time.perf_counter() - t0)
        s = summarize(samples)
        flops = 2.0 * m * kk * nn
        out["shapes"][label] = {"m": m, "k": kk, "n": nn, "seconds": s, "gflops": flops / s["median"] / 1e9}
    return out


def _impl(name: str, x: np.ndarray, k: int, nit: int, init: np.ndarray) -> dict:
    """One k-means to final labels; returns iterations run and the final objective."""
    from raydc.core import kmeans as km

    if name in ("raydc_faiss", "raydc_bf16"):
        r = km.kmeans(x, k, niter=nit, init_centroids=init, use_gpu="never",
                      assign_precision="bf16" if name == "raydc_bf16" else "auto")
        return {"iterations": len(r.objective), "objective": r.final_objective, "backend": r.backend}
    if name == "raydc_lloyd":
        half = len(x) // 2
        r = km.lloyd([x[:half], x[half:]], k, niter=nit, init_centroids=init)
        return {"iterations": len(r.objective), "objective": r.final_objective}
    if name == "faiss":
        return _faiss_direct(x, k, nit, init)
    if name == "faiss_1thread":
        return _faiss_direct(x, k, nit, init, threads=1)
    if name == "sklearn":
        return _sklearn(x, k, nit, init)
    raise ValueError(name)


def _runner_cls():
    import ray

    @ray.remote(num_cpus=0)
    class Runner:
        """A process for one implementation: its thread pools are the only ones in it."""

        def __init__(self):
            import raydc  # noqa: F401  (OPENBLAS_CORETYPE before any BLAS loads)
            from raydc.core.faiss_backend import use_all_cores

            use_all_cores()  # Ray set OMP_NUM_THREADS=1 in this 0-CPU actor: give every library every core

        def run(self, name: str, x: np.ndarray, k: int, nit: int, init: np.ndarray) -> tuple[float, dict]:
            t0 = time.perf_counter()
            out = _impl(name, x, k, nit, init)
            return time.perf_counter() - t0, out

        def assign(self, x: np.ndarray, c: np.ndarray, repeats: int) -> list[float]:
            from raydc.core import kmeans as km

            km.nearest_centroids(x, c, use_gpu="never")
            return [_timed_assign(km, x, c) for _ in range(repeats)]

        def gemm(self, n: int, d: int, ks: list[int], repeats: int) -> dict:
            return gemm_ceiling(n, d, ks, repeats)

        def bf16_agreement(self, x: np.ndarray, init: np.ndarray, final: np.ndarray) -> dict:
            return bf16_agreement(x, {"initial": init, "final": final})

        def search_paths(self, n: int, ds: list[int], ks: list[int], repeats: int) -> list[dict]:
            return search_path_ratios(n, ds, ks, repeats)

    return Runner


BF16_CANDIDATE_COUNTS = (1, 2, 4, 8)


def bf16_agreement(x: np.ndarray, centroid_sets: dict[str, np.ndarray]) -> dict:
    """The bf16 assignment against faiss's float32 search, per candidate count: how many labels differ after the
    re-rank, and how many rows the re-rank changed (the bf16 nearest was not the float32 nearest of the
    candidates). With 1 candidate there is no re-rank: its differences are the bare bf16 GEMM's."""
    from raydc.core import kmeans as km

    out = {}
    for name, c in centroid_sets.items():
        ref, _ = km.nearest_centroids(x, c, use_gpu="never")
        rows = {}
        for m in BF16_CANDIDATE_COUNTS:
            a = km.Bf16Assigner(x, candidates=m)
            lab, _ = a(c)
            rows[str(m)] = {"labels_differ_from_fp32": int((lab != ref).sum()),
                            "rows_changed_by_rerank": a.last_top1_changed}
        out[name] = rows
    return {"n": int(len(x)), "candidates_used": km.BF16_CANDIDATES, "cpu_bf16": km.cpu_bf16_flag(),
            "centroids": out}


_BOUND_MARGIN = 1e-3
# Squared distances this close (relative) are a tie at float32's rounding of the GEMM-based search: which of
# the two centroids faiss's search returns there depends on its blocking, not on the data.
_NEAR_TIE = 1e-4


def bound_pruning(x: np.ndarray, k: int, niter: int, init: np.ndarray) -> dict:
    """How much of Lloyd's assignment exact pruning could skip on these data: Hamerly's bounds (2010) along the
    same Lloyd run (`raydc.core.kmeans` primitives, float32 nearest two by faiss). Each row keeps an upper bound on
    the distance to its centroid and a lower bound on the distance to any other; after an update they widen by the
    centroids' moves, and a row whose upper bound stays below max(lower bound, half the distance from its centroid
    to the nearest other centroid) provably keeps its label, so its search is skipped. The fraction of rows
    skipped per iteration bounds the speed-up any exact bound-based assignment (Hamerly, Elkan's with one bound,
    Yinyang with one group) can get over the full search here. Rows whose bounds fail are searched in full, so
    the labels are Lloyd's own: every iteration compares them with a full search, counting the rows that differ
    and, of those, the ones whose label is farther (float64) than the full search's by more than a near-tie."""
    from raydc.core import kmeans as km

    faiss = km.import_faiss()
    d = x.shape[1]

    def nearest_two(rows: np.ndarray, c: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = faiss.IndexFlatL2(d)
        index.add(c)
        with km._search_path(len(c), 0):  # the path nearest_centroids takes: the same rounding at near-ties
            dist, lab = index.search(rows, 2)
        return np.sqrt(np.maximum(dist, 0)), lab

    c = init.copy()
    rng = np.random.default_rng(0)
    dist, lab = nearest_two(x, c)
    labels, upper, lower = lab[:, 0].copy(), dist[:, 0].copy(), dist[:, 1].copy()
    skipped, differ, wrong = [], 0, 0
    for _ in range(niter - 1):
        sums, counts = km.partial_sums(x, labels, k)
        new, _ = km.update_centroids(sums, counts, rng)
        move = np.sqrt(((new.astype(np.float64) - c) ** 2).sum(1)).astype(np.float32)
        c = new
        cdist, _ = nearest_two(c, c)  # row 0 is the centroid itself
        half_gap = 0.5 * cdist[:, 1]
        top = int(np.argmax(move))
        upper += move[labels]
        lower -= np.where(labels == top, np.partition(move, -2)[-2], move[top])
        # a relative margin above float32 rounding of the bounds and of faiss's distances: near-ties are searched
        keep = upper * (1 + _BOUND_MARGIN) <= np.maximum(half_gap[labels], lower)
        loose = np.nonzero(~keep)[0]
        exact = np.sqrt(((x[loose] - c[labels[loose]]) ** 2).sum(1))  # tighten the upper bound first
        upper[loose] = exact
        fails = exact * (1 + _BOUND_MARGIN) > np.maximum(half_gap[labels[loose]], lower[loose])
        keep[loose[~fails]] = True
        idx = loose[fails]
        if len(idx):
            dist, lab = nearest_two(x[idx], c)
            labels[idx], upper[idx], lower[idx] = lab[:, 0], dist[:, 0], dist[:, 1]
        skipped.append(float(keep.mean()))
        full, _ = km.nearest_centroids(x, c, use_gpu="never")
        rows = np.nonzero(full != labels)[0]
        differ += len(rows)
        if len(rows):  # a difference is an error unless the two centroids are equally near in float64
            ours = ((x[rows].astype(np.float64) - c[labels[rows]]) ** 2).sum(1)
            theirs = ((x[rows].astype(np.float64) - c[full[rows]]) ** 2).sum(1)
            wrong += int((ours - theirs > _NEAR_TIE * theirs).sum())
    mean_skip = float(np.mean(skipped)) if skipped else 0.0
    return {"method": "Hamerly's bounds along Lloyd (raydc primitives), float32", "skipped_per_iteration": skipped,
            "mean_skipped": mean_skip, "max_skipped": max(skipped, default=0.0),
            "assignment_speedup_bound": 1.0 / max(1e-9, 1.0 - mean_skip), "labels_differ_from_full_search": differ,
            "labels_farther_than_full_search": wrong}


def search_path_ratios(n: int, ds: list[int], ks: list[int], repeats: int) -> list[dict]:
    """faiss's flat search (k = 1) on its BLAS path and on its direct distance loop, interleaved, at 1 thread
    and at every core: the measurement behind `raydc.core.kmeans.SEQ_SEARCH_MAX_K`."""
    from raydc.core.faiss_backend import import_faiss

    faiss = import_faiss()
    cvar = faiss.cvar
    old, cores = cvar.distance_compute_blas_threshold, faiss.omp_get_max_threads()
    rng = np.random.default_rng(0)
    rows = []
    try:
        for threads in sorted({1, cores}):
            faiss.omp_set_num_threads(threads)
            for d in ds:
                x = rng.standard_normal((n, d), dtype=np.float32)
                for k in ks:
                    index = faiss.IndexFlatL2(d)
                    index.add(x[:k])
                    t = {"blas": [], "direct": []}
                    for rep in range(repeats + 1):
                        for path, thr in (("blas", 20), ("direct", 2**31 - 1)):
                            cvar.distance_compute_blas_threshold = thr
                            t0 = time.perf_counter()
                            index.search(x, 1)
                            if rep:  # the first round warms up
                                t[path].append(time.perf_counter() - t0)
                    b, s = summarize(t["blas"]), summarize(t["direct"])
                    rows.append({"threads": threads, "n": n, "d": d, "k": k, "blas": b, "direct": s,
                                 "direct_speedup": ratio(b["median"], s["median"])})
    finally:
        cvar.distance_compute_blas_threshold = old
        faiss.omp_set_num_threads(cores)
    return rows


def _faiss_direct(x: np.ndarray, k: int, niter: int, init: np.ndarray, threads: int | None = None):
    from raydc.core.faiss_backend import import_faiss

    faiss = import_faiss()
    prev = faiss.omp_get_max_threads()
    if threads:
        faiss.omp_set_num_threads(threads)
    try:
        km = faiss.Kmeans(x.shape[1], k, niter=niter, seed=1234, max_points_per_centroid=10**9,
                          min_points_per_centroid=1, verbose=False)
        km.train(x, init_centroids=init)
        dist, _ = km.index.search(x, 1)
    finally:
        faiss.omp_set_num_threads(prev)
    return {"iterations": int(len(km.obj)), "objective": float(dist.sum(dtype=np.float64))}


def _sklearn(x: np.ndarray, k: int, niter: int, init: np.ndarray):
    import warnings

    from sklearn.cluster import KMeans

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Explicit initial center position passed: performing only one init"
        m = KMeans(n_clusters=k, init=init, n_init=1, max_iter=niter, tol=0.0, algorithm="lloyd",
                   random_state=0).fit(x)
    return {"iterations": int(m.n_iter_), "objective": float(m.inertia_)}


def _load_service(svc, x: np.ndarray, blocks: int = 8) -> float:
    """Put x into the object store as dict blocks {"id", "feature"} and load them into the shard actors
    (round robin, as the feature pool's output is); returns the seconds."""
    import ray

    bounds = np.linspace(0, len(x), blocks + 1).astype(int)
    refs = [ray.put({"row": np.arange(a, b, dtype=np.int64), "id": np.arange(a, b, dtype=np.int64),
                     "feature": x[a:b]}) for a, b in zip(bounds, bounds[1:])]
    t0 = time.perf_counter()
    svc.load(refs)
    return time.perf_counter() - t0


def run(ctx: Context) -> dict:
    from raydc.core import kmeans as km

    cfg = CONFIGS[ctx.mode]
    n, d, niter = cfg["n"], cfg["d"], cfg["niter"]
    ctx.ensure_ray()
    from raydc.engine.clustering import ClusteringService

    # Shard actors are created once and reloaded for each k (a Ray actor is a process start).
    svc1 = ClusteringService(1, log=lambda *_: None)
    svc2 = ClusteringService(2, log=lambda *_: None)
    import ray

    Runner = _runner_cls()
    # Where the CPU has no bf16 instructions torch emulates them, many times slower than float32: timing that
    # says nothing about the bf16 path, so it is left out (the labels' agreement below is still measured).
    with_bf16 = km.cpu_bf16_flag() is not None
    isolated = ["raydc_faiss", *(["raydc_bf16"] if with_bf16 else []), "raydc_lloyd", "faiss", "faiss_1thread",
                "sklearn"]
    runners = {name: Runner.remote() for name in isolated}
    probe = Runner.remote()  # GEMM ceiling and the assignment step, in a process of their own too
    results: dict = {}
    gemm = ray.get(probe.gemm.remote(n, d, cfg["ks"], cfg["gemm_repeats"]))
    ctx.log(f"  GEMM ceiling: " + ", ".join(f"{k} {v['gflops']:.1f} GF/s" for k, v in gemm["shapes"].items()))
    paths = ray.get(probe.search_paths.remote(n, cfg["path_ds"], cfg["path_ks"], cfg["gemm_repeats"]))
    ctx.log("  flat search, direct loop / BLAS speed: " + ", ".join(
        f"t{r['threads']} d{r['d']} k{r['k']} {r['direct_speedup']:.2f}x" for r in paths))
    for k in cfg["ks"]:
        components = max(4 * k, 64)
        x = gaussian_mixture(n, d, components, seed=k)
        init = km.sample_init_centroids(x, k, seed=0)
        x_ref = ray.put(x)
        inner: dict[str, list[float]] = {}
        load2_s = _load_service(svc2, x)
        load1_s = _load_service(svc1, x)

        def mk(nit: int) -> dict:
            def isolated_call(name):
                def call():
                    secs, out = ray.get(runners[name].run.remote(name, x_ref, k, nit, init))
                    if nit == niter:  # not the warm-up
                        inner.setdefault(name, []).append(secs)
                    return out
                return call

            def raydc_faiss_in_driver():
                r = km.kmeans(x, k, niter=nit, init_centroids=init, use_gpu="never")
                return {"iterations": len(r.objective), "objective": r.final_objective}

            def raydc_actor():
                o = svc1.kmeans(k, niter=nit, seed=0, mode="single", init_centroids=init)
                return {"iterations": len(o.objective), "objective": svc1.column_total("cluster_distance")}

            def raydc_distributed():
                o = svc2.kmeans(k, niter=nit, seed=0, mode="distributed", init_centroids=init)
                return {"iterations": len(o.objective), "objective": svc2.column_total("cluster_distance")}

            return {
                "raydc_faiss": isolated_call("raydc_faiss"),
                **({"raydc_bf16": isolated_call("raydc_bf16")} if with_bf16 else {}),
                "raydc_faiss_in_driver": raydc_faiss_in_driver,
                "raydc_actor": raydc_actor,
                "raydc_distributed": raydc_distributed,
                "raydc_lloyd": isolated_call("raydc_lloyd"),
                "faiss": isolated_call("faiss"),
                "faiss_1thread": isolated_call("faiss_1thread"),
                "sklearn": isolated_call("sklearn"),
            }

        ctx.log(f"  k={k}: N={n}, d={d}, {niter} iterations, {cfg['repeats']} repeats (interleaved)")
        wall, last = interleaved(mk(niter), repeats=cfg["repeats"], warmup=1, warmup_fns=mk(2))
        # Isolated implementations time themselves (no Ray call overhead); the rest are timed by the driver.
        times = {name: (summarize(inner[name]) if name in runners else t) for name, t in wall.items()}

        # The assignment step alone (faiss flat search, as in every iteration of raydc's k-means).
        assign_s = summarize(ray.get(probe.assign.remote(x_ref, init, cfg["gemm_repeats"])))
        # The bf16 assignment's labels against float32's, at the shared initial centroids and at the final ones of
        # a float32 run (k-means' own near-ties: points between two centroids that have settled).
        final_c = km.kmeans(x, k, niter=niter, init_centroids=init, use_gpu="never", assign_precision="fp32").centroids
        agreement = ray.get(probe.bf16_agreement.remote(x_ref, init, final_c))
        ctx.log("    bf16 labels differing from float32, by candidates: " + "; ".join(
            f"{nm}: " + ", ".join(f"{m}: {v['labels_differ_from_fp32']}" for m, v in rows.items())
            for nm, rows in agreement["centroids"].items()))
        pruning = bound_pruning(x, k, niter, init)
        ctx.log(f"    Hamerly's bounds would skip {pruning['mean_skipped']:.1%} of the searches per iteration "
                f"(at most {pruning['max_skipped']:.1%}); labels differing from a full search: "
                f"{pruning['labels_differ_from_full_search']}")
        flops_iter = 2.0 * n * d * k
        ceiling = gemm["shapes"][f"{n}x{d}x{k}"]["gflops"]
        peak = gemm["shapes"]["2048x2048x2048"]["gflops"]
        per = {}
        ref_obj = last["faiss"]["objective"]
        for name, t in times.items():
            iters = max(1, last[name]["iterations"])
            s_iter = t["median"] / iters
            per[name] = {
                "label": IMPLS[name],
                "seconds": t,
                "iterations": last[name]["iterations"],
                "s_per_iter": s_iter,
                "s_per_iter_iqr": t["iqr"] / iters,
                "gflops_effective": flops_iter / s_iter / 1e9,
                "objective": last[name]["objective"],
                "objective_rel_diff_vs_faiss": (last[name]["objective"] - ref_obj) / ref_obj,
            }
            if "backend" in last[name]:
                per[name]["backend"] = last[name]["backend"]
        for name in per:
            per[name]["speedup_vs_sklearn"] = ratio(per["sklearn"]["s_per_iter"], per[name]["s_per_iter"])
            per[name]["speedup_vs_faiss"] = ratio(per["faiss"]["s_per_iter"], per[name]["s_per_iter"])
            per[name]["fraction_of_gemm_ceiling"] = per[name]["gflops_effective"] / ceiling
        assign_gflops = flops_iter / assign_s["median"] / 1e9
        results[str(k)] = {
            "k": k, "n": n, "d": d, "niter": niter, "mixture_components": components,
            "impls": per,
            "assignment": {"seconds": assign_s, "gflops": assign_gflops,
                           "fraction_of_gemm_ceiling": assign_gflops / ceiling,
                           "fraction_of_peak": assign_gflops / peak},
            "gemm_ceiling_gflops": ceiling,
            "bf16_assignment": agreement,
            "bound_pruning": pruning,
            "ray_load_seconds": {"2_actors": load2_s, "1_actor": load1_s},
        }
        ctx.log("    " + ", ".join(f"{nm} {p['s_per_iter'] * 1e3:.1f} ms/it" for nm, p in per.items())
                + f"; assign {assign_gflops:.1f} GF/s = {assign_gflops / ceiling:.0%} of GEMM")
        svc1.release()
        svc2.release()
        del x_ref
    svc1.shutdown()
    svc2.shutdown()
    for a in [*runners.values(), probe]:
        ray.kill(a)

    return {"config": {**cfg, "raydc_bf16_timed": with_bf16, "init": "k distinct data rows (raydc.core.kmeans.sample_init_centroids, seed 0), "
                                      "shared by every implementation",
                       "data": "Gaussian mixture, max(4k, 64) components, centre spread 0.5/axis, unit noise",
                       "s_per_iter": "median total seconds (niter iterations + final assignment) / iterations run",
                       "speedup": "t_reference / t_impl (> 1: faster than the reference)",
                       "isolation": "each implementation in its own process (Ray actor) except raydc_faiss_in_driver; "
                                    "isolated ones time themselves, raydc_actor/raydc_distributed are timed by the "
                                    "driver around the ClusteringService call (their Ray overhead is part of them)"},
            "implementations": IMPLS, "gemm": gemm, "results": results,
            "search_paths": {"rows": paths, "seq_search_max_k": km.SEQ_SEARCH_MAX_K}}


def _timed_assign(km, x, c) -> float:
    t0 = time.perf_counter()
    km.nearest_centroids(x, c, use_gpu="never")
    return time.perf_counter() - t0
