"""What the `raydc` command line tells a user who got something wrong: one line, naming what to fix, exit 2."""
from __future__ import annotations

import pytest

from raydc.cli import main


@pytest.mark.parametrize("command", [["evaluate"], ["report"]])
def test_missing_or_foreign_run_directory_is_named(command, tmp_path, capsys):
    cases = {
        tmp_path / "no-such-run": "does not exist",
        tmp_path / "not-a-run": "is not a raydc run directory",
        tmp_path / "a-file": "is not a directory",
    }
    (tmp_path / "not-a-run").mkdir()
    (tmp_path / "not-a-run" / "metrics.jsonl").write_text("")
    (tmp_path / "a-file").write_text("x")
    for run, says in cases.items():
        assert main([*command, "--run", str(run)]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and str(run) in err and says in err, err
        assert "config file" not in err, err


def test_help_answers_without_importing_torch_or_ray():
    """`raydc --help` is what a user types first: it must not pay for torch's and Ray's imports (seconds)."""
    import subprocess
    import sys

    from tests.conftest import REPO

    code = ("import sys\nfrom raydc.cli import main\n"
            "try:\n    main(['train', '--help'])\nexcept SystemExit:\n    pass\n"
            "print('IMPORTED', sorted(m for m in ('torch', 'ray') if m in sys.modules))")
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "--resume" in p.stdout and p.stdout.strip().endswith("IMPORTED []"), p.stdout[-500:]
