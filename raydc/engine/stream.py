"""Training batches from a streamed shard: decode, resample by pseudo-label, shuffle, augment.

Everything random here is a function of (seed, epoch, image id), never of which worker happens to stream a
row or in what order: `get_dataset_shard` is a streaming split that moves rows between workers from one pass
to the next, and a resumed run must replay the same epoch. The shuffle is a bounded buffer (memory stays
O(buffer), whatever the dataset size) permuted by a generator seeded from (seed, epoch, chunk index).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np
import torch

from raydc.core.augment import random_affine, random_resized_crop, resize_center, to_float
from raydc.core.sampler import hash_uniforms

# Streams of uniforms drawn per (seed, epoch, id); distinct streams keep the draws independent.
STREAM_REPEAT, STREAM_AUGMENT = 1, 2

RepeatFn = Callable[[np.ndarray, np.ndarray], np.ndarray]  # (ids, uniforms) -> repeat count per row


@dataclass
class Augment:
    size: int
    crop: bool = True
    flip: bool = True
    scale_min: float = 0.08
    kind: str = "crop"   # "affine": rotation +-10 deg, shifts of 10 %, zoom 0.9-1.1 (DAC's digit settings)


def decoded_rows(iterator, manifest, *, read_batch_size: int, size: int | None, channels: int | None
                 ) -> Iterator[dict[str, np.ndarray]]:
    from raydc.data.decode import decode_batch

    for batch in iterator.iter_batches(batch_size=read_batch_size, batch_format="numpy"):
        yield decode_batch(batch, manifest, size=size, channels=channels)


def shuffled_batches(rows: Iterator[dict[str, np.ndarray]], *, batch_size: int, seed: int, epoch: int,
                     repeats: RepeatFn | None = None, buffer_batches: int = 16,
                     shuffle: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Yields (ids, repeat_index, uint8 images) batches of exactly `batch_size` (the remainder is dropped:
    BatchNorm on a tiny last batch is noise)."""
    cap = batch_size * buffer_batches
    buf_ids: list[np.ndarray] = []
    buf_rep: list[np.ndarray] = []
    buf_img: list[np.ndarray] = []
    held = 0
    chunk = 0

    def flush(final: bool):
        nonlocal held, chunk, buf_ids, buf_rep, buf_img
        ids = np.concatenate(buf_ids)
        rep = np.concatenate(buf_rep)
        img = np.concatenate(buf_img)
        order = (np.random.default_rng([seed, epoch, chunk, 7]).permutation(len(ids)) if shuffle
                 else np.arange(len(ids)))
        chunk += 1
        n_full = len(ids) // batch_size
        keep = n_full * batch_size if final else min(n_full * batch_size, cap)
        for b in range(0, keep, batch_size):
            sel = order[b:b + batch_size]
            yield ids[sel], rep[sel], img[sel]
        rest = order[keep:]
        buf_ids, buf_rep, buf_img = [ids[rest]], [rep[rest]], [img[rest]]
        held = len(rest)

    for r in rows:
        ids, img = r["id"], r["image"]
        if repeats is not None:
            counts = repeats(ids, hash_uniforms(ids, seed, epoch, STREAM_REPEAT))
            idx = np.repeat(np.arange(len(ids)), counts)
            rep = _repeat_index(counts)
            ids, img = ids[idx], img[idx]
        else:
            rep = np.zeros(len(ids), np.int64)
        if len(ids) == 0:
            continue
        buf_ids.append(ids)
        buf_rep.append(rep)
        buf_img.append(img)
        held += len(ids)
        if held >= 2 * cap:
            yield from flush(final=False)
    if held:
        yield from flush(final=True)


def _repeat_index(counts: np.ndarray) -> np.ndarray:
    """For counts [2, 0, 3] -> [0, 1, 0, 1, 2]: which copy of its row each repeated row is."""
    total = int(counts.sum())
    if total == 0:
        return np.zeros(0, np.int64)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    return np.arange(total) - starts


def to_model_input(ids: np.ndarray, rep: np.ndarray, images: np.ndarray, *, seed: int, epoch: int,
                   augment: Augment | None, size: int) -> torch.Tensor:
    x = to_float(images)
    if augment is None:
        return resize_center(x, size)
    # Each copy of a repeated image gets its own crop: mix the copy index into the id.
    keyed = ids.astype(np.int64) * 64 + np.minimum(rep, 63)
    u = np.stack([hash_uniforms(keyed, seed, epoch, STREAM_AUGMENT * 8 + j) for j in range(5)], axis=1)
    if augment.kind == "affine":
        return random_affine(resize_center(x, augment.size), u, rotation_deg=10.0, shift=0.1, zoom=(0.9, 1.1),
                             flip=augment.flip)
    return random_resized_crop(x, u, augment.size, scale_min=augment.scale_min, flip=augment.flip,
                               crop=augment.crop)
