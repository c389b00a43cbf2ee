"""The manifold readout's fit in its own actor (raydc.engine.manifold_fitter), as the engine's rank 0 asks for it:
the same clusters as a fit in process, the actor gone at shutdown, and the fit in process where none was asked for."""
from __future__ import annotations

import numpy as np
import pytest

from raydc.config import load_config
from raydc.core.merge import manifold_consensus
from raydc.engine.contexts import RankZeroContext


def _sample(n: int = 150) -> np.ndarray:
    rng = np.random.default_rng(3)
    centres = np.eye(4, 8, dtype=np.float32)
    x = centres[rng.integers(0, 4, n)] + 0.05 * rng.standard_normal((n, 8)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _context() -> RankZeroContext:
    cfg = load_config(None, ["data.shards=unused"])
    return RankZeroContext(cfg, None, "unused", lambda: None, lambda m: None)


FIT = {"restarts": 2, "dims": 2, "n_neighbors": 10, "seed": 5, "metric": "cosine"}


def _fit_and_compare(ctx: RankZeroContext) -> dict:
    x = _sample()
    labels, agreement, where = ctx.manifold_consensus(x, 4, **FIT)
    want, want_agreement = manifold_consensus(x, 4, **FIT)
    assert np.array_equal(labels, want)
    np.testing.assert_array_equal(agreement, want_agreement)
    return where


def test_the_actors_fit_is_the_in_process_fit_and_the_actor_goes_at_shutdown(ray_local):
    import ray

    ctx = _context()
    ctx.prepare_manifold(2, 10, "cosine", warm_up=False)
    actor = ctx._fitter
    ctx.prepare_manifold(2, 10, "cosine", warm_up=False)  # every round asks: still the one actor
    assert actor is not None and ctx._fitter is actor
    assert _fit_and_compare(ctx) == {}  # no warm-up ran, so none is reported
    ctx.shutdown()
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.fit.remote(_sample(), 4, FIT))


def test_a_context_never_prepared_fits_in_process():
    """What the in-process harness and a run without Ray get (prepare_manifold starts nothing there)."""
    ctx = _context()
    assert ctx._fitter is None
    assert _fit_and_compare(ctx) == {}


@pytest.mark.slow  # the warm-up compiles UMAP's NN-descent in a fresh process: about a minute of one core
def test_a_warmed_up_fitter_reports_its_warm_up_and_fits_the_same(ray_local):
    ctx = _context()
    ctx.prepare_manifold(2, 10, "cosine")
    try:
        where = _fit_and_compare(ctx)
    finally:
        ctx.shutdown()
    assert where["manifold_warm_up_s"] > 0
