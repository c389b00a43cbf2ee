"""`raydc prepare --distributed`: the Ray Data job gives the same rows, labels, skipped files and manifest as the
one-process prepare of the same folder, under the same rules (--strict, --overwrite, --classes, --limit)."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from raydc.data.manifest import load_manifest, verify_shards
from raydc.data.prepare import prepare
from raydc.errors import DataError
from tests.conftest import REPO
from tests.helpers import make_folder, shard_rows

pytestmark = pytest.mark.ray


def _same_dataset(a_dir, b_dir) -> None:
    a, b = load_manifest(a_dir), load_manifest(b_dir)
    for key in ("count", "encoding", "image_shape", "mode", "has_labels", "class_names", "label_counts", "classes",
                "limit", "source", "has_paths"):
        assert getattr(a, key) == getattr(b, key), key
    assert sorted((s.path, s.reason) for s in a.skipped) == sorted((s.path, s.reason) for s in b.skipped)
    assert [s.row_start for s in b.shards] == list(np.cumsum([0] + [s.rows for s in b.shards])[:-1])
    ta, tb = shard_rows(a_dir), shard_rows(b_dir)
    assert ta.column_names == tb.column_names
    for name in ta.column_names:
        assert ta.column(name).to_pylist() == tb.column(name).to_pylist(), name


def test_distributed_prepare_gives_the_one_process_rows(ray_local, tmp_path):
    from raydc.data.ray_prepare import STAGING_PREFIX, prepare_distributed

    valid, _ = make_folder(tmp_path / "imgs")
    prepare("folder", tmp_path / "one", root=tmp_path / "imgs", rows_per_shard=25, progress=False)
    m = prepare_distributed(str(tmp_path / "imgs"), str(tmp_path / "ray"), rows_per_shard=25, progress=False)
    assert m.count == 60 and len(m.skipped) == 2 and m.has_paths
    assert shard_rows(tmp_path / "ray").column("path").to_pylist() == valid  # each image's file, relative to the root
    verify_shards(m, tmp_path / "ray")
    _same_dataset(tmp_path / "one", tmp_path / "ray")
    assert not [p for p in os.listdir(tmp_path / "ray") if p.startswith(STAGING_PREFIX)], "staging left behind"
    # Filters: the first 7 images of class 1, in the same order as the one-process prepare keeps them.
    prepare("folder", tmp_path / "one7", root=tmp_path / "imgs", classes=[1], limit=7, rows_per_shard=3,
            progress=False)
    prepare_distributed(str(tmp_path / "imgs"), str(tmp_path / "ray7"), classes=[1], limit=7, rows_per_shard=3,
                        progress=False)
    a, b = load_manifest(tmp_path / "one7"), load_manifest(tmp_path / "ray7")
    assert b.count == 7 and b.label_counts == {1: 7} == a.label_counts
    one, ray_ = shard_rows(tmp_path / "one7"), shard_rows(tmp_path / "ray7")
    for name in ("row", "id", "path", "image", "label"):
        assert one.column(name).to_pylist() == ray_.column(name).to_pylist()
    # The same overwrite rule as the one-process prepare.
    with pytest.raises(DataError, match="--overwrite"):
        prepare_distributed(str(tmp_path / "imgs"), str(tmp_path / "ray"), progress=False)
    prepare_distributed(str(tmp_path / "imgs"), str(tmp_path / "ray"), overwrite=True, rows_per_shard=100,
                        progress=False)
    assert len(load_manifest(tmp_path / "ray").shards) == 1


def test_distributed_strict_names_the_corrupt_file_and_leaves_nothing(ray_local, tmp_path):
    from raydc.data.ray_prepare import prepare_distributed

    make_folder(tmp_path / "imgs", n=8)
    with pytest.raises(DataError, match="--strict") as e:
        prepare_distributed(str(tmp_path / "imgs"), str(tmp_path / "out"), strict=True, progress=False)
    assert "noise.jpg" in str(e.value)  # the first corrupt file in path order (cat/a/noise.jpg)
    assert not (tmp_path / "out").exists(), "a failed prepare must not leave the directory it created"


@pytest.mark.slow  # starts a Ray of its own (~20 s); the distributed prepare itself is in the fast suite above
def test_cli_distributed_prepare(tmp_path):
    """The command a user runs, on its own local Ray."""
    make_folder(tmp_path / "imgs", n=12)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    cmd = [sys.executable, "-m", "raydc.cli", "prepare", "--source", "folder", "--root", str(tmp_path / "imgs"),
           "--out", str(tmp_path / "out"), "--distributed", "--no-progress", "--verify"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "prepared 12 images" in p.stdout and "2 skipped" in p.stdout, p.stdout


def test_cli_refuses_to_distribute_a_source_it_cannot(tmp_path):
    """Only folders are prepared by Ray tasks: any other source is refused before Ray starts, exit code 2."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-m", "raydc.cli", "prepare", "--source", "mnist", "--out",
                        str(tmp_path / "m"), "--distributed"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "--source folder" in p.stderr, p.stderr
