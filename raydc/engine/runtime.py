"""Starting or joining Ray, once per process.

`ray job submit` runs the entry point on a cluster node with RAY_ADDRESS set: we join that cluster. On a
laptop nothing is running: we start an embedded local Ray (CPU only is fine). Ray Data's `preserve_order` is
switched on so a run with the same seed reads rows in the same order (determinism on CPU, and exact resume).
"""
from __future__ import annotations

import os

from raydc.config import RayConfig


def local_cpus(cfg: RayConfig, train_cpus: float) -> int:
    """Logical CPUs for an embedded local Ray: the machine's cores *plus* what the Train workers reserve.

    Training and the feature pass alternate, they never run at once, yet Ray reserves the workers' CPUs
    for the whole fit. With the real count alone, a 2-core laptop has 1 CPU left beside one Train worker,
    and Ray Data's actor pool then never starts (measured here: it needs more than 1 free CPU, and hangs
    silently otherwise). Counting the workers' share twice is the over-commit that never materialises."""
    if cfg.num_cpus:
        return cfg.num_cpus
    return int((os.cpu_count() or 1) + max(0.0, train_cpus) + 0.999)


def init_ray(cfg: RayConfig, *, train_cpus: float = 1.0, quiet: bool = True) -> None:
    import ray

    if not ray.is_initialized():
        address = cfg.address or os.environ.get("RAY_ADDRESS")
        # The dashboard brings the state API that Ray Train's placement-group cleaner and Tune's early stopping use.
        kwargs = dict(log_to_driver=True, configure_logging=not quiet)
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(address="local", num_cpus=local_cpus(cfg, train_cpus), **kwargs)
    configure_data_context()


def configure_data_context() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = os.environ.get("RAYDC_DATA_PROGRESS", "0") == "1"
    ctx.print_on_execution_start = False
