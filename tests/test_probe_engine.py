"""Frozen-feature clustering (train.epochs 0) and `raydc evaluate --probe` through the real engine (Ray Train
fit, feature pool, shard actors)."""
from __future__ import annotations

import json

import pytest

from raydc.config import load_config

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # a frozen run, then both probes through the CLI (make test-all)


@pytest.fixture(scope="module")
def splits(tmp_path_factory, mnist_root):
    from raydc.data.prepare import prepare

    base = tmp_path_factory.mktemp("probe")
    prepare("mnist", base / "test", root=str(mnist_root), split="test", limit=300, rows_per_shard=150, progress=False)
    prepare("mnist", base / "train", root=str(mnist_root), split="train", limit=400, rows_per_shard=200,
            progress=False)
    return base


def _frozen(shards, run_dir, *extra):
    return load_config(None, [f"data.shards={shards}", "data.split=test", f"run.dir={run_dir}", "cluster.k=10",
                              "cluster.pca_dim=0", "train.epochs=0", "features.batch_size=150",
                              "run.montage_per_cluster=2", *extra])


def test_frozen_run_and_its_probes(ray_local, splits, tmp_path, capsys):
    from raydc.cli import main
    from raydc.engine.rundir import RunDir
    from raydc.engine.trainer import run_training

    run = run_training(_frozen(splits / "test", tmp_path / "frozen"))
    rows = RunDir(run.location).read_metrics()
    assert len(rows) == 1 and rows[0].get("final") is True and "loss" not in rows[0]  # no training round
    assert RunDir(run.location).has_assignments()

    rc = main(["evaluate", "--run", str(run.location), "--probe", "both", "--train-split", str(splits / "train"),
               "--test-split", str(splits / "test")])
    assert rc == 0
    out = capsys.readouterr().out
    knn = json.loads((run.path / "probes" / "knn-train-test.json").read_text())
    lin = json.loads((run.path / "probes" / "linear-train-test.json").read_text())
    assert knn["train_images"] == 400 and knn["test_images"] == 300 and knn["layer"] == "embed"
    # An untrained Sobel convnet's features already sort digits far above chance (0.1); labels misaligned with
    # their features (a block order mixed up between the pool and the probe) would score near chance.
    assert knn["knn_top1_k20"] > 0.5 and 0 < knn["knn_top1_k200"] <= 1
    assert lin["linear_top1"] > 0.5 and lin["linear_solver"] == "sklearn-lbfgs"
    assert f"knn_top1_k20: {knn['knn_top1_k20']}" in out and f"linear_top1: {lin['linear_top1']}" in out
