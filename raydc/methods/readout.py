"""Label-free final readouts that more than one method offers (no `METHOD` here: not a method of its own).

The manifold readout (N2D, McConville et al. 2020): a bounded sample of the final features is embedded by UMAP
(min_dist 0) and clustered there by a Gaussian mixture on rank 0; every image then takes the cluster most of its
nearest sample images hold, on the shard actor that holds it. Only the sample is ever fitted, so the cost on
rank 0 does not grow with N, and `raydc assign` places a new image by the same vote over the same sample.

DeepCluster reads its over-clustered features out this way (`deepcluster.final_merge: umap`); DEC reads out its
autoencoder's embedding (`dec.readout: umap`), which with `dec.max_iterations: 0` is N2D itself.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from raydc.core.merge import combine_partitions, shard_vote, vote_labels
from raydc.core.seeding import derive_seed
from raydc.errors import ConfigError
from raydc.methods.api import ClusterOutcome, RoundContext
from raydc.methods.base import FinalClustering


@dataclass(frozen=True)
class ManifoldReadout:
    """The readout's knobs, as each method's config section names them."""

    sample: int = 20_000     # images gathered on rank 0 and broadcast to the shards (bounded at any N)
    dims: int = 10           # UMAP dimensions the mixture is fitted in
    neighbors: int = 20      # UMAP's n_neighbors
    vote: int = 10           # nearest sample images whose clusters vote for each image
    restarts: int = 1        # UMAP + mixture seeds seed, seed + 1, ...
    metric: str = "cosine"   # UMAP's metric in feature space
    combine: str = "pick"    # restarts > 1: keep the most agreed ("pick") or combine them ("consensus")
    graph: str = "nndescent"  # the sample's neighbours: UMAP's NN-descent per restart, or "exact" once (faiss)
    samples: int = 1         # independent samples, each fitted; > 1: their partitions combined on the first


def readout_options(section: str, opts: Any, names: dict[str, str], metric: str) -> ManifoldReadout:
    """The readout's knobs from a method's config section (`names`: ManifoldReadout's field -> the section's),
    checked: a value out of range raises ConfigError naming `section.field`."""
    found = ManifoldReadout(metric=metric, **{field: getattr(opts, name) for field, name in names.items()})
    for field, low in (("sample", 1), ("vote", 1), ("restarts", 1), ("dims", 2), ("neighbors", 2), ("samples", 1)):
        value = getattr(found, field)
        if value < low:
            raise ConfigError(f"{section}.{names[field]}", f"must be >= {low}, got {value}")
    return found


def manifold_readout(ctx: RoundContext, k: int, opts: ManifoldReadout, *, sample_seed: int, fit_seed: int,
                     col: str = "final") -> tuple[ClusterOutcome, dict, dict]:
    """k clusters of the features the shards hold, into column `col` (and `col`_distance: 1 - the share of the
    neighbours that voted for the cluster). Returns the outcome (centroids: each cluster's mean sample
    feature), what the final row records, and the artifacts `place_by_vote` needs.

    With `opts.samples` > 1, each further sample (drawn with its own seed, fitted with its own) is read out too
    and its partition carried onto the first sample by the same vote that places every image; the first
    sample's clusters are then those of all the partitions combined (`raydc.core.merge.combine_partitions`).
    Rank 0 holds two samples at a time. Why: on Fashion-MNIST which 20,000 images the sample holds moves the
    readout as much as the UMAP seed does; combining samples averages over both."""
    t_fit, agreements = 0.0, []
    where: dict = {}
    sample_x: np.ndarray | None = None
    parts: list[np.ndarray] = []
    for s in range(opts.samples):
        seed_s = sample_seed if s == 0 else derive_seed(sample_seed, s)
        _, x_s, _ = ctx.service.sample_features(opts.sample, seed_s)
        x_s = np.ascontiguousarray(x_s, np.float32)
        t = time.perf_counter()
        labels_s, agreement, where = ctx.manifold_consensus(
            x_s, k, restarts=opts.restarts, dims=opts.dims, n_neighbors=opts.neighbors,
            seed=fit_seed if s == 0 else derive_seed(fit_seed, s), metric=opts.metric, combine=opts.combine,
            graph=opts.graph)
        if len(agreement) > 1:
            agreements.append(float(agreement.mean() if opts.combine == "consensus" else agreement.max()))
        if sample_x is None:
            sample_x, part = x_s, labels_s
        else:
            part = vote_labels(sample_x, x_s, labels_s, k, opts.vote)[0]
        parts.append(part)
        t_fit += time.perf_counter() - t
    assert sample_x is not None
    sample_labels, sample_agreement = combine_partitions(parts, k, fit_seed)
    sizes = np.sum(ctx.service.apply(shard_vote, col, sample_x, sample_labels, k, opts.vote), axis=0)
    centroids = np.stack([sample_x[sample_labels == c].mean(axis=0) if np.any(sample_labels == c)
                          else np.zeros(sample_x.shape[1], np.float32) for c in range(k)])
    found = ClusterOutcome(centroids=centroids.astype(np.float32), sizes=sizes, objective=[], n_split=0,
                           backend="umap+gmm", mode="sample", col=col)
    row = {"merge_sample": len(sample_x), "time_manifold_fit": t_fit, **where}
    if agreements:  # how settled the readout was: the kept restart's mean ARI with the others, or the restarts'
        # mean ARI with the partition combined from them (the mean over samples)
        row["readout_agreement"] = float(np.mean(agreements))
    if len(parts) > 1:  # how much the samples agreed: each one's ARI with the combined partition, on the first
        row["readout_sample_agreement"] = float(sample_agreement.mean())
    artifacts = {"vote_sample": torch.from_numpy(sample_x), "vote_labels": torch.from_numpy(sample_labels)}
    return found, row, artifacts


def prepare_manifold_readout(ctx: RoundContext, opts: ManifoldReadout) -> None:
    """Called from a method's round plans when its run will end in this readout: the fit's JIT code compiles
    beside the training rounds instead of after them (RoundContext.prepare_manifold)."""
    ctx.prepare_manifold(opts.dims, opts.neighbors, opts.metric, opts.sample, graph=opts.graph)


def check_umap_installed(field: str) -> None:
    """The readout needs umap-learn, an optional extra: say so at config time, naming the field that asked."""
    import importlib.util

    if importlib.util.find_spec("umap") is None:
        raise ConfigError(field, "umap needs umap-learn, which is not installed: pip install 'raydc[umap]'")


def has_vote(artifacts: dict) -> bool:
    """Whether a run's clustering.pt artifacts hold a manifold readout's sample."""
    return artifacts.get("vote_sample") is not None


def place_by_vote(ctx: RoundContext, artifacts: dict, k: int, vote: int, col: str = "final") -> FinalClustering:
    """New images (their features already on the shards) into the run's manifold clusters: the same vote over
    the same sample the run used, so an image the run held lands where the run put it."""
    ctx.service.apply(shard_vote, col, artifacts["vote_sample"].numpy(), artifacts["vote_labels"].numpy(), k, vote)
    return FinalClustering(col, col + "_distance")
