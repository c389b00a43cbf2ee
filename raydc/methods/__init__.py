"""Clustering methods as strategies for the engine's loop, found by module: every module of this package
(other than `api` and `base`) that defines `METHOD` is a method, registered under `METHOD.name`. A new method is one
new file here; the config gains its section and `method:` its name without any other change."""
from __future__ import annotations

import importlib
import pkgutil
from functools import lru_cache


@lru_cache(maxsize=1)
def methods() -> dict:
    """{name: Method subclass}, in module name order (stable, so the config sections have a fixed order)."""
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name in ("api", "base") or info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        cls = getattr(module, "METHOD", None)
        if cls is not None:
            found[cls.name] = cls
    return found


def method_class(name: str):
    return methods()[name]


def build_method(cfg, manifest):
    return method_class(cfg.method)(cfg, manifest)
