"""A sweep whose directory is on object storage (`dir: s3://...`), on the S3 server of tests/s3server.py: Tune's
experiment, every trial's run directory and the outputs go to the bucket, nothing to local disk, and a sweep
SIGKILLed after its first trial resumes from the bucket without training that trial again."""
from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import time

import pytest

from tests.conftest import REPO
from tests.helpers import retry_ray_start, sweep_cmd

pytestmark = [pytest.mark.ray, pytest.mark.slow]  # two sweeps in subprocesses with their own Ray


def test_a_sweep_on_s3_killed_after_one_trial_resumes_from_the_bucket(sweep_files, s3_server, tmp_path):
    from raydc import storage

    out = s3_server.uri("sweeps/k23")
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0", **s3_server.env)
    env.pop("RAY_ADDRESS", None)
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(sweep_cmd(sweep_files, out), cwd=tmp_path, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
        try:
            deadline = time.time() + 500
            while time.time() < deadline and proc.poll() is None and " done (1/2)" not in log_path.read_text():
                time.sleep(0.5)
            assert proc.poll() is None and " done (1/2)" in log_path.read_text(), log_path.read_text()[-3000:]
            time.sleep(3)  # into the second trial
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the embedded Ray it started
            except ProcessLookupError:
                pass
    runs = storage.list_dirs(storage.join(out, "runs"))
    finished = [r for r in runs if storage.is_file(storage.join(r, "metrics.jsonl")) and json.loads(
        storage.read_text(storage.join(r, "metrics.jsonl")).splitlines()[-1]).get("final")]
    assert len(finished) == 1 and not storage.is_file(storage.join(out, "trials.csv")), runs

    resumed = retry_ray_start(lambda: subprocess.run(sweep_cmd(sweep_files, out, "--resume"), cwd=tmp_path, env=env,
                                                     capture_output=True, text=True, timeout=900))
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"resuming the sweep from {out}/tune" in resumed.stdout, resumed.stdout[-3000:]
    lines = storage.read_text(storage.join(finished[0], "attempts.log")).splitlines()
    attempts = [json.loads(x)["action"] for x in lines]
    assert attempts.count("train") == 1 and "resume" not in attempts, attempts
    rows = list(csv.DictReader(io.StringIO(storage.read_text(storage.join(out, "trials.csv")))))
    assert sorted(int(r["cluster.k"]) for r in rows) == [2, 3] and all(r["status"] == "done" for r in rows), rows
    assert all(r["run_dir"].startswith(f"{out}/runs/") for r in rows), rows
    for name in ("best.yaml", "summary.json", "report/selection.png", "sweep.yaml", "base.yaml"):
        assert storage.is_file(storage.join(out, name)), name
    assert storage.list_dirs(storage.join(out, "tune"))  # Tune's experiment lives in the bucket too
    assert not list(tmp_path.glob("s3*")), list(tmp_path.iterdir())  # nothing taken for a relative local path
