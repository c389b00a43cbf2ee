"""The manifold readout's fit (`raydc.core.merge.manifold_consensus`) in an actor that compiled its JIT code
while the run trained.

A fresh process pays about a minute of numba compilation on its first UMAP fit, most of which numba cannot cache
on disk; in a DeepCluster run that minute sat in the final step, after training. The method asks for the fitter
early (`RankZeroContext.prepare_manifold`, from its round plans); the actor starts on rank 0's node and compiles
in a thread at the lowest CPU priority, so the compilation takes the cycles training leaves idle and yields the
rest. The fit itself runs at normal priority in the actor's own thread, after the warm-up has finished, and
computes exactly what rank 0 would have: the same function, seed and sample.
"""
from __future__ import annotations

import os
import threading

import numpy as np
import ray

# Niceness of the warm-up thread: the lowest priority, so it never slows the training it runs beside.
WARM_UP_NICENESS = 19


class _Fitter:
    def __init__(self, dims: int, n_neighbors: int, metric: str, warm_up: bool = True, search: str = "nndescent"):
        self.warm_up_s: float | None = None
        self.search = search  # the neighbour search warmed (raydc.core.merge.umap_search)
        self._warm = threading.Thread(target=self._warm_up if warm_up else lambda *a: None,
                                      args=(dims, n_neighbors, metric, search), daemon=True)
        self._warm.start()

    def _warm_up(self, dims: int, n_neighbors: int, metric: str, search: str) -> None:
        try:  # Linux sets niceness per thread: this one only, the fit keeps the actor's
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), WARM_UP_NICENESS)
        except (AttributeError, OSError):
            pass
        from raydc.core.merge import warm_up_manifold

        try:
            self.warm_up_s = warm_up_manifold(dims=dims, n_neighbors=n_neighbors, metric=metric, search=search)
        except Exception:  # noqa: BLE001 - a failed warm-up only costs the fit its compile time; the fit reports
            self.warm_up_s = None

    def fit(self, sample: np.ndarray, k: int, kwargs: dict) -> tuple[np.ndarray, np.ndarray, dict]:
        """`manifold_consensus(sample, k, **kwargs)`, after the warm-up; and how long the warm-up had taken."""
        from raydc.core.merge import manifold_consensus

        self._warm.join()
        labels, agreement = manifold_consensus(sample, k, **kwargs)
        return labels, agreement, {"manifold_warm_up_s": self.warm_up_s}


# No CPU reserved: it works while rank 0 waits for it, or at the lowest priority beside training.
ManifoldFitter = ray.remote(num_cpus=0)(_Fitter)


def start_fitter(dims: int, n_neighbors: int, metric: str, warm_up: bool = True, search: str = "nndescent"):
    """A `ManifoldFitter` on this node (rank 0's: the sample it fits is already here); `warm_up=False` skips the
    compilation ahead (tests); `search`: the neighbour search the fit will run (`raydc.core.merge.umap_search`),
    so the warm-up compiles that one."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node = ray.get_runtime_context().get_node_id()
    return ManifoldFitter.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node, soft=True)).remote(dims, n_neighbors, metric, warm_up,
                                                                                    search)
