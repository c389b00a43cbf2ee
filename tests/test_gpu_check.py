"""benchmarks/gpu_check.py, the script run once on a GPU machine: here its CPU side, and its comparisons run
CPU against CPU (which must agree exactly), so a broken check is found before the device time is spent."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import REPO


# Two CPU passes of every check (AlexNet-BN features among them) in a fresh interpreter: among the slowest tests
# of `make test`, for a script that runs on a GPU machine; run it (`pytest -m slow tests/test_gpu_check.py`) before
# spending device time.
@pytest.mark.slow
def test_gpu_check_compares_and_reports(tmp_path):
    out = tmp_path / "gpu.json"
    p = subprocess.run([sys.executable, "-m", "benchmarks.gpu_check", "--against", "cpu", "--out", str(out)],
                       cwd=REPO, capture_output=True, text=True, timeout=600, env={"OMP_NUM_THREADS": "1",
                                                                                    **__import__("os").environ})
    assert p.returncode == 0, p.stdout + p.stderr[-3000:]
    checks = {c["name"]: c for c in json.loads(out.read_text())["checks"]}
    for name in ("features_small_convnet", "features_alexnet_bn", "deepcluster_step", "dec_reconstruction_step",
                 "dec_kl_step", "dac_step"):
        assert checks[name]["status"] == "PASS", checks[name]
        assert "0.00e+00" in checks[name]["detail"], checks[name]  # CPU against itself: bit-identical
    assert "loss 0.00000" not in checks["dec_kl_step"]["detail"]  # the KL step has something to compare
    assert checks["kmeans_gpu"]["status"] == "SKIP" or checks["kmeans_gpu_one"]["status"] == "PASS"
    # bf16 autocast against float32 on the same CPU: close, within the bf16 tolerances, and really different
    # (an autocast that did nothing would give an error of exactly 0).
    for name in ("features_small_convnet_bf16", "deepcluster_step_bf16"):
        assert checks[name]["status"] == "PASS", checks[name]
    rel = float(checks["features_small_convnet_bf16"]["detail"].rsplit(" ", 1)[1])
    assert 0 < rel <= 3e-2, checks["features_small_convnet_bf16"]
