"""`raydc evaluate`: a run's assignments against the labels its shards carry (never used in training)."""
from __future__ import annotations


from raydc.config import load_config
from raydc.core import metrics as M
from raydc.errors import UserError


def open_run(run_dir: str):
    """The run directory and its saved config. `--run` is the user's only input to `evaluate` and `report`:
    a typo must be reported as a wrong run directory, not as a missing config file they never named."""
    from raydc.engine.rundir import RunDir

    run = RunDir(run_dir)
    if not run.path.is_dir():
        what = "is not a directory" if run.path.exists() else "does not exist"
        raise UserError(f"run directory {run.path} {what} (--run)")
    if not (run.path / "config.yaml").is_file():
        raise UserError(f"{run.path} is not a raydc run directory: it has no config.yaml (--run names the "
                        f"run.dir of a `raydc train`)")
    return run, load_config(str(run.path / "config.yaml"))


def evaluate_run(run_dir: str, nmi_method: str = "arithmetic") -> dict:
    from raydc.data.manifest import load_manifest
    from raydc.runreport import RowLabels

    run, cfg = open_run(run_dir)
    manifest = load_manifest(cfg.data.shards)
    if not manifest.has_labels:
        raise UserError(f"the shards at {cfg.data.shards} carry no labels: nothing to evaluate against")
    if not run.has_assignments():
        raise UserError(f"{run.path} has no assignments yet: the run has not finished")
    labels = RowLabels(cfg.data.shards, manifest)
    parts = []
    for b in run.assignment_batches(["row", "cluster"]):  # (label, cluster) pair counts, then the scores
        parts.append(M.PairCounts.of(labels(b["row"]), b["cluster"]))
        if len(parts) > 16:
            parts = [M.PairCounts.merge(parts)]
    pairs = M.PairCounts.merge(parts)
    out = M.evaluate_counts(pairs, average_method=nmi_method)
    out["majority_acc"] = M.majority_acc_counts(pairs)
    out["images"] = pairs.n
    return out
