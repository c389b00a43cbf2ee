"""DEC (Xie, Girshick, Farhadi, ICML 2016) as a strategy for the engine's loop.

A DEC run has three stages, all inside the one training fit, each round a unit of work worth a checkpoint:

1. Autoencoder pretraining: greedy layer-wise denoising pairs (`dec.pretrain_epochs` each), then end-to-end
   fine-tuning (`dec.finetune_epochs`). A round is up to `ROUND_EPOCHS` full passes over the data, so Ray's
   per-round cost (~2-3 s: broadcast, report barrier, checkpoint) stays small next to the work.
2. k-means initialisation (the first DEC round): the pool extracts the embedding z of every image, the shard
   actors run k-means on it (no PCA, no L2: DEC clusters the raw embedding). Scored against the labels, this is
   the "AE + k-means" baseline, kept in the state so the final row repeats it.
3. DEC iterations: a round is one target update plus `dec.update_interval` SGD iterations (at most
   `dec.max_update_epochs` passes over the data when that is set). Rank 0 extracts q for
   every image, gets the global soft cluster mass f with one reduction over the shard actors, has each shard
   build its rows of P with that f and put them in the object store by row range (`RowBlocks`: the streaming
   split moves rows between workers, so each worker looks up the rows it streams; nothing N x k is gathered).
   Workers draw rows with Poisson repeats so
   that a round is `update_interval` batches in expectation, and minimise KL(P || Q) over the encoder and
   the centres. Training stops when fewer than `dec.tol` of the hard labels changed between two updates (never
   on the first, which compares with k-means' own labels), after exactly `dec.max_iterations` iterations, or
   when the collapse guard sees the largest cluster pass `dec.collapse_growth` times its share after k-means.

A pretrained start: `model.weights` names an earlier DEC run's directory (or a file of its network) with the same
`model.ae_dims`. Its clustering layer is dropped (its k is not this run's); with `dec.pretrain_epochs: 0` and
`dec.finetune_epochs: 0` the run goes straight to k-means on that embedding. A sweep over k pretrains once this
way (jobs/sweeps/k_dec_pretrained.yaml): k never changes pretraining, and every trial scores the same embedding.

The readout (`dec.readout`): the paper delivers argmax q. `umap` instead clusters a UMAP of a sample of the final
embedding z with a Gaussian mixture and votes every image onto it (raydc.methods.readout, as DeepCluster's
`final_merge: umap`); on a pretrained autoencoder (`dec.max_iterations: 0`) that is N2D (McConville et al. 2020),
which reads the autoencoder's curved class manifolds that k-means, and so DEC's k-means start, cut with planes.

The network and the target maths are in `raydc.core.dec`; this file is the schedule around them.
Randomness: one seed (`train.seed`) drives the weight init, k-means, the shuffles and Poisson draws (hashed per
image id and pass), and dropout (torch is re-seeded each round from (seed, round, rank)), so a resumed run
replays a round exactly.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
import torch.nn as nn

from raydc.core import metrics as M
from raydc.core.dec import build_dec_net, kl_loss, shard_mass, shard_targets, should_stop
from raydc.core.sampler import poisson_repeats
from raydc.core.seeding import derive_seed
from raydc.core.selection import kmeans_stability, manifold_silhouette
from raydc.core.extractor import ExtractorSpec
from raydc.config_loader import resumable
from raydc.errors import ConfigError, NumericalError
from raydc.methods.api import TRUE, RoundContext, TrainContext
from raydc.core.rowblocks import RowBlocks
from raydc.methods.base import (FinalClustering, Method, RoundPlan, check_backbone_arch, clustering_row, rank0_field,
                                shard_argmax)
from raydc.methods.readout import (ManifoldReadout, check_umap_installed, has_vote, manifold_readout, place_by_vote,
                                   prepare_manifold_readout, readout_options)

ROUND_EPOCHS = 5   # at most this many autoencoder epochs per round (one checkpoint, one metrics row)

PRETRAIN, FINETUNE, DEC_PHASE = "pretrain", "finetune", "dec"


@dataclass
class DECConfig:
    """Deep Embedded Clustering (Xie et al. 2016); defaults follow the paper and its reference code."""

    corruption: float = 0.2                # dropout on each layer's input during pretraining
    pretrain_epochs: int = resumable(50)   # greedy layer-wise, per layer
    finetune_epochs: int = resumable(100)  # end-to-end autoencoder
    pretrain_lr: float = 0.1
    pretrain_momentum: float = 0.9
    pretrain_optimizer: Literal["sgd", "adam"] = "sgd"
    pretrain_batch_size: int = 256
    lr_step_epochs: int = 0                # divide the pretraining lr by 10 every this many epochs (0: never)
    alpha: float = 1.0                     # Student-t degrees of freedom
    lr: float = 0.01
    momentum: float = 0.9
    batch_size: int = 256
    update_interval: int = 160             # iterations between target recomputations
    max_update_epochs: float = 0.0         # > 0: at most this many passes over the data per update (0: no cap)
    collapse_growth: float = 2.0           # stop when the largest cluster's share passes this x its k-means share
    tol: float = resumable(0.001)          # stop when fewer than this fraction of labels change
    max_iterations: int = resumable(20_000)
    # Rows of the autoencoder's embedding on which k-means' stability at cluster.k is measured after pretraining
    # (raydc.core.selection.kmeans_stability; the final row's `ae_kmeans_stability`, a sweep's label-free
    # choice of k). 0: not measured.
    stability_sample: int = 5000
    # Rows of the same embedding on which `ae_manifold_silhouette` is measured: the silhouette of a k-component
    # mixture on a UMAP of them (raydc.core.selection.manifold_silhouette), a sweep's label-free choice of k where
    # stability prefers the fewest clusters (an autoencoder pretrained on fewer images). 0: not measured (it fits
    # a UMAP: needs umap-learn).
    manifold_score_sample: int = 0
    # The clustering a run delivers. "q": argmax of DEC's soft assignment (the paper). "umap": clusters found on a
    # UMAP of a sample of the final embedding z by a Gaussian mixture, every image voted onto them by its nearest
    # sample images (N2D, McConville et al. 2020; raydc.methods.readout); with `max_iterations: 0` that is N2D on
    # the pretrained autoencoder. The final row keeps argmax q's scores as dec_acc / dec_nmi / dec_ari. It changes
    # nothing the rounds computed, so a finished run can be resumed with another readout: only the final step
    # reruns. Needs umap-learn (pip install 'raydc[umap]').
    readout: Literal["q", "umap"] = resumable("q")
    readout_sample: int = resumable(20_000)  # umap: images gathered on rank 0 and broadcast to the shards
    readout_dims: int = resumable(10)        # umap: dimensions the mixture is fitted in (N2D: the number of clusters)
    readout_neighbors: int = resumable(20)   # umap: UMAP's n_neighbors (N2D: 20)
    readout_vote: int = resumable(10)        # umap: nearest sample images whose clusters vote for each image
    readout_restarts: int = resumable(1)     # umap: UMAP + mixture seeds, combined by readout_combine
    # umap, restarts > 1: keep the most agreed restart ("pick") or cluster by all their memberships ("consensus")
    readout_combine: Literal["pick", "consensus"] = resumable("pick")
    readout_graph: Literal["nndescent", "exact"] = resumable("nndescent")  # umap: NN-descent, or faiss's exact graph
    readout_samples: int = resumable(1)      # umap: independent samples read out, combined on the first
    readout_metric: Literal["euclidean", "cosine"] = resumable("euclidean")  # umap: in z (N2D: euclidean)

    def validate(self) -> None:
        if not 0 <= self.corruption < 1:
            raise ConfigError("dec.corruption", f"must be in [0, 1), got {self.corruption}")
        if self.alpha <= 0:
            raise ConfigError("dec.alpha", f"must be > 0, got {self.alpha}")
        if self.update_interval < 1:
            raise ConfigError("dec.update_interval", f"must be >= 1, got {self.update_interval}")
        if self.max_update_epochs < 0:
            raise ConfigError("dec.max_update_epochs", f"must be >= 0 (0: no cap), got {self.max_update_epochs}")
        if self.collapse_growth != 0 and self.collapse_growth <= 1:
            raise ConfigError("dec.collapse_growth", f"must be > 1, or 0 to turn the guard off; got "
                                                     f"{self.collapse_growth}")
        if not 0 <= self.tol < 1:
            raise ConfigError("dec.tol", f"must be in [0, 1), got {self.tol}")
        if self.stability_sample < 0:
            raise ConfigError("dec.stability_sample", f"must be >= 0 (0: not measured), got {self.stability_sample}")
        if self.manifold_score_sample < 0:
            raise ConfigError("dec.manifold_score_sample",
                              f"must be >= 0 (0: not measured), got {self.manifold_score_sample}")
        if self.max_iterations < 0:
            raise ConfigError("dec.max_iterations", f"must be >= 0, got {self.max_iterations}")
        for name in ("pretrain_epochs", "finetune_epochs"):
            if getattr(self, name) < 0:
                raise ConfigError(f"dec.{name}", f"must be >= 0, got {getattr(self, name)}")
        self.manifold()  # the readout_* fields, each named if out of range
        if self.readout == "umap":
            check_umap_installed("dec.readout")
        if self.manifold_score_sample:
            check_umap_installed("dec.manifold_score_sample")

    def manifold(self) -> ManifoldReadout:
        """The umap readout's knobs, as raydc.methods.readout takes them."""
        return readout_options("dec", self, {
            "sample": "readout_sample", "dims": "readout_dims", "neighbors": "readout_neighbors",
            "vote": "readout_vote", "restarts": "readout_restarts", "combine": "readout_combine",
            "graph": "readout_graph", "samples": "readout_samples"},
            metric=self.readout_metric)


@dataclass
class AutoencoderChunk:
    """Up to ROUND_EPOCHS epochs of one autoencoder stage."""

    phase: str      # PRETRAIN or FINETUNE
    layer: int      # the greedy layer (-1 while fine-tuning)
    start: int      # epochs of this stage already done
    epochs: int
    total: int


@dataclass
class DECTargets:
    p: RowBlocks                       # (N, k) float32 target distribution, in the object store by row
    n: int                             # images
    centres: np.ndarray | None = None  # the k-means centres, on the first DEC round only


@dataclass
class DECState:
    stage: int = 0                     # index into DEC.stages()
    stage_epoch: int = 0
    ae_epochs: int = 0
    dec_iter: int = 0
    n_updates: int = 0
    initialised: bool = False
    ae_kmeans: dict | None = None      # the AE + k-means baseline's scores
    init_largest_share: float | None = None  # the k-means clustering's largest cluster / N (the collapse guard)
    delta_label: float | None = None
    stop_reason: str | None = None
    pred_path: str | None = rank0_field()  # the saved hard labels of the last update (labels/round=R)


class DEC(Method):
    name = "dec"
    section, options = "dec", DECConfig
    summary_fields = (("phase", "{}"), ("kmeans_objective", "obj {:.5g}"), ("delta_label", "changed {:.2%}"))
    # DeepCluster's SGD settings: this method's batch sizes, optimizer and augmentation are in its own section
    shared_defaults = {"cluster.pca_dim": 0}  # clusters its own 10-d embedding, never a PCA of the features
    ignored_fields = ("train.batch_size", "train.lr", "train.momentum", "train.weight_decay", "train.head_lr",
                      "train.lr_schedule", "train.lr_final", "train.min_steps", "train.reassign",
                      "train.uniform_sampling", "train.augment", "train.crop", "train.crop_scale_min",
                      "train.hflip", "train.erase")

    # `model.arch: torchvision:<name>` / `timm:<name>`: the autoencoder clusters that frozen network's features
    # (DECNet's `front`) instead of pixels; any other `model.arch` is not read (DEC's net is `model.ae_dims`).
    backbones = True

    def __init__(self, cfg, manifest):
        super().__init__(cfg, manifest)
        self.input_dim = (self.backbone.feature_dim if self.backbone is not None
                          else self.input_size ** 2 * self.in_channels)
        self._last_update: dict | None = None  # rank 0: the update that said stop, reused by finalize

    @classmethod
    def validate_config(cls, cfg) -> None:
        """`model.arch` is checked only when it names a published backbone: DEC's own network is its autoencoder
        (`model.ae_dims`)."""
        from raydc.core.backbones import is_backbone

        if cfg.cluster.pca_dim:
            raise ConfigError("cluster.pca_dim", f"must be 0 for DEC (it clusters its own embedding), "
                                                 f"got {cfg.cluster.pca_dim}")
        if not is_backbone(cfg.model.arch):
            # model.weights without a backbone: an autoencoder of the same ae_dims (an earlier DEC run's
            # directory, or a file of its network), so a sweep over k pretrains once (k never changes pretraining)
            if cfg.model.freeze != "none":
                raise ConfigError("model.freeze", "DEC freezes only a published backbone in front of its "
                                                  "autoencoder (model.arch: torchvision:<name> or timm:<name>)")
            return
        check_backbone_arch(cfg.model.arch)
        if cfg.model.freeze == "none":
            raise ConfigError("model.freeze", "DEC clusters a frozen backbone's features through its autoencoder "
                                              "and never trains the backbone: set model.freeze to trunk or all")

    def check_data(self) -> None:
        super().check_data()
        self.check_batch("dec.batch_size", self.opts.batch_size)
        self.check_batch("dec.pretrain_batch_size", self.opts.pretrain_batch_size)

    # ---- model and state ------------------------------------------------------------------------
    def network_factory(self):
        d = self.opts
        spec = {"input_dim": self.input_dim, "dims": list(self.cfg.model.ae_dims), "corruption": d.corruption,
                "k": self.cfg.cluster.k, "alpha": d.alpha, "seed": self.cfg.train.seed}
        if self.backbone is not None:
            spec.update(backbone=self.cfg.model.arch, in_channels=self.in_channels)
        return functools.partial(build_dec_net, spec)

    def is_head_key(self, key: str) -> bool:
        """The clustering layer's centres belong to the earlier run's k; this run sets its own from k-means."""
        return key.split(".")[0] == "cluster" or super().is_head_key(key)

    def weights_target(self, model: nn.Module) -> nn.Module:
        """A backbone's published weights go into the frozen network in front of the autoencoder."""
        front = getattr(model, "front", None)
        return front if isinstance(front, nn.Module) else model

    def stages(self) -> list[tuple[str, int, int]]:
        """The autoencoder schedule: (phase, layer, epochs) for each greedy pair, then fine-tuning. Stages of 0
        epochs stay in the list (and are skipped), so a stage's index means the same whatever the budgets are:
        a resumed run may change them."""
        d = self.opts
        out = [(PRETRAIN, i, d.pretrain_epochs) for i in range(len(self.cfg.model.ae_dims))]
        out.append((FINETUNE, -1, d.finetune_epochs))
        return out

    def init_state(self) -> DECState:
        return DECState()

    def is_done(self, state: DECState, round_idx: int) -> bool:
        return state.stop_reason is not None

    def epoch_of(self, state: DECState, round_idx: int) -> int:
        """Autoencoder epochs completed plus DEC target updates made: strictly increasing, one unit per unit of
        work, so rows never share an x position in the report's curves."""
        return int(state.ae_epochs + state.n_updates)

    def extractor(self, model: nn.Module, call: str) -> ExtractorSpec:
        return self.extractor_of(model, call)

    # ---- rank 0 ---------------------------------------------------------------------------------
    def plan(self, ctx: RoundContext, model: nn.Module, state: DECState, round_idx: int) -> tuple[RoundPlan, dict]:
        if self.opts.readout == "umap":
            prepare_manifold_readout(ctx, self.opts.manifold())
        stages = self.stages()
        while state.stage < len(stages) and state.stage_epoch >= stages[state.stage][2]:
            state.stage, state.stage_epoch = state.stage + 1, 0  # a finished (or emptied) stage
        if state.stage < len(stages):
            return self._plan_autoencoder(stages, state)
        if not state.initialised:
            return self._kmeans_init(ctx, model, state, round_idx)
        return self._update(ctx, model, state, round_idx)

    def _plan_autoencoder(self, stages: list, state: DECState) -> tuple[RoundPlan, dict]:
        """The next chunk of at most ROUND_EPOCHS epochs of one stage; the state advances past it (the round's
        checkpoint commits it, so a failed round is redone from the previous state)."""
        phase, layer, total = stages[state.stage]
        start = state.stage_epoch
        n = min(ROUND_EPOCHS, total - start)
        state.ae_epochs += n
        state.stage_epoch = start + n
        row: dict[str, Any] = {"phase": phase, "stage_epochs": f"{start + n}/{total}"}
        if phase == PRETRAIN:
            row["layer"] = layer
        return RoundPlan(targets=AutoencoderChunk(phase, layer, start, n, total)), row

    def _kmeans_init(self, ctx: RoundContext, model: nn.Module,
                     state: DECState, round_idx: int) -> tuple[RoundPlan, dict]:
        """Embed every image, k-means the embedding (the AE + k-means baseline), then the first target P from
        the same embedding with the k-means centres: no second pass over the images."""
        cc = self.cfg.cluster
        row: dict[str, Any] = {"phase": DEC_PHASE}
        t = time.perf_counter()
        info = ctx.extract(self.extractor(model, "embed"))
        if not info.finite:
            raise NumericalError(self.epoch_of(state, round_idx), "features", "the autoencoder embedding")
        row["time_features"] = time.perf_counter() - t
        t = time.perf_counter()
        out = ctx.service.kmeans(cc.k, niter=cc.niter, seed=derive_seed(self.cfg.train.seed, 11),
                                 n_init=cc.n_init, mode="single")
        row["time_kmeans"] = time.perf_counter() - t
        centres = np.ascontiguousarray(out.centroids, np.float32)
        baseline = {"ae_kmeans_objective": float(out.objective[-1]) if out.objective else None,
                    "ae_kmeans_n_init": cc.n_init}
        true = ctx.service.counts(TRUE, out.col) if ctx.labelled else None
        if true is not None:
            scores = M.evaluate_counts(true)
            baseline.update({f"ae_kmeans_{m}": scores[m] for m in ("acc", "nmi", "ari")})
        samples: dict[int, np.ndarray] = {}  # both scores of k draw from one seed: one gather where sizes agree

        def embedding_sample(n: int) -> np.ndarray:
            if n not in samples:
                samples[n] = ctx.service.sample_features(n, derive_seed(self.cfg.train.seed, 47))[1]
            return samples[n]

        if self.opts.stability_sample:
            # How reproducible k-means at this k is on the embedding before DEC sharpens it: what a sweep over k
            # can select on (silhouette on the final, sharpened embedding prefers the smallest k).
            t = time.perf_counter()
            baseline["ae_kmeans_stability"] = kmeans_stability(embedding_sample(self.opts.stability_sample), cc.k,
                                                               seed=derive_seed(self.cfg.train.seed, 53))
            row["time_stability"] = time.perf_counter() - t
        if self.opts.manifold_score_sample:
            t = time.perf_counter()
            baseline["ae_manifold_silhouette"] = manifold_silhouette(
                embedding_sample(self.opts.manifold_score_sample), cc.k,
                seed=derive_seed(self.cfg.train.seed, 67) % (1 << 31))
            row["time_manifold_score"] = time.perf_counter() - t
        state.ae_kmeans = baseline
        state.init_largest_share = float(np.max(out.sizes) / max(out.n, 1))
        state.pred_path = ctx.save_column(out.col, "labels", round_idx)
        ctx.remember(state.pred_path, ctx.service.publish(out.col, dtype="int32"))
        state.initialised = True
        row.update(baseline)
        plan = self._targets(ctx, state, round_idx, centres, n=info.n, row=row)
        if plan.targets is not None:
            plan.targets.centres = centres
        return plan, row

    def _update(self, ctx: RoundContext, model: nn.Module, state: DECState, round_idx: int) -> tuple[RoundPlan, dict]:
        t = time.perf_counter()
        info = ctx.extract(self.extractor(model, "soft_assign"))
        if not info.finite:
            raise NumericalError(self.epoch_of(state, round_idx), "features", "the soft assignments q")
        row: dict[str, Any] = {"phase": DEC_PHASE, "time_features": time.perf_counter() - t}
        return self._targets(ctx, state, round_idx, None, n=info.n, row=row), row

    def _targets(self, ctx: RoundContext, state: DECState, round_idx: int, centres: np.ndarray | None, n: int, row: dict
                 ) -> RoundPlan:
        """P from the q held by the shard actors (or from z and `centres`): one reduction for the global mass f,
        then each shard's rows of P; the stopping rule on the change of hard labels since the last update.
        Fills `row` with the update's diagnostics. When it stops, the shards keep their rows for the final
        scoring."""
        d, k = self.opts, self.cfg.cluster.k
        t = time.perf_counter()
        mass = np.sum(ctx.service.apply(shard_mass, centres, d.alpha, k), axis=0)
        if not all(ctx.service.apply(shard_targets, centres, d.alpha, mass)):
            raise NumericalError(self.epoch_of(state, round_idx), "targets", "the target distribution P")
        changes = ctx.service.counts(ctx.column_blocks(state.pred_path), "pred")  # (last update, now) pairs
        delta = 1.0 - changes.agreement()
        first = state.n_updates == 0
        if not first:  # stability against the previous update: what sweeps and ASHA compare across k
            row["nmi_prev"] = M.nmi_counts(changes)
        state.n_updates += 1
        state.delta_label = delta
        state.pred_path = ctx.save_column("pred", "labels", round_idx)
        row.update({"dec_update": state.n_updates, "delta_label": delta, "dec_iterations": state.dec_iter,
                    **clustering_row(ctx, "pred", k), "time_targets": time.perf_counter() - t})
        largest = row["size_max"] / max(changes.n, 1)
        if not first and should_stop(delta, d.tol):
            state.stop_reason = f"converged: {delta:.5f} of labels changed (< tol {d.tol})"
        elif d.collapse_growth and state.init_largest_share and largest > d.collapse_growth * state.init_largest_share:
            # KL(P || Q) sharpens what q already favours; on few images one cluster can absorb its neighbours
            # round after round. Stopping here keeps the clustering from before most of that happened.
            state.stop_reason = (f"collapse guard: the largest cluster holds {largest:.1%} of the images, more than "
                                 f"dec.collapse_growth {d.collapse_growth} x its {state.init_largest_share:.1%} "
                                 f"after k-means")
        elif state.dec_iter >= d.max_iterations:
            state.stop_reason = f"max_iterations: {state.dec_iter} >= {d.max_iterations}"
        if state.stop_reason is not None:
            self._last_update = {"row": row}  # the shards keep q's labels ("pred") for finalize
            return RoundPlan(stop=state.stop_reason)
        ctx.remember(state.pred_path, ctx.service.publish("pred", dtype="int32"))
        targets = DECTargets(ctx.service.publish("p", dtype="float32", fill=0.0), int(n))
        ctx.release()
        return RoundPlan(targets=targets)

    def finalize(self, ctx: RoundContext, model: nn.Module, state: DECState, round_idx: int):
        """Hard labels argmax q of the final model. The update that decided to stop already computed them from
        this very model (no training since), so they are reused rather than extracted again."""
        g, row = self._last_update, {}
        if g is None:  # not reached through a stop decision in this process: extract once more
            t = time.perf_counter()
            info = ctx.extract(self.extractor(model, "soft_assign"))
            if not info.finite:
                raise NumericalError(self.epoch_of(state, round_idx), "features", "the soft assignments q")
            ctx.service.apply(shard_argmax, "pred")
            row["time_features"] = time.perf_counter() - t
        else:
            row.update({key: v for key, v in g["row"].items() if key.startswith("time_") or key == "nmi_prev"})
        k = self.cfg.cluster.k
        final = FinalClustering("pred", "pred_distance", {"centres": model.cluster.centers.detach().cpu().clone()})
        row.update({"phase": "final", "stop_reason": state.stop_reason, "delta_label": state.delta_label,
                    "dec_iterations": state.dec_iter, "dec_updates": state.n_updates})
        row.update(state.ae_kmeans or {})
        q_row = clustering_row(ctx, "pred", k)
        if self.opts.readout == "q":
            row.update(q_row)
            return final, row
        # The manifold readout of the final embedding; argmax q's scores stay in the row beside it.
        row.update({f"dec_{key}": q_row[key] for key in ("acc", "nmi", "ari") if key in q_row})
        t = time.perf_counter()
        info = ctx.extract(self.extractor(model, "embed"))
        if not info.finite:
            raise NumericalError(self.epoch_of(state, round_idx), "features", "the final embedding z")
        seed = self.cfg.train.seed
        out, readout_row, vote = manifold_readout(ctx, k, self.opts.manifold(), sample_seed=derive_seed(seed, 59),
                                                  fit_seed=derive_seed(seed, 61) % (1 << 31))
        final = FinalClustering(out.col, out.col + "_distance", {**final.artifacts, **vote})
        row.update(readout_row)
        row.update({"readout": "umap", "time_readout": time.perf_counter() - t, **clustering_row(ctx, out.col, k)})
        return final, row

    def place_new_images(self, ctx: RoundContext, model: nn.Module, artifacts: dict):
        """A new image's cluster is argmax q under the final model, and its distance 1 - max q, as in the run; or,
        after the umap readout, the vote of its nearest sample images in z over the run's own sample."""
        if has_vote(artifacts):
            info = ctx.extract(self.extractor(model, "embed"))
            if not info.finite:
                raise NumericalError(0, "assign", "the embedding z of these images")
            return place_by_vote(ctx, artifacts, self.cfg.cluster.k, self.opts.readout_vote)
        info = ctx.extract(self.extractor(model, "soft_assign"))
        if not info.finite:
            raise NumericalError(0, "assign", "the soft assignments q of these images")
        ctx.service.apply(shard_argmax, "pred")
        return FinalClustering("pred", "pred_distance")

    # ---- all workers ----------------------------------------------------------------------------
    def optimizers(self, model: nn.Module, state: DECState) -> dict:
        """Every phase's optimizer, made once (the loop calls this at start-up and restores their state from the
        checkpoint); `train_round` picks the one for the round's phase."""
        d = self.opts

        def pretrain_opt(params):
            if d.pretrain_optimizer == "adam":
                return torch.optim.Adam(params, lr=d.pretrain_lr)
            return torch.optim.SGD(params, lr=d.pretrain_lr, momentum=d.pretrain_momentum)

        opts = {f"layer{i}": pretrain_opt(model.ae.layer_parameters(i)) for i in range(model.ae.n_layers)}
        opts["finetune"] = pretrain_opt(list(model.ae.parameters()))
        opts["dec"] = torch.optim.SGD(model.dec_parameters(), lr=d.lr, momentum=d.momentum)
        return opts

    def train_round(self, wctx: TrainContext, model: nn.Module, plan: RoundPlan,
                    state: DECState, round_idx: int) -> dict:
        torch.manual_seed(derive_seed(self.cfg.train.seed, round_idx, wctx.rank, 17))  # dropout
        if isinstance(plan.targets, AutoencoderChunk):
            return self._train_autoencoder(wctx, model, plan.targets, state, round_idx)
        return self._train_dec(wctx, model, plan.targets, state, round_idx)

    def _use_optimizer(self, wctx: TrainContext, name: str):
        """The phase's optimizer; finished phases' optimizer state is dropped (it is never used again and would
        only fatten every checkpoint)."""
        for other, opt in wctx.optimizers.items():
            if other != name and opt.state:
                opt.state.clear()
        return wctx.optimizers[name]

    def _inputs(self, wctx: TrainContext, ids, rep, imgs, round_idx: int) -> torch.Tensor:
        from raydc.core.stream import to_model_input

        return to_model_input(ids, rep, imgs, seed=self.cfg.train.seed, epoch=round_idx, augment=None,
                              size=self.input_size).to(wctx.device)

    def _train_autoencoder(self, wctx: TrainContext, model: nn.Module, chunk: AutoencoderChunk, state: DECState,
                           round_idx: int) -> dict:
        d = self.opts
        pretrain = chunk.phase == PRETRAIN
        opt = self._use_optimizer(wctx, f"layer{chunk.layer}" if pretrain else "finetune")
        task = "layerwise" if pretrain else "finetune"
        model.train()
        losses, n_images, seconds = [], 0, 0.0
        for e in range(chunk.epochs):
            epoch_in_stage = chunk.start + e
            lr = d.pretrain_lr * (0.1 ** (epoch_in_stage // d.lr_step_epochs) if d.lr_step_epochs else 1.0)
            for group in opt.param_groups:
                group["lr"] = lr
            stats = wctx.sgd_pass(
                wctx.batches(_pass_id(round_idx, e), batch_size=d.pretrain_batch_size), [opt],
                lambda b: model(self._inputs(wctx, b.ids, b.copy, b.images, round_idx), task=task,
                                layer=chunk.layer),
                epoch=self.epoch_of(state, round_idx), phase=chunk.phase, what="the reconstruction loss")
            losses.append(stats.loss)
            n_images += stats.images
            seconds += stats.seconds
        return {"loss": losses[-1], "loss_epochs": losses, "lr": lr, "train_images": n_images,
                f"time_{chunk.phase}": seconds, "images_per_s_train": n_images / max(seconds, 1e-9)}

    def update_steps(self, n: int) -> int:
        """SGD iterations between two target updates: `dec.update_interval`, capped at `dec.max_update_epochs`
        passes over the n images when set. On 1,400 MNIST images 160 iterations are 29 passes against one
        target; capping them at one pass was measured worse there (ACC 0.508 -> 0.385 against 0.514 uncapped:
        updating P more often sharpens it faster), so the cap is off by default and kept as an ablation."""
        d = self.opts
        if not d.max_update_epochs:
            return d.update_interval
        per_pass = n / (d.batch_size * self.cfg.train.num_workers)
        return max(1, min(d.update_interval, int(np.ceil(d.max_update_epochs * per_pass))))

    def _train_dec(self, wctx: TrainContext, model: nn.Module, targets: DECTargets,
                   state: DECState, round_idx: int) -> dict:
        d = self.opts
        net = wctx.unwrap(model)
        if targets.centres is not None:  # the k-means round: every rank starts from the same centres
            net.cluster.init_from(np.array(targets.centres))  # a writable copy of the shared array
        n = targets.n
        # Poisson(lam) copies of each row, all rows in one pseudo-cluster: update_interval batches per worker
        # in expectation, decided per image id so it does not matter which worker streams a row.
        n_total = self.update_steps(n) * d.batch_size * wctx.world

        def repeats(r, u):
            return poisson_repeats(np.zeros(len(r["id"]), np.int64), np.array([n]), n_total, u)

        def loss_of(b):
            return kl_loss(model(self._inputs(wctx, b.ids, b.copy, b.images, round_idx)),
                           torch.from_numpy(b.target).to(wctx.device))

        opt = self._use_optimizer(wctx, "dec")
        model.train()
        batches = wctx.batches(_pass_id(round_idx, 0), targets=targets.p, repeats=repeats, batch_size=d.batch_size,
                               max_steps=max(0, d.max_iterations - state.dec_iter))
        stats = wctx.sgd_pass(batches, [opt], loss_of, epoch=self.epoch_of(state, round_idx), phase=DEC_PHASE,
                              what="the KL loss")
        state.dec_iter += stats.steps  # equal on every rank: all workers stop at the same step
        return {"loss": stats.loss, "train_images": stats.images, "dec_steps": stats.steps,
                "dec_iterations": state.dec_iter, "time_train": stats.seconds,
                "images_per_s_train": stats.images / max(stats.seconds, 1e-9)}


def _pass_id(round_idx: int, epoch: int) -> int:
    """A distinct number per pass over the data (several per round while pretraining), which seeds the shuffle
    and the Poisson draws: reusing the round number would give every epoch of a round the same order."""
    return round_idx * ROUND_EPOCHS + epoch


METHOD = DEC
