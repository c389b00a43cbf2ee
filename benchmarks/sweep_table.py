"""Collect a finished `raydc sweep` directory into a result file: what the label-free selection picked, every
trial's scores, and how the selection metric ranks the trials against ACC (evaluation only).

The sweep itself is run from a worktree pinned to a commit (its trials take minutes each); this reads its
`summary.json` and `trials.csv`, so the figures in RESULTS.md come from a committed file. Usage:

    python -m benchmarks.sweep_table --sweep runs/sweeps/k_dec_demo --commit COMMIT \
        --label "DEC, k over {5, 10, 15, 20}, MNIST test 10k" --out benchmarks/results/sweep_dec_k.json

`--append` keeps the file's other sweeps (a sweep collected again replaces its entry).
"""
from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

from benchmarks.common import machine_info

SCORES = ("silhouette", "calinski_harabasz", "ae_kmeans_stability", "ae_manifold_silhouette", "nmi_prev", "loss",
          "acc", "nmi", "ari")


def _number(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def collect(sweep_dir: Path, label: str, commit: str) -> dict:
    summary = json.loads((sweep_dir / "summary.json").read_text())
    with (sweep_dir / "trials.csv").open() as f:
        rows = list(csv.DictReader(f))
    sweep = (sweep_dir / "sweep.yaml").read_text() if (sweep_dir / "sweep.yaml").exists() else ""
    params = [c for c in (rows[0] if rows else {}) if "." in c]  # swept fields are dotted config paths
    trials = [{"trial_id": r.get("trial_id"), "status": r.get("status"),
               "params": {p: r[p] if (v := _number(r[p])) is None else v for p in params},
               "wall_s": _number(r.get("wall_s")),
               **{s: v for s in SCORES if (v := _number(r.get(s))) is not None}} for r in rows]
    return {"label": label, "commit": commit, "sweep_dir": str(sweep_dir.resolve()), "sweep_yaml": sweep,
            "selection": summary["selection"], "best": summary["best"], "best_params": summary["best_params"],
            "best_score": summary["best_score"], "labels": summary.get("labels"), "trials": trials}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sweep", type=Path, required=True, help="a finished sweep directory")
    ap.add_argument("--label", required=True)
    ap.add_argument("--commit", required=True, help="the commit the sweep's worktree was pinned to")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--append", action="store_true")
    args = ap.parse_args(argv)
    old = json.loads(args.out.read_text()) if args.append and args.out.exists() else None
    entry = collect(args.sweep, args.label, args.commit)
    sweeps = [s for s in (old["sweeps"] if old else []) if s["label"] != args.label] + [entry]
    args.out.write_text(json.dumps({"benchmark": "sweep_table", "machine": machine_info(),
                                    "sweeps": sweeps}, indent=1) + "\n")
    print(f"{args.label}: best {entry['best_params']} ({entry['selection']})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
