"""Pick an OpenBLAS kernel from the CPU's flags before faiss (or numpy) loads its bundled OpenBLAS.

faiss-cpu's bundled OpenBLAS does not recognise some recent CPUs (AMD EPYC Zen 4 among them) and falls back to
a generic kernel: k-means was measured about 4x slower that way. OPENBLAS_CORETYPE is only read when the
library loads, so this must run before the first `import faiss` in every process (drivers and Ray workers
alike): `raydc/__init__.py` calls it. A user's own OPENBLAS_CORETYPE always wins, and we never name a kernel
whose instructions the CPU lacks (that would crash with SIGILL).
"""
from __future__ import annotations

import os

# Most capable first; each kernel needs all of its flags.
_KERNELS: tuple[tuple[str, frozenset[str]], ...] = (
    ("SkylakeX", frozenset({"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512cd"})),
    ("Haswell", frozenset({"avx2", "fma"})),
    ("Sandybridge", frozenset({"avx"})),
)


def cpu_flags(cpuinfo_path: str = "/proc/cpuinfo") -> frozenset[str]:
    """The flags of the first CPU listed; empty where /proc/cpuinfo is absent (macOS, Windows)."""
    try:
        with open(cpuinfo_path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def choose_coretype(flags: frozenset[str]) -> str | None:
    for name, needed in _KERNELS:
        if needed <= flags:
            return name
    return None


def configure_openblas(environ: dict | None = None, cpuinfo_path: str = "/proc/cpuinfo") -> str | None:
    """Set OPENBLAS_CORETYPE unless the user did; returns the value in force (None when left unset)."""
    env = os.environ if environ is None else environ
    if env.get("OPENBLAS_CORETYPE"):
        return env["OPENBLAS_CORETYPE"]
    if os.uname().machine not in ("x86_64", "AMD64"):
        return None
    chosen = choose_coretype(cpu_flags(cpuinfo_path))
    if chosen:
        env["OPENBLAS_CORETYPE"] = chosen
    return chosen
