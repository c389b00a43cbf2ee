"""A manifold readout of finished DeepCluster runs, against the run's own k-NN-graph merge (issue #30, item 1).

N2D (McConville et al. 2020) clusters an embedding by UMAP to a few dimensions (min_dist 0) and a Gaussian
mixture. Whether that beats joining the 100 trained clusters depends on the features, not on training, so this
reads the final network of runs that already exist: `raydc embed` writes every image's final features (L2
normalised, as the run clustered them), and each readout is computed from those alone, without labels:

- `kmeans`: faiss k-means at the delivered k on the features (10 restarts, best objective);
- `umap_gmm` / `umap_kmeans`: UMAP (10 dimensions, 20 neighbours, min_dist 0, cosine) fitted on a uniform
  sample of `--sample` images, a Gaussian mixture (full covariance, 5 initialisations) or k-means on it, and
  every other image placed by a vote of its 10 nearest sample images in feature space
  (`raydc.core.merge.vote_labels`, which the shard actors run for `deepcluster.final_merge: umap`).

Labels only score the results. The run's own final ACC (its shipped readout) is beside them. Usage (umap-learn
on the path; it is not a dependency of raydc):

    python -m benchmarks.manifold_readout --out benchmarks/results/manifold_readout.json \
        --run "mnist seed 31:runs/dc-31:shards/mnist:COMMIT" ...
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine_info


def load_features(run_dir: Path, shards: Path, work: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(ids, features, labels) of every image: the run's reduced features, joined to the shards' labels."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = work / (run_dir.name + "-embed")
    if not out.exists():
        subprocess.run([sys.executable, "-m", "raydc.cli", "embed", "--run", str(run_dir), "--data", str(shards),
                        "--out", str(out)], check=True)
    t = pa.concat_tables([pq.read_table(f) for f in sorted(out.glob("*.parquet"))])
    ids = t.column("id").to_numpy()
    x = np.stack(t.column("embedding").to_numpy(zero_copy_only=False)).astype(np.float32)
    lab = pa.concat_tables([pq.read_table(f, columns=["id", "label"]) for f in sorted(shards.glob("*.parquet"))])
    by_id = dict(zip(lab.column("id").to_numpy().tolist(), lab.column("label").to_numpy().tolist()))
    return ids, x, np.array([by_id[i] for i in ids.tolist()], np.int64)


def readouts(x: np.ndarray, k: int, sample: int, seed: int) -> dict[str, tuple[np.ndarray, float]]:
    import umap
    from sklearn.cluster import KMeans
    from sklearn.mixture import GaussianMixture

    from raydc.core.kmeans import kmeans
    from raydc.core.merge import vote_labels

    out: dict[str, tuple[np.ndarray, float]] = {}
    t = time.perf_counter()
    out["kmeans"] = (kmeans(x, k, niter=50, seed=seed, n_init=10).labels, time.perf_counter() - t)
    rng = np.random.default_rng(seed)
    idx = np.sort(rng.choice(len(x), size=min(sample, len(x)), replace=False))
    t = time.perf_counter()
    z = umap.UMAP(n_components=10, n_neighbors=20, min_dist=0.0, metric="cosine", random_state=seed
                  ).fit_transform(x[idx])
    t_umap = time.perf_counter() - t
    for name, fit in (("umap_gmm", lambda: GaussianMixture(k, covariance_type="full", n_init=5,
                                                          random_state=seed).fit_predict(z)),
                      ("umap_kmeans", lambda: KMeans(k, n_init=10, random_state=seed).fit_predict(z))):
        t = time.perf_counter()
        sample_labels = np.asarray(fit(), np.int64)
        labels = vote_labels(x, x[idx], sample_labels, k, n_neighbors=10)[0]
        labels[idx] = sample_labels  # the sample keeps the clusters fitted on it
        out[name] = (labels, t_umap + time.perf_counter() - t)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", action="append", required=True, help="LABEL:RUN_DIR:SHARD_DIR:COMMIT")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--work", type=Path, default=Path("tmp/manifold"))
    ap.add_argument("--sample", type=int, default=20_000)
    ap.add_argument("--k", type=int, default=10)
    args = ap.parse_args(argv)
    from raydc.core.metrics import acc, nmi
    from raydc.config_loader import read_yaml
    from raydc.engine.rundir import parse_metrics

    args.work.mkdir(parents=True, exist_ok=True)
    rows = []
    for spec in args.run:
        label, run_dir, shards, commit = spec.split(":")
        run = Path(run_dir)
        final = [r for r in parse_metrics((run / "metrics.jsonl").read_text(), run_dir) if r.get("final")][-1]
        seed = int(read_yaml(run / "config.yaml")["train"]["seed"])
        ids, x, y = load_features(run, Path(shards), args.work)
        row = {"label": label, "run_dir": str(run.resolve()), "commit": commit, "images": len(ids),
               "shipped": {"acc": final.get("acc"), "nmi": final.get("nmi"),
                           "train_k_acc_majority": final.get("train_k_acc_majority")}, "readouts": {}}
        for name, (pred, seconds) in readouts(x, args.k, args.sample, seed).items():
            row["readouts"][name] = {"acc": float(acc(y, pred)), "nmi": float(nmi(y, pred)),
                                     "seconds": round(seconds, 1)}
        rows.append(row)
        print(label, "shipped", f"{row['shipped']['acc']:.4f}",
              " ".join(f"{n} {r['acc']:.4f}" for n, r in row["readouts"].items()), flush=True)
        args.out.write_text(json.dumps({"benchmark": "manifold_readout", "machine": machine_info(),
                                        "sample": args.sample, "k": args.k, "runs": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
