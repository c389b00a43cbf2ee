"""Inference copies of a network with its BatchNorm layers folded into the convolution or linear layer before them.

A feature pass runs the network in eval mode, where a BatchNorm is a fixed per-channel scale and shift: folded into
the preceding layer's weights and bias it costs nothing, where as its own layer it is a full pass over the
activations (benchmarks/RESULTS.md, "What a step costs": the `folded` column). The fold
changes the arithmetic by rounding only; the weights the run trains and checkpoints are never touched: the fold
works on a copy.

Only a BatchNorm that directly follows a Conv2d or Linear inside an `nn.Sequential` is folded (the trunks of
raydc's convnets, AlexNet-BN and VGG-BN); any other BatchNorm stays as it is, so the copy always computes what
the original computes in eval mode. A network that reads out with batch statistics (DAC's `batch_readout`) must
not be folded: its extractor does not ask for it.
"""
from __future__ import annotations

import copy

import torch.nn as nn
from torch.nn.utils.fusion import fuse_conv_bn_eval, fuse_linear_bn_eval


def _foldable(layer: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(bn, (nn.BatchNorm1d, nn.BatchNorm2d)) or bn.running_mean is None:
        return False  # no running statistics (track_running_stats=False): it normalises by the batch
    if isinstance(layer, nn.Conv2d):
        return isinstance(bn, nn.BatchNorm2d) and not layer.transposed and layer.out_channels == bn.num_features
    return isinstance(layer, nn.Linear) and isinstance(bn, nn.BatchNorm1d) and layer.out_features == bn.num_features


def fold_batchnorm(model: nn.Module) -> tuple[nn.Module, int]:
    """An eval-mode copy of `model` with every (Conv2d | Linear, BatchNorm) pair of adjacent Sequential entries
    fused into one layer, the BatchNorm replaced by an Identity. Returns (the copy, the number of folds)."""
    folded = copy.deepcopy(model).eval()
    n = 0
    for seq in [m for m in folded.modules() if isinstance(m, nn.Sequential)]:
        names = list(seq._modules)
        for a, b in zip(names[:-1], names[1:]):
            layer, bn = seq._modules[a], seq._modules[b]
            if layer is None or bn is None or not _foldable(layer, bn):
                continue
            assert isinstance(bn, nn.modules.batchnorm._BatchNorm)
            if isinstance(layer, nn.Conv2d):
                fused: nn.Module = fuse_conv_bn_eval(layer, bn)
            else:
                assert isinstance(layer, nn.Linear)
                fused = fuse_linear_bn_eval(layer, bn)
            seq._modules[a] = fused
            seq._modules[b] = nn.Identity()
            n += 1
    return folded, n
