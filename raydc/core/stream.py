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

from raydc.core.augment import random_affine, random_erase, random_resized_crop, resize_center, to_float
from raydc.core.sampler import hash_uniform_columns, hash_uniforms

# Streams of uniforms drawn per (seed, epoch, id); distinct streams keep the draws independent.
STREAM_REPEAT, STREAM_AUGMENT, STREAM_ERASE = 1, 2, 3

RepeatFn = Callable[[dict, np.ndarray], np.ndarray]  # (row columns, uniforms) -> repeat count per row


@dataclass
class Augment:
    size: int
    crop: bool = True
    flip: bool = True
    scale_min: float = 0.08
    kind: str = "crop"   # "affine": rotation +-10 deg, shifts of 10 %, zoom 0.9-1.1 (DAC's digit settings)
    erase: float = 0.0   # probability of random erasing after the crop or affine (raydc.core.augment.random_erase)


@dataclass
class Batch:
    """One training batch: the images with their ids (the randomness key), rows (the key of per-image
    targets), which copy of a repeated image each one is, and the method's per-row target (or None)."""

    ids: np.ndarray
    rows: np.ndarray
    copy: np.ndarray
    images: np.ndarray
    target: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


def decoded_rows(iterator, manifest, *, read_batch_size: int, size: int | None, channels: int | None,
                 targets: Callable[[np.ndarray], np.ndarray] | None = None) -> Iterator[dict[str, np.ndarray]]:
    """Decoded read batches; `targets(rows)` joins each row's per-image target (a callable of rows, such as
    `raydc.engine.row_lookup.RowLookup`) as it streams."""
    from raydc.data.decode import decode_batch

    for batch in iterator.iter_batches(batch_size=read_batch_size, batch_format="numpy"):
        d = decode_batch(batch, manifest, size=size, channels=channels)
        if targets is not None:
            d["target"] = targets(d["row"])
        yield d


def shuffled_batches(rows: Iterator[dict[str, np.ndarray]], *, batch_size: int, seed: int, epoch: int,
                     repeats: RepeatFn | None = None, buffer_batches: int = 16,
                     shuffle: bool = True) -> Iterator[Batch]:
    """Yields `Batch`es of exactly `batch_size` (the remainder is dropped: BatchNorm on a tiny last batch is
    noise). `repeats(row_dict, uniforms)` gives each row's copy count (resampling)."""
    cap = batch_size * buffer_batches
    buf: list[dict[str, np.ndarray]] = []
    held = 0
    chunk = 0

    def flush(final: bool):
        nonlocal held, chunk, buf
        cols = {c: np.concatenate([b[c] for b in buf]) for c in buf[0]}
        n = len(cols["id"])
        order = np.random.default_rng([seed, epoch, chunk, 7]).permutation(n) if shuffle else np.arange(n)
        chunk += 1
        n_full = n // batch_size
        keep = n_full * batch_size if final else min(n_full * batch_size, cap)
        for b in range(0, keep, batch_size):
            sel = order[b:b + batch_size]
            yield Batch(cols["id"][sel], cols["row"][sel], cols["copy"][sel], cols["image"][sel],
                        cols["target"][sel] if "target" in cols else None)
        rest = order[keep:]
        buf = [{c: v[rest] for c, v in cols.items()}]
        held = len(rest)

    for r in rows:
        r = {c: r[c] for c in ("id", "row", "image", "target") if c in r}
        if "row" not in r:
            r["row"] = r["id"]
        if repeats is not None:
            counts = repeats(r, hash_uniforms(r["id"], seed, epoch, STREAM_REPEAT))
            idx = np.repeat(np.arange(len(r["id"])), counts)
            r = {c: v[idx] for c, v in r.items()}
            r["copy"] = _repeat_index(counts)
        else:
            r["copy"] = np.zeros(len(r["id"]), np.int64)
        if len(r["id"]) == 0:
            continue
        buf.append(r)
        held += len(r["id"])
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
    u = hash_uniform_columns(keyed, seed, epoch, STREAM_AUGMENT * 8, 5)
    if augment.kind == "affine":
        x = random_affine(resize_center(x, augment.size), u, rotation_deg=10.0, shift=0.1, zoom=(0.9, 1.1),
                          flip=augment.flip)
    else:
        x = random_resized_crop(x, u, augment.size, scale_min=augment.scale_min, flip=augment.flip,
                                crop=augment.crop)
    if augment.erase > 0:
        x = random_erase(x, hash_uniform_columns(keyed, seed, epoch, STREAM_ERASE * 8, 5), augment.erase)
    return x
