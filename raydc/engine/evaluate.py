"""`raydc evaluate`: a run's assignments against the labels its shards carry (never used in training)."""
from __future__ import annotations


from raydc.core import metrics as M
from raydc.errors import UserError


def open_run(run_dir: str):
    """The run directory and its saved config. `--run` is the user's only input to `evaluate` and `report`:
    a typo must be reported as a wrong run directory, not as a missing config file they never named."""
    from raydc.engine.rundir import RunDir

    from raydc import storage
    from raydc.config import load_config_text

    run = RunDir(run_dir)
    if not storage.exists(run.location) or storage.is_file(run.location):
        what = "is not a directory" if storage.exists(run.location) else "does not exist"
        raise UserError(f"run directory {run.location} {what} (--run)")
    text = run.read_config_text()
    if text is None:
        raise UserError(f"{run.location} is not a raydc run directory: it has no config.yaml (--run names the "
                        f"run.dir of a `raydc train`)")
    return run, load_config_text(text, run.join("config.yaml"))


def evaluate_run(run_dir: str, nmi_method: str = "arithmetic") -> dict:
    from raydc.data.manifest import load_manifest
    from raydc.run_report import RowLabels

    run, cfg = open_run(run_dir)
    manifest = load_manifest(cfg.data.shards)
    if not manifest.has_labels:
        raise UserError(f"the shards at {cfg.data.shards} carry no labels: nothing to evaluate against")
    if not run.has_assignments():
        raise UserError(f"{run.location} has no assignments yet: the run has not finished")
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
