"""DeepCluster's final readout: how 100 trained clusters become the 10 a user gets, old merge against new.

Two measurements on the demo data (MNIST test, 10,000 images), each seed trained with 100 clusters and 10
delivered (`cluster.k=100 deepcluster.final_k=10`):

1. **End to end**: the same config and seed run with `final_merge: spectral` (the co-neighbour graph, one edge
   per point) and with `final_merge: knn` (the k-NN graph readout). Training is deterministic on CPU for a seed,
   so both runs of a seed train the same network and differ only in the readout (the training-k majority ACC of
   the two is the check). Each run's final row: ACC, NMI, and the first round's ACC beside it.
2. **Same features, many fine clusterings**: the final network of each seed embeds the images once; the
   100 fine clusters are then redrawn with several k-means seeds (a near-tie in k-means is what turned one
   run in four into a 15-point loss on MNIST 70k), and every readout merges each of them. This isolates the
   readout from training, and is the ablation of its parts (graph: k-NN edge counts or PAGA's ratio; score:
   modularity or normalised cut; and k-means at 10 on the same features, no merge).

Run directories are read back when they exist (`<work>/readout/demo-<merge>-seed<S>`), so a stopped suite
resumes with what it has not done. Full mode only: each run is minutes.
"""
from __future__ import annotations

import statistics
from pathlib import Path

import numpy as np

from benchmarks.common import REPO, Context

NAME = "readout"
NEEDS_RAY = False  # started only when a run is missing (finished runs are read back)
SEEDS = (31, 32, 33)
KMEANS_SEEDS = range(6)  # fine clusterings of each final network's features (same-features ablation)
SETS = ["cluster.k=100", "deepcluster.final_k=10"]
MERGES = ("spectral", "knn")
# the same-features ablation: name -> (what, graph, score); "old" and "kmeans" are not k-NN readouts
READOUTS = {
    "kmeans": ("k-means at 10 on the same features (no merge)", None, None),
    "old": ("co-neighbour graph (nearest, second centroid), spectral, one run", None, None),
    "knn_counts_modularity": ("k-NN edge counts, best of 10 spectral + average linkage by modularity (default)",
                              "counts", "modularity"),
    "knn_counts_ncut": ("k-NN edge counts, kept by normalised cut", "counts", "ncut"),
    "knn_paga_modularity": ("PAGA ratio (counts / expected), kept by modularity", "paga", "modularity"),
    "knn_paga_ncut": ("PAGA ratio, kept by normalised cut", "paga", "ncut"),
}


def _final(run_dir: Path) -> tuple[dict | None, dict | None, float]:
    from benchmarks.bench_seeds import final_rows

    final, first, seconds, _ = final_rows(run_dir)
    return final, first, seconds


def _mean(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "n": len(values)}


def _features(run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """(L2-normalised embedding, labels) of the MNIST test images under a finished run's final network: the
    deterministic eval transform, as the feature pool computes it."""
    import torch
    from torchvision.datasets import MNIST

    from raydc.config import Config
    from raydc.config_loader import from_dict
    from raydc.core.augment import resize_center, to_float
    from raydc.core.pca import l2_normalize
    from raydc.engine.rundir import RunDir
    from raydc.methods.deepcluster import _build

    saved = RunDir(str(run_dir)).load_clustering()
    cfg = from_dict(Config, saved["config"])
    m = cfg.model
    net = _build({"arch": m.arch, "sobel": m.sobel, "width": m.width, "feature_dim": m.feature_dim}, 1,
                 cfg.cluster.k, cfg.deepcluster.variant == "v2")
    net.load_state_dict(saved["model"])
    net.eval()
    ds = MNIST(str(_data_root()), train=False)
    images = ds.data.numpy()[..., None]
    with torch.inference_mode():
        x = np.concatenate([net.embed(resize_center(to_float(images[i:i + 500]), 28)).float().numpy()
                            for i in range(0, len(images), 500)])
    return l2_normalize(x).astype(np.float32), ds.targets.numpy()


def _data_root() -> Path:
    import os

    return Path(os.environ.get("RAYDC_DATA_ROOT", REPO.parent / "shared" / "data"))


def same_features(x: np.ndarray, y: np.ndarray, seed: int) -> dict:
    """ACC of every readout on fine clusterings of the same features (k-means k=100, seeds KMEANS_SEEDS)."""
    from raydc.core import metrics as M
    from raydc.core.kmeans import kmeans
    from raydc.core.merge import (
        coneighbour_counts,
        fine_graph,
        graph_merge,
        knn_edge_counts,
        spectral_merge,
    )

    ids = np.arange(len(x))
    out: dict = {name: [] for name in READOUTS}
    out["fine_majority"] = []
    for s in KMEANS_SEEDS:
        km = kmeans(x, 100, niter=20, seed=seed * 100 + s, use_gpu="never")
        fine = km.labels
        out["fine_majority"].append(M.majority_acc(y, fine))
        out["kmeans"].append(M.acc(y, kmeans(x, 10, niter=20, seed=seed * 100 + s, use_gpu="never").labels))
        out["old"].append(M.acc(y, spectral_merge(coneighbour_counts(x, km.centroids), 10, seed=s)[fine]))
        edges = knn_edge_counts(x, fine, x, fine, 100, 15, ids=ids, sample_ids=ids)
        sizes = np.bincount(fine, minlength=100)
        for name, (_, graph, score) in READOUTS.items():
            if graph is not None:
                groups = graph_merge(fine_graph(edges, sizes, graph), 10, seed=s, score=score).groups
                out[name].append(M.acc(y, groups[fine]))
    return out


def same_features_of_run(run_dir: Path, seed: int, measure: bool = True) -> dict | None:
    """`same_features` on a finished run's final network, kept beside the run (`readout_same_features.json`) so
    that a stopped suite does not redo it. Either readout's run of a seed will do: they train the same network."""
    import json

    cache = run_dir / "readout_same_features.json"
    if cache.exists():
        doc = json.loads(cache.read_text())
        if doc.get("kmeans_seeds") == list(KMEANS_SEEDS):
            return doc["acc"]
    if not measure:
        return None
    x, y = _features(run_dir)
    acc = same_features(x, y, seed)
    cache.write_text(json.dumps({"kmeans_seeds": list(KMEANS_SEEDS), "acc": acc}))
    return acc


def run(ctx: Context) -> dict:
    if ctx.quick:
        return {"skipped": "full mode only: 6 runs of minutes each"}
    return collect(ctx, launch=True)


def collect(ctx: Context, launch: bool) -> dict:
    """The runs that exist (and, with `launch`, the missing ones run first), read back; a run that does not
    exist without `launch` is listed under "missing" and left out of the means, and only the same-features
    ablations already measured are read."""
    from raydc.config import load_config
    from raydc.engine.trainer import run_training

    keys = ("acc", "nmi", "ari", "train_k_acc_majority")
    runs: dict = {m: [] for m in MERGES}
    missing = []
    for merge in MERGES:
        for seed in SEEDS:
            run_dir = ctx.work / "readout" / f"demo-{merge}-seed{seed}"
            final, first, seconds = _final(run_dir)
            if final is None and launch:
                ctx.ensure_ray()
                ctx.log(f"  {merge} seed {seed}: running")
                cfg = load_config(str(REPO / "jobs" / "configs" / "demo.yaml"),
                                  [*SETS, f"deepcluster.final_merge={merge}", f"train.seed={seed}",
                                   f"run.dir={run_dir}"])
                run_training(cfg, overwrite=True, log=lambda *a: None)
                final, first, seconds = _final(run_dir)
            if final is None:
                missing.append(f"{merge} seed {seed}")
                continue
            row = {"seed": seed, "seconds": seconds, "first_acc": first.get("acc") if first else None,
                   **{k: final.get(k) for k in keys if final.get(k) is not None}}
            runs[merge].append(row)
            ctx.log(f"  {merge} seed {seed}: ACC {row['acc']:.3f} (round 0: {row['first_acc']:.3f})")
    ablation: dict = {"kmeans_seeds": list(KMEANS_SEEDS), "per_run": {}}
    for seed in SEEDS:
        done = [ctx.work / "readout" / f"demo-{m}-seed{seed}" for m in MERGES]
        done = [d for d in done if _final(d)[0] is not None]
        done.sort(key=lambda d: not (d / "readout_same_features.json").exists())  # one already measured first
        if not done:
            continue
        acc = same_features_of_run(done[0], seed, measure=launch)
        if acc is None:
            missing.append(f"same-features ablation seed {seed}")
            continue
        ablation["per_run"][str(seed)] = acc
        ctx.log(f"  same features, seed {seed}: " + ", ".join(
            f"{n} {statistics.fmean(v):.3f}" for n, v in ablation["per_run"][str(seed)].items()))
    pooled = {n: [a for r in ablation["per_run"].values() for a in r[n]] for n in (*READOUTS, "fine_majority")}
    ablation["summary"] = {n: _mean(v) for n, v in pooled.items() if v}
    ablation["what"] = {n: w for n, (w, _, _) in READOUTS.items()}
    summary = {m: {k: _mean([r[k] for r in rows]) for k in (*keys, "first_acc")
                   if rows and all(r.get(k) is not None for r in rows)} for m, rows in runs.items()}
    return {"seeds": list(SEEDS), "config": "demo.yaml", "sets": SETS, "runs": runs, "summary": summary,
            "missing": missing, "same_features": ablation}


def section(doc: dict) -> str:
    """RESULTS.md's section for this benchmark (called by benchmarks.render)."""
    if "runs" not in doc:
        return ""
    rows = []
    for merge, runs in doc["runs"].items():
        if not runs:
            continue
        s = doc["summary"][merge]
        rows.append([f"`final_merge: {merge}`", f"{s['acc']['mean']:.3f} ± {s['acc']['std']:.3f}",
                     f"{s['acc']['min']:.3f}", " / ".join(f"{r['seed']}: {r['acc']:.3f}" for r in runs),
                     " / ".join(f"{r['first_acc']:.3f}" for r in runs),
                     " / ".join(f"{r['train_k_acc_majority']:.3f}" for r in runs)])
    ab = doc["same_features"]
    n_runs = len(ab["per_run"])
    missing = ("Not run (on this overloaded machine, in the time there was): " + ", ".join(doc["missing"]) + ".\n\n"
               if doc.get("missing") else "")
    arows = [[f"`{n}`", ab["what"].get(n, "the 100 fine clusters, majority vote (a bound on any merge)"),
              f"{v['mean']:.3f} ± {v['std']:.3f}", f"{v['min']:.3f}", str(v["n"])]
             for n, v in ab["summary"].items()]

    def table(header, body):
        return "\n".join(["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|",
                          *("| " + " | ".join(r) + " |" for r in body)])

    return ("## DeepCluster's final readout (100 clusters trained, 10 delivered)\n\n"
            f"`{doc['config']}` with `{' '.join(doc['sets'])}`, seeds {', '.join(map(str, doc['seeds']))}; the "
            "final round of each run. Both readouts of a seed train the same network (deterministic on CPU: "
            "the majority ACC at k = 100 matches).\n\n" + missing
            + table(["readout", "ACC mean ± std", "ACC min", "ACC per seed",
                     "ACC round 0 (k = 100, one-to-one)", "majority ACC at k = 100"], rows)
            + "\n\nSame features, many fine clusterings: each seed's final network, k-means "
            f"k = 100 redrawn with {len(ab['kmeans_seeds'])} seeds, every readout on each "
            f"({n_runs * len(ab['kmeans_seeds'])} merges per row).\n\n"
            + table(["readout", "what", "ACC mean ± std", "ACC min", "merges"], arows) + "\n")
