"""Probe finished runs of the shipped configs (k-NN and linear, train split -> test split) into one result file.

The probes in `bench_probes.py` are a small, self-contained check the suite can rerun; this table is about the
networks the shipped configs actually produce, which take minutes to hours each, so it collects run
directories that already exist (each trained from a worktree pinned to the commit given) instead of training
them itself. Usage:

    python -m benchmarks.probe_table --out benchmarks/results/probe_table.json \
        --run "DeepCluster, mnist.yaml:runs/dc-mnist:COMMIT" --run "untrained:runs/dc-mnist-e0:COMMIT" ...

Each --run is LABEL:DIR:COMMIT[:TRAIN_SPLIT:TEST_SPLIT] (default train -> test of the run's own data.source;
a shard directory works as a split too, for transfer to another dataset). `--append` keeps the file's rows.
What the network saw while it trained is in each row (`data.source`, `data.split`): a run on all 70,000
images has seen the test images, without their labels, as every clustering paper's MNIST run has.
"""
from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path


def _arch(cfg: dict) -> str:
    """DEC's network is its autoencoder (model.ae_dims); model.arch is not used by it."""
    if cfg["method"] == "dec":
        return "autoencoder d-" + "-".join(str(d) for d in cfg["model"]["ae_dims"])
    return cfg["model"]["arch"]


def collect(label: str, run_dir: str, commit: str, train_split: str, test_split: str) -> dict:
    from raydc.config_loader import read_yaml
    from raydc.engine.probe import probe_runs
    from raydc.engine.rundir import parse_metrics

    rows = parse_metrics(Path(run_dir, "metrics.jsonl").read_text(), run_dir)
    final = next((r for r in reversed(rows) if r.get("final")), rows[-1])
    cfg = read_yaml(Path(run_dir, "config.yaml"))
    probes = probe_runs(run_dir, ("knn", "linear"), train_split, test_split)
    drop = ("probe", "path", "run", "method", "arch", "train_shards", "test_shards")
    return {"label": label, "run_dir": str(Path(run_dir).resolve()), "commit": commit,
            "method": cfg["method"], "arch": _arch(cfg), "weights": cfg["model"].get("weights"),
            "trained_on": f"{cfg['data'].get('source')} {cfg['data'].get('split')}",
            "epochs": cfg["train"]["epochs"], "seed": cfg["train"]["seed"],
            "final": {k: final.get(k) for k in ("acc", "nmi", "ari", "epoch")},
            "train_split": train_split, "test_split": test_split,
            "probes": {p: {k: v for k, v in r.items() if k not in drop} for p, r in probes.items()}}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", action="append", required=True, help="LABEL:DIR:COMMIT[:TRAIN_SPLIT:TEST_SPLIT]")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--append", action="store_true", help="keep the file's rows and add these")
    args = ap.parse_args(argv)
    old = json.loads(args.out.read_text()) if args.append and args.out.exists() else None
    rows = list(old["runs"]) if old else []
    for spec in args.run:
        parts = spec.split(":")
        label, run_dir, commit = parts[:3]
        train_split, test_split = (parts[3], parts[4]) if len(parts) >= 5 else ("train", "test")
        row = collect(label, run_dir, commit, train_split, test_split)
        rows = [r for r in rows if r["label"] != label] + [row]
        print(f"{label}: " + ", ".join(f"{k} {v:.3f}" for p in row["probes"].values() for k, v in p.items()
                                       if isinstance(v, float) and "top1" in k))
    args.out.write_text(json.dumps({"benchmark": "probe_table", "machine": platform.node(), "runs": rows},
                                   indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
