"""What a feature pass runs and how it reduces what it computes: the contract between a method (which names the
network and its readout) and whatever executes the pass (the engine's feature pool, `raydc assign`, a benchmark).
Plain values, no Ray: a method builds an `ExtractorSpec` without knowing who will run it."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import numpy as np


@dataclass
class FeatureReduction:
    """What the pool's workers do to the network's features before they leave: project with a PCA fitted on a
    sample (None: no PCA), L2-normalise, cast. `keep_fraction` < 1 keeps a uniform sample of the rows instead
    of all of them, drawn per row from (seed, id) so it does not depend on how the work was cut."""

    projection: Any = None            # raydc.core.pca.PCAProjection
    l2_normalize: bool = False
    dtype: str = "float32"
    keep_fraction: float = 1.0
    seed: int = 0


@dataclass
class ExtractorSpec:
    """What the pool runs: `build()` makes the module, `state` are its weights, `call` names the method
    that maps a float NCHW batch to features (DeepCluster: `embed`; DEC: `embed` or `soft_assign`; DAC: its
    label features, `forward`)."""

    build: Callable[[], Any]
    state: dict
    call: str = "embed"
    input_size: int = 28
    channels: int | None = None
    reduction: FeatureReduction | None = None
    precision: str | None = None   # the autocast dtype (raydc.core.precision); None: the run's
    memory_format: str | None = None  # the weights' layout (raydc.core.precision); None: the run's, else auto
    # Rows that must reach `call` together, cut at multiples of this within each Parquet row group: a network
    # that normalises with its batch's statistics (DAC's readout) then sees the same batches on every pass,
    # whatever the pool's concurrency or batch size, so a resumed run and `raydc assign` give the same clusters.
    batch_align: int = 1
    # Fold each BatchNorm into the layer before it for the pass (raydc.core.bn_fold): only for a `call` that runs
    # the network in eval mode with running statistics. A spec without it runs the module as built. The method sets
    # it from its run's config (`features.fold_batchnorm`, not resumable), so a resumed run and `raydc assign` on a
    # finished one compute as the run did, and a run from before the field never folds.
    fold_batchnorm: bool = False
    # Set only while the spec travels through the clustering coordinator (raydc.engine.sealed_spec): the builder
    # and weights behind an object-store reference, `build` and `state` empty until a pool worker opens it.
    network: Any = None


def run_arithmetic_of(saved: dict) -> tuple[str, str]:
    """(precision, memory format) a finished run computed its features in, from its clustering.pt: a pass over
    new images (`raydc assign`, `embed`, `evaluate --probe`) computes as the run's own final pass did. A run
    from before they were recorded: float32, contiguous."""
    return saved.get("precision") or "fp32", saved.get("memory_format") or "contiguous"


def as_computed_by(spec: ExtractorSpec, saved: dict) -> ExtractorSpec:
    """`spec` in the arithmetic of the run whose clustering.pt is `saved` (where the spec names none)."""
    import dataclasses

    precision, memory_format = run_arithmetic_of(saved)
    return dataclasses.replace(spec, precision=spec.precision or precision,
                               memory_format=spec.memory_format or memory_format)


def load_network(spec: ExtractorSpec):
    """The spec's module as trained: built, loaded with its weights, in its memory format, in eval mode. One
    place, so every pool (and `raydc assign`, `embed`, `evaluate`) lays the network out as the run did."""
    from raydc.core.precision import in_memory_format

    model = spec.build()
    model.load_state_dict(spec.state)
    return in_memory_format(model, _layout(spec, model)).eval()


def pool_device() -> str:
    """Where a feature pool's actor computes: its GPU when Ray gave it one. One rule for the device a pool moves
    the network to and the layout `auto` resolves for, so the two never disagree."""
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _layout(spec: ExtractorSpec, model) -> str:
    from raydc.core.precision import resolve_memory_format

    # the run's resolved layout when it has one; else `auto` for where this pool computes
    return resolve_memory_format(spec.memory_format or "auto", model, pool_device())


def inference_network(model, spec: ExtractorSpec):
    """What the pass calls `spec.call` on: `model` (from `load_network`), or its BatchNorm-folded copy in the
    same memory format when the spec asks for the fold."""
    if not spec.fold_batchnorm:
        return model
    from raydc.core.bn_fold import fold_batchnorm
    from raydc.core.precision import in_memory_format

    folded, _ = fold_batchnorm(model)
    return in_memory_format(folded, _layout(spec, model))


def build_network(spec: ExtractorSpec):
    """The pass's module: `load_network`, then `inference_network`."""
    return inference_network(load_network(spec), spec)


def keep_mask(ids: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Which rows a sampling pass keeps: a function of (seed, id) only."""
    from raydc.core.sampler import hash_uniforms

    return hash_uniforms(ids, seed, 0, 97) < fraction


def reduce_features(feats: np.ndarray, r: FeatureReduction | None) -> np.ndarray:
    from raydc.core.pca import l2_normalize

    if r is None:
        return feats
    if not np.isfinite(feats).all():  # NaN rows reach the shard, whose check names the round (NumericalError)
        dim = r.projection.matrix.shape[1] if r.projection is not None else feats.shape[1]
        return np.full((len(feats), dim), np.nan, r.dtype)
    if r.projection is not None:
        feats = r.projection.apply(feats, l2_normalize=r.l2_normalize)
    elif r.l2_normalize:
        feats = l2_normalize(feats)
    return feats.astype(r.dtype, copy=False)
