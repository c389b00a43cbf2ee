"""Collect DAC A/B runs (one change each against the shipped `dac_mnist.yaml`) into one result file.

Each run is a finished run directory; what is compared is the clustering after its first round of training
(th = 0.9: the row of epoch 1, or the final row of a one-round run), which is where raydc and the reference
diverge first (the official MNIST log: ACC 0.956 after one epoch of 70,000 images). Usage:

    python -m benchmarks.dac_ab --out benchmarks/results/dac_ab.json \
        --run "bf16, augmentation (shipped):runs/ab-aug1:b982564" --run "fp32:runs/ab-fp32:b982564" ...

Each --run is LABEL:DIR:COMMIT (the commit the run's worktree was pinned to). The overrides are read back from
the run's own config.yaml, so the file says what was run. `--append` adds the runs to the file's existing ones
(a run left going is collected as far as it got; collecting the same run directory again replaces its row).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
from pathlib import Path


def after_first_round(rows: list[dict]) -> dict:
    """The row that reports the clustering after round 0's training."""
    for r in rows:
        if r.get("epoch") == 1 or (r.get("final") and r.get("epoch", 1) >= 1):
            return r
    raise ValueError("the run has no row after its first round")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--run", action="append", required=True, help="LABEL:DIR:COMMIT")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--what", default="DAC, MNIST test 10,000 images, seed 31: one round at th 0.9")
    ap.add_argument("--append", action="store_true", help="keep the file's runs and add these")
    args = ap.parse_args(argv)
    from raydc.config_loader import read_yaml
    from raydc.engine.rundir import parse_metrics

    old = json.loads(args.out.read_text()) if args.append and args.out.exists() else None
    runs = list(old["runs"]) if old else []
    for spec in args.run:
        label, run_dir, commit = spec.rsplit(":", 2)
        rows = parse_metrics(Path(run_dir, "metrics.jsonl").read_text(), run_dir)
        r = after_first_round(rows)
        cfg = read_yaml(Path(run_dir, "config.yaml"))
        row = {"label": label, "run_dir": os.path.abspath(run_dir), "commit": commit,
                "precision": r.get("precision") or rows[0].get("precision"),
                "dac": cfg.get("dac"), "train": {k: cfg["train"].get(k) for k in ("seed", "precision", "epochs")},
                "acc": r.get("acc"), "nmi": r.get("nmi"), "ari": r.get("ari"),
                "acc_by_round": [x.get("acc") for x in rows if x.get("acc") is not None],
                "round0_loss": rows[0].get("loss"), "round0_images_per_s": rows[0].get("images_per_s_train"),
                "rounds": sum(1 for x in rows if not x.get("final")),
                "wall_s_rounds": round(sum(float(x.get("time_round") or 0) for x in rows), 1)}
        # a run collected again (one left going, read after more rounds) replaces its row where it stood
        same = [i for i, old_row in enumerate(runs) if old_row["run_dir"] == row["run_dir"]]
        if same:
            runs[same[0]] = row
        else:
            runs.append(row)
        print(f"{label}: ACC {r.get('acc')}, NMI {r.get('nmi'):.3f}")
    what = old["what"] if old else args.what
    doc = {"benchmark": "dac_ab", "what": what, "machine": platform.node(), "runs": runs}
    if old and old.get("groups"):  # the 3-seed summaries RESULTS.md draws from these runs (edited by hand)
        doc["groups"] = old["groups"]
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
