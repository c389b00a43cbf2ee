"""One sweep trial: a Tune function trainable that runs a whole raydc run (its own TorchTrainer), as the Ray
docs recommend for Train V2 (`Tuner(fn)`, Train's metrics reaching Tune through its report callback).

Every round's numeric row reaches Tune as it is reported, so a scheduler can stop a bad trial early; the final
row (the selection scores) is read from the run directory after the fit and reported last. The run directory
is `<sweep>/runs/<trial id>`, and the run is always started with resume: a trial that Tune restarts (after
`raydc sweep --resume`, or an error) continues its run from the last checkpoint instead of starting over.
"""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from raydc import storage
from raydc.engine.console import LineSink
from raydc.engine.rundir import RunDir

ATTEMPTS_FILE = "attempts.log"


def under(base: Path | str, *parts: str) -> Path | str:
    """`base / parts` for the sweep directory, which is a Path on local disk and a URI string on object storage
    (where `Path` would turn `s3://b/x` into `s3:/b/x`)."""
    return base.joinpath(*parts) if isinstance(base, Path) else storage.join(base, *parts)


def parent_of(location: Path | str) -> Path | str:
    return location.parent if isinstance(location, Path) else str(location).rstrip("/").rsplit("/", 1)[0]


class RoundReport(TuneReportCallback):
    """Train's reports, minus the loop's end-of-run marker: Tune reads `done` in a result as the end of the
    trial, which would end it before the final row is reported."""

    def after_report(self, run_context, metrics, checkpoint):
        row = dict(metrics[0])
        if row.pop("done", None) is not None:
            return
        super().after_report(run_context, [row], checkpoint)


def final_row(rows: list[dict]) -> dict | None:
    """The final clustering's row, with the last training round's loss (DEC's KL, DAC's pair loss): the final
    row itself trains nothing, so it has no loss of its own."""
    if not rows or not rows[-1].get("final"):
        return None
    losses = [r["loss"] for r in rows[:-1] if isinstance(r.get("loss"), (int, float))]
    return {**rows[-1], **({"loss": losses[-1]} if losses and "loss" not in rows[-1] else {})}


def numeric(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def run_trial(config: dict[str, Any], *, base: dict, sweep_dir: str, lines: LineSink | None = None) -> None:
    from ray import tune

    from raydc.engine.trainer import run_training
    from raydc.sweep.space import trial_config
    from raydc.tracking import for_trial

    trial_id = tune.get_context().get_trial_id()
    run_dir = storage.join(sweep_dir, "runs", trial_id)  # a local path or a URI, as the sweep directory is
    storage.makedirs(run_dir)
    done = final_row(RunDir(run_dir).read_metrics())
    # Tune saves its experiment state every few seconds, not on each trial's end: a sweep killed in between
    # restarts a trial whose run had finished. Its final row is the run's result; report it, do not redo it.
    action = "reuse" if done is not None else "resume" if RunDir(run_dir).latest_checkpoint() else "train"
    attempts = storage.join(run_dir, ATTEMPTS_FILE)
    before = storage.read_text(attempts) if storage.is_file(attempts) else ""
    storage.write_text_atomic(attempts, before + json.dumps({"started": time.time(), "action": action,
                                                             "params": config}) + "\n")
    t0 = time.perf_counter()
    if done is None:
        cfg = for_trial(trial_config(base, config, str(run_dir)), sweep_dir)
        # The trial's lines and its Train workers' go straight to the sweep's console, prefixed.
        log = (lines or LineSink()).with_prefix(f"[trial {trial_id}] ")
        run = run_training(cfg, resume=True, callbacks=[RoundReport()], log=log, lines=log)
        done = final_row(run.read_metrics())
        if done is None:
            raise RuntimeError(f"run {run.location} ended without a final metrics row")
    tune.report({**numeric(done), "final": 1, "trial_wall_s": time.perf_counter() - t0})
