"""The one place raydc imports faiss, so that the OpenBLAS kernel choice always happens first.

faiss-cpu bundles its own OpenBLAS, which reads OPENBLAS_CORETYPE once, when the library loads. `import
raydc` sets that variable (see `raydc/_blas.py`); importing faiss from here guarantees the order in every
process, Ray workers included. faiss-cpu and faiss-gpu install the same `faiss` module, and the official
faiss-gpu wheel imports fine on a machine without a GPU and then silently runs everything on CPU: the
functions below say which build and which device actually ran, so logs and results can record it.
"""
from __future__ import annotations

import logging
import os
import sys
from types import ModuleType

import raydc  # noqa: F401  (sets OPENBLAS_CORETYPE before faiss loads its OpenBLAS)
from raydc.errors import UserError

log = logging.getLogger(__name__)

_warned_gpu_build_without_gpu = False


def import_faiss() -> ModuleType:
    """faiss, imported after raydc has chosen the OpenBLAS kernel; a missing install is a UserError."""
    try:
        import faiss
    except ImportError as e:  # pragma: no cover - depends on the install
        raise UserError(
            "faiss is not installed: `pip install faiss-cpu` (or `pip install 'raydc[cpu]'`), or on a GPU machine "
            "`pip install 'raydc[gpu]'` (faiss-cpu and faiss-gpu are mutually exclusive: uninstall one first). "
            f"Import error: {e}"
        ) from e
    return faiss


def is_gpu_build(faiss: ModuleType | None = None) -> bool:
    """True for a faiss build with GPU support (whether or not a GPU is visible)."""
    faiss = faiss or import_faiss()
    return hasattr(faiss, "StandardGpuResources")


def faiss_gpu_count() -> int:
    """GPUs faiss can use: 0 for a CPU build, and 0 (with a one-time warning) for a GPU build that sees none."""
    faiss = import_faiss()
    if not is_gpu_build(faiss):
        return 0
    n = int(faiss.get_num_gpus())
    if n == 0:
        _warn_gpu_build_without_gpu()
    return n


def _warn_gpu_build_without_gpu() -> None:
    global _warned_gpu_build_without_gpu
    if not _warned_gpu_build_without_gpu:
        _warned_gpu_build_without_gpu = True
        log.warning("faiss has GPU support but sees no GPU (CUDA_VISIBLE_DEVICES=%r): it runs on CPU. "
                    "On a CPU-only machine install faiss-cpu instead.",
                    os.environ.get("CUDA_VISIBLE_DEVICES"))


def describe_faiss(use_gpus: int | None = None) -> str:
    """A one-line description of the faiss that runs, for logs and results.

    `use_gpus` is the number of GPUs a computation actually used (None: as many as faiss sees). Examples:
    "faiss-cpu 1.15.1 (OPENBLAS_CORETYPE=SkylakeX)", "faiss-gpu 1.10.0 on 2 GPUs",
    "faiss-gpu 1.10.0 on CPU (no GPU visible, OPENBLAS_CORETYPE=Haswell)".
    """
    faiss = import_faiss()
    version = getattr(faiss, "__version__", "?")
    blas = f"OPENBLAS_CORETYPE={os.environ.get('OPENBLAS_CORETYPE') or 'unset'}"
    if not is_gpu_build(faiss):
        return f"faiss-cpu {version} ({blas})"
    n = faiss_gpu_count() if use_gpus is None else use_gpus
    if n > 0:
        return f"faiss-gpu {version} on {n} GPU{'s' if n > 1 else ''}"
    reason = "no GPU visible" if faiss_gpu_count() == 0 else "GPU not requested"
    return f"faiss-gpu {version} on CPU ({reason}, {blas})"


def want_gpu(use_gpu: str) -> int:
    """How many GPUs to use for `use_gpu` in {"auto", "always", "never"}; "always" without a GPU is an error."""
    if use_gpu not in ("auto", "always", "never"):
        raise ValueError(f"use_gpu must be 'auto', 'always' or 'never', got {use_gpu!r}")
    if use_gpu == "never":
        return 0
    n = faiss_gpu_count()
    if use_gpu == "always" and n == 0:
        what = "this faiss build has no GPU support (faiss-cpu)" if not is_gpu_build() else "faiss sees no GPU"
        raise UserError(f"use_gpu='always' but {what}: install 'raydc[gpu]' on a GPU machine, "
                        f"or set cluster.use_gpu to 'auto' or 'never'")
    return n


def use_all_cores(n: int | None = None) -> int:
    """Let faiss's OpenMP loops, the BLAS and torch use `n` threads (default: every core of this machine).

    Why: Ray sets OMP_NUM_THREADS=1 in an actor that reserves no CPU, and raydc's shard actors reserve none
    (they time-share the CPUs with training, which waits while they cluster). Left alone, their k-means ran
    on one core: measured 586 ms/iteration at k=1000 in such an actor against 432 ms in a 2-thread process."""
    n = int(n or os.cpu_count() or 1)
    import_faiss().omp_set_num_threads(n)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(n)  # the OpenBLAS/OpenMP pools already loaded (numpy, scipy, faiss's own)
    except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
        pass
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    else:
        # torch is imported only where it is used (the exact sums, the bf16 path, a method's function on a shard):
        # a shard actor that only runs faiss never pays its import. When it does load, it reads this, not Ray's 1.
        os.environ["OMP_NUM_THREADS"] = str(n)
    return n
