"""DAC's science (Chang et al., ICCV 2017): label features, the adaptive thresholds, pair selection, the loss.

A network maps each image to k scores; softmax then L2 normalisation gives its *label feature* l_i (unit norm,
non-negative entries), so the cosine similarity of two images is one dot product and the cluster of an image is
argmax l_i: no k-means anywhere. Training is binary classification of pairs: a pair whose similarity is at least
u(lambda) is "same", one below l(lambda) is "different", the rest are left out of the loss. lambda grows every
round, u falls and l rises, so the curriculum starts from the most confident pairs and ends when l >= u, when
every pair is selected.

The reference code computes the selection on the batch with the weights fixed (Keras `predict`, batch-statistics
BatchNorm) and then fits the pairs; `frozen_bn_stats` lets that selection pass run in training mode without
touching the running statistics the feature pass later uses.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# Two-threshold schedules: u(lambda) = upper - upper_rate * lambda, l(lambda) = lower + lower_rate * lambda,
# lambda = round * lambda_step. official_cifar: vector-1127/DAC cifar10_2.py (upper 0.99, lower 0.8, both moved by
# (upper - lower) / epochs / 2 per epoch, so they meet after `epochs` rounds; lambda_step None means that value).
# paper: u = 0.95 - lambda, l = 0.455 + 0.1 lambda, lambda += 1.1 * 0.009 per epoch (the gradient step on u - l
# with eta = 0.009), as in HongtaoYang/DAC-tensorflow's reproduction; l reaches u after 46 rounds. "official" is
# the name official_cifar had before official_mnist existed (configs and checkpoints that say it keep working).
SCHEDULE_PRESETS: dict[str, dict[str, float | None]] = {
    "official_cifar": {"upper": 0.99, "lower": 0.8, "upper_rate": 1.0, "lower_rate": 1.0, "lambda_step": None},
    "paper": {"upper": 0.95, "lower": 0.455, "upper_rate": 1.0, "lower_rate": 0.1, "lambda_step": 1.1 * 0.009},
}
SCHEDULE_PRESETS["official"] = SCHEDULE_PRESETS["official_cifar"]

# The single-threshold schedule of vector-1127/DAC MNIST/mnist.py: a pair is "same" when s > th, "different"
# otherwise (no ignored band), th starts at 0.9 and falls by (0.9 - 0.5) / epochs after every epoch (step None
# means that value), never below the floor.
SINGLE_THRESHOLD_PRESETS: dict[str, dict[str, float | None]] = {
    "official_mnist": {"start": 0.9, "step": None, "floor": 0.5},
}


@dataclass(frozen=True)
class ThresholdSchedule:
    upper: float
    lower: float
    upper_rate: float
    lower_rate: float
    lambda_step: float

    def at(self, round_idx: int) -> tuple[float, float]:
        """(u, l) used while training round `round_idx` (0-based)."""
        lam = round_idx * self.lambda_step
        return self.upper - self.upper_rate * lam, self.lower + self.lower_rate * lam

    def finished(self, round_idx: int) -> bool:
        """True once l >= u: every pair would be selected, the curriculum is over (1e-9: float round-off)."""
        u, l = self.at(round_idx)
        return l >= u - 1e-9


@dataclass(frozen=True)
class SingleThreshold:
    """One threshold th(r) = max(floor, start - step * r): pairs above it are "same", the rest "different", so
    every pair is trained on from the first round. Returned as (th, th) so it selects like the two-threshold
    schedules with an empty band; it never finishes by itself (the run ends at train.epochs)."""

    start: float
    step: float
    floor: float

    def at(self, round_idx: int) -> tuple[float, float]:
        th = max(self.floor, self.start - self.step * round_idx)
        return th, th

    def finished(self, round_idx: int) -> bool:
        return False


def label_features(scores: Tensor) -> Tensor:
    """softmax then L2 normalisation: unit-norm, non-negative rows whose dot products are cosine similarities.
    In float32 whatever the network ran in: the similarities near the thresholds need more than bf16's 3 digits."""
    return F.normalize(torch.softmax(scores.float(), dim=1), dim=1)


def select_pairs(similarity: Tensor, upper: float, lower: float) -> tuple[Tensor, Tensor]:
    """(same, different) boolean masks: s >= u is "same", s < l is "different"; pairs in between are left out."""
    return similarity >= upper, similarity < lower


def pair_loss(similarity: Tensor, same: Tensor, different: Tensor, kind: str = "bce",
              eps: float = 1e-7) -> Tensor:
    """The pairwise objective on a B x B similarity matrix (with gradients) and the selection masks.

    bce: binary cross-entropy over the selected pairs only, normalised by their number (vector-1127/DAC's CIFAR
    script); no pair selected gives a zero loss that still has a graph. mse: the official MNIST variant, the
    squared error between every similarity and its binarised target (1 for "same", else 0), mean over all pairs.
    """
    if kind == "bce":
        s = similarity.clamp(eps, 1.0 - eps)
        terms = -(same * torch.log(s) + different * torch.log1p(-s))
        return terms.sum() / (same | different).sum().clamp_min(1)
    if kind == "mse":
        return (similarity - same.to(similarity.dtype)).pow(2).mean()
    raise ValueError(f"unknown DAC loss {kind!r} (expected 'bce' or 'mse')")


@contextmanager
def frozen_bn_stats(model: nn.Module):
    """BatchNorm layers normalise with the batch's statistics but leave their running averages untouched
    (momentum 0), for a selection pass in training mode that must not count as a second update."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, m.num_batches_tracked.clone() if m.num_batches_tracked is not None else None)
             for m in bns]
    for m in bns:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, tracked) in zip(bns, saved):
            m.momentum = momentum
            if tracked is not None:
                m.num_batches_tracked.copy_(tracked)


# ---- networks -------------------------------------------------------------------------------------------
def _conv_bn_relu(cin: int, cout: int, k: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class _IdentityLinear(nn.Linear):
    """Keras' `init='identity'` Dense layer of the reference nets (square, k -> k)."""

    def __init__(self, k: int):
        super().__init__(k, k)
        with torch.no_grad():
            self.weight.copy_(torch.eye(k))
            self.bias.zero_()


def dac_convnet(in_channels: int, k: int, *, variant: str, bn_eps: float = 1e-5,
                bn_affine: bool = True) -> nn.Sequential:
    """The reference all-convolutional nets (valid 3x3 convs, BatchNorm, He init), ending in k scores.

    mnist (MNIST/mnist.py): 3 x conv-64, pool, BN, 3 x conv-128, pool, BN, conv1x1-k, BN-ReLU, avg-pool, BN,
    then two identity-initialised k x k dense layers each with BN and ReLU. cifar (CIFAR10/cifar10_2.py): the
    same trunk without the BN after the pools, and no ReLU after the last dense layer. The reference pools the
    last map with a fixed window (2 on 28 px, 3 on 32 px); an adaptive average pool gives the same 1 x 1 there
    and also takes other sizes >= 22 px. `bn_affine=False` keeps every BatchNorm's scale and shift at 1 and 0
    (still in the state dict, so checkpoints of either kind load alike).
    """
    if variant not in ("mnist", "cifar"):
        raise ValueError(f"unknown DAC net variant {variant!r}")
    mnist = variant == "mnist"
    layers: list[nn.Module] = [*_conv_bn_relu(in_channels, 64, 3), *_conv_bn_relu(64, 64, 3),
                               *_conv_bn_relu(64, 64, 3), nn.MaxPool2d(2)]
    if mnist:
        layers.append(nn.BatchNorm2d(64))
    layers += [*_conv_bn_relu(64, 128, 3), *_conv_bn_relu(128, 128, 3), *_conv_bn_relu(128, 128, 3),
               nn.MaxPool2d(2)]
    if mnist:
        layers.append(nn.BatchNorm2d(128))
    layers += [*_conv_bn_relu(128, k, 1), nn.AdaptiveAvgPool2d(1)]
    if mnist:
        layers.append(nn.BatchNorm2d(k))
    layers += [nn.Flatten(), _IdentityLinear(k), nn.BatchNorm1d(k), nn.ReLU(inplace=True),
               _IdentityLinear(k), nn.BatchNorm1d(k)]
    if mnist:
        layers.append(nn.ReLU(inplace=True))
    net = nn.Sequential(*layers)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eps = bn_eps
            if not bn_affine:
                m.weight.requires_grad_(False)
                m.bias.requires_grad_(False)
    return net


DAC_NET_MIN_SIZE = 22  # the reference nets' valid convolutions and pools need at least this many pixels


class LabelFeatureNet(nn.Module):
    """Any network giving k scores, followed by `label_features`: `forward` is the one entry DDP sees.

    `batch_readout` is the reference code's inference (Keras BatchNorm mode 2: batch statistics at inference
    too): consecutive groups of `readout_batch` rows are normalised with their own statistics. The running
    averages are what `forward` in eval mode uses; they are accumulated over augmented training batches while
    the weights move, so they lag the network the readout is about."""

    def __init__(self, scores: nn.Module, readout_batch: int = 128):
        super().__init__()
        self.scores = scores
        self.readout_batch = readout_batch

    def forward(self, x: Tensor) -> Tensor:
        return label_features(self.scores(x))

    def batch_readout(self, x: Tensor, group: int | None = None) -> Tensor:
        """Label features with batch-statistics BatchNorm over fixed groups of `group` (default
        `readout_batch`) consecutive rows; a last group smaller than half a group joins the one before it (a
        handful of images has no statistics worth the name). The running averages are left untouched and the
        module's mode is restored."""
        was_training = self.training
        self.train()
        try:
            with frozen_bn_stats(self):
                return torch.cat([self(x[a:b]) for a, b in readout_groups(len(x), group or self.readout_batch)])
        finally:
            self.train(was_training)


def readout_groups(n: int, size: int) -> list[tuple[int, int]]:
    """[start, stop) of each readout group over n rows: `size` rows each, a tail under size / 2 merged back."""
    if n == 0:
        return []
    edges = list(range(0, n, size)) + [n]
    if len(edges) > 2 and edges[-1] - edges[-2] < size / 2:
        del edges[-2]
    return list(zip(edges[:-1], edges[1:]))


def chunk_targets(features: Tensor, upper: float, lower: float) -> tuple[Tensor, Tensor]:
    """(same, different) masks over a chunk's pairs from its label features, computed once and reused for
    every local epoch over the chunk (the MNIST script's selection: one `predict` per 1,000 images)."""
    return select_pairs(similarity_matrix(features.float()), upper, lower)


def similarity_matrix(features: Tensor) -> Tensor:
    """B x B cosine similarities of unit-norm label features."""
    return features @ features.t()


def pair_matrix_bytes(batch: int) -> int:
    """Memory one B x B float32 similarity matrix takes; training holds a few of them (the selection, the
    similarity with its graph, the loss terms), so the cap on B is set from this."""
    return 4 * batch * batch


def max_batch_for(bytes_budget: int, copies: int = 4) -> int:
    return int(math.isqrt(max(0, bytes_budget // (4 * copies))))
