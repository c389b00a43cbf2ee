"""DeepCluster ablations on the demo setting (the 10,000 MNIST test images, k=10, 10 rounds): one config field
changed at a time from the paper's v1, each run's final round beside its first clustering.

The base is spelled out field by field (not "whatever demo.yaml says today"), so a later change of the shipped
config does not change what an ablation row means. Runs live in `<runs>/abl/<name>` and are read back when they
finished, so the table can be rebuilt, or a stopped suite resumed, without rerunning them.
"""
from __future__ import annotations

from benchmarks.bench_seeds import final_rows
from benchmarks.common import REPO, Context

NAME = "ablations"
NEEDS_RAY = False  # started only when a run is missing (finished runs are read back)
ROUNDS = 10

BASE = ["train.epochs=10", "deepcluster.variant=v1", "deepcluster.head=reset", "deepcluster.final_k=0",
        "deepcluster.final_merge=kmeans",
        "train.lr_schedule=constant", "train.min_steps=0", "train.augment=crop", "train.crop_scale_min=0.5",
        "cluster.k=10", "cluster.pca_dim=0", "model.sobel=true"]

ABLATIONS = [  # (run name, what changes, overrides on BASE)
    ("v1_base", "the paper's DeepCluster (v1): fresh head each round, constant lr", []),
    ("v1_cos", "cosine lr schedule over the rounds", ["train.lr_schedule=cosine"]),
    ("v1_match", "head: match (last head carried to the clusters it overlaps)", ["deepcluster.head=match"]),
    ("v1_steps200", "at least 200 SGD steps per round (5x the 39 of one pass)", ["train.min_steps=200"]),
    ("v1_affine", "augmentation: rotation/shift/zoom instead of crops", ["train.augment=affine"]),
    ("v1_k100", "over-clustering: k=100, final_k=10", ["cluster.k=100", "deepcluster.final_k=10"]),
    ("v2", "DeepCluster-v2: centroids as frozen cosine prototypes, T=0.1", ["deepcluster.variant=v2"]),
    ("v2_steps200", "v2, at least 200 SGD steps per round", ["deepcluster.variant=v2", "train.min_steps=200"]),
    ("v2_affine", "v2, rotation/shift/zoom augmentation", ["deepcluster.variant=v2", "train.augment=affine"]),
    ("v2_nosobel", "v2 without the Sobel front end", ["deepcluster.variant=v2", "model.sobel=false"]),
    ("v2_k100", "v2, k=100, final_k=10", ["deepcluster.variant=v2", "cluster.k=100", "deepcluster.final_k=10"]),
    ("v2_k100_affine_spectral", "v2, affine, k=100, final_k=10 by the spectral merge of the 100 clusters",
     ["deepcluster.variant=v2", "train.augment=affine", "cluster.k=100", "deepcluster.final_k=10",
      "deepcluster.final_merge=spectral"]),
]


def run(ctx: Context) -> dict:
    from raydc.config import load_config
    from raydc.engine.trainer import run_training

    if ctx.quick:
        return {"skipped": "full mode only: each ablation is a run of minutes"}
    results = {}
    for name, what, sets in ABLATIONS:
        run_dir = ctx.runs / "abl" / name
        final, first, seconds, curve = final_rows(run_dir)
        if final is None:
            ctx.ensure_ray()
            ctx.log(f"  {name}: running")
            cfg = load_config(str(REPO / "jobs" / "configs" / "demo.yaml"), [*BASE, *sets, f"run.dir={run_dir}"])
            run_training(cfg, overwrite=True, log=lambda *a: None)
            final, first, seconds, curve = final_rows(run_dir)
        results[name] = {"what": what, "sets": sets, "seconds": seconds, "first_acc": first.get("acc"),
                         "curve_acc": curve, **{k: final.get(k) for k in (
                             "acc", "nmi", "ari", "nmi_prev", "acc_majority", "train_k_acc_majority",
                             "train_k_acc", "train_k_nmi_prev", "silhouette") if final.get(k) is not None}}
        results[name].setdefault("nmi_prev", results[name].get("train_k_nmi_prev"))
        r = results[name]
        ctx.log(f"  {name}: first ACC {r['first_acc']:.3f} -> final {r['acc']:.3f}, NMI(t-1,t) "
                f"{r.get('nmi_prev', float('nan')):.3f}")
    return {"setting": "MNIST test 10,000 images, k=10, 10 rounds, seed 31", "base": BASE, "results": results}
