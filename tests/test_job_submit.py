"""A real local Ray head (`ray start --head` on 127.0.0.1, its own ports and temp dir), a tiny job through
`ray job submit`, then the run directory checked. The head runs with --block in its own process group, so the
test stops exactly it (never `ray stop`, which would kill every Ray on the machine)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.ray


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_deepcluster(tmp_path, mnist_root):
    from raydc.data.prepare import prepare

    shards = tmp_path / "shards"
    prepare("mnist", shards, root=str(mnist_root), split="test", limit=400, progress=False)
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{bin_dir}:{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    # Every port the head opens is its own: another Ray on this machine (a user's run, a parallel test
    # session) holds the defaults, and the job agent then fails to bind and jobs are never accepted.
    own_ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "node-manager-port", "object-manager-port", "ray-client-server-port")]
    temp = Path("/tmp") / f"raydc-jobtest-{os.getpid()}"  # short: Ray's socket paths have a length limit
    head = subprocess.Popen(
        [str(bin_dir / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={gcs}",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}", "--include-dashboard=true",
         f"--temp-dir={temp}", "--num-cpus=4", "--disable-usage-stats", *own_ports],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 120
        while time.time() < deadline:
            assert head.poll() is None, head.stdout.read()
            try:
                with socket.create_connection(("127.0.0.1", dash), timeout=1):
                    break
            except OSError:
                time.sleep(1)
        run_dir = tmp_path / "run"
        cmd = [str(bin_dir / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
               "python", "jobs/deepcluster.py", "--set", f"data.shards={shards}", "--set", f"run.dir={run_dir}",
               "--set", "cluster.k=4", "--set", "cluster.pca_dim=8", "--set", "train.epochs=1",
               "--set", "train.batch_size=64", "--set", "features.batch_size=200"]
        for _ in range(40):  # the dashboard answers before its job agent is up: "No available agent"
            job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            if "No available agent" not in job.stdout + job.stderr:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in (job.stdout + job.stderr)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [0, 1]
        assert (run_dir / "assignments.parquet").exists()
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
