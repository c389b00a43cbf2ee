"""Shard bytes back to arrays: exact for raw, PIL-consistent for encoded, one shape per batch when resized."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from raydc.data.decode import decode_batch, decode_images, to_float_nchw
from raydc.data.manifest import Manifest
from raydc.errors import DataError


def png(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("c", [1, 3])
def test_raw_round_trip_is_exact(c):
    x = np.random.default_rng(0).integers(0, 256, (7, 9, 5, c), dtype=np.uint8)
    mode = "L" if c == 1 else "RGB"
    out = decode_images([a.tobytes() for a in x], "raw", [9, 5, c], mode)
    assert out.dtype == np.uint8 and np.array_equal(out, x)
    assert decode_images([], "raw", [9, 5, c], mode).shape == (0, 9, 5, c)


def test_raw_channel_conversion_matches_pil():
    rgb = np.random.default_rng(1).integers(0, 256, (4, 6, 6, 3), dtype=np.uint8)
    gray = decode_images([a.tobytes() for a in rgb], "raw", [6, 6, 3], "RGB", channels=1)
    expected = np.stack([np.asarray(Image.fromarray(a).convert("L")) for a in rgb])[..., None]
    assert np.array_equal(gray, expected)
    back = decode_images([a.tobytes() for a in gray], "raw", [6, 6, 1], "L", channels=3)
    assert back.shape == (4, 6, 6, 3) and np.array_equal(back[..., 0], back[..., 2])


def test_raw_resize_matches_encoded_path():
    x = np.random.default_rng(2).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    raw = decode_images([a.tobytes() for a in x], "raw", [28, 28, 1], "L", size=32)
    enc = decode_images([png(a) for a in x], "encoded", None, "L", size=32)
    assert raw.shape == (3, 32, 32, 1) and np.array_equal(raw, enc)
    rgb = decode_images([a.tobytes() for a in x], "raw", [28, 28, 1], "L", size=16, channels=3)
    assert rgb.shape == (3, 16, 16, 3)


def test_encoded_png_is_lossless_and_resizes_mixed_sizes():
    rng = np.random.default_rng(3)
    same = [rng.integers(0, 256, (10, 12, 3), dtype=np.uint8) for _ in range(4)]
    out = decode_images([png(a) for a in same], "encoded", [10, 12, 3], "RGB")
    assert np.array_equal(out, np.stack(same))
    mixed = [png(rng.integers(0, 256, s, dtype=np.uint8)) for s in [(10, 12, 3), (30, 20, 1), (7, 40, 3)]]
    for channels, c in ((None, 3), (1, 1), (3, 3)):
        assert decode_images(mixed, "encoded", None, "RGB", size=16, channels=channels).shape == (3, 16, 16, c)
    with pytest.raises(DataError, match="size"):
        decode_images(mixed, "encoded", None, "RGB")


def test_resize_is_shorter_side_then_center_crop():
    # A 20-high, 40-wide image: left half black, right half white. Shorter side 20 -> 10 gives 10 x 20,
    # and the centre crop keeps columns 5..14, so the crop is half black, half white.
    a = np.zeros((20, 40, 1), np.uint8)
    a[:, 20:] = 255
    out = decode_images([png(a)], "encoded", None, "L", size=10)[0, :, :, 0]
    assert out.shape == (10, 10)
    assert out[:, :4].max() == 0 and out[:, 6:].min() == 255


def test_decode_batch_and_float_layout():
    x = np.random.default_rng(4).integers(0, 256, (5, 4, 4, 1), dtype=np.uint8)
    m = Manifest(name="t", source="mem", count=5, encoding="raw", image_shape=[4, 4, 1], mode="L", has_labels=True)
    batch = {"id": np.arange(10, 15), "image": np.array([a.tobytes() for a in x], dtype=object),
             "label": np.array([1, 0, 1, 0, 1])}
    d = decode_batch(batch, m)
    assert d["id"].dtype == np.int64 and d["label"].dtype == np.int64 and np.array_equal(d["image"], x)
    assert "label" not in decode_batch({"id": batch["id"], "image": batch["image"]}, m)
    f = to_float_nchw(d["image"])
    assert f.shape == (5, 1, 4, 4) and f.dtype == np.float32 and f.flags.c_contiguous
    assert np.allclose(f[:, 0], x[..., 0] / 255.0) and 0.0 <= f.min() and f.max() <= 1.0


def test_wrong_raw_length_and_encoding_are_data_errors():
    with pytest.raises(DataError, match="shape"):
        decode_images([b"\x00" * 15], "raw", [4, 4, 1], "L")
    with pytest.raises(DataError, match="encoding"):
        decode_images([b""], "jpeg2000", None, "L")
