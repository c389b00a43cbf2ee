"""Distributed Lloyd's reduction (issue #14): what the busiest process receives per iteration, and seconds per
iteration, star against sharded.

Bytes: the engine's own accounting (`ClusterOutcome.bytes_per_iteration`, counted on the payloads each process
fetched) from `ClusteringService` over in-process shards, so 64 shards cost 64 objects, not 64 processes. The
counts are exactly affine in d (k x d sums and centroids, plus k counts), so every (k, shards) cell is measured
at d = 8 and d = 16 and extended to d = 256 along that line; where memory allows (k <= 10k) d = 256 is also
measured directly and must equal the extension. k = 100k at 64 shards with d = 256 would hold 64 x 205 MB of
sums in this one process for the star.

Seconds: the same two reductions on Ray actors (3 shards on this host), from the same initial centroids,
interleaved; both must give the same centroids to the bit.

Two-level k-means against the flat one (in-process shards, same points, interleaved): seconds, the k-means
objective of each (the sum of squared distances to the assigned centroid: lower is better) and the NMI between
the two clusterings.
"""
from __future__ import annotations

import numpy as np

from benchmarks.common import Context, interleaved, ratio

NAME = "reduction"
NEEDS_RAY = True

CONFIGS = {
    "quick": {"ks": [1000, 10_000], "shards": [3, 64], "direct_d": 64, "direct_max_k": 1000,
              "time_n": 20_000, "time_d": 32, "time_ks": [100, 1000], "time_niter": 3, "repeats": 2,
              "tl_n": 20_000, "tl_d": 16, "tl_ks": [400], "tl_niter": 5},
    "full": {"ks": [1000, 10_000, 100_000], "shards": [3, 64], "direct_d": 256, "direct_max_k": 10_000,
             "time_n": 50_000, "time_d": 64, "time_ks": [100, 1000, 10_000], "time_niter": 5, "repeats": 3,
             "tl_n": 100_000, "tl_d": 32, "tl_ks": [1000, 10_000], "tl_niter": 10},
}
TARGET_D = 256


def _traffic(k: int, d: int, shards: int, reduction: str) -> dict:
    from raydc.engine.clustering import local_service

    rng = np.random.default_rng(0)
    x = rng.random((k, d), dtype=np.float32)  # N = k: every point its own centroid; bytes do not depend on N
    svc = local_service(shards, log=lambda m: None)
    svc.load([{"row": r, "id": r, "feature": x[r]} for r in np.array_split(np.arange(k), shards)])
    out = svc.kmeans(k, niter=1, seed=0, mode="distributed", init_centroids=x, reduction=reduction)
    return out.bytes_per_iteration


def _extended(k: int, shards: int, reduction: str) -> dict:
    a, b = _traffic(k, 8, shards, reduction), _traffic(k, 16, shards, reduction)
    keys = ("received", "coordinator_received", "shard_received_max")
    return {key: int(a[key] + (b[key] - a[key]) * (TARGET_D - 8) / 8) for key in keys}


def run(ctx: Context) -> dict:
    import ray

    from raydc.core import kmeans as km
    from raydc.engine.clustering import ClusteringService

    cfg = CONFIGS[ctx.mode]
    table = []
    for k in cfg["ks"]:
        for shards in cfg["shards"]:
            row = {"k": k, "shards": shards, "d": TARGET_D}
            for red in ("star", "sharded"):
                row[red] = _extended(k, shards, red)
                if k <= cfg["direct_max_k"]:
                    row[red + "_direct_d"] = cfg["direct_d"]
                    row[red + "_direct"] = {key: int(v) for key, v in _traffic(k, cfg["direct_d"], shards, red).items()
                                            if key in ("received", "coordinator_received", "shard_received_max")}
            row["busiest_ratio"] = row["star"]["received"] / row["sharded"]["received"]
            table.append(row)
            ctx.log(f"  k={k:>6} shards={shards:>2}: busiest process {row['star']['received'] / 2**20:9.1f} MiB (star)"
                    f" -> {row['sharded']['received'] / 2**20:7.1f} MiB (sharded) per iteration")

    ctx.ensure_ray()
    n, d = cfg["time_n"], cfg["time_d"]
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, d), dtype=np.float32)
    svc = ClusteringService(3, log=lambda m: None)
    svc.load([ray.put({"row": r, "id": r, "feature": x[r]}) for r in np.array_split(np.arange(n), 6)])
    timing = []
    for k in cfg["time_ks"]:
        init = km.sample_init_centroids(x, k, seed=0)
        results = {}

        def fit(red):
            return lambda: svc.kmeans(k, niter=cfg["time_niter"], seed=0, mode="distributed", init_centroids=init,
                                      reduction=red)

        secs, results = interleaved({"star": fit("star"), "sharded": fit("sharded")}, repeats=cfg["repeats"])
        iters = len(results["star"].objective)
        same = bool(np.array_equal(results["star"].centroids, results["sharded"].centroids))
        timing.append({"k": k, "n": n, "d": d, "shards": 3, "iterations": iters, "seconds": secs,
                       "sharded_over_star": ratio(secs["sharded"], secs["star"]), "same_centroids": same})
        ctx.log(f"  k={k:>6}: star {secs['star']['median'] / iters * 1e3:.0f} ms/it, sharded "
                f"{secs['sharded']['median'] / iters * 1e3:.0f} ms/it (time ratio sharded/star "
                f"{timing[-1]['sharded_over_star']:.2f}), same centroids: {same}")
    svc.shutdown()
    return {"config": cfg, "target_d": TARGET_D, "bytes": table, "timing": timing, "two_level": _two_level(ctx, cfg)}


def _two_level(ctx: Context, cfg: dict) -> list[dict]:
    from benchmarks.bench_kmeans import gaussian_mixture
    from raydc.core.metrics import nmi
    from raydc.engine.clustering import local_service
    from raydc.engine.row_lookup import RowLookup

    n, d = cfg["tl_n"], cfg["tl_d"]
    x = gaussian_mixture(n, d, 200, seed=2, spread=2.0)
    svc = local_service(2, log=lambda m: None)
    svc.load([{"row": r, "id": r, "feature": x[r]} for r in np.array_split(np.arange(n), 8)])
    rows = []
    for k in cfg["tl_ks"]:
        labels = {}

        def fit(level):
            def go():
                out = svc.kmeans(k, niter=cfg["tl_niter"], seed=0, mode="distributed", reduction="star",
                                 hierarchical=level)
                labels[level] = RowLookup(svc.publish("cluster"))(np.arange(n))
                return out
            return go

        secs, res = interleaved({"flat": fit("never"), "two_level": fit("always")}, repeats=2, warmup=0)
        row = {"k": k, "n": n, "d": d, "super_k": int(round(np.sqrt(k))), "seconds": secs,
               "speedup": ratio(secs["flat"], secs["two_level"]),
               "objective_ratio": res["two_level"].objective[-1] / res["flat"].objective[-1],
               "nmi_between": float(nmi(labels["never"], labels["always"]))}
        rows.append(row)
        ctx.log(f"  two-level k={k}: {row['speedup']:.1f}x faster than flat, objective x{row['objective_ratio']:.3f}, "
                f"NMI between them {row['nmi_between']:.3f}")
    return rows
