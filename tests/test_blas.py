"""raydc/_blas.py: the OpenBLAS kernel choice made at `import raydc` (fake cpuinfo files, dict environs)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import raydc._blas as blas

AVX512 = "avx512f avx512bw avx512vl avx512dq avx512cd"
REPO = Path(__file__).resolve().parents[1]


def _cpuinfo(tmp_path: Path, flags: str) -> str:
    p = tmp_path / "cpuinfo"
    p.write_text(f"processor\t: 0\nmodel name\t: Fake CPU\nflags\t\t: fpu sse sse2 {flags}\n\n"
                 f"processor\t: 1\nflags\t\t: fpu\n")
    return str(p)


@pytest.fixture(autouse=True)
def x86(monkeypatch):
    """Pretend to be x86_64 so the tests mean the same on any build machine."""
    real = os.uname()
    fake = os.uname_result((real.sysname, real.nodename, real.release, real.version, "x86_64"))
    monkeypatch.setattr(blas.os, "uname", lambda: fake)


@pytest.mark.parametrize("flags, expected", [
    (f"avx avx2 fma {AVX512}", "SkylakeX"),
    ("avx avx2 fma avx512f avx512bw avx512vl avx512dq", "Haswell"),   # one avx512 flag missing
    ("avx avx2 fma", "Haswell"),
    ("avx avx2", "Sandybridge"),                                        # no fma: not Haswell
    ("avx", "Sandybridge"),
    ("sse4_1 sse4_2", None),
])
def test_kernel_from_flags(tmp_path, flags, expected):
    env: dict[str, str] = {}
    assert blas.configure_openblas(env, _cpuinfo(tmp_path, flags)) == expected
    assert env.get("OPENBLAS_CORETYPE") == expected


def test_user_value_is_never_overridden(tmp_path):
    env = {"OPENBLAS_CORETYPE": "Prescott"}
    assert blas.configure_openblas(env, _cpuinfo(tmp_path, f"avx avx2 fma {AVX512}")) == "Prescott"
    assert env == {"OPENBLAS_CORETYPE": "Prescott"}


def test_first_cpu_flags_only_and_missing_cpuinfo(tmp_path):
    assert "avx2" in blas.cpu_flags(_cpuinfo(tmp_path, "avx2"))
    assert blas.cpu_flags(str(tmp_path / "absent")) == frozenset()
    env: dict[str, str] = {}
    assert blas.configure_openblas(env, str(tmp_path / "absent")) is None and env == {}


def test_non_x86_is_left_alone(tmp_path, monkeypatch):
    real = os.uname()
    arm = os.uname_result((real.sysname, real.nodename, real.release, real.version, "aarch64"))
    monkeypatch.setattr(blas.os, "uname", lambda: arm)
    env: dict[str, str] = {}
    assert blas.configure_openblas(env, _cpuinfo(tmp_path, f"avx avx2 fma {AVX512}")) is None
    assert env == {}


def test_import_raydc_keeps_a_user_setting():
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    env["OPENBLAS_CORETYPE"] = "Prescott"
    env["PYTHONPATH"] = str(REPO)
    out = subprocess.run([sys.executable, "-c", "import raydc, os; print(os.environ['OPENBLAS_CORETYPE'])"],
                         env=env, capture_output=True, text=True, check=True, cwd=REPO)
    assert out.stdout.strip() == "Prescott"
