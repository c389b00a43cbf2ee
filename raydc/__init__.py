"""raydc: deep clustering of images (DeepCluster, DEC) on Ray Data, Ray Train and faiss."""
from raydc._blas import configure_openblas as _configure_openblas

# Before anything can import faiss: its OpenBLAS reads OPENBLAS_CORETYPE once, at load time.
_configure_openblas()

__version__ = "0.1.0"

# The Python API (docs/api.md): imported here, cheaply (Ray, torch and the engine load on the first call).
from raydc.api import Run, load_run, sweep, train  # noqa: E402

__all__ = ["Run", "__version__", "load_run", "sweep", "train"]
