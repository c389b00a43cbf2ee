"""DeepCluster epoch breakdown: `run_training` (the real job: one TorchTrainer.fit, rank 0 drives the feature
pool and the shard actors between epochs) on an MNIST subset, phases read from the run's `metrics.jsonl`:
`time_features` (actor pool over every image), `time_pca` (moments, reduction, projection, L2), `time_kmeans`
(faiss, 20 iterations), `time_train` (the training pass), and `other` = `time_round` minus those (pseudo-label
broadcast, metrics, checkpoint). The DeepCluster paper puts clustering at about a third of an epoch; that
"clustering" includes the forward pass over the dataset, so both the k-means share and the whole clustering
step's share (features + PCA + k-means) are reported.

The final row (`final: true`, the closing clustering of the trained network, no training) is kept apart.
"""
from __future__ import annotations

import json
import time

from benchmarks.common import REPO, Context, summarize

NAME = "epoch"
NEEDS_RAY = True

CONFIGS = {
    # Full MNIST (70k) does not fit ~15 min here: training alone runs at ~100 images/s on these 2 cores.
    "quick": {"split": "test", "limit": 256, "epochs": 2, "batch_size": 64, "k": 10},
    "full": {"split": "all", "limit": 10_000, "epochs": 3, "batch_size": 256, "k": 10},
}
REPO_CONFIG = str(REPO / "jobs" / "configs" / "mnist.yaml")
PHASES = ("time_features", "time_pca", "time_kmeans", "time_train")


def phase_table(rows: list[dict]) -> dict:
    """Per-epoch phase seconds and shares of `time_round`, their medians, from metrics.jsonl rows."""
    epochs = []
    for r in rows:
        if r.get("final") or "time_train" not in r:
            continue
        ph = {p: float(r.get(p, 0.0)) for p in PHASES}
        total = float(r.get("time_round", sum(ph.values())))
        ph["other"] = max(0.0, total - sum(ph.values()))
        e = {"epoch": r.get("epoch"), "time_round": total, "seconds": ph,
             "share": {p: v / total for p, v in ph.items()},
             "images_per_s_train": r.get("images_per_s_train"), "images_per_s_features": r.get("images_per_s_features"),
             "train_images": r.get("train_images"), "kmeans_backend": r.get("kmeans_backend"),
             "nmi": r.get("nmi"), "acc": r.get("acc"), "nmi_prev": r.get("nmi_prev"),
             "features_clock": r.get("features_clock")}
        e["share"]["clustering_step"] = (ph["time_features"] + ph["time_pca"] + ph["time_kmeans"]) / total
        e["share"]["pca_plus_kmeans"] = (ph["time_pca"] + ph["time_kmeans"]) / total
        epochs.append(e)
    if not epochs:
        raise RuntimeError("metrics.jsonl has no training rows")
    keys = list(epochs[0]["share"])
    return {
        "epochs": epochs,
        "median_seconds": {p: summarize([e["seconds"][p] for e in epochs])["median"] for p in epochs[0]["seconds"]},
        "median_share": {p: summarize([e["share"][p] for e in epochs])["median"] for p in keys},
        "median_time_round": summarize([e["time_round"] for e in epochs])["median"],
    }


def run(ctx: Context) -> dict:
    from raydc.config import load_config
    from raydc.engine.trainer import run_training

    c = CONFIGS[ctx.mode]
    ctx.ensure_ray()
    shard_dir, manifest = ctx.mnist_shards(c["split"], c["limit"])
    run_dir = ctx.work / f"runs/epoch-{ctx.mode}"
    cfg = load_config(REPO_CONFIG, [
        f"data.shards={shard_dir}", f"run.dir={run_dir}", f"train.epochs={c['epochs']}",
        f"train.batch_size={c['batch_size']}", f"cluster.k={c['k']}", "train.use_gpu=never",
    ])
    ctx.log(f"  DeepCluster on {manifest.count} MNIST images, {c['epochs']} epochs, k={c['k']} "
            f"(jobs/configs/mnist.yaml otherwise)")
    t0 = time.perf_counter()
    run = run_training(cfg, overwrite=True, log=ctx.log if ctx.verbose else (lambda *_: None))
    wall = time.perf_counter() - t0
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines() if line.strip()]
    table = phase_table(rows)
    final = next((r for r in rows if r.get("final")), {})
    fixed = wall - sum(r.get("time_round", 0.0) for r in rows)
    ms = table["median_share"]
    ctx.log(f"  per epoch {table['median_time_round']:.1f}s: features {ms['time_features']:.0%}, "
            f"PCA {ms['time_pca']:.0%}, k-means {ms['time_kmeans']:.0%}, train {ms['time_train']:.0%}, "
            f"other {ms['other']:.0%}")
    return {
        "config": {**c, "images": manifest.count, "base_config": "jobs/configs/mnist.yaml",
                   "method": "run_training (one TorchTrainer.fit for the whole run)", "run_dir": str(run_dir)},
        "phases": table,
        "final_clustering": {p: final.get(p) for p in ("time_features", "time_pca", "time_kmeans", "time_round",
                                                       "nmi", "acc", "ari")},
        "run_wall_s": wall,
        "fixed_s": fixed,  # Ray Train start-up and teardown, report drawing: everything outside the rounds
        "curves": [{k: r.get(k) for k in ("epoch", "final", "nmi", "acc", "ari", "nmi_prev", "loss")} for r in rows],
    }

