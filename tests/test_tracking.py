"""run.trackers without Ray: rows appended through rank 0's TrackedRun reach real TensorBoard event files and a
real MLflow store (a local file store), read back as a user would; a resume continues the same MLflow run."""
from __future__ import annotations

import pytest

from raydc.config import load_config
from raydc.engine.rundir import RunDir
from raydc.errors import ConfigError
from raydc.tracking import TrackedRun, flat_params, log_report, numeric_metrics, rank_zero_run
from tests.tracking_read import (mlflow_artifacts, mlflow_history, mlflow_runs, tensorboard_scalars,
                                 tensorboard_tags)

pytest.importorskip("mlflow")


def rows(n: int = 3) -> list[dict]:
    out = [{"round": r, "epoch": r, "loss": 2.0 - r / 2, "acc": 0.3 + r / 10, "kmeans_backend": "faiss",
            "size_histogram": [1, 2], "memory": {"rank0_peak_rss": 1000 + r}, "nmi_prev": float("nan")}
           for r in range(n)]
    out.append({"round": n, "epoch": n, "acc": 0.9, "silhouette": 0.5, "final": True})
    return out


def config(tmp_path, *extra: str):
    return load_config(None, [f"data.shards={tmp_path / 'shards'}", f"run.dir={tmp_path / 'run'}",
                              "run.trackers=[tensorboard, mlflow]", "cluster.k=4", *extra])


def test_numeric_metrics_and_params():
    row = rows()[1]
    assert numeric_metrics(row) == {"round": 1.0, "epoch": 1.0, "loss": 1.5, "acc": pytest.approx(0.4),
                                    "memory/rank0_peak_rss": 1001.0}
    assert numeric_metrics(rows()[-1])["silhouette"] == 0.5 and "final" not in numeric_metrics(rows()[-1])
    params = flat_params({"cluster": {"k": 4, "super_k": None}, "model": {"ae_dims": [1, 2]}, "method": "dec"})
    assert params == {"cluster.k": "4", "cluster.super_k": "null", "model.ae_dims": "[1, 2]", "method": "dec"}


def test_only_rank_zero_with_trackers_gets_a_tracked_run(tmp_path):
    run = RunDir(tmp_path / "run")
    assert isinstance(rank_zero_run(run, config(tmp_path), 0), TrackedRun)
    assert rank_zero_run(run, config(tmp_path), 1) is run
    assert rank_zero_run(run, config(tmp_path, "run.trackers=[]"), 0) is run


def test_rows_reach_tensorboard_and_mlflow_once_per_round_and_a_resume_continues(tmp_path):
    cfg = config(tmp_path)
    run = RunDir(cfg.run.dir)
    run.create(cfg.to_yaml(), resume=False, overwrite=False)
    tracked = rank_zero_run(run, cfg, 0)
    all_rows = rows()
    for row in all_rows[:2]:
        tracked.append_metrics(row)
    # a resume: a new process's TrackedRun (the worker restarted), the rest of the rows
    tracked = rank_zero_run(RunDir(cfg.run.dir), cfg, 0)
    for row in all_rows[2:]:
        tracked.append_metrics(row)
    assert [r["round"] for r in run.read_metrics()] == [0, 1, 2, 3]  # metrics.jsonl as before

    tb = tensorboard_scalars(run.path / "tensorboard")
    assert tb["loss"] == {0: 2.0, 1: 1.5, 2: 1.0}
    assert tb["acc"] == {0: pytest.approx(0.3), 1: pytest.approx(0.4), 2: pytest.approx(0.5),
                         3: pytest.approx(0.9)}
    assert tb["silhouette"] == {3: 0.5} and tb["memory/rank0_peak_rss"][2] == 1002
    assert "kmeans_backend" not in tb and "nmi_prev" not in tb  # strings and NaN stay in metrics.jsonl
    assert "config/text_summary" in tensorboard_tags(run.path / "tensorboard", "tensor")  # the Text tab

    uri = (run.path / "mlruns").as_uri()
    runs = mlflow_runs(uri, "raydc")
    assert list(runs) == ["run"], runs  # one MLflow run for the raydc run, resumed or not
    mrun = runs["run"]
    assert mlflow_history(uri, mrun.info.run_id, "loss") == {0: 2.0, 1: 1.5, 2: 1.0}
    assert set(mlflow_history(uri, mrun.info.run_id, "acc")) == {0, 1, 2, 3}
    assert mrun.data.params["cluster.k"] == "4" and mrun.data.params["run.trackers"] == '["tensorboard", "mlflow"]'
    assert mrun.data.tags["raydc.run_dir"] == run.location and mrun.info.status == "FINISHED"

    # the driver, after the report: its pictures as artefacts of the same MLflow run, and images in TensorBoard
    (run.path / "report").mkdir()
    from PIL import Image

    Image.new("RGB", (8, 6), (200, 10, 10)).save(run.path / "report" / "montage.png")
    log_report(cfg, run.location, [run.path / "report" / "montage.png", run.path / "report" / "x.html"])
    assert mlflow_artifacts(uri, mrun.info.run_id) == ["report/montage.png"]
    assert "report/montage" in tensorboard_tags(run.path / "tensorboard", "image")


def test_a_missing_tracker_fails_at_config_load_naming_the_field(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    with pytest.raises(ConfigError, match="run.trackers"):
        load_config(None, [f"data.shards={tmp_path}", "run.trackers=[wandb]"])
    with pytest.raises(ConfigError, match="run.mlflow_uri"):
        load_config(None, [f"data.shards={tmp_path}", "run.trackers=[mlflow]", "run.dir=s3://bucket/run"])
