"""Sweeps: the label-free choice of a winner from final rows, the sweep directory's outputs, then a tiny
sweep over k through Ray Tune and the real engine, and a sweep killed with SIGKILL and resumed.

The end-to-end tests read the final-row scores (`silhouette`, ...) that every method writes in its last
metrics row."""
from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from raydc.config import load_config
from raydc.config_loader import from_dict
from raydc.sweep.config import SelectConfig, SweepConfig
from raydc.sweep.select import TrialRecord, select_best, selection_label
from tests.conftest import REPO
from tests.helpers import sweep_cmd

# ---- selection from final rows -------------------------------------------------------------------------


def rec(tid: str, k: int, status: str = "done", **final) -> TrialRecord:
    return TrialRecord(trial_id=tid, params={"cluster.k": k}, status=status,
                       final={"final": True, **final} if final else None)


def test_silhouette_is_the_default_and_is_maximised():
    records = [rec("a", 2, silhouette=0.40, loss=0.1, acc=0.66), rec("b", 3, silhouette=0.71, loss=0.5, acc=0.99),
               rec("c", 5, silhouette=0.52, loss=0.9, acc=0.80)]
    select = SelectConfig()
    assert select.metric == "silhouette" and select.direction == "max"
    assert select_best(records, select).trial_id == "b"
    assert selection_label(select) == "label-free selection: silhouette (max)"


@pytest.mark.parametrize("metric, want", [("calinski_harabasz", "c"), ("nmi_prev", "a"), ("loss", "b"),
                                          ("ae_kmeans_stability", "b")])
def test_each_label_free_score_has_its_direction(metric, want):
    records = [rec("a", 2, calinski_harabasz=10.0, nmi_prev=0.99, loss=0.7, ae_kmeans_stability=0.6),
               rec("b", 3, calinski_harabasz=50.0, nmi_prev=0.90, loss=0.2, ae_kmeans_stability=0.95),
               rec("c", 5, calinski_harabasz=90.0, nmi_prev=0.80, loss=0.4, ae_kmeans_stability=0.7)]
    assert select_best(records, SelectConfig(metric=metric)).trial_id == want


def test_unfinished_missing_and_non_finite_scores_cannot_win():
    records = [rec("a", 2, status="error", silhouette=0.99), rec("b", 3, status="stopped", silhouette=0.98),
               rec("c", 5, silhouette=math.nan), rec("d", 7, loss=0.1), rec("e", 9, silhouette=0.2),
               rec("f", 11, silhouette=0.2)]
    best = select_best(records, SelectConfig())
    assert best.trial_id == "e"  # and a tie goes to the earlier trial
    assert select_best(records[:4], SelectConfig()) is None


def test_labels_select_only_when_asked_and_the_summary_says_so():
    records = [rec("a", 2, silhouette=0.9, acc=0.5), rec("b", 3, silhouette=0.1, acc=0.9)]
    supervised = from_dict(SelectConfig, {"metric": "acc", "supervised": True})
    assert select_best(records, supervised).trial_id == "b"
    assert selection_label(supervised) == "supervised selection: acc (max)"
    assert select_best(records, SelectConfig()).trial_id == "a"


def test_label_agreement_reports_rank_correlation_and_the_labelled_pick():
    from raydc.sweep.select import label_agreement

    records = [rec("a", 2, silhouette=0.40, acc=0.66), rec("b", 3, silhouette=0.71, acc=0.99),
               rec("c", 5, silhouette=0.52, acc=0.80), rec("d", 7, status="error", silhouette=0.9, acc=1.0)]
    agree = label_agreement(records, SelectConfig())
    assert agree.trials == 3 and agree.label_best.trial_id == "b" and agree.spearman == pytest.approx(1.0)
    # a minimised score is oriented before ranking: lower loss preferred, and here lower loss means lower acc
    losses = [rec("a", 2, loss=0.1, acc=0.5), rec("b", 3, loss=0.2, acc=0.7), rec("c", 5, loss=0.3, acc=0.9)]
    assert label_agreement(losses, SelectConfig(metric="loss")).spearman == pytest.approx(-1.0)
    assert label_agreement(records[:2], SelectConfig()).spearman is None  # two trials: no correlation
    assert label_agreement([rec("a", 2, silhouette=0.4)], SelectConfig()) is None  # no labels
    supervised = from_dict(SelectConfig, {"metric": "acc", "supervised": True})
    assert label_agreement(records, supervised) is None


# ---- outputs from records --------------------------------------------------------------------------------


def test_outputs_trials_csv_best_yaml_and_plot(tmp_path):
    from raydc.sweep import outputs

    sweep = from_dict(SweepConfig, {"space": {"cluster.k": {"grid": [2, 3, 5]}}, "dir": str(tmp_path)})
    records = []
    for i, (k, s, acc) in enumerate([(2, 0.40, 0.66), (3, 0.71, 0.99), (5, 0.52, 0.80)]):
        run = tmp_path / "runs" / f"t{i}"
        run.mkdir(parents=True)
        cfg = load_config(None, [f"data.shards={tmp_path}/shards", f"run.dir={run}", f"cluster.k={k}"])
        (run / "config.yaml").write_text(cfg.to_yaml())
        records.append(TrialRecord(f"t{i}", {"cluster.k": k}, "done", run_dir=str(run), wall_s=12.5, attempts=1,
                                   final={"final": True, "silhouette": s, "acc": acc, "nmi_prev": 0.9, "loss": 1.0},
                                   rows=[{"round": 0}, {"round": 1, "final": True}]))
    records.append(TrialRecord("t3", {"cluster.k": 7}, "error", error="RuntimeError: boom", attempts=1))
    best = select_best(records, sweep.select)
    outputs.write_trials_csv(tmp_path / "trials.csv", records, sweep, best)
    rows = list(csv.DictReader((tmp_path / "trials.csv").open()))
    assert [r["trial_id"] for r in rows] == ["t0", "t1", "t2", "t3"]
    assert [r["best"] for r in rows] == ["0", "1", "0", "0"]
    assert rows[1]["cluster.k"] == "3" and float(rows[1]["silhouette"]) == 0.71 and rows[1]["acc"] == "0.99"
    assert rows[3]["status"] == "error" and rows[3]["silhouette"] == "" and "boom" in rows[3]["error"]
    assert list(rows[0])[:5] == ["trial_id", "status", "best", "cluster.k", "silhouette"]

    path = outputs.write_best_yaml(tmp_path / "best.yaml", best, sweep)
    cfg = load_config(str(path))  # a full config that `raydc train --config` takes
    assert cfg.cluster.k == 3 and cfg.run.dir == str(tmp_path / "best")
    assert "label-free selection: silhouette (max) = 0.71" in path.read_text()

    png = outputs.plot_selection(tmp_path / "report", records, sweep, best)
    assert png.stat().st_size > 5000
    from raydc.sweep.select import label_agreement

    agreement = label_agreement(records, sweep.select)
    summary = json.loads(outputs.write_summary_json(tmp_path / "summary.json", records, sweep, best,
                                                    agreement).read_text())
    assert summary["best"] == "t1" and summary["labels"]["label_best"] == "t1"
    assert summary["labels"]["spearman_with_selection"] == pytest.approx(1.0) and summary["labels"]["trials"] == 3


# ---- what Tune is given -----------------------------------------------------------------------------------


def test_search_and_scheduler_reach_tune():
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from raydc.sweep.runner import _tune_config

    grid = from_dict(SweepConfig, {"space": {"cluster.k": {"grid": [2, 3]}}})
    tc = _tune_config(grid, 2)
    assert isinstance(tc.search_alg, BasicVariantGenerator) and tc.search_alg.max_concurrent == 2
    assert tc.scheduler is None and tc.num_samples == 1
    asha = from_dict(SweepConfig, {"space": {"train.lr": {"loguniform": [0.01, 0.1]}}, "search": {"algorithm": "random",
                     "num_samples": 6}, "scheduler": {"name": "asha", "grace_period": 2}})
    tc = _tune_config(asha, 1)
    assert isinstance(tc.scheduler, ASHAScheduler) and tc.scheduler.metric == "nmi_prev" and tc.num_samples == 6
    pytest.importorskip("optuna")
    tpe = from_dict(SweepConfig, {"space": {"train.lr": {"loguniform": [0.01, 0.1]}}, "search": {"algorithm": "optuna",
                    "num_samples": 4}})
    tc = _tune_config(tpe, 3)
    assert tc.search_alg.metric == "silhouette" and tc.max_concurrent_trials == 3
    assert not isinstance(tc.search_alg, ConcurrencyLimiter)  # Tune wraps it from max_concurrent_trials


# ---- through Ray Tune and the engine --------------------------------------------------------------------



@pytest.mark.ray
@pytest.mark.parametrize("grid", [
    # One trial: Tune, the engine inside a trial, the console, trackers and the sweep's files (the scores'
    # directions and the choice among trials are the selection tests' above). `make test-all`: a whole engine run
    # inside a Tune trial starts some thirty processes, and on a small machine their start-ups dominate the suite.
    pytest.param([3], id="one-trial", marks=pytest.mark.slow),
    # The choice through Tune among three whole runs (~2 min on 2 cores): `make test-all`.
    pytest.param([2, 3, 5], id="three-trials", marks=pytest.mark.slow),
])
def test_tiny_sweep_picks_k3_without_labels_and_writes_best_yaml(ray_local, sweep_files, tmp_path, grid):
    from raydc.sweep.runner import run_sweep

    sweep_file = tmp_path / "k.yaml"
    sweep_file.write_text(yaml.safe_dump({"space": {"cluster.k": {"grid": grid}}, "search": {"algorithm": "grid"}}))
    lines: list[str] = []
    out = run_sweep(str(sweep_files / "base.yaml"), str(sweep_file), ["run.trackers=[tensorboard, mlflow]"],
                    sweep_dir=str(tmp_path / "sweep"), log=lines.append)
    n = len(grid)
    assert [r.status for r in out.records] == ["done"] * n, [(r.trial_id, r.status, r.error) for r in out.records]
    scores = {r.params["cluster.k"]: r.score("silhouette") for r in out.records}
    assert out.best is not None and out.best.params == {"cluster.k": 3}, scores
    assert sum("done (" in ln for ln in lines) == n  # one line per finished trial
    # each trial's round lines, from its Train worker through the sweep's console (raydc.engine.console)
    assert sum(ln.startswith("[trial ") and "] epoch 0 |" in ln for ln in lines) == n, lines
    assert any(ln.startswith("best: cluster.k=3 | silhouette") and "label-free selection" in ln for ln in lines)
    assert any(ln.startswith("labels (evaluation only): acc would pick") for ln in lines)

    rows = list(csv.DictReader((out.sweep_dir / "trials.csv").open()))
    assert sorted(int(r["cluster.k"]) for r in rows) == grid
    for r in rows:  # labels exist in these shards: recorded for every trial, not used to select
        assert r["status"] == "done" and float(r["acc"]) > 0 and float(r["wall_s"]) > 0 and r["attempts"] == "1"
        assert Path(r["run_dir"]).parent == out.sweep_dir / "runs"
    assert (out.sweep_dir / "report" / "selection.png").stat().st_size > 5000
    assert (out.sweep_dir / "tune").is_dir()

    # run.trackers: each trial's rows in its TensorBoard directory and in its MLflow run of the sweep's experiment
    from tests.tracking_read import mlflow_history, mlflow_runs, tensorboard_scalars

    uri = (out.sweep_dir / "mlruns").as_uri()
    runs = mlflow_runs(uri, "sweep")
    assert sorted(runs) == sorted(r.trial_id for r in out.records)
    for r in out.records:
        rows = [json.loads(line) for line in (Path(r.run_dir) / "metrics.jsonl").read_text().splitlines()]
        want = {row["round"]: pytest.approx(row["acc"], rel=1e-6) for row in rows}
        assert len(want) == 2  # round 0 and the final row
        assert tensorboard_scalars(Path(r.run_dir) / "tensorboard")["acc"] == want
        assert mlflow_history(uri, runs[r.trial_id].info.run_id, "acc") == want
        assert runs[r.trial_id].data.params["cluster.k"] == str(r.params["cluster.k"])

    # best.yaml is the winning trial's config with its own run.dir: a plain config `raydc train` takes (its
    # training is any other run's, covered by the engine tests, so it is not repeated here).
    cfg = load_config(str(out.sweep_dir / "best.yaml"))
    assert cfg.cluster.k == 3 and Path(cfg.run.dir) == out.sweep_dir / "best"
    winner = load_config(str(Path(out.best.run_dir) / "config.yaml"))
    cfg.run.dir = winner.run.dir
    assert cfg == winner


def _attempts(run_dir: Path) -> list[str]:
    return [json.loads(line)["action"] for line in (run_dir / "attempts.log").read_text().splitlines()]


@pytest.mark.ray
@pytest.mark.slow  # two sweeps in subprocesses with their own Ray (~4-5 min here): `make test-all`
def test_sigkill_then_resume_reruns_only_unfinished_trials(sweep_files, tmp_path):
    """The `raydc sweep` process is SIGKILLed once the first trial has finished; `--resume` completes the
    sweep without training the finished trial again."""
    out = tmp_path / "sweep"
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
               RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(sweep_cmd(sweep_files, out), env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.time() + 400
        while time.time() < deadline and proc.poll() is None:
            if " done (1/2)" in (tmp_path / "first.log").read_text():
                break
            time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert " done (1/2)" in (tmp_path / "first.log").read_text()
        time.sleep(3)  # into the second trial
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the embedded Ray it started, if anything outlived it
        except ProcessLookupError:
            pass
        log.close()
    finished = [p.parent for p in (out / "runs").glob("*/metrics.jsonl")
                if json.loads(p.read_text().splitlines()[-1]).get("final")]
    assert len(finished) == 1
    assert not (out / "trials.csv").exists()

    resumed = subprocess.run(sweep_cmd(sweep_files, out, "--resume"), env=env, capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert "resuming the sweep" in resumed.stdout
    # quiet: the trials' own lines, not Ray Train's, Ray Data's or faiss's output from the trials' actors
    assert "[trial " in resumed.stdout and "RayTrainWorker" not in resumed.stdout
    assert "FeatureShard" not in resumed.stdout and "objective=" not in resumed.stdout
    assert _attempts(finished[0]).count("train") == 1 and "resume" not in _attempts(finished[0])
    rows = list(csv.DictReader((out / "trials.csv").open()))
    assert sorted(int(r["cluster.k"]) for r in rows) == [2, 3]
    assert all(r["status"] == "done" for r in rows)
    assert (out / "best.yaml").exists()
