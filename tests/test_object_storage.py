"""Shards and run directories on a real S3-protocol server (moto over HTTP on 127.0.0.1, tests/s3server.py):
DeepCluster and DEC runs read and write them through pyarrow's S3 filesystem, in the driver, the Train workers,
the feature pool, the shard actors and Ray Data's read tasks alike, and end exactly where the same run on local
disk does. Credentials come from the environment, never the config."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.helpers import cli_train, s3_env, s3_keys

pytestmark = pytest.mark.ray


def test_prepare_writes_shards_to_s3_as_it_does_to_disk(shards_local_and_s3, s3_server, mnist_root, capsys):
    """`raydc prepare --out s3://...`: the same shard bytes and manifest as a local prepare, the same refusal
    to overwrite without --overwrite, and nothing left of a failed one."""
    from raydc.data.manifest import load_manifest, verify_shards
    from raydc.storage import join, read_bytes

    local, remote = shards_local_and_s3
    a, b = load_manifest(local), load_manifest(remote)
    assert [s.sha256 for s in a.shards] == [s.sha256 for s in b.shards] and b.count == 300
    verify_shards(b, remote)
    assert read_bytes(join(remote, a.shards[1].file)) == (local / a.shards[1].file).read_bytes()
    from raydc.cli import main  # the command's own entry point, in process: a one-process prepare needs no Ray

    cmd = ["prepare", "--source", "mnist", "--root", str(mnist_root),
           "--split", "test", "--limit", "300", "--rows-per-shard", "150", "--out", remote, "--no-progress"]
    assert main(cmd) == 2
    err = capsys.readouterr().err
    assert "already holds a prepared dataset" in err, err[-2000:]
    other = s3_server.uri("shards/cli150")
    cmd[cmd.index(remote)] = other
    assert main([*cmd, "--verify"]) == 0, capsys.readouterr().err[-2000:]
    assert len(load_manifest(other).shards) == 2
    assert sorted(k.rsplit("/", 1)[-1] for k in s3_keys(s3_server, "shards/cli150/")) == [
        "manifest.json", "shard-00000.parquet", "shard-00001.parquet"]
    empty = s3_server.uri("shards/none")
    assert main([*cmd[:-3], "--classes", "99", "--out", empty]) == 2, capsys.readouterr().err[-2000:]
    assert not s3_keys(s3_server, "shards/none/")


@pytest.fixture(scope="module")
def run_on_s3(shards_local_and_s3, s3_server, ray_local):
    """One epoch of DeepCluster with shards and run directory both in the bucket (the CLI, joined to the session's
    Ray): the run the tests below read, and the slow one resumes."""
    _, remote = shards_local_and_s3
    env = s3_env(s3_server, ray_local)
    run_uri = s3_server.uri("runs/dc")
    p = cli_train(remote, run_uri, env)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    return run_uri, env, p.stdout + p.stderr


def test_a_run_on_s3_writes_everything_to_the_bucket_and_nothing_to_local_disk(run_on_s3, s3_server):
    """Metrics, checkpoints (Ray Train's storage), labels, assignments and the report go to the bucket, written by
    the driver, the Train workers, the feature pool and the shard actors alike; nothing lands on local disk."""
    from raydc.engine.rundir import RunDir

    run_uri, _, _ = run_on_s3
    keys = s3_keys(s3_server, "runs/dc/")
    for expected in ("config.yaml", "metrics.jsonl", "clustering.pt", "report/curves.png", "report/montage.png"):
        assert expected in keys, (expected, keys)
    assert any(k.startswith("checkpoints/fit-000/checkpoint_") and k.endswith("/state.pt") for k in keys), keys
    assert any(k.startswith("labels/round=") for k in keys), keys
    remote_run = RunDir(run_uri)
    assert remote_run.checkpoint_round() == 0 and [r["epoch"] for r in remote_run.read_metrics()] == [0, 1]
    assert sorted(remote_run.read_assignments()["id"].tolist()) == list(range(300))
    assert not (REPO / "s3:").exists()  # a URI taken for a relative local path would land here


def test_the_default_output_is_one_line_per_round_and_none_of_rays_chatter(run_on_s3):
    """`raydc train`'s console without --verbose: each round's line once, unprefixed, and none of what Ray prints
    by default (every worker line twice, TrainController start-up lines, a TrainingReport dump per round, faiss's
    log). The SIGTERM run of tests/test_cli_run.py checks the same on a run it stops."""
    _, _, out = run_on_s3
    lines = out.splitlines()
    assert "Traceback" not in out, out
    assert sum(line.startswith("epoch 0 |") for line in lines) == 1, out
    assert sum(line.startswith("final |") for line in lines) == 1, out
    for noise in ("RayTrainWorker pid=", "TrainController", "Reporting training result", "TrainingReport(",
                  "Clustering ", "PYTHON worker processes have been started", "Progress bars disabled", "Warning:"):
        assert noise not in out, (noise, out)


# Two more runs (~2 min of the fast suite's 6 on 2 cores): `make test-all`. The run above keeps the S3 paths in
# the fast suite; the resume reads Ray Train's checkpoint back from the bucket.
@pytest.mark.slow
def test_a_run_on_s3_resumes_from_s3_and_equals_the_run_on_local_disk(run_on_s3, shards_local_and_s3, s3_server,
                                                                      tmp_path):
    """The run above stopped after 1 epoch; a --resume adds a second from the checkpoint read back from S3: every
    row equals the uninterrupted 2-epoch run on the local copy of the shards with a local run directory, streamed
    rather than cached."""
    from raydc.engine.rundir import RunDir

    local, remote = shards_local_and_s3
    run_uri, env, _ = run_on_s3
    p = cli_train(remote, run_uri, env, "train.epochs=2", resume=True)  # a second fit: checkpoints/fit-001
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    assert "resuming" in p.stdout + p.stderr
    # The S3 run keeps its rows in the object store (data.cache: auto, 300 tiny images); this one streams them
    # from the shards every pass: the cache must not change a single number.
    p = cli_train(str(local), str(tmp_path / "local"), env, "train.epochs=2", "data.cache=never")
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    a, b = RunDir(run_uri).read_metrics(), RunDir(tmp_path / "local").read_metrics()
    assert [r["epoch"] for r in a] == [r["epoch"] for r in b] == [0, 1, 2] and a[-1]["final"]
    for ra, rb in zip(a, b):  # the same rows, read from either store, give the same run
        for key in ("loss", "kmeans_objective", "acc", "nmi", "pca_rows"):
            if key in rb:
                assert ra[key] == pytest.approx(rb[key], rel=1e-5), (ra["epoch"], key)
    assert RunDir(run_uri).checkpoint_round() == 1
    assert any(k.startswith("checkpoints/fit-001/") for k in s3_keys(s3_server, "runs/dc/"))


# A whole DEC run: the run directory on S3 is checked in the fast suite by the DeepCluster run above (same RunDir
# and storage code); DEC's own files there in test-all.
@pytest.mark.slow
def test_a_dec_run_lives_on_s3(shards_local_and_s3, s3_server, ray_local):
    from raydc.engine.evaluate import evaluate_run
    from raydc.engine.rundir import RunDir

    _, remote = shards_local_and_s3
    run_uri = s3_server.uri("runs/dec")
    sets = [f"data.shards={remote}", f"run.dir={run_uri}", "method=dec", "model.ae_dims=[32,16,4]", "cluster.k=4",
            "cluster.pca_dim=0", "dec.pretrain_epochs=1", "dec.finetune_epochs=1", "dec.batch_size=50",
            "dec.pretrain_batch_size=50", "dec.update_interval=6", "dec.max_iterations=18", "ray.num_cpus=4",
            "run.montage_per_cluster=2"]
    p = subprocess.run([sys.executable, "-m", "raydc.cli", "train", *[f"--set={s}" for s in sets]], cwd=REPO,
                       env=s3_env(s3_server, ray_local), capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    rows = RunDir(run_uri).read_metrics()
    assert rows[-1]["final"] and rows[-1]["acc"] > 0
    assert evaluate_run(run_uri)["acc"] == pytest.approx(rows[-1]["acc"])  # `raydc evaluate --run s3://...`
    keys = s3_keys(s3_server, "runs/dec/")
    assert "clustering.pt" in keys and any(k.startswith("assignments/part-") for k in keys), keys


def test_a_missing_bucket_names_the_uri_and_exits_2(s3_server, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), **s3_server.env)
    uri = "s3://raydc-no-such-bucket/shards"
    p = subprocess.run([sys.executable, "-m", "raydc.cli", "train", f"--set=data.shards={uri}",
                        f"--set=run.dir={tmp_path / 'run'}"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 2, (p.stdout[-2000:], p.stderr[-2000:])
    assert "raydc-no-such-bucket" in p.stderr and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert not (tmp_path / "run").exists()  # nothing started


def test_distributed_prepare_reads_a_folder_on_s3_and_writes_shards_there(s3_server, ray_local, tmp_path):
    """`raydc prepare --source folder --root s3://... --out s3://... --distributed`: Ray Data lists and reads
    the bucket, the tasks upload the shards, and the rows equal a one-process prepare of the same folder on
    local disk."""
    from raydc.data.manifest import load_manifest, verify_shards
    from raydc.data.prepare import prepare
    from tests.helpers import make_folder, shard_rows

    valid, _ = make_folder(tmp_path / "imgs", n=20)
    client = s3_server.client()
    for path in sorted((tmp_path / "imgs").rglob("*")):
        if path.is_file():
            client.put_object(Bucket=s3_server.bucket, Key=f"folders/imgs/{path.relative_to(tmp_path / 'imgs')}",
                              Body=path.read_bytes())
    out = s3_server.uri("shards/folder-dist")
    p = subprocess.run([sys.executable, "-m", "raydc.cli", "prepare", "--source", "folder", "--root",
                        s3_server.uri("folders/imgs"), "--out", out, "--distributed", "--rows-per-shard", "8",
                        "--no-progress"], cwd=REPO, env=s3_env(s3_server, ray_local), capture_output=True, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "prepared 20 images" in p.stdout and "2 skipped" in p.stdout, p.stdout
    prepare("folder", tmp_path / "local", root=tmp_path / "imgs", rows_per_shard=8, progress=False)
    a, b = load_manifest(tmp_path / "local"), load_manifest(out)
    verify_shards(b, out)
    assert (b.count, b.label_counts, b.class_names) == (a.count, a.label_counts, a.class_names)
    assert sorted(s.path for s in b.skipped) == sorted(s.path for s in a.skipped)
    ta, tb = shard_rows(tmp_path / "local"), shard_rows(out)
    for name in ("row", "id", "path", "image", "label"):
        assert ta.column(name).to_pylist() == tb.column(name).to_pylist(), name
    assert b.has_paths and tb.column("path").to_pylist() == valid  # relative to the bucket prefix, not a URI
    assert not [k for k in s3_keys(s3_server, "shards/folder-dist/") if "_staging-" in k]
