"""What `init_ray` sets up around Ray: quiet mode's one filter on Ray's error channel (the raylet's worker-pool size
notice is dropped: it reached the CLI's output on 2-core machines, CI included; every other raylet error still
reaches the user), and Ray Train's poll interval (a round of a small run waited for the controller's poll)."""
from __future__ import annotations

import os

import pytest

from raydc.engine.runtime import HEALTH_CHECK_ENV, _quiet_raylet_notices


def _print(text: str) -> None:
    from ray._private import worker

    worker.print_to_stdstream({"lines": [text], "pid": "raylet", "is_err": False}, ignore_prefix=False)


def test_quiet_mode_drops_the_worker_pool_notice_and_keeps_other_raylet_errors(capsys):
    from ray._private import worker

    found = worker.print_to_stdstream  # a quiet run earlier in this process may have wrapped it already
    original = getattr(found, "raydc_original", found)
    notice = ("WARNING: 12 PYTHON worker processes have been started on node: 06e1 with address: 192.0.2.2, "
              "which is 6x the maximum expected startup concurrency (2).")
    try:
        _quiet_raylet_notices(True)
        _quiet_raylet_notices(True)  # twice (two runs in one interpreter): still one wrapper over Ray's own
        assert worker.print_to_stdstream.raydc_original is original
        _print(notice)
        _print("Task was killed due to the node running low on memory (test_runtime_quiet).")
        out = capsys.readouterr().out
        assert "PYTHON worker processes" not in out
        assert "killed due to the node running low on memory (test_runtime_quiet)" in out
    finally:
        _quiet_raylet_notices(False)
    try:
        assert worker.print_to_stdstream is original
        _print(notice.replace("12", "13"))  # verbose: Ray's printer, the notice shown
        assert "13 PYTHON worker processes have been started" in capsys.readouterr().out
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
