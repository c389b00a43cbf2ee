"""Clustering methods as strategies for the engine's loop; `build_method` picks one by `cfg.method`."""
from __future__ import annotations

import importlib

REGISTRY = {
    "deepcluster": ("raydc.methods.deepcluster", "DeepCluster"),
    "dec": ("raydc.methods.dec", "DEC"),
}


def build_method(cfg, manifest):
    module, cls = REGISTRY[cfg.method]
    return getattr(importlib.import_module(module), cls)(cfg, manifest)
