"""raydc/_malloc.py: freed batches stay mapped in every process that imports raydc, unless the user says otherwise.

The behaviour is checked where it matters, in a fresh process: page faults while a 64 MiB buffer is allocated,
filled and freed again and again (what every batch's activations do). Under glibc's defaults each one is a fresh
mapping whose pages fault in; with the thresholds raised, the second and later ones reuse the first one's pages.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import raydc._malloc as malloc

REPO = Path(__file__).resolve().parents[1]

FAULTS = """
import resource, numpy as np
import raydc
def batch():
    a = np.ones(64 << 20 >> 3)  # 64 MiB, written: every page touched
    del a
batch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(5):
    batch()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(**env: str) -> int:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "RAYDC_MALLOC", "GLIBC_TUNABLES"))}
    full.update(env, PYTHONPATH=str(REPO))
    out = subprocess.run([sys.executable, "-c", FAULTS], env=full, capture_output=True, text=True, check=True,
                         timeout=120)
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(malloc.glibc_version() is None, reason="glibc's mallopt only")
def test_import_keeps_freed_batches_mapped():
    kept, default = _faults(), _faults(RAYDC_MALLOC="default")
    assert default > 100, f"glibc's defaults should fault a fresh 64 MiB mapping in each time ({default} faults)"
    assert kept * 20 < default, f"after `import raydc`: {kept} page faults, against {default} with glibc's defaults"


def test_what_is_in_force(monkeypatch):
    assert malloc.retain_freed_memory({"RAYDC_MALLOC": "default"}) == "default"
    assert malloc.retain_freed_memory({"MALLOC_TRIM_THRESHOLD_": "1000000"}) == "user"
    assert malloc.retain_freed_memory({"MALLOC_MMAP_THRESHOLD_": "1000000"}) == "user"
    assert malloc.retain_freed_memory({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1000000"}) == "user"
    expected = "retain" if malloc.glibc_version() else "unsupported"
    assert malloc.retain_freed_memory({}) == expected
    monkeypatch.setattr(malloc.os, "confstr", lambda name: "musl 1.2")
    monkeypatch.setattr(malloc, "_applied", None)
    assert malloc.glibc_version() is None
    assert malloc.retain_freed_memory({}) == "unsupported"
