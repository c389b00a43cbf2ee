"""What a sweep leaves in its directory besides Tune's own results: `trials.csv`, `best.yaml`, `report/`.

Everything is rebuilt from the run directories and Tune's results, never kept in memory across a resume, so a
resumed sweep writes the same files as one that never stopped.
"""
from __future__ import annotations

import csv
import io
import json
import math
import re
from pathlib import Path
from typing import Any

from raydc.config import Config
from raydc import storage
from raydc.config_loader import from_dict, parse_yaml
from raydc.engine.rundir import RunDir
from raydc.sweep.config import Param, SweepConfig
from raydc.sweep.select import LabelAgreement, TrialRecord, metric_columns, selection_label
from raydc.sweep.trial import ATTEMPTS_FILE, final_row, parent_of, under

_TRIAL_ID = re.compile(r"_([0-9a-f]{5}_\d{5})_")


def record_from_result(result, sweep_dir: Path | str, params: list[Param], scheduled: bool) -> TrialRecord:
    """One trial's record from its Tune result and its run directory (the run's final row is the truth)."""
    metrics = result.metrics or {}
    trial_id = metrics.get("trial_id")
    if not trial_id:
        m = _TRIAL_ID.search(Path(result.path).name)
        trial_id = m.group(1) if m else Path(result.path).name
    run = RunDir(under(sweep_dir, "runs", trial_id))
    rows = run.read_metrics()
    final = final_row(rows)
    attempts_path = run.join(ATTEMPTS_FILE)
    attempts = len(storage.read_text(attempts_path).splitlines()) if storage.is_file(attempts_path) else 0
    if result.error is not None:
        status = "error"
    elif metrics.get("final") and final is not None:
        status = "done"
    else:
        status = "stopped" if scheduled else "unfinished"
    config = result.config or {}
    return TrialRecord(
        trial_id=trial_id, params={p.name: config.get(p.name) for p in params}, status=status, final=final,
        wall_s=metrics.get("time_total_s"), run_dir=run.location if storage.exists(run.location) else None,
        attempts=attempts, error=_first_line(result.error), rows=rows)


def _first_line(err) -> str | None:
    if err is None:
        return None
    lines = [ln for ln in str(err).splitlines() if ln.strip()]
    return lines[-1][:300] if lines else type(err).__name__


def write_trials_csv(path: Path | str, records: list[TrialRecord], sweep: SweepConfig,
                     best: TrialRecord | None) -> Path | str:
    names = [p.name for p in sweep.params()]
    metrics = metric_columns(records, sweep.select)
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["trial_id", "status", "best", *names, *metrics, "rounds", "wall_s", "attempts", "run_dir", "error"])
    for r in records:
        final = r.final or {}
        rounds = sum(1 for row in r.rows if not row.get("final"))
        w.writerow([r.trial_id, r.status, int(best is r), *[r.params.get(n) for n in names],
                    *[_fmt(final.get(m)) for m in metrics], rounds, _fmt(r.wall_s), r.attempts, r.run_dir or "",
                    r.error or ""])
    storage.write_text_atomic(str(path), buf.getvalue())
    return path


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if not math.isfinite(v) else f"{v:.6g}"
    return "" if v is None else v


def write_best_yaml(path: Path | str, best: TrialRecord, sweep: SweepConfig) -> Path | str:
    """The winner's resolved config with a run.dir of its own, ready for `raydc train --config`."""
    saved = storage.join(best.run_dir, "config.yaml")
    cfg = from_dict(Config, parse_yaml(storage.read_text(saved), saved))
    cfg.run.dir = str(under(parent_of(path), "best"))
    shown = ", ".join(f"{k}={v}" for k, v in best.params.items())
    score = best.score(sweep.select.metric)
    header = (f"# Winner of the sweep in {parent_of(path)}: trial {best.trial_id} ({shown}),\n"
              f"# {selection_label(sweep.select)} = {score:.6g}. Train it: raydc train --config {path}\n")
    storage.write_text_atomic(str(path), header + cfg.to_yaml())
    return path


def plot_selection(report_dir: Path | str, records: list[TrialRecord], sweep: SweepConfig,
                   best: TrialRecord | None) -> Path | str | None:
    """The selection metric (and ACC when labels exist) against each swept parameter, the winner marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = sweep.params()
    metric = sweep.select.metric
    done = [r for r in records if r.score(metric) is not None]
    if not done:
        return None
    rows = [(metric, selection_label(sweep.select))]
    if metric != "acc" and any(r.score("acc") is not None for r in done):
        rows.append(("acc", "ACC (labels: recorded, not used to select)" if metric not in ("nmi", "ari")
                     else "ACC"))
    fig, axes = plt.subplots(len(rows), len(params), figsize=(4.2 * len(params), 3.3 * len(rows)),
                             squeeze=False, constrained_layout=True)
    for j, p in enumerate(params):
        numeric_axis = all(isinstance(r.params.get(p.name), (int, float)) and not isinstance(r.params.get(p.name), bool)
                           for r in done)
        cats = sorted({repr(r.params.get(p.name)) for r in done})
        for i, (key, label) in enumerate(rows):
            ax = axes[i][j]
            pts = sorted((_x(r.params.get(p.name), numeric_axis, cats), r.score(key), r is best)
                         for r in done if r.score(key) is not None)
            if not pts:
                continue
            xs, ys, win = zip(*pts)
            ax.plot(xs, ys, "o-" if len(params) == 1 else "o", color="tab:blue", ms=6)
            for x, y, w in pts:
                if w:
                    ax.plot([x], [y], "*", color="tab:red", ms=16, label=f"winner ({p.name}={best.params[p.name]})")
            if p.kind == "loguniform":
                ax.set_xscale("log")
            if not numeric_axis:
                ax.set_xticks(range(len(cats)), cats)
            elif p.kind in ("grid", "choice") and len(set(xs)) <= 12:
                ax.set_xticks(sorted(set(xs)))
            ax.set_xlabel(p.name)
            ax.set_ylabel(key)
            ax.set_title(label, fontsize=9)
            ax.grid(alpha=0.3)
            if any(win):
                ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"{len(done)} finished trial(s) of {len(records)}", fontsize=10)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    path = under(report_dir, "selection.png")
    storage.write_bytes_atomic(str(path), buf.getvalue())
    return path


def _x(v, numeric_axis: bool, cats: list[str]):
    return v if numeric_axis else cats.index(repr(v))


def write_summary_json(path: Path | str, records: list[TrialRecord], sweep: SweepConfig,
                       best: TrialRecord | None, agreement: LabelAgreement | None = None) -> Path | str:
    data = {"selection": selection_label(sweep.select), "best": best.trial_id if best else None,
            "best_params": best.params if best else None,
            "best_score": best.score(sweep.select.metric) if best else None,
            "trials": {r.trial_id: r.status for r in records}}
    if agreement is not None:  # evaluation only: the winner above was chosen without it
        data["labels"] = {"metric": agreement.label_metric, "trials": agreement.trials,
                          "spearman_with_selection": agreement.spearman,
                          "label_best": agreement.label_best.trial_id,
                          "label_best_params": agreement.label_best.params}
    storage.write_text_atomic(str(path), json.dumps(data, indent=2) + "\n")
    return path
