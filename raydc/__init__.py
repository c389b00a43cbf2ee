"""raydc: deep clustering of images (DeepCluster, DEC) on Ray Data, Ray Train and faiss."""
from raydc._blas import configure_openblas as _configure_openblas
from raydc._malloc import retain_freed_memory as _retain_freed_memory

# Before anything can import faiss: its OpenBLAS reads OPENBLAS_CORETYPE once, at load time.
_configure_openblas()
# Before the first large tensor: keep freed batches mapped rather than faulting fresh pages in for every batch.
_retain_freed_memory()

__version__ = "0.1.0"

# The Python API (docs/api.md): imported here, cheaply (Ray, torch and the engine load on the first call).
from raydc.api import Run, load_run, sweep, train  # noqa: E402

__all__ = ["Run", "__version__", "load_run", "sweep", "train"]
