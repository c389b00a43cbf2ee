"""What the final clusters of finished runs confuse: each class's share in the cluster matched to it, and the
largest groups of a class that sit in another class's cluster.

A final ACC says how much is wrong, not what. Two runs at 0.967 can miss in the same place (one sub-population
glued to another class) or in many, and only the first is something a readout could be asked to fix. Clusters
are matched to classes one to one as ACC does (Hungarian); labels only score. Usage:

    python -m benchmarks.confusion --out benchmarks/results/confusion.json \
        --run "LABEL:RUN_DIR:SHARDS:COMMIT" ...

`--append` keeps the file's rows (a label given again replaces its row). Each row also carries the run's
minutes in rounds and its final row's scores (for DEC: the AE + k-means start, argmax q and the readout).
`--config NAME` marks a run as a shipped config's full run (`dec_mnist_keras.yaml`), which RESULTS'
time-to-quality table lists.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

CLASS_NAMES = {
    "mnist": [str(d) for d in range(10)],
    "fashionmnist": ["T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"],
}


def _column(files: list[Path], names: list[str]) -> dict[str, np.ndarray]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    t = pa.concat_tables([pq.read_table(f, columns=names) for f in files])
    return {n: t.column(n).to_numpy() for n in names}


def confusion(run_dir: Path, shards: Path) -> tuple[np.ndarray, np.ndarray]:
    """(classes x clusters counts, each class's matched cluster) from the run's assignments and the shards'
    labels, joined on the image id."""
    from raydc.core.metrics import matched_confusion

    got = _column(sorted((run_dir / "assignments").glob("*.parquet")), ["id", "cluster"])
    lab = _column(sorted(shards.glob("*.parquet")), ["id", "label"])
    order = np.argsort(lab["id"])
    pos = np.searchsorted(lab["id"], got["id"], sorter=order)
    return matched_confusion(lab["label"][order[pos]].astype(np.int64), got["cluster"].astype(np.int64))


def summarise(counts: np.ndarray, matched: np.ndarray, names: list[str], top: int = 4) -> dict:
    n = int(counts.sum())
    owner = {int(c): i for i, c in enumerate(matched)}  # cluster -> the class it is matched to
    own = [int(counts[i, matched[i]]) for i in range(len(matched))]
    wrong = [(int(counts[i, c]), i, int(c)) for i in range(counts.shape[0]) for c in range(counts.shape[1])
             if c != matched[i] and counts[i, c] > 0]
    wrong.sort(reverse=True)
    return {
        "acc": sum(own) / n,
        "n": n,
        "class_share_in_own_cluster": {names[i]: own[i] / max(int(counts[i].sum()), 1) for i in range(len(own))},
        "largest_misplaced": [{"class": names[i], "in_cluster_of": names[owner[c]] if c in owner else f"cluster {c}",
                               "images": v, "share_of_all": v / n} for v, i, c in wrong[:top]],
        "cluster_sizes": counts.sum(axis=0).tolist(),
        "counts": counts.tolist(),
    }


def _run_summary(run_dir: Path) -> dict:
    """The run's minutes in rounds (the sum of `time_round`: start-up and the gaps between a stop and a resume
    are not in it) and its final row's scores."""
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    final = rows[-1]
    keys = ("acc", "nmi", "ari", "stop_reason", "readout", "ae_kmeans_acc", "dec_acc", "dec_nmi")
    return {"wall_s_rounds": sum(r.get("time_round") or 0.0 for r in rows),
            "final": {k: final.get(k) for k in keys if final.get(k) is not None}}


def main(argv: list[str] | None = None) -> int:
    from raydc.config_loader import read_yaml

    ap = argparse.ArgumentParser()
    ap.add_argument("--run", action="append", required=True, help="LABEL:RUN_DIR:SHARDS:COMMIT")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--append", action="store_true")
    ap.add_argument("--config", help="the shipped config the run(s) ran, for the time-to-quality table")
    args = ap.parse_args(argv)
    doc = json.loads(args.out.read_text()) if args.append and args.out.exists() else {"runs": []}
    for spec in args.run:
        label, run_dir, shards, commit = spec.rsplit(":", 3)
        run_cfg = read_yaml(Path(run_dir, "config.yaml"))
        source = run_cfg["data"]["source"]
        counts, matched = confusion(Path(run_dir), Path(shards))
        row = {"label": label, "run_dir": run_dir, "commit": commit, "source": source,
               **summarise(counts, matched, CLASS_NAMES.get(source, [str(i) for i in range(len(matched))]))}
        row.update(method=run_cfg["method"], **_run_summary(Path(run_dir)))
        if args.config:
            row["config"] = args.config
        doc["runs"] = [r for r in doc["runs"] if r["label"] != label] + [row]
        worst = ", ".join(f"{m['images']} {m['class']} in {m['in_cluster_of']}" for m in row["largest_misplaced"])
        print(f"{label}: ACC {row['acc']:.4f}; largest misplaced: {worst}")
    doc["benchmark"] = "confusion"
    args.out.write_text(json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
