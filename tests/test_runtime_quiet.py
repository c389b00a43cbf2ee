"""Quiet mode's one filter on Ray's error channel: the raylet's worker-pool size notice is dropped (it reached the
CLI's output on 2-core machines, CI included), every other raylet error still reaches the user."""
from __future__ import annotations

from raydc.engine.runtime import _quiet_raylet_notices


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
