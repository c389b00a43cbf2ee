"""DeepCluster (Caron et al., ECCV 2018) as a strategy for the engine's loop.

Each round (= epoch): features of every image from the current convnet (pre-ReLU penultimate layer, eval
mode, deterministic transform) -> PCA-256 with whitening -> L2 -> k-means (20 iterations, no subsampling, a
fresh seed per epoch drawn from the run seed) -> pseudo-labels by image id. Training then draws images
uniformly over the non-empty clusters (each row repeated Poisson(n / (k_nonempty |c|)) times, DeepCluster's
UnifLabelSampler in expectation, computable while streaming), through a re-initialised top layer with its own
momentum-free SGD, as in the reference code.

DeepCluster has no config section of its own: its knobs are the engine's `cluster` (k-means, PCA) and `train`
(SGD, sampling, augmentation) sections, which it uses as the paper does.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from raydc.core import metrics as M
from raydc.core.models import build_convnet
from raydc.core.pca import PCAProjection
from raydc.core.sampler import poisson_repeats
from raydc.core.seeding import derive_seed
from raydc.engine.features import ExtractorSpec
from raydc.engine.stream import Augment, to_model_input
from raydc.errors import ConfigError, NumericalError
from raydc.methods.base import FinalClustering, Method, RoundPlan, by_id, rank0_field

FEATURE_DIMS = {"alexnet": 4096, "vgg16": 4096}  # fixed penultimate widths; smallconvnet's is model.feature_dim


def _build(cfg_model: dict, in_channels: int, k: int) -> nn.Module:
    net = build_convnet(cfg_model["arch"], in_channels, cfg_model["sobel"], cfg_model["width"],
                        cfg_model["feature_dim"])
    net.reset_head(k, torch.Generator().manual_seed(0))
    return net


@dataclass
class PseudoLabels:
    """One round's training targets: every image's cluster (by id) and the cluster sizes."""

    labels: np.ndarray   # (max id + 1,) int64, -1 where no image has that id
    sizes: np.ndarray    # (k,)
    n: int               # images clustered


@dataclass
class DeepClusterState:
    last_assign: np.ndarray | None = rank0_field()  # the previous round's clusters by id, for NMI(t-1, t)


class DeepCluster(Method):
    name = "deepcluster"

    @classmethod
    def validate_config(cls, cfg) -> None:
        super().validate_config(cfg)
        feat = FEATURE_DIMS.get(cfg.model.arch, cfg.model.feature_dim)
        if cfg.cluster.pca_dim > feat:
            raise ConfigError("cluster.pca_dim", f"{cfg.cluster.pca_dim} is larger than the feature dimension {feat}")

    def check_data(self) -> None:
        super().check_data()
        self.check_batch("train.batch_size", self.cfg.train.batch_size)

    def build_model(self) -> nn.Module:
        return self._factory()()

    def _factory(self):
        c = self.cfg.model
        model_cfg = {"arch": c.arch, "sobel": c.sobel, "width": c.width, "feature_dim": c.feature_dim}
        return functools.partial(_build, model_cfg, self.in_channels, self.cfg.cluster.k)

    def init_state(self) -> DeepClusterState:
        return DeepClusterState()

    def is_done(self, state: DeepClusterState, round_idx: int) -> bool:
        return round_idx >= self.cfg.train.epochs

    def extractor(self, model: nn.Module) -> ExtractorSpec:
        sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return ExtractorSpec(build=self._factory(), state=sd, call="embed", input_size=self.cfg.model.input_size,
                             channels=self.in_channels)

    # ---- rank 0 ---------------------------------------------------------------------------------
    def cluster(self, ctx, model: nn.Module, state: DeepClusterState, round_idx: int, *, release: bool = True):
        """features -> PCA -> k-means for the model as it is now; returns (outcome, metrics)."""
        cc = self.cfg.cluster
        times: dict[str, float] = {}
        t = time.perf_counter()
        info = ctx.extract(self.extractor(model))
        times["time_features"] = time.perf_counter() - t
        if not info["finite"]:
            raise NumericalError(round_idx, "features", "the network's features")
        t = time.perf_counter()
        proj = ctx.service.fit_projection(cc.pca_dim, cc.whiten)
        if not ctx.service.project(proj, cc.l2_normalize):
            raise NumericalError(round_idx, "pca", "the PCA-projected features")
        times["time_pca"] = time.perf_counter() - t
        t = time.perf_counter()
        mode = ctx.service.choose_mode(cc.mode, cc.single_max_bytes)
        out = ctx.service.kmeans(cc.k, niter=cc.niter, seed=derive_seed(self.cfg.train.seed, round_idx, 11),
                                 n_init=cc.n_init, mode=mode)
        out.projection = proj
        times["time_kmeans"] = time.perf_counter() - t
        if release:
            ctx.release()
        row = self.cluster_metrics(out, state)
        row.update(times)
        row["images_per_s_features"] = info["n"] / max(times["time_features"], 1e-9)
        state.last_assign = by_id(out.ids, out.labels.astype(np.int64), -1)
        return out, row

    def cluster_metrics(self, out, state: DeepClusterState) -> dict:
        row = {
            "kmeans_objective": float(out.objective[-1]) if out.objective else float("nan"),
            "kmeans_objective_curve": [float(o) for o in out.objective],
            "kmeans_backend": out.backend, "kmeans_mode": out.mode, "n_split": int(out.n_split),
            **M.size_stats(out.labels, self.cfg.cluster.k),
        }
        if state.last_assign is not None:
            row["nmi_prev"] = M.nmi(state.last_assign[out.ids], out.labels)
        if out.true_labels is not None:
            row.update(M.evaluate(out.true_labels, out.labels))
        return row

    def plan(self, ctx, model: nn.Module, state: DeepClusterState, round_idx: int) -> tuple[RoundPlan, dict]:
        out, row = self.cluster(ctx, model, state, round_idx)
        sizes = np.bincount(out.labels, minlength=self.cfg.cluster.k)
        return RoundPlan(targets=PseudoLabels(state.last_assign, sizes, int(len(out.ids)))), row

    def finalize(self, ctx, model: nn.Module, state: DeepClusterState, round_idx: int):
        out, row = self.cluster(ctx, model, state, round_idx, release=False)
        artifacts = {"projection": _projection_to_plain(out.projection),
                     # a copy: the array is read-only, and torch.from_numpy would share it
                     "centroids": torch.tensor(np.asarray(out.centroids), dtype=torch.float32)}
        return FinalClustering(out.ids, out.labels, out.distances, out.true_labels, artifacts), row

    def assign(self, ctx, model: nn.Module, artifacts: dict):
        info = ctx.extract(self.extractor(model))
        if not info["finite"]:
            raise NumericalError(0, "assign", "the network's features for these images")
        ctx.service.project(_projection_from_plain(artifacts["projection"]), self.cfg.cluster.l2_normalize)
        return ctx.service.assign_to(artifacts["centroids"].numpy())

    # ---- all workers ----------------------------------------------------------------------------
    def optimizers(self, model: nn.Module, state: DeepClusterState) -> dict:
        t = self.cfg.train
        return {"body": torch.optim.SGD(model.body_parameters(), lr=t.lr, momentum=t.momentum,
                                        weight_decay=t.weight_decay)}

    def train_round(self, wctx, model: nn.Module, plan: RoundPlan, state: DeepClusterState, round_idx: int) -> dict:
        t = self.cfg.train
        targets: PseudoLabels = plan.targets
        labels, sizes = targets.labels, targets.sizes
        net = wctx.unwrap(model)
        n_total = t.reassign * targets.n
        # A fresh top layer each epoch: k-means permutes cluster ids, so last epoch's head means nothing.
        g = torch.Generator().manual_seed(derive_seed(t.seed, round_idx, 13))
        with torch.no_grad():
            net.top_layer.weight.copy_(torch.randn(net.top_layer.weight.shape, generator=g) * 0.01)
            net.top_layer.bias.zero_()
        head_opt = torch.optim.SGD(net.top_layer.parameters(), lr=t.head_lr or t.lr, weight_decay=t.weight_decay)

        if t.uniform_sampling:
            def repeats(ids, u):
                return poisson_repeats(labels[ids], sizes, n_total, u)
        else:
            def repeats(ids, u):
                return poisson_repeats(np.zeros(len(ids), np.int64), np.array([len(labels)]), n_total, u)

        aug = Augment(self.cfg.model.input_size, crop=t.crop, flip=t.hflip, scale_min=t.crop_scale_min)

        def loss_of(ids, rep, imgs):
            x = to_model_input(ids, rep, imgs, seed=t.seed, epoch=round_idx, augment=aug,
                               size=self.cfg.model.input_size).to(wctx.device)
            return F.cross_entropy(model(x), torch.from_numpy(labels[ids]).to(wctx.device))

        model.train()
        stats = wctx.sgd_pass(wctx.batches(round_idx, repeats=repeats), [wctx.optimizers["body"], head_opt],
                              loss_of, epoch=round_idx, phase="train", what="the loss")
        return {"loss": stats.loss, "train_images": stats.images, "time_train": stats.seconds,
                "images_per_s_train": stats.images / max(stats.seconds, 1e-9)}


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
