"""Memory against N: one DeepCluster round on synthetic 8x8 images at growing N, peak RSS per process role.

What must hold (issue #12): no process but the shard actors holds anything O(N). The driver (the `raydc train`
process), the coordinator actor and rank 0 must stay flat in N; each shard actor grows as N / shards. Each N is
a fresh `raydc train` subprocess (its own Ray), so the peaks do not mix: the driver's peak comes from the
kernel (`wait4`'s ru_maxrss), the others from the `memory` field every metrics row carries (VmHWM of rank 0,
the coordinator and each shard, read in those processes). Both the resident set (VmHWM) and the private memory
(peak RssAnon, sampled) are recorded: a process that reads object-store blocks has the store's shared pages in
its resident set (raydc.engine.memory says why), which is Ray's memory, bounded by the store, not the
process's. Bytes per k-means iteration are the payloads of the distributed Lloyd measured in the coordinator.

Images are 10 noisy prototypes (so k-means has something to find), ids random int64 (hashed ids, negatives
included), prepared by `raydc prepare --source npz`. The round is kept cheap where it does not touch memory:
a 16-d feature, PCA to 8 fitted on a 20,000-image sample, 20,000 training images, k = 10, 5 iterations.

`run_frozen` (benchmark `scale_frozen`, issue #31) is the same round with `train.epochs 0`: no training, one feature
pass of the network as built, PCA and the distributed k-means, the final assignment and report. That is the
frozen-feature path a user runs over 10^9 images, so it must be flat in N the same way.
"""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import Context, run_measured

NAME = "scale"
NEEDS_RAY = False  # each N runs `raydc train` in a subprocess with a Ray of its own
SIDE = 8
FULL_SIZES = (100_000, 1_000_000, 5_000_000)
QUICK_SIZES = (20_000, 100_000)
SHARDS = 2


def make_npz(path: Path, n: int, seed: int = 0, chunk: int = 500_000) -> None:
    rng = np.random.default_rng(seed)
    protos = rng.integers(0, 256, (10, SIDE, SIDE), dtype=np.int16)
    images = np.empty((n, SIDE, SIDE), np.uint8)
    labels = np.empty(n, np.int64)
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        y = rng.integers(0, 10, b - a)
        images[a:b] = np.clip(protos[y] + rng.normal(0, 40, (b - a, SIDE, SIDE)), 0, 255).astype(np.uint8)
        labels[a:b] = y
    ids = rng.permutation(np.unique(rng.integers(-(1 << 62), 1 << 62, int(n * 1.01) + 10)))[:n]
    np.savez(path, images=images, labels=labels, ids=ids.astype(np.int64))


def shards_for(ctx: Context, n: int) -> Path:
    from raydc.data.manifest import load_manifest
    from raydc.data.prepare import prepare

    out = ctx.work / "scale" / f"shards-{n}"
    try:
        if load_manifest(out).count == n:
            return out
    except Exception:  # noqa: BLE001 - missing or stale: prepare again
        pass
    npz = ctx.work / "scale" / f"images-{n}.npz"
    npz.parent.mkdir(parents=True, exist_ok=True)
    make_npz(npz, n)
    prepare("npz", out, root=npz, rows_per_shard=250_000, overwrite=True, progress=False)
    npz.unlink()
    return out


CONFIG = """\
# The scaling benchmark's round (benchmarks/bench_scale.py): DeepCluster v1, PCA fitted on a sample.
method: deepcluster
model: {arch: smallconvnet, sobel: false, feature_dim: 16}
cluster: {k: 10, pca_dim: 8, niter: 5, mode: distributed, num_shards: %d}
features: {pca_sample: 20000, batch_size: 4096}
train: {epochs: 1, min_steps: 0, batch_size: 256, augment: crop, hflip: false}
run: {keep_checkpoints: 1}
""" % SHARDS


def overrides(n: int, shards: Path, run_dir: Path) -> list[str]:
    return [f"data.shards={shards}", f"run.dir={run_dir}", f"train.reassign={min(1.0, 20_000 / max(n, 1)):.6f}"]


def _work_dir(ctx: Context, frozen: bool) -> Path:
    """Where a variant keeps its run directories, logs and finished points (the shards are shared)."""
    return ctx.work / ("scale-frozen" if frozen else "scale")


def run_one(ctx: Context, n: int, frozen: bool = False) -> dict:
    shards = shards_for(ctx, n)
    work = _work_dir(ctx, frozen)
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / f"run-{n}"
    config = work / "scale.yaml"
    config.write_text(CONFIG)
    cmd = [str(Path(sys.executable).parent / "raydc"), "train", "--config", str(config), "--overwrite"]
    for s in overrides(n, shards, run_dir) + (["train.epochs=0"] if frozen else []):
        cmd += ["--set", s]
    log_path = work / f"run-{n}.log"
    with log_path.open("w") as log:
        peaks = run_measured(cmd, env={**os.environ}, stdout=log, stderr=subprocess.STDOUT)
    if peaks.exit_code != 0:
        raise RuntimeError(f"raydc train for N={n} failed; see {log_path.name}")
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    mem = [r["memory"] for r in rows if "memory" in r]
    traffic = next((r["kmeans_bytes_per_iteration"] for r in rows if "kmeans_bytes_per_iteration" in r), None)
    final = rows[-1]
    return {"n": n, "seconds": peaks.seconds,
            "driver_peak_rss": peaks.peak_rss_bytes, "driver_peak_anon": peaks.peak_anon_bytes,
            "rank0_peak_rss": max(m["rank0_peak_rss"] for m in mem),
            "rank0_peak_anon": max(m["rank0_peak_anon"] for m in mem),
            "coordinator_peak_rss": max(m.get("coordinator_peak_rss", 0) for m in mem),
            "coordinator_peak_anon": max(m.get("coordinator_peak_anon", 0) for m in mem),
            "shard_peak_rss": [max(m["shard_peak_rss"][i] for m in mem if "shard_peak_rss" in m)
                               for i in range(SHARDS)],
            "shard_peak_anon": [max(m["shard_peak_anon"][i] for m in mem if "shard_peak_anon" in m)
                                for i in range(SHARDS)],
            "kmeans_bytes_per_iteration": traffic, "final_acc": final.get("acc"), "final_nmi": final.get("nmi")}


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x: 0 is flat, 1 is linear in N."""
    lx, ly = np.log(xs), np.log(ys)
    return float(np.polyfit(lx, ly, 1)[0]) if len(xs) > 1 else math.nan


def run(ctx: Context) -> dict:
    return _measure(ctx, frozen=False)


def run_frozen(ctx: Context) -> dict:
    return _measure(ctx, frozen=True)


def _measure(ctx: Context, frozen: bool) -> dict:
    sizes = QUICK_SIZES if ctx.quick else FULL_SIZES
    points = []
    for n in sizes:
        # a stopped suite resumes with the sizes it has not run
        saved = _work_dir(ctx, frozen) / f"point-{n}.json"
        if saved.exists():
            p = json.loads(saved.read_text())
        else:
            ctx.log(f"  scale N={n:,}: preparing and running one {'frozen ' if frozen else ''}round")
            p = run_one(ctx, n, frozen)
            saved.write_text(json.dumps(p))
        points.append(p)
        ctx.log(f"  N={n:,}: driver {p['driver_peak_rss'] / 2**20:.0f} MiB, rank 0 {p['rank0_peak_rss'] / 2**20:.0f} "
                f"MiB, coordinator {p['coordinator_peak_rss'] / 2**20:.0f} MiB, shards "
                f"{[round(s / 2**20) for s in p['shard_peak_rss']]} MiB, {p['seconds']:.0f} s")
    ns = [p["n"] for p in points]
    fits = {role: slope(ns, [p[role] for p in points])
            for role in ("driver_peak_rss", "rank0_peak_rss", "coordinator_peak_rss", "driver_peak_anon",
                         "rank0_peak_anon", "coordinator_peak_anon")}
    fits["shard_peak_rss"] = slope(ns, [max(p["shard_peak_rss"]) for p in points])
    fits["shard_peak_anon"] = slope(ns, [max(p["shard_peak_anon"]) for p in points])
    # Growth per image between the smallest and largest N: a shard per image it holds, the others per image.
    a, b = points[0], points[-1]
    per_image = (max(b["shard_peak_anon"]) - max(a["shard_peak_anon"])) / ((b["n"] - a["n"]) / SHARDS)
    growth = {role: (b[role] - a[role]) / (b["n"] - a["n"]) for role in
              ("driver_peak_anon", "rank0_peak_anon", "coordinator_peak_anon", "driver_peak_rss", "rank0_peak_rss",
               "coordinator_peak_rss")}
    return {"sizes": list(sizes), "shards": SHARDS, "side": SIDE, "points": points, "loglog_slopes": fits,
            "shard_bytes_per_image": per_image, "bytes_per_image": growth, "pca_dim": 8, "config": CONFIG,
            "frozen": frozen}
