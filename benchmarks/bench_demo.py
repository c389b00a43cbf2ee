"""`make demo`'s config as shipped, over three seeds (issue #30, item 3): the final round and the first clustering's
ACC of each seed, so a user knows what one `make demo` gives and that training does not end below its start.

The same procedure as `bench_seeds.py` (each run's final row, never a best round; finished runs read back, so a
stopped suite resumes). It is a file of its own because `seeds.json` keeps the demo as it was measured before
demo.yaml changed (k = 10, no readout: its `deepcluster_demo_k10`), and rerunning that suite would retrain every
other setting in it.
"""
from __future__ import annotations

from benchmarks.bench_seeds import run_settings
from benchmarks.common import Context

NAME = "demo"
NEEDS_RAY = False  # started only when a run is missing

SETTINGS = {
    # make demo as shipped since train.memory_format auto became contiguous on the CPU
    "deepcluster_demo_contiguous": {"config": "demo.yaml", "sets": [], "method": "DeepCluster",
                                    "data": "MNIST test, 10,000 images, k = 100 joined to 10, 2 epochs (demo.yaml, "
                                            "make demo: contiguous weights)"},
    # make demo as it was shipped before: channels_last weights (auto's choice on the CPU then)
    "deepcluster_demo": {"config": "demo.yaml", "sets": ["train.memory_format=channels_last"], "method": "DeepCluster",
                         "data": "MNIST test, 10,000 images, k = 100 joined to 10, 2 epochs (demo.yaml, channels_last "
                                 "weights)"},
    # the feature passes' BatchNorm folded (features.fold_batchnorm), same seeds, same session
    "deepcluster_demo_bnfold": {"config": "demo.yaml", "sets": ["train.memory_format=channels_last",
                                                                "features.fold_batchnorm=true"], "method": "DeepCluster",
                                "data": "MNIST test, 10,000 images, k = 100 joined to 10, 2 epochs (demo.yaml, "
                                        "channels_last, features.fold_batchnorm true)"},
}


def run(ctx: Context) -> dict:
    if ctx.quick:
        return {"skipped": "full mode only: three runs of minutes each"}
    return run_settings(ctx, SETTINGS, "demo")
