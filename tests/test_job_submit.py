"""The README's `ray job submit` section, run as written against a fresh `ray start --head`.

The head is a real local one (127.0.0.1, its own ports, temp dir and HOME, token authentication on as Ray 2.60
starts it on a machine that has run Ray before), run with --block in its own process group, so the test stops
exactly it (never `ray stop`, which
would kill every Ray on the machine). Its PATH puts this virtualenv last, so a bare `python` there is not
one with raydc's dependencies: the job must bring them (the README's runtime env). The README's
client commands run in bash with only its placeholders filled in (head address, token, `/shared`) and, for
time, a smaller k and one epoch appended; the client has its own HOME, so the token step is what lets it in.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO

# slow: the README's runtime env makes Ray build a virtualenv and pip-check every package before the job starts;
# the whole test took 215 s and 461 s in two sessions here, a quarter of `make test`. `make test-all` runs it.
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(900)]
SMALL = (" --set cluster.k=4 --set deepcluster.final_k=2 --set train.epochs=1 --set train.batch_size=64"
         " --set features.batch_size=200")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def readme_block(marker: str) -> str:
    text = (REPO / "README.md").read_text()
    m = re.search(rf"<!-- {marker} -->\n```bash\n(.*?)```", text, re.S)
    assert m, f"README.md has no ```bash block after <!-- {marker} -->"
    return m.group(1)


def _submit(script: str, env: dict) -> subprocess.CompletedProcess:
    for _ in range(40):  # the dashboard answers before its job agent is up: "No available agent"
        job = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=REPO, env=env, capture_output=True,
                             text=True, timeout=800)
        if "No available agent" not in job.stdout + job.stderr:
            return job
        time.sleep(3)
    return job


def test_readme_job_submit_against_a_fresh_head(tmp_path, mnist_root):
    from raydc.data.prepare import prepare

    shared = tmp_path / "shared"
    prepare("mnist", shared / "shards" / "mnist", root=str(mnist_root), split="test", limit=400, progress=False)
    bin_dir = Path(sys.executable).parent
    base_env = {k: v for k, v in os.environ.items()
                if not k.startswith(("RAY_ADDRESS", "RAY_AUTH", "RAYDC_", "VIRTUAL_ENV", "PYTHONPATH"))}
    base_env["RAY_USAGE_STATS_ENABLED"] = "0"
    system_path = os.pathsep.join(p for p in base_env.get("PATH", "").split(os.pathsep) if Path(p) != bin_dir)
    (tmp_path / "head-home").mkdir()
    (tmp_path / "client-home").mkdir()
    # The head's admin has `ray` on PATH, but after the system's own `python`.
    head_env = dict(base_env, HOME=str(tmp_path / "head-home"), PATH=f"{system_path}{os.pathsep}{bin_dir}")
    client_env = dict(base_env, HOME=str(tmp_path / "client-home"), PATH=f"{bin_dir}{os.pathsep}{system_path}")
    # The head's machine has run Ray before (any local ray.init() writes ~/.ray/auth_token), so `ray start
    # --head` turns token authentication on, as in the issue this test reproduces.
    subprocess.run([str(bin_dir / "ray"), "get-auth-token", "--generate"], env=head_env, check=True,
                   capture_output=True, timeout=120)
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
        env=head_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        while time.time() < deadline:
            assert head.poll() is None, head.stdout.read()
            try:
                with socket.create_connection(("127.0.0.1", dash), timeout=1):
                    break
            except OSError:
                time.sleep(1)
        # "On the head node": the README's token step, run with the head's HOME.
        token = subprocess.run(["bash", "-euo", "pipefail", "-c", readme_block("job-submit-head")], env=head_env,
                               capture_output=True, text=True, timeout=120, check=True).stdout.strip()
        assert re.fullmatch(r"\S{16,}", token), token
        client = readme_block("job-submit-client")
        for placeholder in ("<head-node>:8265", "<the token printed on the head>", "/shared/"):
            assert placeholder in client, placeholder
        script = (client.replace("<head-node>:8265", f"127.0.0.1:{dash}")
                  .replace("<the token printed on the head>", token)
                  .replace("/shared/", f"{shared}/").rstrip() + SMALL + "\n")

        # Without the token the client is refused: the token step is not decoration.
        refused = _submit(script.replace(f"RAY_AUTH_TOKEN={token}", "RAYDC_UNUSED=x"), client_env)
        assert refused.returncode != 0 and "auth" in (refused.stdout + refused.stderr).lower()

        job = _submit(script, client_env)
        out = job.stdout + job.stderr
        assert job.returncode == 0 and "succeeded" in out, out[-6000:]
        run_dir = shared / "runs" / "mnist"
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        assert [r["epoch"] for r in rows] == [0, 1]
        assert list((run_dir / "assignments").glob("part-*.parquet"))
        assert sum(line.startswith("epoch 0 |") for line in out.splitlines()) == 1, out[-6000:]
        assert "TrainingReport(" not in out and "TrainController" not in out

        # A relative run.dir would land in Ray's temporary package directory: refused, naming the field.
        rel = _submit(script.replace(f"run.dir={shared}/runs/mnist", "run.dir=runs/mnist"), client_env)
        out = rel.stdout + rel.stderr
        assert rel.returncode != 0 and "config field 'run.dir'" in out and "RAYDC_BASE_DIR" in out, out[-4000:]
        assert "Traceback" not in out, out[-4000:]
    finally:
        os.killpg(head.pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(temp, ignore_errors=True)
