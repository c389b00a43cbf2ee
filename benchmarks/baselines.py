"""What a user might try before raydc, on the same 70,000 images: scikit-learn's k-means on the raw pixels, and
UMAP of the raw pixels followed by k-means (the N2D recipe without its autoencoder). Wall seconds and ACC/NMI,
for the time-to-quality table in RESULTS.md (issue #27), beside raydc's shipped configs.

Reads the images from prepared shard directories (`raydc prepare`; raw 28x28 gray), scaled to [0, 1]. No
labels are used except to score. Usage (umap-learn on the path; it is not a dependency of raydc):

    python -m benchmarks.baselines --out benchmarks/results/baselines.json \
        --data "MNIST 70k:shards/mnist" --data "Fashion-MNIST 70k:shards/fashionmnist"
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import machine_info


def load_pixels(shards: Path) -> tuple[np.ndarray, np.ndarray]:
    """(N x 784 float32 in [0, 1], labels) from raw-encoded shards, in shard and row order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.concat_tables([pq.read_table(f, columns=["image", "label"]) for f in sorted(shards.glob("*.parquet"))])
    images = np.frombuffer(b"".join(t.column("image").to_pylist()), np.uint8).reshape(t.num_rows, -1)
    return images.astype(np.float32) / 255.0, t.column("label").to_numpy().astype(np.int64)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", action="append", required=True, help="LABEL:SHARD_DIR")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--k", type=int, default=10)
    ap.add_argument("--seeds", default="0,1,2", help="k-means seeds (UMAP runs once, with the first)")
    args = ap.parse_args(argv)
    import umap
    from sklearn.cluster import KMeans

    from raydc.core.metrics import acc, nmi

    seeds = [int(s) for s in args.seeds.split(",")]
    doc: dict = {"benchmark": "baselines", "machine": machine_info(), "k": args.k,
                 "what": "scikit-learn KMeans (k-means++, n_init 10, lloyd) on raw pixels in [0, 1]; UMAP (10 "
                         "dimensions, 20 neighbours, min_dist 0, euclidean, all images) then the same KMeans",
                 "data": {}}
    for spec in args.data:
        label, shards = spec.split(":", 1)
        x, y = load_pixels(Path(shards))
        runs: dict = {"sklearn_kmeans": [], "umap_kmeans": []}
        for seed in seeds:
            t = time.perf_counter()
            pred = KMeans(args.k, n_init=10, random_state=seed).fit_predict(x)
            runs["sklearn_kmeans"].append({"seed": seed, "acc": acc(y, pred), "nmi": nmi(y, pred),
                                           "seconds": round(time.perf_counter() - t, 1)})
        t = time.perf_counter()
        z = umap.UMAP(n_components=10, n_neighbors=20, min_dist=0.0, random_state=seeds[0]).fit_transform(x)
        t_umap = time.perf_counter() - t
        for seed in seeds:
            t = time.perf_counter()
            pred = KMeans(args.k, n_init=10, random_state=seed).fit_predict(z)
            runs["umap_kmeans"].append({"seed": seed, "acc": acc(y, pred), "nmi": nmi(y, pred),
                                        "seconds": round(t_umap + time.perf_counter() - t, 1)})
        doc["data"][label] = {"images": len(y), "shards": str(Path(shards).resolve()), "runs": runs}
        print(label, {n: [round(r["acc"], 4) for r in rs] for n, rs in runs.items()}, flush=True)
        args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
