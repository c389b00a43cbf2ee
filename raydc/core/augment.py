"""Batched image transforms whose randomness comes from per-image uniforms, not from a global RNG.

Why: rows reach training workers through a streaming split whose row-to-worker mapping changes between
passes. If augmentation drew from a worker's RNG, a resumed run (or another worker count) would see other
crops. Here the caller hashes (seed, epoch, image id) into uniforms, so each image gets the same crop
wherever and whenever it is streamed, and a resumed run reproduces an uninterrupted one. Doing the crop as
one `affine_grid`/`grid_sample` over the batch also avoids a Python loop per image.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

MEAN, STD = 0.5, 0.25  # after scaling to [0, 1]; BN right after the first conv makes the exact values moot


def to_float(images_u8: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 NHWC -> float32 NCHW, normalised."""
    if isinstance(images_u8, np.ndarray) and not images_u8.flags.writeable:
        images_u8 = images_u8.copy()  # Arrow-backed batches are read-only; torch wants to own writable memory
    t = torch.as_tensor(images_u8)
    t = t.permute(0, 3, 1, 2).float().div_(255.0)
    return t.sub_(MEAN).div_(STD)


def resize_center(x: torch.Tensor, size: int) -> torch.Tensor:
    """The deterministic eval transform: resize the shorter side to `size`, centre-crop size x size."""
    h, w = x.shape[-2:]
    if h == size and w == size:
        return x
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    x = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False, antialias=scale < 1)
    top, left = (nh - size) // 2, (nw - size) // 2
    return x[..., top:top + size, left:left + size]


def random_resized_crop(x: torch.Tensor, uniforms: np.ndarray, size: int, scale_min: float = 0.08,
                        ratio: tuple[float, float] = (3 / 4, 4 / 3), flip: bool = True,
                        crop: bool = True) -> torch.Tensor:
    """RandomResizedCrop + horizontal flip, one affine resampling per batch.

    `uniforms` is (N, 5) in [0, 1): area scale, log aspect ratio, x offset, y offset, flip. A crop of area
    fraction s and aspect r covers w = sqrt(s r), h = sqrt(s / r) of the image (clamped to 1, as
    torchvision falls back to a smaller crop when the box does not fit)."""
    n = x.shape[0]
    u = torch.as_tensor(np.asarray(uniforms, dtype=np.float64)[:, :5], dtype=torch.float32)
    if crop:
        s = scale_min + (1.0 - scale_min) * u[:, 0]
        log_r = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 1]
        r = torch.exp(log_r)
        w = torch.sqrt(s * r).clamp(max=1.0)
        h = torch.sqrt(s / r).clamp(max=1.0)
        cx = (2 * u[:, 2] - 1) * (1 - w)   # centre in normalised coords so the box stays inside
        cy = (2 * u[:, 3] - 1) * (1 - h)
    else:
        w = h = torch.ones(n)
        cx = cy = torch.zeros(n)
    sign = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0] = w * sign
    theta[:, 0, 2] = cx
    theta[:, 1, 1] = h
    theta[:, 1, 2] = cy
    grid = F.affine_grid(theta, [n, x.shape[1], size, size], align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode="bilinear", padding_mode="border", align_corners=False)


def random_affine(x: torch.Tensor, uniforms: np.ndarray, *, rotation_deg: float = 10.0, shift: float = 0.1,
                  zoom: tuple[float, float] = (0.95, 1.05), flip: bool = False, mode: str = "bilinear",
                  zoom_per_axis: bool = False) -> torch.Tensor:
    """DAC's augmentation (Keras ImageDataGenerator: rotation, shifts, zoom, optional horizontal flip) as one
    affine resampling per batch, same size out as in.

    `uniforms` is (N, 5) in [0, 1): angle, x shift, y shift, zoom, flip; (N, 6) with `zoom_per_axis`, the sixth
    the y zoom (Keras draws the two axes' zooms apart). Shifts are fractions of the image size (normalised
    coordinates span 2, hence the factor 2); a zoom z > 1 magnifies, i.e. samples a 1/z box. Borders repeat the
    edge pixel, as Keras' default fill mode 'nearest' does; `mode="nearest"` also samples as the reference's
    `ndi.affine_transform(order=0)` does.
    """
    u = torch.as_tensor(np.asarray(uniforms, dtype=np.float64)[:, :6], dtype=torch.float32)
    n = x.shape[0]
    angle = (2 * u[:, 0] - 1) * math.radians(rotation_deg)
    tx = (2 * u[:, 1] - 1) * 2 * shift
    ty = (2 * u[:, 2] - 1) * 2 * shift
    sx = 1.0 / (zoom[0] + (zoom[1] - zoom[0]) * u[:, 3])
    sy = 1.0 / (zoom[0] + (zoom[1] - zoom[0]) * u[:, 5]) if zoom_per_axis else sx
    f = torch.where(u[:, 4] < 0.5, -1.0, 1.0) if flip else torch.ones(n)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.zeros(n, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1], theta[:, 0, 2] = cos * sx * f, -sin * sy, tx
    theta[:, 1, 0], theta[:, 1, 1], theta[:, 1, 2] = sin * sx * f, cos * sy, ty
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid.to(x.dtype), mode=mode, padding_mode="border", align_corners=False)


def random_erase(x: torch.Tensor, uniforms: np.ndarray, p: float, area: tuple[float, float] = (0.02, 0.33),
                 ratio: tuple[float, float] = (0.3, 3.3)) -> torch.Tensor:
    """Random erasing (Zhong et al. 2020; torchvision's RandomErasing ranges): with probability `p`, one rectangle
    of `area` fraction of the image and aspect (h / w) in `ratio` is filled with the image's own minimum, its
    background. `uniforms` is (N, 5) in [0, 1): apply, area, log aspect, top, left.

    Why the background rather than the mean: on digits and clothes the erased part then reads as a missing stroke
    or a missing piece, not as a grey patch the network could learn to look for. The hope was a network that no
    longer takes one stroke (a 7's crossbar) for another digit; on mnist.yaml it kept those 7s together in more
    seeds but lost other groups instead (benchmarks/RESULTS.md), so no shipped config turns it on."""
    n, _, hh, ww = x.shape
    u = torch.as_tensor(np.asarray(uniforms, dtype=np.float64)[:, :5], dtype=torch.float32)
    s = area[0] + (area[1] - area[0]) * u[:, 1]
    r = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u[:, 2])
    eh = torch.sqrt(s * r).clamp(max=1.0) * hh
    ew = torch.sqrt(s / r).clamp(max=1.0) * ww
    top = u[:, 3] * (hh - eh)
    left = u[:, 4] * (ww - ew)
    rows = torch.arange(hh, dtype=torch.float32).view(1, hh, 1) + 0.5
    cols = torch.arange(ww, dtype=torch.float32).view(1, 1, ww) + 0.5
    inside = ((rows >= top.view(n, 1, 1)) & (rows < (top + eh).view(n, 1, 1))
              & (cols >= left.view(n, 1, 1)) & (cols < (left + ew).view(n, 1, 1)) & (u[:, 0] < p).view(n, 1, 1))
    background = x.amin(dim=(1, 2, 3), keepdim=True)
    return torch.where(inside.unsqueeze(1), background, x)


def brightness_shift(x: torch.Tensor, uniforms: np.ndarray, amount: float) -> torch.Tensor:
    """Keras' `channel_shift_range` on grey images: each image plus one draw from [-amount, amount), clipped to
    the image's own range (its min and max before the shift). `uniforms` is (N,) in [0, 1)."""
    u = torch.as_tensor(np.asarray(uniforms, dtype=np.float64), dtype=x.dtype).view(-1, *([1] * (x.dim() - 1)))
    lo = x.amin(dim=tuple(range(1, x.dim())), keepdim=True)
    hi = x.amax(dim=tuple(range(1, x.dim())), keepdim=True)
    return torch.minimum(torch.maximum(x + (2 * u - 1) * amount, lo), hi)
