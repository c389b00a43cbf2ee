"""How much DeepCluster's umap readout moves with its own seeds, on fixed features (issue #30).

For each finished 70k run (its final features written by `raydc embed`, as `manifold_readout.py` does): one
uniform sample of 20,000 images (numpy seed 0), then R restarts of the readout on that sample, restart r with
UMAP and Gaussian-mixture seed r (10 dimensions, 20 neighbours, min_dist 0, cosine; full covariance, 5
initialisations), every image placed by the vote of its 10 nearest sample images. Per restart, beside ACC (labels
only score): label-free scores a readout could be chosen by: the mixture's mean log-likelihood in its own UMAP
space, the silhouette (cosine) of 5,000 images in feature space, and the restart's mean adjusted Rand index with
the other restarts (`consensus`, what `deepcluster.final_umap_restarts` keeps the best of).

    python -m benchmarks.readout_restarts --embed-dir tmp/manifold --out benchmarks/results/readout_restarts.json \
        --run "MNIST 70k, seed 31:deepcluster_mnist70k-seed31:shards/mnist" ...

`--embed-dir` holds `<name>-embed/` folders (`raydc embed` output) as `manifold_readout.py --work` leaves them.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine_info


def restarts(x: np.ndarray, y: np.ndarray, k: int, n_restarts: int, sample: int) -> list[dict]:
    import umap
    from sklearn.metrics import silhouette_score
    from sklearn.mixture import GaussianMixture

    from raydc.core.merge import consensus_partition, vote_labels
    from raydc.core.metrics import acc, nmi

    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(len(x), min(sample, len(x)), replace=False))
    ev = np.sort(rng.choice(len(x), min(5000, len(x)), replace=False))
    rows, labels = [], []
    for s in range(n_restarts):
        t = time.perf_counter()
        z = umap.UMAP(n_components=10, n_neighbors=20, min_dist=0.0, metric="cosine", random_state=s,
                      n_jobs=1).fit_transform(x[idx])
        g = GaussianMixture(k, covariance_type="full", n_init=5, random_state=s).fit(z)
        sample_labels = g.predict(z)
        lab = vote_labels(x, x[idx], sample_labels, k, 10)[0]
        lab[idx] = sample_labels
        labels.append(lab)
        rows.append({"seed": s, "acc": float(acc(y, lab)), "nmi": float(nmi(y, lab)),
                     "log_likelihood": float(g.score(z)),
                     "silhouette": float(silhouette_score(x[ev], lab[ev], metric="cosine")),
                     "seconds": round(time.perf_counter() - t, 1)})
    for r, agreement in zip(rows, consensus_partition(labels)[1]):
        r["consensus"] = float(agreement)
    return rows


def main(argv: list[str] | None = None) -> int:
    from benchmarks.manifold_readout import load_features

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", action="append", required=True, help="LABEL:EMBED_NAME:SHARD_DIR")
    ap.add_argument("--embed-dir", type=Path, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--restarts", type=int, default=5)
    ap.add_argument("--sample", type=int, default=20_000)
    args = ap.parse_args(argv)
    runs = []
    for spec in args.run:
        label, name, shards = spec.split(":")
        _, x, y = load_features(Path("/nonexistent") / name, Path(shards), args.embed_dir)
        rows = restarts(x, y, 10, args.restarts, args.sample)
        runs.append({"label": label, "embed": name, "restarts": rows})
        print(label, " ".join(f"{r['acc']:.4f}" for r in rows), flush=True)
        args.out.write_text(json.dumps({"benchmark": "readout_restarts", "machine": machine_info(),
                                        "sample": args.sample, "k": 10, "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
