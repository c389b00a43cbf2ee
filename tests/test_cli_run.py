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
