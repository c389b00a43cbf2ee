"""DeepCluster (Caron et al., ECCV 2018) as a strategy for the engine's loop.

Each round (= epoch): features of every image from the current convnet (pre-ReLU penultimate layer, eval
mode, deterministic transform) -> PCA-256 with whitening -> L2 -> k-means (20 iterations, no subsampling, a
fresh seed per epoch drawn from the run seed) -> pseudo-labels by image id. Training then draws images
uniformly over the non-empty clusters (each row repeated Poisson(n / (k_nonempty |c|)) times, DeepCluster's
UnifLabelSampler in expectation, computable while streaming), through a re-initialised top layer with its own
momentum-free SGD, as in the reference code.
"""
from __future__ import annotations

import functools
import time

import numpy as np
import ray
import torch
import torch.nn as nn
import torch.nn.functional as F

from raydc.config import Config
from raydc.core import metrics as M
from raydc.core.models import build_convnet
from raydc.core.sampler import poisson_repeats
from raydc.engine.features import ExtractorSpec
from raydc.engine.stream import Augment, to_model_input
from raydc.errors import NumericalError
from raydc.methods.base import Method, Targets


def _build(cfg_model: dict, in_channels: int, k: int) -> nn.Module:
    net = build_convnet(cfg_model["arch"], in_channels, cfg_model["sobel"], cfg_model["width"],
                        cfg_model["feature_dim"])
    net.reset_head(k, torch.Generator().manual_seed(0))
    return net


def epoch_seed(seed: int, epoch: int, stream: int) -> int:
    return int(np.random.default_rng([seed, epoch, stream]).integers(1 << 31))


class DeepCluster(Method):
    name = "deepcluster"

    def build_model(self) -> nn.Module:
        return self._factory()()

    def _factory(self):
        c = self.cfg.model
        model_cfg = {"arch": c.arch, "sobel": c.sobel, "width": c.width, "feature_dim": c.feature_dim}
        return functools.partial(_build, model_cfg, self.in_channels, self.cfg.cluster.k)

    def is_done(self, state: dict, round_idx: int) -> bool:
        return round_idx >= self.cfg.train.epochs

    def extractor(self, model: nn.Module) -> ExtractorSpec:
        sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        return ExtractorSpec(build=self._factory(), state=sd, call="embed", input_size=self.cfg.model.input_size,
                             channels=self.in_channels)

    # ---- rank 0 ---------------------------------------------------------------------------------
    def cluster(self, ctx, model: nn.Module, state: dict, round_idx: int):
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
        out = ctx.service.kmeans(cc.k, niter=cc.niter, seed=epoch_seed(self.cfg.train.seed, round_idx, 11),
                                 n_init=cc.n_init, mode=mode)
        out.projection = proj
        times["time_kmeans"] = time.perf_counter() - t
        ctx.service.release()
        row = self.cluster_metrics(out, state)
        row.update(times)
        row["images_per_s_features"] = info["n"] / max(times["time_features"], 1e-9)
        return out, row

    def cluster_metrics(self, out, state: dict) -> dict:
        k = self.cfg.cluster.k
        sizes = np.bincount(out.labels, minlength=k)
        row = {
            "kmeans_objective": float(out.objective[-1]) if out.objective else float("nan"),
            "kmeans_objective_curve": [float(o) for o in out.objective],
            "kmeans_backend": out.backend, "kmeans_mode": out.mode, "n_split": int(out.n_split),
            "n_empty": int((sizes == 0).sum()), "size_min": int(sizes.min()), "size_max": int(sizes.max()),
            "size_histogram": sizes.tolist(),
        }
        prev = state.get("last_assign")
        if prev is not None:
            prev_by_row = prev[out.ids]
            row["nmi_prev"] = M.nmi(prev_by_row, out.labels)
        if out.true_labels is not None:
            row.update({k2: v for k2, v in M.evaluate(out.true_labels, out.labels).items()})
        return row

    def make_targets(self, ctx, model: nn.Module, state: dict, round_idx: int) -> tuple[Targets, dict]:
        out, row = self.cluster(ctx, model, state, round_idx)
        assign = np.full(int(out.ids.max()) + 1, -1, np.int64)
        assign[out.ids] = out.labels
        sizes = np.bincount(out.labels, minlength=self.cfg.cluster.k)
        state["last_assign"] = assign
        targets = Targets(refs={"labels": ray.put(assign), "sizes": ray.put(sizes)}, values={"n": int(len(out.ids))})
        return targets, row

    def finalize(self, ctx, model: nn.Module, state: dict, round_idx: int):
        out, row = self.cluster(ctx, model, state, round_idx)
        assign = np.full(int(out.ids.max()) + 1, -1, np.int64)
        assign[out.ids] = out.labels
        state["last_assign"] = assign
        return out, row

    # ---- all workers ----------------------------------------------------------------------------
    def optimizers(self, model: nn.Module, state: dict) -> dict:
        t = self.cfg.train
        return {"body": torch.optim.SGD(model.body_parameters(), lr=t.lr, momentum=t.momentum,
                                        weight_decay=t.weight_decay)}

    def train_round(self, wctx, model: nn.Module, targets: Targets, state: dict, round_idx: int) -> dict:
        t = self.cfg.train
        net = wctx.unwrap(model)
        labels = ray.get(targets.refs["labels"])
        sizes = ray.get(targets.refs["sizes"])
        n_total = t.reassign * targets.values["n"]
        # A fresh top layer each epoch: k-means permutes cluster ids, so last epoch's head means nothing.
        g = torch.Generator().manual_seed(epoch_seed(t.seed, round_idx, 13))
        with torch.no_grad():
            net.top_layer.weight.copy_(torch.randn(net.top_layer.weight.shape, generator=g) * 0.01)
            net.top_layer.bias.zero_()
        head_opt = torch.optim.SGD(net.top_layer.parameters(), lr=t.head_lr or t.lr, weight_decay=t.weight_decay)
        body_opt = wctx.optimizers["body"]

        if t.uniform_sampling:
            def repeats(ids, u):
                return poisson_repeats(labels[ids], sizes, n_total, u)
        else:
            def repeats(ids, u):
                return poisson_repeats(np.zeros(len(ids), np.int64), np.array([len(labels)]), n_total, u)

        aug = Augment(self.cfg.model.input_size, crop=t.crop, flip=t.hflip, scale_min=t.crop_scale_min)
        model.train()
        loss_sum, n_seen, steps = 0.0, 0, 0
        t0 = time.perf_counter()
        for ids, rep, imgs in wctx.batches(round_idx, repeats=repeats):
            x = to_model_input(ids, rep, imgs, seed=t.seed, epoch=round_idx, augment=aug,
                               size=self.cfg.model.input_size).to(wctx.device)
            y = torch.from_numpy(labels[ids]).to(wctx.device)
            loss = F.cross_entropy(model(x), y)
            if not torch.isfinite(loss):
                raise NumericalError(round_idx, "train", "the loss")
            body_opt.zero_grad(set_to_none=True)
            head_opt.zero_grad(set_to_none=True)
            loss.backward()
            body_opt.step()
            head_opt.step()
            loss_sum += float(loss) * len(ids)
            n_seen += len(ids)
            steps += 1
            wctx.progress(steps, n_seen, loss_sum / max(n_seen, 1))
        seconds = time.perf_counter() - t0
        totals = wctx.all_reduce_sum([loss_sum, n_seen])
        return {"loss": totals[0] / max(totals[1], 1), "train_images": int(totals[1]), "time_train": seconds,
                "images_per_s_train": totals[1] / max(seconds, 1e-9)}
