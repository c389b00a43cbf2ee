"""DeepCluster through the real engine: one Ray Train fit, feature pool, shard actors, run directory."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from raydc.config import load_config
from raydc.errors import ConfigError, UserError
from tests.conftest import REPO

pytestmark = pytest.mark.ray


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory, mnist_root):
    from raydc.data.prepare import prepare

    out = tmp_path_factory.mktemp("shards") / "mnist600"
    prepare("mnist", out, root=str(mnist_root), split="test", limit=600, rows_per_shard=200, progress=False)
    return out


@pytest.fixture(scope="module")
def hashed_shards(tmp_path_factory, tiny_shards):
    """The same 600 digits under random int64 ids (hashes, negatives, no order), as users' ids are."""
    from raydc.data.decode import decode_batch
    from raydc.data.manifest import load_manifest
    from raydc.data.prepare import prepare
    import pyarrow.parquet as pq

    m = load_manifest(tiny_shards)
    t = pq.ParquetDataset(m.shard_paths(tiny_shards)).read().sort_by("row")
    d = decode_batch({c: t.column(c).to_numpy(zero_copy_only=False) for c in ("id", "image", "label")}, m)
    ids = np.random.default_rng(5).permutation(
        np.unique(np.random.default_rng(6).integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, 700)))[:600]
    base = tmp_path_factory.mktemp("hashed")
    np.savez(base / "d.npz", images=d["image"][..., 0], labels=d["label"], ids=ids)
    prepare("npz", base / "shards", root=base / "d.npz", rows_per_shard=200, progress=False)
    return base / "shards", ids


def tiny_config(shards: Path, run_dir: Path, *extra: str):
    return load_config(None, [
        f"data.shards={shards}", f"run.dir={run_dir}", "cluster.k=5", "cluster.pca_dim=16",
        "train.epochs=2", "train.batch_size=64", "train.crop_scale_min=0.5", "train.hflip=false",
        "features.batch_size=200", "run.montage_per_cluster=4", *extra])


# Slow: the fast suite's Ray Train runs with two DDP workers are DAC's (tests/test_dac_method.py), and its
# DeepCluster runs through Ray are the S3 run, the one-trial sweep and the multi-node scenario's k-means.
@pytest.mark.slow
def test_tiny_run_writes_the_run_directory(ray_local, hashed_shards, tmp_path):
    """Two DDP workers (gloo): covers the streaming split, the synchronised stop and the broadcast, with ids
    that are random int64 (the run keys everything by row; the user sees their own ids)."""
    import pyarrow.parquet as pq
    import torch

    from raydc.engine.trainer import run_training

    tiny_shards, ids = hashed_shards
    run = run_training(tiny_config(tiny_shards, tmp_path / "run", "train.num_workers=2",
                                   "train.cpus_per_worker=0.5", "train.batch_size=32", "cluster.mode=distributed"))
    rows = [json.loads(line) for line in (run.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
    assert rows[-1].get("final") is True
    for r in rows[:2]:
        for key in ("loss", "kmeans_objective", "time_features", "time_pca", "time_kmeans", "time_train",
                    "acc", "nmi", "ari", "size_histogram"):
            assert key in r, key
        assert np.isfinite(r["loss"]) and r["train_images"] > 0
        assert sum(r["size_histogram"]) == 600
    assert "nmi_prev" in rows[1] and "nmi_prev" not in rows[0]
    for r in rows:  # peak memory of every process role, in every row (the scaling benchmark reads it)
        assert r["memory"]["rank0_peak_rss"] > 0 and len(r["memory"]["shard_peak_rss"]) == 2
    for r in rows:  # where each round's feature passes went (PCA sample pass + full pass, persistent pool)
        c = r["features_clock"]
        assert c["embed_s"] > 0 and c["busy_s"] >= c["embed_s"] + c["decode_s"] and c["pool"] > 0
    a = run.read_assignments()
    parts = run.assignment_parts()
    assert len(parts) == 2  # one part per shard actor (distributed k-means: both hold rows), each its own writer
    assert sorted(a["id"].tolist()) == sorted(ids.tolist())  # every id exactly once
    assert np.array_equal(a["id"], ids[a["row"]])  # and under its own row
    assert a["cluster"].min() >= 0 and a["cluster"].max() < 5
    # checkpoints hold paths and small state, never per-image arrays
    ckpt = torch.load(Path(run.latest_checkpoint()) / "state.pt", weights_only=True)
    assert run.checkpoint_round() == 1 and len(run.checkpoints()) == 2  # Ray Train keeps run.keep_checkpoints
    assert ckpt["state"]["labels_path"].startswith(str(run.path / "labels"))
    assert all(not (isinstance(v, torch.Tensor) and v.numel() >= 600) for v in ckpt["state"].values())
    for png in ("curves.png", "phases.png", "sizes.png", "montage.png"):
        assert (Path(run.report_dir) / png).stat().st_size > 1000, png
    assert (run.path / "config.yaml").exists() and run.checkpoints()
    assert (run.path / "clustering.pt").exists()
    # config.yaml is the config the workers ran (the one clustering.pt carries), decided once before both
    from raydc.config_loader import to_dict
    from raydc.engine.evaluate import open_run

    assert to_dict(open_run(str(run.path))[1]) == run.load_clustering()["config"]

    # `raydc assign` on the training images reproduces the run's final assignment (same model, same centroids).
    from raydc.engine.assign import assign_images
    from raydc.engine.evaluate import evaluate_run

    path = assign_images(str(run.path), str(tiny_shards), str(tmp_path / "assigned"))
    t = pq.read_table(path)
    mine = dict(zip(t.column("id").to_pylist(), t.column("cluster").to_pylist()))
    theirs = dict(zip(a["id"].tolist(), a["cluster"].tolist()))
    agree = np.mean([mine[i] == theirs[i] for i in theirs])
    assert agree > 0.99, agree
    scores = evaluate_run(str(run.path))
    assert scores["acc"] == pytest.approx(rows[-1]["acc"]) and scores["images"] == 600


def test_existing_run_dir_is_refused(ray_local, tiny_shards, tmp_path):
    from raydc.engine.trainer import run_training

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="--resume.*--overwrite"):
        run_training(tiny_config(tiny_shards, tmp_path / "run"))


@pytest.mark.parametrize("override,field", [("cluster.k=601", "cluster.k"),
                                            ("train.batch_size=700", "train.batch_size"),
                                            ("method=dec", "dec.batch_size"),
                                            ("method=dac", "dac.batch_size")])
def test_fields_checked_against_the_data_fail_before_any_work(tiny_shards, tmp_path, override, field):
    """These configs load (each field is valid on its own) and fail only against the 600 images, in the
    method's `check_data`, before a run directory or Ray exists."""
    from raydc.engine.trainer import run_training

    extra = {"method=dec": ["cluster.pca_dim=0", "dec.batch_size=601"],
             "method=dac": ["model.arch=dac_mnist", "cluster.pca_dim=0", "dac.batch_size=601"]}.get(override, [])
    cfg = tiny_config(tiny_shards, tmp_path / "run", override, *extra)
    t = time.perf_counter()
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        run_training(cfg)
    assert not (tmp_path / "run").exists()
    assert time.perf_counter() - t < 30


def test_pca_wider_than_the_features_fails_at_load(tiny_shards, tmp_path):
    with pytest.raises(ConfigError, match=r"cluster\.pca_dim.*feature dimension 8"):
        tiny_config(tiny_shards, tmp_path / "run", "model.feature_dim=8")


def _cli(args: list[str], env: dict, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "raydc.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, **kw)


@pytest.mark.slow  # three runs (~2-3 min on a quiet 2-core machine); `make test-all` or `pytest -m slow`
@pytest.mark.parametrize("start", ["random", "backbone_file"])
def test_sigkill_mid_epoch_then_resume_matches_uninterrupted(ray_local, tiny_shards, tmp_path, start):
    """SIGKILL a `raydc train` in the middle of epoch 1, resume, and compare with an uninterrupted run of the
    same seed: same assignments, same per-epoch metrics. The killed run joins this session's Ray cluster
    (as a job on a shared cluster would), so the kill takes its driver and, with it, the job's Train workers,
    feature pool and shard actors; the resumed run starts from the last checkpoint in the run directory.
    `backbone_file`: the network is a torchvision ResNet-18 started from a state-dict file (issue #31), so a
    resume that loaded the file again over the checkpoint's trained weights would end elsewhere."""
    from raydc.engine.rundir import RunDir
    from raydc.engine.trainer import run_training

    extra = ["train.epochs=3"]
    if start == "backbone_file":
        import torch
        from torchvision.models import resnet18

        torch.manual_seed(7)
        torch.save(resnet18(weights=None).state_dict(), tmp_path / "resnet18.pth")
        extra += ["model.arch=torchvision:resnet18", f"model.weights={tmp_path / 'resnet18.pth'}",
                  "model.input_size=32"]
    ref = run_training(tiny_config(tiny_shards, tmp_path / "ref", *extra))

    killed = tmp_path / "killed"
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO),
               RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    sets = [f"--set={s}" for s in [f"data.shards={tiny_shards}", f"run.dir={killed}", "cluster.k=5",
                                   "cluster.pca_dim=16", "train.batch_size=64", "train.crop_scale_min=0.5",
                                   "train.hflip=false", "features.batch_size=200", "run.montage_per_cluster=4",
                                   *extra]]
    proc = _cli(["train", *sets], env)
    run = RunDir(killed)
    deadline = time.time() + 900
    try:
        while time.time() < deadline and run.checkpoint_round() is None:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.5)
        assert run.checkpoint_round() == 0, "the first epoch never finished"
        time.sleep(1)  # into epoch 1: features/k-means or training (a tiny epoch can be over in 4 s)
        assert run.checkpoint_round() < 2
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    time.sleep(3)  # Ray reaps the dead driver's workers
    assert not list((killed / "assignments").glob("part-*.parquet"))

    resumed = run_training(tiny_config(tiny_shards, killed, *extra), resume=True)
    a, b = ref.read_assignments(), resumed.read_assignments()
    order_a, order_b = np.argsort(a["id"]), np.argsort(b["id"])
    np.testing.assert_array_equal(a["cluster"][order_a], b["cluster"][order_b])
    rows_a, rows_b = ref.read_metrics(), resumed.read_metrics()
    assert [r["epoch"] for r in rows_b] == [r["epoch"] for r in rows_a]
    for ra, rb in zip(rows_a, rows_b):
        for key in ("loss", "kmeans_objective", "acc", "nmi", "ari", "nmi_prev"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-9), (ra["epoch"], key)


def _descendants(root: int) -> list[int]:
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def _train_worker_pids(raylet_pid: int) -> list[int]:
    pids = []
    for pid in _descendants(raylet_pid):
        try:
            if b"RayTrainWorker" in Path(f"/proc/{pid}/cmdline").read_bytes():
                pids.append(pid)
        except OSError:
            pass
    return pids


@pytest.mark.slow  # two full tiny runs plus Ray Train's restart of the worker group: 516 s seen under load
def test_a_killed_train_worker_is_replaced_and_resumes_from_ray_trains_checkpoint(ray_local, tiny_shards, tmp_path):
    """The Train worker (rank 0, which also owns the coordinator and the shard actors) is SIGKILLed after the
    first round's checkpoint. With `train.max_failures=1` Ray Train starts a new worker group inside the same
    fit, `ray.train.get_checkpoint()` hands it that checkpoint, and the run ends exactly where an uninterrupted
    run of the same seed does."""
    import threading

    import ray

    from raydc.engine.rundir import RunDir
    from raydc.engine.trainer import run_training

    extra = ["train.epochs=3"]
    ref = run_training(tiny_config(tiny_shards, tmp_path / "ref", *extra), log=lambda *a: None)
    raylet = ray._private.worker._global_node.all_processes["raylet"][0].process.pid
    run = RunDir(tmp_path / "faulty")
    lines: list[str] = []
    done: dict = {}

    def train():
        try:
            done["run"] = run_training(tiny_config(tiny_shards, run.path, *extra, "train.max_failures=1"),
                                       log=lines.append)
        except BaseException as e:  # re-raised below, in the test's thread
            done["error"] = e

    t = threading.Thread(target=train, daemon=True)
    t.start()
    deadline = time.time() + 900
    while time.time() < deadline and run.checkpoint_round() is None and t.is_alive():
        time.sleep(0.2)
    assert run.checkpoint_round() == 0, ("the first round never finished", done, lines)
    killed = _train_worker_pids(raylet)
    assert len(killed) == 1, killed
    os.kill(killed[0], signal.SIGKILL)
    t.join(900)
    assert "error" not in done, done.get("error")
    rows_a, rows_b = ref.read_metrics(), run.read_metrics()
    assert [r["epoch"] for r in rows_b] == [r["epoch"] for r in rows_a] == [0, 1, 2, 3]
    for ra, rb in zip(rows_a, rows_b):
        for key in ("loss", "kmeans_objective", "acc", "nmi", "nmi_prev"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=1e-6, abs=1e-9), (ra["epoch"], key)
    a, b = ref.read_assignments(), run.read_assignments()
    np.testing.assert_array_equal(a["cluster"][np.argsort(a["id"])], b["cluster"][np.argsort(b["id"])])
    # A retry inside the fit, not a new one: every checkpoint is fit-000's.
    assert all("/fit-000/" in c for c in run.checkpoints()), run.checkpoints()


def test_cli_user_error_exits_2_without_traceback(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    p = subprocess.run([sys.executable, "-m", "raydc.cli", "train", "--set", f"data.shards={tmp_path}/none",
                        "--set", "train.lrr=1"], cwd=REPO, env=env, capture_output=True, text=True)
    assert p.returncode == 2
    assert "train.lrr" in p.stderr and "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "raydc.cli", "train", "--set", f"data.shards={tmp_path}/none",
                        "--set", f"run.dir={tmp_path}/r"], cwd=REPO, env=env, capture_output=True, text=True)
    assert p.returncode == 2 and "raydc prepare" in p.stderr and "Traceback" not in p.stderr
