"""What `init_ray` sets up around Ray: quiet mode's one filter on Ray's error channel (the raylet's worker-pool size
notice is dropped: it reached the CLI's output on 2-core machines, CI included; every other raylet error still
reaches the user), and Ray Train's poll interval (a round of a small run waited for the controller's poll)."""
from __future__ import annotations

import os

import pytest

from raydc.engine.runtime import HEALTH_CHECK_ENV, _quiet_error_printer, _quiet_raylet_notices

NOTICE = ("WARNING: 12 PYTHON worker processes have been started on node: 06e1 with address: 192.0.2.2, which is "
          "6x the maximum expected startup concurrency (2).")


def test_the_filter_drops_the_worker_pool_notice_and_passes_every_other_raylet_line():
    got: list[tuple[dict, bool]] = []
    printer = _quiet_error_printer(lambda data, ignore_prefix: got.append((data, ignore_prefix)))
    printer({"lines": [NOTICE], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    assert got == []  # nothing left to print: Ray's printer is not called at all
    oom = "Task was killed due to the node running low on memory."
    printer({"lines": [NOTICE, oom], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    printer({"lines": [NOTICE], "pid": 4242, "is_err": False}, ignore_prefix=True)  # a worker's own line: kept
    assert got == [({"lines": [oom], "pid": "raylet", "is_err": False}, False),
                   ({"lines": [NOTICE], "pid": 4242, "is_err": False}, True)]


def test_a_dead_raylets_report_is_printed_once_without_its_log_tail(tmp_path):
    """The report is Ray's own (its agents' `report_raylet_error_logs` on a raylet.out): both agents send it."""
    from ray._private.process_watcher import report_raylet_error_logs

    tail = [f"[2026-12-07 19:20:{i:02d},000 I 4242 4242] (raylet) node_manager.cc:{100 + i}: heartbeat {i}\n"
            for i in range(30)]
    (tmp_path / "raylet.out").write_text("".join(tail))
    published: list[str] = []

    class Gcs:  # where Ray's agent publishes to: the message it would send every driver
        def publish_error(self, key, error_type, message, job_id, timeout):
            published.append(message)

    report_raylet_error_logs(str(tmp_path), Gcs())
    assert len(published) == 1 and "heartbeat 29" in published[0]  # Ray's format as this test assumes it
    got: list[dict] = []
    printer = _quiet_error_printer(lambda data, ignore_prefix: got.append(data))
    for _ in range(2):
        printer({"lines": [published[0]], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    assert len(got) == 1 and len(got[0]["lines"]) == 1
    line = got[0]["lines"][0]
    assert line.startswith("Raylet is terminated. Termination is unexpected.") and "OOM killer" in line
    assert "heartbeat" not in line and "\n" not in line and "raylet.out" in line


def test_quiet_mode_wraps_rays_printer_once_and_verbose_puts_it_back():
    from ray._private import worker

    found = worker.print_to_stdstream  # a quiet run earlier in this process may have wrapped it already
    original = getattr(found, "raydc_original", found)
    try:
        _quiet_raylet_notices(True)
        _quiet_raylet_notices(True)  # twice (two runs in one interpreter): still one wrapper over Ray's own
        assert worker.print_to_stdstream is not original and worker.print_to_stdstream.raydc_original is original
        _quiet_raylet_notices(False)
        assert worker.print_to_stdstream is original
    finally:
        worker.print_to_stdstream = found


@pytest.mark.ray
def test_ray_train_polls_its_workers_often_unless_the_user_chose_an_interval(ray_local, monkeypatch):
    from raydc.config import RayConfig
    from raydc.engine.runtime import init_ray, ray_state_kept

    monkeypatch.delenv(HEALTH_CHECK_ENV, raising=False)
    with ray_state_kept():
        init_ray(RayConfig())
        assert float(os.environ[HEALTH_CHECK_ENV]) < 2.0  # Ray Train's default is 2 s
    assert HEALTH_CHECK_ENV not in os.environ  # the Python API leaves the environment as it found it
    monkeypatch.setenv(HEALTH_CHECK_ENV, "3")
    init_ray(RayConfig())
    assert os.environ[HEALTH_CHECK_ENV] == "3"


def test_a_ray_that_raydc_starts_itself_runs_no_preemption_watcher_and_a_joined_one_keeps_rays_default():
    from raydc.engine.runtime import PREEMPTION_WATCHER_ENV, ray_train_env

    assert ray_train_env(started_here=True)[PREEMPTION_WATCHER_ENV] == "0"
    assert PREEMPTION_WATCHER_ENV not in ray_train_env(started_here=False)  # a cluster's nodes may be drained
    assert ray_train_env(started_here=False)[HEALTH_CHECK_ENV] == ray_train_env(started_here=True)[HEALTH_CHECK_ENV]
