"""Memory against N on the frozen-feature path (`train.epochs 0`): bench_scale's round with no training.

Same images, shards, sizes and measurements as `bench_scale` (see its docstring); only the round differs.
"""
from __future__ import annotations

from benchmarks.bench_scale import run_frozen
from benchmarks.common import Context

NAME = "scale_frozen"
NEEDS_RAY = False  # each N runs `raydc train` in a subprocess with a Ray of its own


def run(ctx: Context) -> dict:
    return run_frozen(ctx)
