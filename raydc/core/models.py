"""Convnets for DeepCluster: Sobel front end, trunk, classifier, and a top layer rebuilt every epoch.

Every network here exposes the same three parts so the engine never needs to know which one it trains:
`embed(x)` returns the penultimate layer *before its last ReLU* (the features DeepCluster clusters, as the
reference code does by stripping that ReLU), `forward(x)` applies the ReLU and the top layer, and
`reset_head(k)` puts a fresh N(0, 0.01) top layer on for this epoch's k clusters (cluster ids are permuted
arbitrarily between k-means runs, so the old head means nothing).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class Sobel(nn.Module):
    """Fixed grayscale + Sobel filters (2 output channels): removes colour, the cue that DeepCluster would
    otherwise latch onto as a trivial solution. Non-trainable, stored as buffers so it checkpoints with the
    model but never appears among the parameters an optimizer sees."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        gray = torch.full((1, in_channels, 1, 1), 1.0 / in_channels)
        gx = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]])
        gy = torch.tensor([[1.0, 2.0, 1.0], [0.0, 0.0, 0.0], [-1.0, -2.0, -1.0]])
        self.register_buffer("gray", gray)
        self.register_buffer("filters", torch.stack([gx, gy]).unsqueeze(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_channels > 1:
            x = F.conv2d(x, self.gray)
        return F.conv2d(x, self.filters, padding=1)


class ClusterNet(nn.Module):
    """Sobel (optional) -> `features` (conv trunk) -> `classifier` (FC layers, last ReLU applied in forward)
    -> `top_layer` (k logits)."""

    def __init__(self, features: nn.Module, classifier: nn.Sequential, feature_dim: int,
                 in_channels: int, sobel: bool):
        super().__init__()
        self.sobel = Sobel(in_channels) if sobel else None
        self.features = features
        self.classifier = classifier
        self.feature_dim = feature_dim
        self.top_layer: nn.Linear | None = None
        self.cosine_head = False  # DeepCluster-v2: logits are the L2-normalised embedding against prototypes
        self.frozen_parts: tuple[str, ...] = ()
        _init_weights(self)

    def freeze(self, what: str) -> None:
        """`model.freeze`: "trunk" fixes `features` (a backbone: the whole published network), "all" also the
        classifier; only the top layer is left to learn. A frozen part also stays in eval mode when the
        network trains, so its batch-norm statistics stay those it was given."""
        parts = {"none": (), "trunk": ("features",), "all": ("features", "classifier")}[what]
        for name in parts:
            getattr(self, name).requires_grad_(False)
        self.frozen_parts = parts
        self.train(self.training)

    def train(self, mode: bool = True) -> "ClusterNet":
        super().train(mode)
        for name in getattr(self, "frozen_parts", ()):
            getattr(self, name).eval()
        return self

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        if self.sobel is not None:
            x = self.sobel(x)
        x = self.features(x)
        return self.classifier(torch.flatten(x, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.cosine_head:
            return self.top_layer(F.normalize(self.embed(x), dim=1))
        h = F.relu(self.embed(x))
        if self.top_layer is None:
            return h
        return self.top_layer(h)

    def reset_head(self, k: int, generator: torch.Generator | None = None) -> nn.Linear:
        head = nn.Linear(self.feature_dim, k)
        with torch.no_grad():
            head.weight.normal_(0.0, 0.01, generator=generator)
            head.bias.zero_()
        device = next(self.features.parameters()).device
        self.top_layer = head.to(device)
        return self.top_layer

    def body_parameters(self) -> list[nn.Parameter]:
        return [p for n, p in self.named_parameters() if not n.startswith("top_layer.") and p.requires_grad]


def _init_weights(model: nn.Module) -> None:
    """The reference init: conv N(0, sqrt(2/(k*k*out))), BN (1, 0), linear N(0, 0.01) with zero bias."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
            nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, 0.01)
            nn.init.zeros_(m.bias)


def _conv_bn_relu(cin: int, cout: int, k: int = 3, stride: int = 1, pad: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, k, stride, pad, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


def small_convnet(in_channels: int, sobel: bool = True, width: int = 1, feature_dim: int = 256) -> ClusterNet:
    """A BN convnet for 28-32 px images that trains at a useful speed on a CPU: three conv stages
    (32, 64, 128 channels x width, each 2x2-pooled), then FC 1152->512->feature_dim."""
    c1, c2, c3 = 32 * width, 64 * width, 128 * width
    trunk_in = 2 if sobel else in_channels
    features = nn.Sequential(
        *_conv_bn_relu(trunk_in, c1), nn.MaxPool2d(2),
        *_conv_bn_relu(c1, c2), nn.MaxPool2d(2),
        *_conv_bn_relu(c2, c3), nn.AdaptiveMaxPool2d(3),
    )
    hidden = 512
    classifier = nn.Sequential(
        nn.Linear(c3 * 9, hidden), nn.BatchNorm1d(hidden), nn.ReLU(inplace=True),
        nn.Linear(hidden, feature_dim),
    )
    return ClusterNet(features, classifier, feature_dim, in_channels, sobel)


def alexnet_bn(in_channels: int = 3, sobel: bool = True) -> ClusterNet:
    """DeepCluster's AlexNet (conv 96-256-384-384-256 with BN), fc 9216->4096->4096; 224 px inputs.
    torchvision's AlexNet has other widths and no BN, so the trunk is spelled out; an adaptive 6x6 pool
    (as torchvision has) lets other input sizes through."""
    trunk_in = 2 if sobel else in_channels
    features = nn.Sequential(
        *_conv_bn_relu(trunk_in, 96, 11, 4, 2), nn.MaxPool2d(3, 2),
        *_conv_bn_relu(96, 256, 5, 1, 2), nn.MaxPool2d(3, 2),
        *_conv_bn_relu(256, 384), *_conv_bn_relu(384, 384), *_conv_bn_relu(384, 256), nn.MaxPool2d(3, 2),
        nn.AdaptiveAvgPool2d(6),
    )
    classifier = nn.Sequential(
        nn.Dropout(0.5), nn.Linear(256 * 6 * 6, 4096), nn.ReLU(inplace=True),
        nn.Dropout(0.5), nn.Linear(4096, 4096),
    )
    return ClusterNet(features, classifier, 4096, in_channels, sobel)


def vgg16_bn(in_channels: int = 3, sobel: bool = True) -> ClusterNet:
    """torchvision's VGG16-BN trunk with its first conv taking Sobel's 2 channels; fc 25088->4096->4096
    (no dropout before the first FC, as in the reference)."""
    from torchvision.models import vgg16_bn as tv_vgg16_bn

    trunk = tv_vgg16_bn(weights=None).features
    trunk_in = 2 if sobel else in_channels
    first = trunk[0]
    trunk[0] = nn.Conv2d(trunk_in, first.out_channels, first.kernel_size, first.stride, first.padding)
    features = nn.Sequential(*trunk, nn.AdaptiveAvgPool2d(7))
    classifier = nn.Sequential(
        nn.Linear(512 * 7 * 7, 4096), nn.ReLU(inplace=True), nn.Dropout(0.5), nn.Linear(4096, 4096),
    )
    return ClusterNet(features, classifier, 4096, in_channels, sobel)


def build_convnet(arch: str, in_channels: int, sobel: bool, width: int = 1, feature_dim: int = 256) -> ClusterNet:
    """raydc's convnets by name, or a published network (`torchvision:<name>`, `timm:<name>`: raydc.core.backbones,
    untrained here; `sobel`, `width` and `feature_dim` do not apply to it)."""
    from raydc.core.backbones import build_backbone, is_backbone

    if is_backbone(arch):
        return build_backbone(arch, in_channels)
    if arch == "smallconvnet":
        return small_convnet(in_channels, sobel, width, feature_dim)
    if arch == "alexnet":
        return alexnet_bn(in_channels, sobel)
    if arch == "vgg16":
        return vgg16_bn(in_channels, sobel)
    raise ValueError(f"unknown convnet architecture {arch!r}")
