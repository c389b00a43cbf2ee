"""Shards on a real S3-protocol server (moto over HTTP on 127.0.0.1, tests/s3server.py): a DeepCluster run reads
them through pyarrow's S3 filesystem, in the driver, the feature pool and Ray Data's read tasks alike, and ends
exactly where the same run on the local copy does. Credentials come from the environment, never the config."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def shards_local_and_s3(tmp_path_factory, mnist_root, s3_server):
    from raydc.data.prepare import prepare
    from raydc.storage import join, write_bytes_atomic

    local = tmp_path_factory.mktemp("s3shards") / "mnist300"
    prepare("mnist", local, root=str(mnist_root), split="test", limit=300, rows_per_shard=100, progress=False)
    remote = s3_server.uri("shards/mnist300")
    for f in sorted(local.iterdir()):
        write_bytes_atomic(join(remote, f.name), f.read_bytes())
    return local, remote


def _train(shards: str, run_dir: Path, env: dict) -> subprocess.CompletedProcess:
    sets = [f"data.shards={shards}", f"run.dir={run_dir}", "cluster.k=4", "cluster.pca_dim=8",
            "features.pca_sample=150", "train.epochs=2", "train.batch_size=50", "train.crop_scale_min=0.5",
            "train.hflip=false", "features.batch_size=100", "run.montage_per_cluster=2", "ray.num_cpus=4"]
    return subprocess.run([sys.executable, "-m", "raydc.cli", "train", *[f"--set={s}" for s in sets]], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=900)


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_a_run_on_s3_shards_equals_the_run_on_local_ones(shards_local_and_s3, s3_server, tmp_path):
    local, remote = shards_local_and_s3
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0", **s3_server.env)
    env.pop("RAY_ADDRESS", None)  # a Ray of its own, started with the AWS variables its workers inherit
    runs = {}
    for name, shards in (("s3", remote), ("local", str(local))):
        p = _train(shards, tmp_path / name, env)
        assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
        runs[name] = _rows(tmp_path / name)
    a, b = runs["s3"], runs["local"]
    assert [r["epoch"] for r in a] == [0, 1, 2] and a[-1]["final"]
    for ra, rb in zip(a, b):  # the same rows, read from either store, give the same run
        for key in ("loss", "kmeans_objective", "acc", "nmi", "pca_rows"):
            if key in rb:
                assert ra[key] == pytest.approx(rb[key], rel=1e-6), (ra["epoch"], key)
    import pyarrow.dataset as pads

    t = pads.dataset(str(tmp_path / "s3" / "assignments")).to_table()
    assert sorted(t.column("id").to_pylist()) == list(range(300))


def test_a_missing_bucket_names_the_uri_and_exits_2(s3_server, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), **s3_server.env)
    uri = "s3://raydc-no-such-bucket/shards"
    p = subprocess.run([sys.executable, "-m", "raydc.cli", "train", f"--set=data.shards={uri}",
                        f"--set=run.dir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, (p.stdout[-2000:], p.stderr[-2000:])
    assert "raydc-no-such-bucket" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # nothing started
