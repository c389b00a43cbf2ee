"""Starting or joining Ray, once per process.

`ray job submit` runs the entry point on a cluster node with RAY_ADDRESS set: we join that cluster. On a
laptop nothing is running: we start an embedded local Ray (CPU only is fine). Ray Data's `preserve_order` is
switched on so a run with the same seed reads rows in the same order (determinism on CPU, and exact resume).
"""
from __future__ import annotations

import os

from raydc.config import RayConfig


def init_ray(cfg: RayConfig, *, quiet: bool = True) -> None:
    import ray

    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        kwargs = dict(log_to_driver=True, configure_logging=not quiet, include_dashboard=False)
        if address:
            kwargs.pop("include_dashboard")
            ray.init(address=address, **kwargs)
        else:
            ray.init(address="local", num_cpus=cfg.num_cpus, **kwargs)
    configure_data_context()


def configure_data_context() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = os.environ.get("RAYDC_DATA_PROGRESS", "0") == "1"
    ctx.print_on_execution_start = False
