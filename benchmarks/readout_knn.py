"""UMAP's neighbour graph in the manifold readout: its own NN-descent against an exact faiss search (issue #27).

For each finished 70k run (its final features written by `raydc embed`, as `manifold_readout.py` leaves them):
one uniform sample of 20,000 images (numpy seed 0), the readout fitted on it with UMAP and mixture seed 0 (10
dimensions, 20 neighbours, min_dist 0, cosine, full-covariance mixture with 5 initialisations), every image then
placed by the vote of its 10 nearest sample images; once with the neighbour graph from UMAP's NN-descent
(pynndescent, what raydc's readout uses) and once from `raydc.core.merge.exact_neighbors` (faiss flat search,
distances per pair in float64), handed to UMAP as `precomputed_knn`. Each fit runs in a process of its own, as a run's readout does,
so numba's compile counts: pynndescent compiles its distance-specialised kernels anew in every process. Seconds
are the fit's (UMAP + mixture), not the vote's; labels only score.

    python -m benchmarks.readout_knn --embed-dir tmp/manifold --out benchmarks/results/readout_knn.json \
        --run "MNIST 70k, seed 31:deepcluster_mnist70k-seed31:shards/mnist" ...
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

VARIANTS = ("nndescent", "exact")


def fit(features: Path, variant: str) -> dict:
    """One readout fit in this process: {seconds, labels of the sample, sample indices}."""
    import warnings

    import umap
    from sklearn.mixture import GaussianMixture

    from raydc.core.merge import exact_neighbors

    x = np.load(features)
    rng = np.random.default_rng(0)
    idx = np.sort(rng.choice(len(x), min(20_000, len(x)), replace=False))
    s = np.ascontiguousarray(x[idx], np.float32)
    t = time.perf_counter()
    kw = {}
    if variant == "exact":
        kw["precomputed_knn"] = exact_neighbors(s, 20, "cosine")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z = umap.UMAP(n_components=10, n_neighbors=20, min_dist=0.0, metric="cosine", random_state=0, n_jobs=1,
                      **kw).fit_transform(s)
    lab = GaussianMixture(10, covariance_type="full", n_init=5, random_state=0).fit(z).predict(z)
    return {"seconds": time.perf_counter() - t, "idx": idx.tolist(), "labels": lab.tolist()}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--embed-dir", type=Path)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--run", action="append", default=[], help="LABEL:RUN_NAME:SHARDS")
    ap.add_argument("--fit", nargs=3, metavar=("FEATURES", "VARIANT", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.fit:
        Path(args.fit[2]).write_text(json.dumps(fit(Path(args.fit[0]), args.fit[1])))
        return 0

    from benchmarks.manifold_readout import load_features
    from raydc.core.merge import vote_labels
    from raydc.core.metrics import acc, nmi

    rows = []
    t0 = time.perf_counter()
    for spec in args.run:
        label, name, shards = spec.rsplit(":", 2)
        _, x, y = load_features(args.embed_dir / name, Path(shards), args.embed_dir)
        feats = args.embed_dir / f"{name}-features.npy"
        np.save(feats, x)
        row: dict = {"label": label, "run": name}
        for v in VARIANTS:
            out = args.embed_dir / f"{name}-{v}.json"
            subprocess.run([sys.executable, "-m", "benchmarks.readout_knn", "--fit", str(feats), v, str(out)],
                           check=True)
            r = json.loads(out.read_text())
            idx, sample_labels = np.array(r["idx"]), np.array(r["labels"])
            lab = vote_labels(x, x[idx], sample_labels, 10, 10)[0]
            lab[idx] = sample_labels
            row[v] = {"seconds": r["seconds"], "acc": float(acc(y, lab)), "nmi": float(nmi(y, lab))}
            print(f"{label} {v}: {r['seconds']:.1f} s, ACC {row[v]['acc']:.4f}", flush=True)
        feats.unlink()
        rows.append(row)
    doc = {"benchmark": "readout_knn", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "wall_s": time.perf_counter() - t0, "machine": machine_info(),
           "config": {"sample": 20_000, "umap": "10 dims, 20 neighbours, min_dist 0, cosine, seed 0, n_jobs 1",
                      "mixture": "full covariance, 5 initialisations, seed 0", "vote": 10,
                      "seconds": "UMAP + mixture in a fresh process (numba's compile included)"},
           "runs": rows}
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
