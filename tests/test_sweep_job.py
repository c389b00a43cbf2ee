"""`ray job submit` of a 2-trial sweep (jobs/sweep.py) against a real local head with its own ports, as
tests/test_job_submit.py does for a training run; the head is stopped by its process group, never `ray stop`."""
from __future__ import annotations

import csv
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.conftest import REPO
from tests.helpers import three_groups

pytestmark = [pytest.mark.ray, pytest.mark.slow]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_runs_a_sweep(tmp_path):
    from raydc.data.prepare import prepare

    images, labels = three_groups()
    np.savez(tmp_path / "src.npz", images=images, labels=labels)
    shards = tmp_path / "shards"
    prepare("npz", shards, root=tmp_path / "src.npz", rows_per_shard=90, progress=False)
    sweep_file = tmp_path / "k.yaml"
    sweep_file.write_text(yaml.safe_dump({"space": {"cluster.k": {"grid": [2, 3]}}, "dir": str(tmp_path / "out")}))

    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0",
               PATH=f"{bin_dir}:{os.environ.get('PATH', '')}")
    env.pop("RAY_ADDRESS", None)
    gcs, dash = free_port(), free_port()
    own_ports = [f"--{name}={free_port()}" for name in (
        "dashboard-agent-listen-port", "dashboard-agent-grpc-port", "metrics-export-port",
        "runtime-env-agent-port", "node-manager-port", "object-manager-port", "ray-client-server-port")]
    temp = Path("/tmp") / f"raydc-sweepjob-{os.getpid()}"  # short: Ray's socket paths have a length limit
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
        cmd = [str(bin_dir / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO), "--",
               "python", "jobs/sweep.py", "--sweep", str(sweep_file),
               "--set", f"data.shards={shards}", "--set", "model.input_size=16", "--set", "model.feature_dim=32",
               "--set", "cluster.pca_dim=0", "--set", "cluster.num_shards=1", "--set", "cluster.n_init=5",
               "--set", "train.epochs=1", "--set", "train.lr=0.01",
               "--set", "train.batch_size=30", "--set", "train.crop=false", "--set", "train.torch_threads=1",
               "--set", "features.batch_size=180"]
        for _ in range(40):  # the dashboard answers before its job agent is up: "No available agent"
            job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
            if "No available agent" not in job.stdout + job.stderr:
                break
            time.sleep(3)
        text = job.stdout + job.stderr
        assert job.returncode == 0, text[-4000:]
        assert "succeeded" in text and "best: cluster.k=" in text
        rows = list(csv.DictReader((tmp_path / "out" / "trials.csv").open()))
        assert sorted(int(r["cluster.k"]) for r in rows) == [2, 3] and all(r["status"] == "done" for r in rows)
        assert (tmp_path / "out" / "best.yaml").exists()
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
