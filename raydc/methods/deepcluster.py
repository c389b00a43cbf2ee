"""DeepCluster (Caron et al., ECCV 2018) as a strategy for the engine's loop.

Each round (= epoch): features of every image from the current convnet (pre-ReLU penultimate layer, eval
mode, deterministic transform) -> PCA-256 with whitening (fitted on a sample of `features.pca_sample` images,
applied by the feature workers) -> L2 -> k-means (20 iterations, no subsampling, a fresh seed per epoch drawn
from the run seed) -> pseudo-labels, kept on the shard actors and joined to the training stream by row.
Training then draws images
uniformly over the non-empty clusters (each row repeated Poisson(n / (k_nonempty |c|)) times, DeepCluster's
UnifLabelSampler in expectation, computable while streaming), through a re-initialised top layer with its own
momentum-free SGD, as in the reference code.

Its knobs are the engine's `cluster` (k-means, PCA) and `train` (SGD, lr schedule, sampling, augmentation)
sections, used as the paper does, and its own `deepcluster` section for what departs from the paper:

- `variant: v2`, DeepCluster-v2 (SwAV appendix; swav `main_deepclusterv2.py`): no head reset. The classifier is
  the L2-normalised embedding against prototypes set to this round's (normalised) k-means centroids, frozen,
  with logits divided by a temperature. The targets no longer come from a random head that needs a whole
  round to learn what the clusters are, so each round keeps improving the clusters the last one found.
- `head: match` (v1): instead of a random head each round, the previous head's rows are carried over to the
  new clusters they overlap most (Hungarian matching of the two assignments).
- `final_k`: over-clustering. Train with `cluster.k` (e.g. 100) and deliver a clustering of the final features
  with `final_k` clusters; the training-k clustering is scored too (majority-vote ACC, as k > classes asks).
  `final_merge: spectral` gets the final_k clusters by joining the training-k ones along the data's manifolds
  (raydc.core.merge) rather than by k-means at final_k, which cuts curved classes into convex cells.
  `final_merge: knn` joins them along a k-nearest-neighbour graph of the points themselves (each shard's points
  searched in a fixed-size sample), edges weighed against their expected number, and the best of several
  partitions by modularity: a few bridge points or one k-means near-tie no longer decide the merge.
"""
from __future__ import annotations

import dataclasses
import functools
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from raydc.config_loader import resumable
from raydc.core.merge import shard_coneighbours, shard_group, shard_knn_edges
from raydc.core.models import build_convnet
from raydc.core.pca import PCAProjection
from raydc.core.rowblocks import RowBlocks
from raydc.core.sampler import poisson_repeats
from raydc.core.seeding import derive_seed
from raydc.core.extractor import ExtractorSpec
from raydc.core.stream import Augment, to_model_input
from raydc.errors import ConfigError, NumericalError
from raydc.methods.api import ClusterOutcome, RoundContext, TrainContext
from raydc.methods.base import FinalClustering, Method, RoundPlan, clustering_row, rank0_field
from raydc.methods.readout import (ManifoldReadout, check_umap_installed, has_vote, manifold_readout, place_by_vote,
                                   prepare_manifold_readout, readout_options)

FEATURE_DIMS = {"alexnet": 4096, "vgg16": 4096}  # fixed penultimate widths; smallconvnet's is model.feature_dim


@dataclass
class DeepClusterConfig:
    """What departs from the paper's DeepCluster (v1 with a fresh head each round is the default)."""

    variant: Literal["v1", "v2"] = "v1"
    temperature: float = 0.1               # v2: logits = cos(embedding, prototype) / temperature
    head: Literal["reset", "match"] = "reset"  # v1: a fresh N(0, 0.01) head each round, or the last one matched
    # The final readout (final_k < cluster.k) changes nothing the rounds computed, so a finished or interrupted run
    # may be resumed with another one (`--resume --set deepcluster.final_merge=umap`): only the final step reruns.
    final_k: int = resumable(0)            # > 0: the delivered clustering has this many clusters (0: cluster.k)
    # final_k < cluster.k: "kmeans" clusters the final features again with final_k; "spectral" joins the
    # training-k clusters by spectral clustering of their co-neighbour graph (raydc.core.merge); "knn" joins
    # them along the points' own nearest-neighbour graph (raydc.core.merge.graph_merge), label-free; "umap"
    # finds final_k clusters on a UMAP of a sample (raydc.core.merge.manifold_clusters, N2D) and gives every
    # image the cluster of most of its nearest sample images (needs umap-learn: pip install 'raydc[umap]')
    final_merge: Literal["kmeans", "spectral", "knn", "umap"] = resumable("kmeans")
    final_neighbors: int = resumable(15)   # knn: neighbours of each point, searched in the sample below
    final_sample: int = resumable(20_000)  # knn, umap: points gathered on rank 0 and sent to the shards (bounded)
    final_restarts: int = resumable(10)    # knn: spectral restarts; the best `final_score` is kept
    final_graph: Literal["counts", "paga"] = resumable("counts")  # knn: edge counts, or counts / expected
    final_score: Literal["modularity", "ncut"] = resumable("modularity")  # knn: the label-free partition score
    final_umap_dims: int = resumable(10)   # umap: dimensions of the embedding the mixture is fitted in
    final_umap_neighbors: int = resumable(20)  # umap: UMAP's n_neighbors (its graph over the sample)
    final_vote: int = resumable(10)        # umap: sample neighbours whose clusters vote for each image
    # umap: restarts of UMAP + mixture on the one sample (seeds seed, seed + 1, ...), each a UMAP fit, combined
    # label-free (raydc.core.merge.manifold_consensus) by final_umap_combine: "pick" keeps the one that agrees most
    # with the others (mean ARI); "consensus" clusters the sample by all their memberships at once
    # (raydc.core.merge.combine_partitions)
    final_umap_restarts: int = resumable(1)
    final_umap_combine: Literal["pick", "consensus"] = resumable("pick")
    # umap: the sample's neighbour graph UMAP starts from: its own NN-descent in each restart (approximate; a
    # minute of JIT compilation per process), or "exact": one flat faiss search of the sample for all restarts
    final_umap_graph: Literal["nndescent", "exact"] = resumable("nndescent")
    # umap: independent samples of final_sample images, each read out (final_umap_restarts fits) and carried onto
    # the first by the vote; > 1 clusters the first by all their partitions at once (combine_partitions)
    final_umap_samples: int = resumable(1)

    def validate(self) -> None:
        if self.temperature <= 0:
            raise ConfigError("deepcluster.temperature", f"must be > 0, got {self.temperature}")
        if self.final_k < 0 or self.final_k == 1:
            raise ConfigError("deepcluster.final_k", f"must be 0 (cluster.k) or >= 2, got {self.final_k}")
        for name in ("final_neighbors", "final_restarts"):
            if getattr(self, name) < 1:
                raise ConfigError(f"deepcluster.{name}", f"must be >= 1, got {getattr(self, name)}")
        self.manifold()  # final_sample, final_vote and the umap fields, each named if out of range
        if self.final_merge == "umap":
            check_umap_installed("deepcluster.final_merge")

    def manifold(self) -> ManifoldReadout:
        """The umap readout's knobs (cosine: the features are L2-normalised), as raydc.methods.readout takes them."""
        return readout_options("deepcluster", self, {
            "sample": "final_sample", "dims": "final_umap_dims", "neighbors": "final_umap_neighbors",
            "vote": "final_vote", "restarts": "final_umap_restarts", "combine": "final_umap_combine",
            "graph": "final_umap_graph", "samples": "final_umap_samples"},
            metric="cosine")


def _build(cfg_model: dict, in_channels: int, k: int, cosine: bool = False) -> nn.Module:
    net = build_convnet(cfg_model["arch"], in_channels, cfg_model["sobel"], cfg_model["width"],
                        cfg_model["feature_dim"])
    net.reset_head(k, torch.Generator().manual_seed(0))
    net.freeze(cfg_model.get("freeze", "none"))
    if cosine:  # prototypes are the centroids, set each round and never learned (swav: "frozen prototypes")
        net.cosine_head = True
        net.top_layer.bias = None
        net.top_layer.requires_grad_(False)
    return net


def matched_head_rows(overlap: np.ndarray) -> np.ndarray:
    """For each new cluster, the previous cluster whose head row it inherits: a one-to-one matching of the two
    assignments that maximises the images they share (clusters with no partner keep their own index).
    `overlap[new, prev]` counts the images in both (a k x k table reduced over the shards)."""
    from scipy.optimize import linear_sum_assignment

    k = overlap.shape[0]
    rows, cols = linear_sum_assignment(overlap, maximize=True)
    src = np.arange(k)
    src[rows] = cols
    return src


@dataclass
class PseudoLabels:
    """One round's training targets: every image's cluster (RowBlocks: in the object store, by row) and the
    cluster sizes."""

    labels: RowBlocks
    sizes: np.ndarray    # (k,)
    n: int               # images clustered
    prototypes: np.ndarray | None = None  # v2: (k, d) unit-norm centroids, the classifier's frozen rows
    head_rows: np.ndarray | None = None   # v1 `head: match`: new cluster j takes the last head's row head_rows[j]


@dataclass
class DeepClusterState:
    # The directory of the previous round's clusters (Parquet parts the shards wrote), for NMI(t-1, t) and
    # `head: match`; a path, not an array, so the checkpoint stays small whatever N is.
    labels_path: str | None = rank0_field()


class DeepCluster(Method):
    name = "deepcluster"
    section, options = "deepcluster", DeepClusterConfig
    summary_fields = (("kmeans_objective", "obj {:.5g}"),)
    backbones = True
    frozen = True  # train.epochs 0: finalize at once, one feature pass + PCA + k-means over the given network

    @classmethod
    def validate_config(cls, cfg) -> None:
        super().validate_config(cfg)
        from raydc.core.backbones import backbone_info, is_backbone

        feat = (backbone_info(cfg.model.arch).feature_dim if is_backbone(cfg.model.arch)
                else FEATURE_DIMS.get(cfg.model.arch, cfg.model.feature_dim))
        if cfg.model.freeze == "all" and cfg.train.epochs > 0:
            raise ConfigError("model.freeze", "all leaves only the top layer to train, which changes no feature: "
                                              "set train.epochs 0 to cluster the frozen network's features")
        if cfg.cluster.pca_dim > feat:
            raise ConfigError("cluster.pca_dim", f"{cfg.cluster.pca_dim} is larger than the feature dimension {feat}")
        if 0 < cfg.features.pca_sample < cfg.cluster.pca_dim:
            raise ConfigError("features.pca_sample", f"{cfg.features.pca_sample} images cannot fit a "
                                                     f"{cfg.cluster.pca_dim}-d PCA (cluster.pca_dim)")
        if cfg.deepcluster.final_k > cfg.cluster.k:
            raise ConfigError("deepcluster.final_k", f"{cfg.deepcluster.final_k} is more than cluster.k "
                                                     f"{cfg.cluster.k}: it merges the training clusters, never splits")
        if cfg.deepcluster.variant == "v2":
            # The prototypes are centroids of the L2-normalised embedding itself, which the cosine head sees.
            if cfg.cluster.pca_dim:
                raise ConfigError("cluster.pca_dim", f"must be 0 with deepcluster.variant v2 (its prototypes "
                                                     f"live in the embedding), got {cfg.cluster.pca_dim}")
            if not cfg.cluster.l2_normalize:
                raise ConfigError("cluster.l2_normalize", "must be true with deepcluster.variant v2")

    def check_data(self) -> None:
        super().check_data()
        self.check_batch("train.batch_size", self.cfg.train.batch_size)

    def network_factory(self):
        c = self.cfg.model
        model_cfg = {"arch": c.arch, "sobel": c.sobel, "width": c.width, "feature_dim": c.feature_dim,
                     "freeze": c.freeze}
        return functools.partial(_build, model_cfg, self.in_channels, self.cfg.cluster.k,
                                 self.opts.variant == "v2")

    def comparable_final(self, final_row: dict) -> tuple[str, float | None]:
        """Like with like: an over-clustered run's final row is at final_k, and round 0 clustered at the training
        k, where the Hungarian ACC counts only final_k of the k clusters (near chance for 100 clusters of 10
        classes, whatever the features): the majority ACC at the training k is what both rounds can be compared
        by."""
        if "train_k_acc_majority" in final_row:
            return "acc_majority", final_row["train_k_acc_majority"]
        return "acc", final_row.get("acc")

    def init_state(self) -> DeepClusterState:
        return DeepClusterState()

    def is_done(self, state: DeepClusterState, round_idx: int) -> bool:
        return round_idx >= self.cfg.train.epochs

    def extractor(self, model: nn.Module) -> ExtractorSpec:
        return self.extractor_of(model, "embed", fold_batchnorm=self.cfg.features.fold_batchnorm)

    # ---- rank 0 ---------------------------------------------------------------------------------
    def cluster(self, ctx: RoundContext, model: nn.Module, state: DeepClusterState, round_idx: int):
        """features -> PCA -> k-means for the model as it is now; returns (outcome, metrics, the clusters as
        RowBlocks). The clusters are also saved (labels/round=R) and the state points at them; the shards keep
        the features and the clusters until the caller releases them."""
        cc = self.cfg.cluster
        times: dict[str, float] = {}
        t = time.perf_counter()
        info = ctx.extract(self.extractor(model), pca_dim=cc.pca_dim, whiten=cc.whiten,
                           l2_normalize=cc.l2_normalize, seed=derive_seed(self.cfg.train.seed, round_idx, 43))
        times["time_pca"] = info.pca_seconds
        times["time_features"] = time.perf_counter() - t - info.pca_seconds
        if not info.finite:
            raise NumericalError(round_idx, "features", "the network's features"
                                 + (" after the PCA projection" if info.projection is not None else ""))
        t = time.perf_counter()
        mode = ctx.service.choose_mode(cc.mode, cc.single_max_bytes)
        out = ctx.service.kmeans(cc.k, niter=cc.niter, seed=derive_seed(self.cfg.train.seed, round_idx, 11),
                                 n_init=cc.n_init, mode=mode, **cc.kmeans_args())
        out.projection = info.projection
        times["time_kmeans"] = time.perf_counter() - t
        previous = ctx.column_blocks(state.labels_path)
        row = self.cluster_metrics(ctx, out, previous)
        blocks = ctx.service.publish(out.col, dtype="int32")
        state.labels_path = ctx.save_column(out.col, "labels", round_idx)
        ctx.remember(state.labels_path, blocks)
        row.update(times)
        if info.projection is not None:
            row["pca_rows"] = info.pca_rows  # the images the PCA was fitted on (features.pca_sample)
        row["images_per_s_features"] = info.n / max(times["time_features"] + times["time_pca"], 1e-9)
        return out, row, blocks

    def cluster_metrics(self, ctx: RoundContext, out: ClusterOutcome, previous: RowBlocks | None) -> dict:
        row = {
            "kmeans_objective": float(out.objective[-1]) if out.objective else float("nan"),
            "kmeans_objective_curve": [float(o) for o in out.objective],
            "kmeans_backend": out.backend, "kmeans_mode": out.mode, "n_split": int(out.n_split),
        }
        if out.bytes_per_iteration is not None:
            row["kmeans_bytes_per_iteration"] = out.bytes_per_iteration
        row.update(clustering_row(ctx, out.col, self.cfg.cluster.k, prev=previous, majority=True))
        return row

    def plan(self, ctx: RoundContext, model: nn.Module,
             state: DeepClusterState, round_idx: int) -> tuple[RoundPlan, dict]:
        if self.opts.final_merge == "umap" and self.opts.final_k and self.opts.final_k != self.cfg.cluster.k:
            prepare_manifold_readout(ctx, self.opts.manifold())
        previous = ctx.column_blocks(state.labels_path)  # held here, so its blocks outlive the new round's
        out, row, blocks = self.cluster(ctx, model, state, round_idx)
        targets = PseudoLabels(blocks, np.asarray(out.sizes), out.n)
        if self.opts.variant == "v2":
            c = np.asarray(out.centroids, np.float32)
            targets.prototypes = c / np.maximum(np.linalg.norm(c, axis=1, keepdims=True), 1e-12)
        elif self.opts.head == "match" and previous is not None:
            k = self.cfg.cluster.k
            targets.head_rows = matched_head_rows(ctx.service.counts(out.col, previous).dense(k, k))
        ctx.release()
        return RoundPlan(targets=targets), row

    def finalize(self, ctx: RoundContext, model: nn.Module, state: DeepClusterState, round_idx: int):
        out, row, _ = self.cluster(ctx, model, state, round_idx)
        final_k = self.opts.final_k
        vote: dict = {}  # the umap readout's sample and clusters, kept for `raydc assign`
        if final_k and final_k != self.cfg.cluster.k:
            # Over-clustering: the training-k clustering is scored (majority vote is its fair ACC), then the same
            # projected features, still on the shard actors, are clustered with final_k for the user.
            trained = {f"train_k_{key}": row[key] for key in ("acc", "acc_majority", "nmi", "nmi_prev", "n_empty")
                       if key in row}
            t = time.perf_counter()
            cc = self.cfg.cluster
            readout = _READOUTS.get(self.opts.final_merge)
            if readout is not None:
                out2, merge_row, vote = readout(ctx, self.opts, self.cfg.train.seed, out, final_k, round_idx)
                trained.update(merge_row)
            else:
                mode = ctx.service.choose_mode(cc.mode, cc.single_max_bytes)
                out2 = ctx.service.kmeans(final_k, niter=cc.niter, seed=derive_seed(self.cfg.train.seed, round_idx, 29),
                                          n_init=cc.n_init, mode=mode, col="final",
                                          **cc.kmeans_args())
            out2.projection = out.projection
            out = out2
            row = {key: v for key, v in row.items() if key.startswith("time_") or key == "images_per_s_features"}
            row.update(trained)
            row.update({"kmeans_objective": float(out.objective[-1]) if out.objective else float("nan"),
                        "kmeans_backend": out.backend, "kmeans_mode": out.mode, "final_k": final_k,
                        **clustering_row(ctx, out.col, final_k, majority=True),
                        "time_final_k": time.perf_counter() - t})
        artifacts = {"projection": _projection_to_plain(out.projection),
                     "groups": None if out.groups is None else torch.tensor(out.groups),
                     **vote,
                     # a copy: the array is read-only, and torch.from_numpy would share it
                     "centroids": torch.tensor(np.asarray(out.centroids), dtype=torch.float32)}
        return FinalClustering(out.col, out.col + "_distance", artifacts), row

    def place_new_images(self, ctx: RoundContext, model: nn.Module, artifacts: dict) -> FinalClustering:
        info = ctx.extract(self.extractor(model), projection=_projection_from_plain(artifacts["projection"]),
                           l2_normalize=self.cfg.cluster.l2_normalize)
        if not info.finite:
            raise NumericalError(0, "assign", "the network's features for these images")
        if has_vote(artifacts):  # the umap readout: the same vote over the same sample
            return place_by_vote(ctx, artifacts, len(artifacts["centroids"]), self.opts.final_vote)
        ctx.service.label_nearest(artifacts["centroids"].numpy(), "cluster")
        if artifacts.get("groups") is not None:  # a spectral merge: the fine centroid's group is the cluster
            ctx.service.apply(shard_group, "cluster", "final", artifacts["groups"].numpy())
            return FinalClustering("final", "final_distance")
        return FinalClustering("cluster", "cluster_distance")

    # ---- all workers ----------------------------------------------------------------------------
    def optimizers(self, model: nn.Module, state: DeepClusterState) -> dict:
        t = self.cfg.train
        if not model.body_parameters():  # model.freeze all (train.epochs 0): nothing to optimise
            return {}
        return {"body": torch.optim.SGD(model.body_parameters(), lr=t.lr, momentum=t.momentum,
                                        weight_decay=t.weight_decay)}

    def images_per_round(self, n: int) -> tuple[float, bool]:
        """How many images a round draws: `train.reassign` x N, raised to `train.min_steps` batches per worker
        when N is small (a round of a few SGD steps leaves the network, and so the next clustering, as it was).
        Returns (images, whether the floor raised it)."""
        t = self.cfg.train
        floor = t.min_steps * t.batch_size * t.num_workers
        return max(t.reassign * n, floor), floor > t.reassign * n

    def set_head(self, net: nn.Module, targets: PseudoLabels, round_idx: int) -> None:
        """The classifier this round trains with: v2's prototypes, the last head matched to the new clusters, or
        (the paper) a fresh N(0, 0.01) layer, since k-means permutes cluster ids and the old head means nothing."""
        with torch.no_grad():
            if targets.prototypes is not None:
                net.top_layer.weight.copy_(torch.from_numpy(targets.prototypes) / self.opts.temperature)
            elif targets.head_rows is not None:
                rows = torch.from_numpy(targets.head_rows)
                net.top_layer.weight.copy_(net.top_layer.weight[rows])
                net.top_layer.bias.copy_(net.top_layer.bias[rows])
            else:
                g = torch.Generator().manual_seed(derive_seed(self.cfg.train.seed, round_idx, 13))
                net.top_layer.weight.copy_(torch.randn(net.top_layer.weight.shape, generator=g) * 0.01)
                net.top_layer.bias.zero_()

    def train_round(self, wctx: TrainContext, model: nn.Module, plan: RoundPlan,
                    state: DeepClusterState, round_idx: int) -> dict:
        t = self.cfg.train
        targets: PseudoLabels = plan.targets
        sizes = targets.sizes
        net = wctx.unwrap(model)
        n_total, floored = self.images_per_round(targets.n)
        if floored and round_idx == 0 and wctx.rank == 0:
            wctx.log(f"train.min_steps: {targets.n} images x train.reassign {t.reassign} would be "
                     f"{int(t.reassign * targets.n) // (t.batch_size * t.num_workers)} SGD steps per round; "
                     f"drawing {int(n_total)} images ({t.min_steps} steps) instead")
        lr = t.lr_at(round_idx)
        for group in wctx.optimizers["body"].param_groups:
            group["lr"] = lr
        opts = [wctx.optimizers["body"]]
        self.set_head(net, targets, round_idx)
        if targets.prototypes is None:
            head_lr = (t.head_lr or t.lr) * lr / t.lr
            opts.append(torch.optim.SGD(net.top_layer.parameters(), lr=head_lr, weight_decay=t.weight_decay))

        if t.uniform_sampling:
            def repeats(r, u):
                return poisson_repeats(r["target"].astype(np.int64), sizes, n_total, u)
        else:
            def repeats(r, u):
                return poisson_repeats(np.zeros(len(r["id"]), np.int64), np.array([targets.n]), n_total, u)

        aug = Augment(self.input_size, crop=t.crop, flip=t.hflip, scale_min=t.crop_scale_min,
                      kind=t.augment, erase=t.erase)

        def loss_of(b):
            x = to_model_input(b.ids, b.copy, b.images, seed=t.seed, epoch=round_idx, augment=aug,
                               size=self.input_size).to(wctx.device)
            return F.cross_entropy(model(x), torch.from_numpy(b.target.astype(np.int64)).to(wctx.device))

        model.train()
        stats = wctx.sgd_pass(wctx.batches(round_idx, targets=targets.labels, repeats=repeats), opts, loss_of,
                              epoch=round_idx, phase="train", what="the loss")
        return {"loss": stats.loss, "train_images": stats.images, "train_steps": stats.steps, "lr": lr,
                "time_train": stats.seconds, "images_per_s_train": stats.images / max(stats.seconds, 1e-9)}


def _projection_to_plain(p: PCAProjection | None) -> dict | None:
    if p is None:
        return None
    return {"mean": torch.from_numpy(p.mean), "matrix": torch.from_numpy(p.matrix),
            "eigenvalues": torch.from_numpy(p.eigenvalues), "whiten": bool(p.whiten)}


def _projection_from_plain(d: dict | None) -> PCAProjection | None:
    if d is None:
        return None
    return PCAProjection(d["mean"].numpy(), d["matrix"].numpy(), d["eigenvalues"].numpy(), d["whiten"])


METHOD = DeepCluster


# ---- final readouts: final_k clusters from an over-clustered run's last round ---------------------------------
# Each gets (rank 0's context, the method's options, train.seed, the training-k outcome, final_k, the round) and
# returns (the final outcome, what it adds to the final row, artifacts kept in clustering.pt).


def _spectral_final(ctx: RoundContext, o: DeepClusterConfig, seed: int, out: ClusterOutcome, final_k: int,
                    round_idx: int) -> tuple[ClusterOutcome, dict, dict]:
    """final_k clusters as groups of the training-k ones: co-neighbour counts summed over the shards (k x k),
    spectral clustering of that graph on rank 0. Each image keeps its distance to its fine centroid."""
    from raydc.core.merge import spectral_merge

    centroids = np.ascontiguousarray(out.centroids, np.float32)
    counts = np.sum([c for c in ctx.service.apply(shard_coneighbours, centroids) if c is not None], axis=0)
    groups = spectral_merge(counts, final_k, seed=derive_seed(seed, round_idx, 31) % (1 << 31))
    ctx.service.apply(shard_group, out.col, "final", groups)
    return dataclasses.replace(out, col="final", sizes=np.bincount(groups, weights=out.sizes, minlength=final_k),
                               objective=[], groups=groups), {}, {}


def _knn_final(ctx: RoundContext, o: DeepClusterConfig, seed: int, out: ClusterOutcome, final_k: int,
               round_idx: int) -> tuple[ClusterOutcome, dict, dict]:
    """final_k clusters as groups of the training-k ones, joined along the points' k-NN graph: a sample of at
    most `final_sample` points is gathered once and broadcast; each shard counts, for its own points, the
    fine clusters of their nearest sample points (k x k back); rank 0 keeps the best of several partitions of
    that graph by a label-free score. Returns the outcome and what the merge chose."""
    from raydc.core.merge import fine_graph, graph_merge

    k = len(out.centroids)
    sample_ids, sample_x, cols = ctx.service.sample_features(
        o.final_sample, derive_seed(seed, round_idx, 37), cols=(out.col,))
    sample_labels = np.asarray(cols[out.col], np.int64)
    edges = np.sum([e for e in ctx.service.apply(shard_knn_edges, out.col, sample_x, sample_labels, sample_ids,
                                                 k, o.final_neighbors) if e is not None], axis=0)
    graph = fine_graph(edges, np.bincount(sample_labels, minlength=k), o.final_graph)
    merged = graph_merge(graph, final_k, seed=derive_seed(seed, round_idx, 31) % (1 << 31),
                         restarts=o.final_restarts, score=o.final_score)
    ctx.service.apply(shard_group, out.col, "final", merged.groups)
    row = {"merge_score": merged.score, "merge_candidate": merged.candidate, "merge_sample": len(sample_ids)}
    return dataclasses.replace(out, col="final", objective=[], groups=merged.groups,
                               sizes=np.bincount(merged.groups, weights=out.sizes, minlength=final_k)), row, {}


def _umap_final(ctx: RoundContext, o: DeepClusterConfig, seed: int, out: ClusterOutcome, final_k: int,
                round_idx: int) -> tuple[ClusterOutcome, dict, dict]:
    """final_k clusters found on a manifold of the final features (raydc.methods.readout.manifold_readout): a
    sample of at most `final_sample` images clustered on rank 0 by UMAP + Gaussian mixture, every image voted
    onto the sample's clusters on its shard. Returns the outcome, what the readout recorded, and the sample
    `raydc assign` votes with."""
    return manifold_readout(ctx, final_k, o.manifold(), sample_seed=derive_seed(seed, round_idx, 37),
                            fit_seed=derive_seed(seed, round_idx, 41) % (1 << 31))


_READOUTS = {"spectral": _spectral_final, "knn": _knn_final, "umap": _umap_final}
