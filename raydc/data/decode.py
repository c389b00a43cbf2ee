"""Shard bytes back to uint8 NHWC arrays, on the hot path of every feature pass and training step.

"raw" shards decode with one `np.frombuffer` over the joined bytes of a batch: no per-image Python work beyond
the join. "encoded" shards go through PIL per image, converting to the wanted mode and resizing (shorter side
to `size`, then a centre crop, as torchvision's Resize + CenterCrop) so that mixed-size folders batch.
Resizing raw data uses the same PIL path, so raw and encoded copies of one image decode alike.
"""
from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from raydc.errors import DataError


def decode_images(images: Sequence[bytes], encoding: str, shape: Sequence[int] | None, mode: str,
                  size: int | None = None, channels: int | None = None) -> np.ndarray:
    """Decode a batch to uint8 (N, H, W, C). `channels` (1 or 3) overrides the stored mode; `size` gives
    size x size outputs. `shape` is the stored [H, W, C] (required for "raw")."""
    if channels is not None and channels not in (1, 3):
        raise DataError(f"channels must be 1 or 3, got {channels}")
    want_mode = mode if channels is None else ("L" if channels == 1 else "RGB")
    if encoding == "raw":
        if shape is None:
            raise DataError("raw shards need an image shape; the manifest or shard metadata has none")
        return _decode_raw(images, tuple(int(s) for s in shape), want_mode, size)
    if encoding == "encoded":
        return _decode_encoded(images, want_mode, size)
    raise DataError(f"unknown image encoding {encoding!r}; expected 'raw' or 'encoded'")


def _decode_raw(images: Sequence[bytes], shape: tuple[int, ...], mode: str, size: int | None) -> np.ndarray:
    h, w, c = shape
    n = len(images)
    buf = b"".join(images)
    if len(buf) != n * h * w * c:
        raise DataError(f"raw image bytes do not match the shape {list(shape)}: {len(buf)} bytes for {n} images")
    out = np.frombuffer(buf, dtype=np.uint8).reshape(n, h, w, c)
    want_c = 1 if mode == "L" else 3
    if size is not None and (h, w) != (size, size):
        return np.stack([_pil_to_array(_fit(_pil_from_array(a), size), mode) for a in out]) if n else \
            np.zeros((0, size, size, want_c), np.uint8)
    if want_c != c:
        out = _convert_channels(out, want_c)
    return out


def _decode_encoded(images: Sequence[bytes], mode: str, size: int | None) -> np.ndarray:
    from PIL import Image

    arrays = []
    for data in images:
        with Image.open(io.BytesIO(data)) as img:
            img = img.convert(mode)
            if size is not None:
                img = _fit(img, size)
            arrays.append(_pil_to_array(img, mode))
    if not arrays:
        c = 1 if mode == "L" else 3
        return np.zeros((0, size or 0, size or 0, c), np.uint8)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        raise DataError(f"images in this batch have different sizes {sorted(shapes)[:3]}...; "
                        f"pass a size (model.input_size) so they are resized to one shape")
    return np.stack(arrays)


def _fit(img: Any, size: int) -> Any:
    """Shorter side to `size`, then centre crop to size x size (torchvision's Resize(size) + CenterCrop(size))."""
    from PIL import Image

    w, h = img.size
    if (w, h) == (size, size):
        return img
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BILINEAR)
    left, top = (nw - size) // 2, (nh - size) // 2
    return img.crop((left, top, left + size, top + size))


def _pil_from_array(a: np.ndarray) -> Any:
    from PIL import Image

    return Image.fromarray(np.ascontiguousarray(a[..., 0] if a.shape[-1] == 1 else a))


def _pil_to_array(img: Any, mode: str) -> np.ndarray:
    if img.mode != mode:
        img = img.convert(mode)
    a = np.asarray(img, dtype=np.uint8)
    return a[..., None] if a.ndim == 2 else a


def _convert_channels(x: np.ndarray, want_c: int) -> np.ndarray:
    """Gray to RGB by repetition; RGB to gray with PIL's fixed-point ITU-R 601-2 luma, so it equals convert('L')."""
    if want_c == 3:
        return np.repeat(x, 3, axis=-1)
    weights = np.array([19595, 38470, 7471], dtype=np.uint32)
    luma = (x.astype(np.uint32) @ weights + 0x8000) >> 16
    return luma.astype(np.uint8)[..., None]


def decode_batch(batch: Mapping[str, Any], manifest: Any, size: int | None = None,
                 channels: int | None = None) -> dict[str, np.ndarray]:
    """A batch from `iter_batches(batch_format="numpy")` as {"row"?, "id", "image" (uint8 NHWC), "label"?}."""
    images = batch["image"]
    out = {"id": np.asarray(batch["id"], dtype=np.int64),
           "image": decode_images(images, manifest.encoding, manifest.image_shape, manifest.mode, size, channels)}
    if "row" in batch:
        out["row"] = np.asarray(batch["row"], dtype=np.int64)
    if "label" in batch:
        out["label"] = np.asarray(batch["label"], dtype=np.int64)
    return out


def to_float_nchw(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC to float32 NCHW in [0, 1]: the layout and range PyTorch models take."""
    out = np.ascontiguousarray(images.transpose(0, 3, 1, 2), dtype=np.float32)
    out *= np.float32(1 / 255)
    return out
