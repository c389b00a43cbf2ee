"""A full disk under a local run directory (a small tmpfs mounted by the test; skipped where mounting is not
allowed): every write fails with one line naming the path and the space it needed, and none leaves a
half-written file, under its real name or as a temporary: the old content stays whole. A whole run filling its
disk mid-run and resumed: tests/test_faults_run.py (slow)."""
from __future__ import annotations

import json
import os
import subprocess

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydc import storage
from raydc.engine.rundir import RunDir, save_safe
from raydc.errors import DataError


@pytest.fixture
def small_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(disk)], capture_output=True,
                       text=True, timeout=30)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {p.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


def _fill(disk, leave: int = 0) -> None:
    """Take all but `leave` bytes (tmpfs counts whole 4 KiB pages)."""
    free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
    with open(disk / "filler", "wb") as f:
        f.write(b"\0" * max(0, free - leave))


def _hidden(disk) -> list[str]:
    return sorted(str(p.relative_to(disk)) for p in disk.rglob(".*"))


def test_writes_on_a_full_disk_fail_in_one_line_and_leave_the_old_file_whole(small_disk):
    run = RunDir(small_disk / "run")
    run.write_metrics([{"round": 0, "loss": 1.0}])
    save_safe(run.clustering_path, {"centroids": list(range(10))})
    _fill(small_disk)
    with pytest.raises(DataError) as e:
        run.append_metrics({"round": 1, "loss": 0.5, "pad": "x" * 200_000})
    msg = str(e.value)
    assert "\n" not in msg and run.metrics_path in msg and "no space left" in msg, msg
    assert "MiB free" in msg and "this write needs 0.19 MiB" in msg and "--resume" in msg, msg
    assert run.read_metrics() == [{"round": 0, "loss": 1.0}]  # the old file, whole
    with pytest.raises(DataError, match="no space left"):
        save_safe(run.clustering_path, {"centroids": list(range(100_000))})
    assert run.load_clustering()["centroids"] == list(range(10))
    assert _hidden(small_disk) == []  # no temporary left behind


def test_a_parquet_part_on_a_full_disk_leaves_neither_a_torn_part_nor_a_temporary(small_disk):
    part = str(small_disk / "run" / "assignments" / "part-00000.parquet")
    table = pa.table({"row": list(range(300_000))})
    _fill(small_disk, leave=64 << 10)
    with pytest.raises(DataError) as e, storage.open_output_stream(part) as f:
        pq.write_table(table, f)
    assert part in str(e.value) and "no space left" in str(e.value), str(e.value)
    assert not os.path.exists(part) and _hidden(small_disk) == []
    (small_disk / "filler").unlink()  # space freed: the same write goes through
    with storage.open_output_stream(part) as f:
        pq.write_table(table, f)
    assert pq.read_table(part).num_rows == 300_000


def test_the_sweep_outputs_writer_cleans_up_too(small_disk):
    from raydc.storage import write_text_atomic

    target = small_disk / "trials.csv"
    write_text_atomic(str(target), "a\n")
    _fill(small_disk)
    with pytest.raises(DataError, match="no space left"):
        write_text_atomic(str(target), json.dumps(list(range(100_000))))
    assert target.read_text() == "a\n" and _hidden(small_disk) == []


def test_a_full_disk_fails_a_lease_renewal_without_losing_the_lease(small_disk):
    """The heartbeat writes its new lock content before it touches the lock: on a full disk the renewal fails
    (the heartbeat thread tries again) and the lease stays whole and this writer's."""
    from raydc.engine.lease import LeaseHeld, RunLease, lease_location

    run = str(small_disk / "run")
    a = RunLease(run, 30, log=lambda m: None)
    a.acquire()
    before = open(lease_location(run), "rb").read()
    _fill(small_disk)
    with pytest.raises(OSError):
        a.renew()
    assert open(lease_location(run), "rb").read() == before
    (small_disk / "filler").unlink()
    a.renew()  # still ours
    with pytest.raises(LeaseHeld):
        RunLease(run, 30, log=lambda m: None).acquire()
    a.release()
    assert _hidden(small_disk) == []


def test_ray_trains_own_write_on_a_full_disk_becomes_the_same_one_line():
    """Ray Train writes checkpoints and its controller's state under the run directory itself; a full disk
    there reaches the driver as a ControllerError (or a worker's failure) around a bare pyarrow OSError."""
    from ray.train import ControllerError

    from raydc.engine.trainer import _user_cause

    err = ControllerError(OSError(28, "Error writing bytes to file. Detail: [errno 28] No space left on device"))
    cause = _user_cause(err, "/mnt/runs/x")
    assert isinstance(cause, DataError) and str(cause).startswith("/mnt/runs/x: no space left"), cause
    assert _user_cause(ControllerError(RuntimeError("something else")), "/mnt/runs/x") is None
