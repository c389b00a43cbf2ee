"""`raydc train` as a user runs it, in a subprocess joined to the session's Ray (as a job on a shared cluster
would be): what it prints by default, and how it ends on SIGTERM. The images are a folder of mixed sizes (the
engine's resize path through a real round; the whole run on them is test_input_shapes' slow test)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.ray


def _train(ray_local, shards, run_dir, *extra: str) -> tuple[subprocess.Popen, list[str]]:
    env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=str(REPO),
               RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    env.pop("RAYDC_VERBOSE", None)
    sets = [f"--set={s}" for s in (f"data.shards={shards}", f"run.dir={run_dir}", "cluster.k=3", "cluster.pca_dim=8",
                                   "model.input_size=20", "train.batch_size=32", "features.batch_size=36",
                                   "run.montage_per_cluster=2")]
    proc = subprocess.Popen([sys.executable, "-m", "raydc.cli", "train", *sets, *extra], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True).start()
    return proc, lines


def _wait_for(lines: list[str], proc: subprocess.Popen, prefix: str, timeout: float = 600) -> None:
    deadline = time.time() + timeout
    while not any(line.startswith(prefix) for line in list(lines)):
        assert proc.poll() is None, "".join(lines)
        assert time.time() < deadline, "".join(lines)
        time.sleep(0.5)


# Slow (a whole CLI run to its first round, as the fault runs of tests/test_faults_run.py): the fast suite's CLI
# runs are the S3 run and the sweep.
@pytest.mark.slow
def test_sigterm_mid_run_ends_cleanly_with_the_resume_hint(ray_local, mixed_folder_shards, tmp_path):
    """Also the default output: the per-round line once, unprefixed, and none of Ray's chatter (it was every
    worker line twice, TrainController start-up lines, a TrainingReport dump per round, faiss's log)."""
    proc, lines = _train(ray_local, mixed_folder_shards, tmp_path / "run", "--set=train.epochs=200")
    try:
        _wait_for(lines, proc, "epoch 0 |")
        # What a user does when a job looks stuck: submit it again. It is refused (raydc.engine.lease), naming
        # the live run, and writes nothing.
        second, second_lines = _train(ray_local, mixed_folder_shards, tmp_path / "run", "--set=train.epochs=200",
                                      "--resume")
        assert second.wait(timeout=300) == 2, "".join(second_lines)
        time.sleep(0.5)
        assert "is being written by another run (host " in "".join(second_lines), second_lines
        assert f"pid {proc.pid}" in "".join(second_lines), second_lines
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 143, "".join(lines)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    time.sleep(0.5)  # the reader thread drains the pipe
    out = "".join(lines)
    assert "terminated (SIGTERM); resume with --resume" in out, out
    assert "Traceback" not in out, out
    assert sum(line.startswith("epoch 0 |") for line in lines) == 1, out
    assert "network input 20x20x3 (model.input_size; the images are mixed sizes, RGB)\n" in lines, out
    for noise in ("RayTrainWorker pid=", "TrainController", "Reporting training result", "TrainingReport(",
                  "Clustering ", "PYTHON worker processes have been started", "Progress bars disabled"):
        assert noise not in out, (noise, out)
    assert (tmp_path / "run" / "checkpoints").is_dir()  # something to resume from
    assert not (tmp_path / ".run.lease").exists()  # given back on SIGTERM: a --resume need not wait


def test_ray_losing_part_of_a_run_ends_in_one_line_with_the_resume_hint(monkeypatch, capsys):
    """What `ray stop` under a running `raydc train` made `fit()` raise (seen by hand: Ray Train's WorkerGroupError,
    its rank 0 failing the health check with the actor unavailable): one line naming the lost actor and the
    resume hint, exit 1, no traceback; --verbose keeps the traceback. An error raised by code inside a task (a
    RayTaskError, here a ValueError in the worker, or an actor whose constructor raised) is a bug and keeps it too,
    however Ray Train wraps it."""
    from ray.exceptions import ActorDiedError, ActorUnavailableError, OutOfMemoryError, RayTaskError
    from ray.train import WorkerGroupError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    import raydc.cli as cli

    unavailable = ActorUnavailableError("The actor is temporarily unavailable: RpcError: Connection reset", None)
    lost = WorkerGroupError("[Rank 0 Error Snippet]: A worker health check failed.",
                            {0: WorkerHealthCheckFailedError("A worker health check failed.", unavailable)})
    in_task = RayTaskError("train_loop", "Traceback (most recent call last): ...", ValueError("bad"))
    # seen by hand with the raylet killed mid-run: rank 0's call to a shard actor raised inside its task
    called_lost = WorkerGroupError("[Rank 0 Error Snippet]: ActorUnavailableError", {0: RayTaskError(
        "train_loop", "Traceback (most recent call last): ...", unavailable).as_instanceof_cause()})
    bug = WorkerGroupError("[Rank 0 Error Snippet]: ValueError", {0: in_task.as_instanceof_cause()})
    raised: list[BaseException] = []

    def dispatch(args):
        raise raised[-1]

    monkeypatch.setattr(cli, "_dispatch", dispatch)
    monkeypatch.setenv("RAYDC_VERBOSE", "")  # restored after the test: --verbose below sets it
    argv = ["train", "--config", "jobs/configs/demo.yaml"]
    for error in (unavailable, lost, called_lost):
        raised.append(error)
        assert cli.main(argv) == 1
        err = capsys.readouterr().err
        assert "Ray lost part of the run (ActorUnavailableError: The actor" in err, err
        assert "resume with --resume" in err and "Traceback" not in err and len(err.splitlines()) == 2, err
    # Ray's memory monitor killed a task rank 0 waited on: say so, and what to change before resuming
    oom = OutOfMemoryError(  # the message Ray 2.60 gave for an actor and for a task (seen by hand, threshold 0.2)
        "1 worker(s) were killed due to the node running low on memory. Memory on the node (IP: 192.0.2.2, ID: "
        "2d30) was 4.74GB used / 23.54GB limit (0.201369) OOM kill reason: Memory usage 5060481024B exceeded "
        "threshold of 5055239168B (20.0% of 25276194816B limit)")
    raised.append(WorkerGroupError("[Rank 0 Error Snippet]: OutOfMemoryError", {0: oom}))
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "Ray killed part of the run for lack of memory on a node (OutOfMemoryError: 1 worker(s) were" in err, err
    assert "train.batch_size" in err and "resume with --resume" in err and "Traceback" not in err, err
    for error in (in_task.as_instanceof_cause(), bug, ActorDiedError(in_task)):  # the last: a constructor raised
        raised.append(error)
        with pytest.raises(type(error)):
            cli.main(argv)
    raised.append(lost)
    with pytest.raises(WorkerGroupError):
        cli.main([*argv, "--verbose"])
