"""`raydc evaluate`: a run's assignments against the labels its shards carry (never used in training)."""
from __future__ import annotations

from pathlib import Path

from raydc.config import load_config
from raydc.core import metrics as M
from raydc.errors import UserError


def evaluate_run(run_dir: str, nmi_method: str = "arithmetic") -> dict:
    from raydc.data.manifest import load_manifest
    from raydc.engine.rundir import RunDir
    from raydc.runreport import _labels_for

    run = RunDir(run_dir)
    cfg = load_config(str(run.path / "config.yaml"))
    manifest = load_manifest(cfg.data.shards)
    if not manifest.has_labels:
        raise UserError(f"the shards at {cfg.data.shards} carry no labels: nothing to evaluate against")
    if not (run.path / "assignments.parquet").exists():
        raise UserError(f"{run.path} has no assignments.parquet yet: the run has not finished")
    a = run.read_assignments()
    labels = _labels_for(cfg.data.shards, manifest, a["id"])
    out = M.evaluate(labels, a["cluster"], average_method=nmi_method)
    out["majority_acc"] = M.majority_acc(labels, a["cluster"])
    out["images"] = int(len(labels))
    return out
