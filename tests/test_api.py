"""The Python API as a notebook drives it: raydc.train twice in one interpreter, raydc.load_run, the trackers'
read-back, and Ray left as the calls found it."""
from __future__ import annotations

import json
import logging

import pytest

import raydc
from raydc.api import _overrides, resolve_config
from raydc.errors import ConfigError, UserError
from tests.tracking_read import mlflow_history, mlflow_runs, tensorboard_scalars


def test_overrides_as_sections_or_double_underscores(tmp_path):
    assert _overrides({"cluster": {"k": 4}, "cluster__pca_dim": 8, "train__epochs": 1}) == {
        "cluster": {"k": 4, "pca_dim": 8}, "train": {"epochs": 1}}
    (tmp_path / "c.yaml").write_text(f"data: {{shards: {tmp_path}}}\ncluster: {{k: 3, niter: 7}}\n")
    cfg = resolve_config(tmp_path / "c.yaml", {"cluster": {"k": 5}, "train__lr": 0.1})
    assert (cfg.cluster.k, cfg.cluster.niter, cfg.train.lr) == (5, 7, 0.1)
    assert resolve_config(cfg, {"cluster__k": 6}).cluster.k == 6 and cfg.cluster.k == 5  # the given one unchanged
    with pytest.raises(ConfigError, match="cluster.kk"):
        resolve_config(cfg, {"cluster__kk": 6})
    with pytest.raises(UserError, match="not a raydc run directory"):
        raydc.load_run(tmp_path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, mnist_root):
    from raydc.data.prepare import prepare

    out = tmp_path_factory.mktemp("shards") / "mnist300"
    prepare("mnist", out, root=str(mnist_root), split="test", limit=300, progress=False)
    return out


def _logging_state():
    import threading

    import ray.data  # noqa: F401  (its import sets its loggers up: Ray Data's doing, before any raydc call here)

    return ({n: logging.getLogger(n).level for n in ("ray", "ray.data", "ray.train", "ray.tune")},
            sorted(t.name for t in threading.enumerate() if t.name.startswith("raydc")))


@pytest.mark.ray
@pytest.mark.slow  # two tiny runs in one interpreter: minutes on 2 cores (make test-all)
def test_train_twice_then_load_run_with_trackers(ray_local, shards, tmp_path):
    import ray

    tiny = {"data": {"shards": str(shards)}, "cluster": {"k": 4, "pca_dim": 8, "num_shards": 1},
            "train": {"batch_size": 64, "epochs": 2}, "features": {"batch_size": 150},
            "run": {"montage_per_cluster": 2, "trackers": ["tensorboard", "mlflow"]}}
    before = _logging_state()
    lines: list[str] = []
    first = raydc.train(tiny, run__dir=str(tmp_path / "a"), log=lines.append)
    second = raydc.train(tiny, run__dir=str(tmp_path / "b"), cluster__k=3, train__epochs=1, log=lines.append)
    assert ray.is_initialized() and _logging_state() == before  # the notebook's Ray, its logging as it was

    assert any(line.startswith("training finished in") for line in lines)
    # the Train workers' round lines reach the caller's log (raydc.engine.console), once each, unprefixed
    assert sum(line.startswith("epoch 0 |") for line in lines) == 2, lines
    for run, k, rounds in ((first, 4, 2), (second, 3, 1)):
        rows = [json.loads(line) for line in (tmp_path / run.dir.rsplit("/", 1)[-1] / "metrics.jsonl")
                .read_text().splitlines()]
        loaded = raydc.load_run(run.dir)
        assert loaded.metrics == rows == run.metrics
        assert [r["round"] for r in rows] == list(range(rounds + 1)) and rows[-1]["final"]
        assert loaded.config == run.config and loaded.config.cluster.k == k
        assert run.result is not None and run.result.error is None and loaded.result is None  # Ray Train's
        table = loaded.assignments().to_table()
        assert table.num_rows == 300 and set(table.column_names) >= {"row", "id", "cluster", "distance"}
        assert max(table.column("cluster").to_pylist()) < k
        assert any(p.endswith(".png") for p in __import__("os").listdir(loaded.report_dir))

        # the trackers: every row's numbers, one step per round, in TensorBoard and in the run's MLflow run
        tb = tensorboard_scalars(loaded.tensorboard_dir)
        uri = (tmp_path / run.dir.rsplit("/", 1)[-1] / "mlruns").as_uri()
        (mrun,) = mlflow_runs(uri, "raydc").values()
        for key in ("acc", "nmi", "kmeans_objective", "time_round"):
            want = {r["round"]: pytest.approx(r[key], rel=1e-6) for r in rows if key in r}
            assert len(want) == rounds + 1, key
            assert tb[key] == want, key
            assert mlflow_history(uri, mrun.info.run_id, key) == want, key
        assert mrun.data.params["cluster.k"] == str(k)
        assert any(a.startswith("report/") for a in _artifacts(uri, mrun.info.run_id))


def _artifacts(uri, run_id):
    from tests.tracking_read import mlflow_artifacts

    return mlflow_artifacts(uri, run_id)
