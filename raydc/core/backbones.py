"""Published classification networks as clustering trunks: `model.arch: torchvision:<name>` or `timm:<name>`.

A backbone is the published network with its classification layer removed (its pooled penultimate features
are what is clustered) inside raydc's `ClusterNet` contract (`embed`, `forward`, `reset_head`), so DeepCluster
trains or freezes it like its own convnets. Its input is what it was published for: the images in [0, 1] are
normalised with its mean and std inside the network (grey images are repeated to 3 channels), and the side
defaults to its own resolution (raydc.methods.base.resolve_input_size). Sobel is never put in front of it:
a pretrained trunk expects colour.

Weights come only from files (`model.weights`): nothing is downloaded, and a file is read with
torch.load(weights_only=True), so a pickled file that would run code is refused, never executed. The file is
the network's own state dict as torchvision or timm publish it (a `{"state_dict": ...}` or `{"model": ...}`
wrapper is unwrapped); it is loaded into the full network, head included, before the head comes off, so a
file of another network fails loudly instead of loading half.
"""
from __future__ import annotations

import io
import pickle
from dataclasses import dataclass

import torch
import torch.nn as nn

from raydc.core.models import ClusterNet

FAMILIES = ("torchvision", "timm")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class WeightsError(ValueError):
    """A weights file that cannot be used (pickled code, not a state dict, another network's keys)."""


def parse_arch(arch: str) -> tuple[str, str] | None:
    """('torchvision', 'resnet18') for 'torchvision:resnet18'; None for raydc's own networks."""
    family, sep, name = arch.partition(":")
    return (family, name) if sep and family in FAMILIES else None


def is_backbone(arch: str) -> bool:
    return parse_arch(arch) is not None


@dataclass(frozen=True)
class BackboneInfo:
    family: str
    name: str
    feature_dim: int
    input_size: int          # the side it was published for (torchvision: its eval crop)
    mean: tuple[float, ...]
    std: tuple[float, ...]
    fixed_size: bool = False  # takes no other side (torchvision's ViTs check it)

    def describe(self) -> str:
        return (f"{self.family}:{self.name}: {self.feature_dim}-d features, published for {self.input_size} px, "
                f"normalised with mean {tuple(round(m, 3) for m in self.mean)} std "
                f"{tuple(round(s, 3) for s in self.std)}")


def _timm():
    try:
        import timm
    except ImportError:
        raise ImportError("timm backbones need the timm package: pip install 'raydc[timm]'") from None
    return timm


def _raw(family: str, name: str) -> nn.Module:
    """The published network with random weights (weights=None: never a download)."""
    if family == "torchvision":
        import torchvision.models as tvm

        if name not in tvm.list_models(module=tvm):
            raise KeyError(f"torchvision has no classification model {name!r} (torchvision.models.list_models)")
        return tvm.get_model(name, weights=None)
    timm = _timm()
    if not timm.is_model(name):
        raise KeyError(f"timm has no model {name!r} (timm.list_models)")
    return timm.create_model(name, pretrained=False)


def _normalisation(family: str, name: str, raw: nn.Module) -> tuple[int, tuple, tuple]:
    if family == "torchvision":
        import torchvision.models as tvm

        try:
            t = tvm.get_model_weights(name).DEFAULT.transforms()  # metadata only: nothing is fetched
            return int(t.crop_size[0]), tuple(t.mean), tuple(t.std)
        except (ValueError, AttributeError, KeyError):
            return 224, IMAGENET_MEAN, IMAGENET_STD
    cfg = getattr(raw, "pretrained_cfg", None) or {}
    size = cfg.get("input_size", (3, 224, 224))
    return int(size[-1]), tuple(cfg.get("mean", IMAGENET_MEAN)), tuple(cfg.get("std", IMAGENET_STD))


def _strip_head(family: str, raw: nn.Module) -> tuple[nn.Module, int]:
    """(the network without its classification layer, the width of what it now returns)."""
    if family == "timm":
        raw.reset_classifier(0)
        return raw, int(raw.num_features)
    # torchvision's classification nets end in one Linear (resnet.fc, vit.heads.head, convnext/efficientnet/
    # mobilenet/vgg .classifier[-1], swin.head): the last Linear registered is that layer.
    last = None
    for path, m in raw.named_modules():
        if isinstance(m, nn.Linear):
            last = (path, m)
    if last is None:
        raise KeyError("this torchvision model has no final Linear layer to take off")
    path, layer = last
    parent = raw.get_submodule(path.rpartition(".")[0]) if "." in path else raw
    setattr(parent, path.rpartition(".")[2], nn.Identity())
    return raw, int(layer.in_features)


def backbone_info(arch: str) -> BackboneInfo:
    """What a backbone takes and gives, built on the meta device (no memory, no weights initialised)."""
    family, name = parse_arch(arch)
    with torch.device("meta"):
        raw = _raw(family, name)
        size, mean, std = _normalisation(family, name, raw)
        fixed = family == "torchvision" and isinstance(getattr(raw, "image_size", None), int)
        _, dim = _strip_head(family, raw)
    return BackboneInfo(family, name, dim, size, mean, std, fixed)


class InputAdapter(nn.Module):
    """[0, 1] images -> the backbone's input: grey repeated to 3 channels, then (x - mean) / std. Buffers, so
    the statistics travel with the state dict and never reach an optimizer."""

    def __init__(self, in_channels: int, mean, std):
        super().__init__()
        self.in_channels = in_channels
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1 and self.mean.shape[1] == 3:
            x = x.expand(-1, 3, -1, -1)
        return (x - self.mean) / self.std


class BackboneNet(ClusterNet):
    """A published network as a ClusterNet: `features` is the whole network without its head, `classifier`
    the identity (the pooled features are the clustered layer), the top layer as for raydc's own nets."""

    def __init__(self, info: BackboneInfo, trunk: nn.Module, in_channels: int):
        nn.Module.__init__(self)  # not ClusterNet.__init__: its init would overwrite the network's own
        self.info = info
        self.sobel = None
        self.adapter = InputAdapter(in_channels, info.mean, info.std)
        self.features = trunk
        self.classifier = nn.Identity()
        self.feature_dim = info.feature_dim
        self.top_layer = None
        self.cosine_head = False
        self.frozen_parts: tuple[str, ...] = ()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.adapter(x))


def build_backbone(arch: str, in_channels: int, weights: dict | None = None) -> BackboneNet:
    """The backbone for `arch`, with `weights` (the published network's state dict) loaded before its head
    comes off. Untrained (the network's own init) when `weights` is None."""
    family, name = parse_arch(arch)
    raw = _raw(family, name)
    info = backbone_info(arch)
    if weights is not None:
        try:
            raw.load_state_dict(weights, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise WeightsError(f"the weights do not fit {arch}: {' '.join(first[:3])[:400]}") from None
    trunk, _ = _strip_head(family, raw)
    return BackboneNet(info, trunk, in_channels)


def safe_load(data: bytes, where: str):
    """A torch file's contents, read with weights_only=True: a file that holds pickled objects (which could
    run code when loaded) is refused, never executed."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{where} holds pickled Python objects, which raydc does not load because "
                           f"unpickling can run code; save the network's state_dict() instead ({first})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise WeightsError(f"{where} is not a readable torch weights file ({type(e).__name__}: {e})") from None


def as_state_dict(obj, where: str) -> dict:
    """The state dict in a loaded weights file (a `{"state_dict": ...}` or `{"model": ...}` wrapper, as
    training checkpoints and raydc's clustering.pt have, is unwrapped)."""
    for key in ("state_dict", "model"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{where} is not a state dict (a mapping of parameter names to tensors)")
    return obj
