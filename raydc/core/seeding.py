"""Seeds derived from the run seed: one function so every method draws its per-round seeds the same way.

A resumed run must replay a round exactly, so nothing here may depend on process state: a seed is a pure
function of (run seed, keys), e.g. (seed, epoch, stream) for k-means or (seed, round, rank, 17) for dropout.
"""
from __future__ import annotations

import numpy as np


def derive_seed(seed: int, *keys: int, bits: int = 31) -> int:
    """A non-negative int below 2**bits, a pure function of the run seed and the keys."""
    return int(np.random.default_rng([seed, *keys]).integers(1 << bits))
