"""Whole runs through the faults a cluster meets (slow: several CLI runs, each with its own Ray):

* the object store unreachable for a few seconds in the middle of a round (a fault-injecting proxy between the
  run and the S3 server, tests/faultproxy.py): the run waits it out and ends equal to an undisturbed run;
* unreachable for longer than RAYDC_STORAGE_RETRY_S: the run stops, and `--resume` once the store is back
  ends equal to the undisturbed run (its lease, which it could not give back, is taken over once stale);
* a full disk under a local run directory (a small tmpfs): one line naming the path, no half-written file,
  and `--resume` after space is freed ends equal to the undisturbed run.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import threading
import time

import pytest

from tests.conftest import REPO
from tests.faultproxy import fault_proxy
from tests.helpers import cli_train as _train_once
from tests.helpers import retry_ray_start

pytestmark = [pytest.mark.ray, pytest.mark.slow]

EPOCHS = ("train.epochs=2", "run.lease_timeout_s=8")


def _train(*args, **kwargs) -> subprocess.CompletedProcess:
    """A CLI run with a Ray of its own (see `_own_ray_env`), started again when that Ray did not come up."""
    from raydc import storage

    def first_start_again():
        if not kwargs.get("resume"):
            storage.delete_dir(args[1])  # what the failed start created, so the next start is a first start

    return retry_ray_start(lambda: _train_once(*args, **kwargs), before_retry=first_start_again)


def _own_ray_env(s3_server) -> dict:
    """Each faulted run starts its own Ray rather than joining the session's: the Ray workers must reach the
    store through the fault proxy the run is given (AWS_ENDPOINT_URL), and a shared Ray's workers inherited the
    unproxied address when it started."""
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0", **s3_server.env)
    env.pop("RAY_ADDRESS", None)
    return env


def _when_round_done(run_uri: str, round_: int, action, stop: threading.Event) -> threading.Thread:
    """Call `action` once the run's metrics hold round `round_`'s row (read straight from the S3 server)."""
    from raydc.engine.rundir import RunDir

    def watch():
        while not stop.is_set():
            try:
                if any(r.get("epoch") == round_ for r in RunDir(run_uri).read_metrics()):
                    action()
                    return
            except Exception:  # noqa: BLE001  (a metrics file being replaced)
                pass
            time.sleep(0.2)

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


def _same_run(a_uri: str, b_uri: str) -> None:
    from raydc.engine.rundir import RunDir

    a, b = RunDir(a_uri), RunDir(b_uri)
    ra, rb = a.read_metrics(), b.read_metrics()
    assert [r["epoch"] for r in ra] == [r["epoch"] for r in rb] == [0, 1, 2] and ra[-1]["final"], (ra, rb)
    for x, y in zip(ra, rb):
        for key in ("loss", "kmeans_objective", "acc", "nmi", "pca_rows"):
            if key in y:
                assert x[key] == pytest.approx(y[key], rel=1e-5), (x["epoch"], key)
    xa, xb = a.read_assignments(), b.read_assignments()
    order_a, order_b = xa["id"].argsort(), xb["id"].argsort()
    assert (xa["id"][order_a] == xb["id"][order_b]).all() and (xa["cluster"][order_a] == xb["cluster"][order_b]).all()


@pytest.fixture(scope="module")
def undisturbed(shards_local_and_s3, s3_server):
    _, remote = shards_local_and_s3
    run_uri = s3_server.uri("faults/undisturbed")
    p = _train(remote, run_uri, _own_ray_env(s3_server), *EPOCHS)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    return run_uri


def _train_through(proxy, shards: str, run_uri: str, env: dict, *extra: str, resume: bool = False):
    env = dict(env, AWS_ENDPOINT_URL=proxy.endpoint)
    return _train(shards, run_uri, env, *EPOCHS, *extra, resume=resume)


def test_a_short_storage_outage_mid_round_costs_a_wait_and_nothing_else(shards_local_and_s3, s3_server,
                                                                         undisturbed):
    _, remote = shards_local_and_s3
    run_uri = s3_server.uri("faults/short")
    stop = threading.Event()
    with fault_proxy(s3_server.endpoint) as proxy:
        _when_round_done(run_uri, 0, lambda: proxy.outage(8.0, "drop"), stop)
        p = _train_through(proxy, remote, run_uri, dict(_own_ray_env(s3_server), RAYDC_STORAGE_RETRY_S="60"))
        stop.set()
        refused = proxy.refused
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    assert refused > 0, p.stdout[-3000:]  # the outage happened while the run was talking to the store
    _same_run(run_uri, undisturbed)


def test_a_long_storage_outage_stops_the_run_and_resume_equals_an_undisturbed_run(shards_local_and_s3,
                                                                                  s3_server, undisturbed):
    _, remote = shards_local_and_s3
    run_uri = s3_server.uri("faults/long")
    env = dict(_own_ray_env(s3_server), RAYDC_STORAGE_RETRY_S="2")
    stop = threading.Event()
    with fault_proxy(s3_server.endpoint) as proxy:
        _when_round_done(run_uri, 0, lambda: proxy.outage(600.0, "drop"), stop)
        p = _train_through(proxy, remote, run_uri, env)
        stop.set()
        out = p.stdout + p.stderr
        assert proxy.refused > 0, out[-4000:]
        proxy.outage(0, "drop")  # the store is back
        assert p.returncode == 2, out[-4000:]
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("raydc: error:") and "cannot reach" in last and "--resume" in last, out[-4000:]
        p = _train_through(proxy, remote, run_uri, env, resume=True)
    assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
    _same_run(run_uri, undisturbed)


def test_a_full_disk_stops_the_run_with_the_path_and_resume_after_freeing_space_equals_an_undisturbed_run(
        shards_local_and_s3, s3_server, undisturbed, tmp_path):
    local, _ = shards_local_and_s3
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256m", "tmpfs", str(disk)], check=True,
                       capture_output=True, timeout=30)
    except (subprocess.CalledProcessError, FileNotFoundError, PermissionError) as e:
        pytest.skip(f"cannot mount a tmpfs here ({e})")
    try:
        run = disk / "run"
        filler = disk / "filler"
        stop = threading.Event()

        def fill():  # once round 0 is written: leave the run no space
            with contextlib.suppress(OSError), open(filler, "wb") as f:
                while True:
                    f.write(b"\0" * (1 << 16))
                    f.flush()

        env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
        env.pop("RAY_ADDRESS", None)
        _when_round_done(str(run), 0, fill, stop)
        p = _train(str(local), str(run), env, *EPOCHS, "data.cache=never")
        stop.set()
        out = p.stdout + p.stderr
        assert p.returncode == 2, out[-4000:]
        last = p.stderr.strip().splitlines()[-1]
        assert last.startswith("raydc: error:") and "no space left" in last and str(disk) in last, out[-4000:]
        leftovers = [q for q in run.rglob(".*.tmp-*")]
        assert not leftovers, leftovers  # no temporary left behind, and so no torn file under a real name
        from raydc.engine.rundir import RunDir

        RunDir(run).read_metrics()  # whole JSON lines, or this raises
        filler.unlink()
        p = _train(str(local), str(run), env, *EPOCHS, "data.cache=never", resume=True)
        assert p.returncode == 0, (p.stdout[-3000:], p.stderr[-3000:])
        _same_run(str(run), undisturbed)
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)
