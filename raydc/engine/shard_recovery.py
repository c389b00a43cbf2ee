"""What a shard actor needs to come back after its process or node is lost: the reduced features it holds,
written once per load to the run directory (POSIX or object storage), and which of those parts it holds now.

Why per load and not per call: the features are the expensive state (a pass of the network over every image);
everything a shard computes from them in a round (clusters, distances) is recomputed from the centroids,
which the coordinator keeps. A restarted actor (Ray's `max_restarts`) reads its holdings back in __init__, so
the calls Ray retries on it (`max_task_retries`) see the same rows in the same order, and a k-means resumed
from the coordinator's last centroids gives the uninterrupted result to the bit.

The files are `.npz` read with `allow_pickle=False` and a JSON list: loading them can never run code.
"""
from __future__ import annotations

import io
import json

import numpy as np

from raydc import storage

HOLDINGS_VERSION = 1


def part_name(index: int) -> str:
    return f"shard-{index:05d}.npz"


def holdings_name(index: int) -> str:
    return f"shard-{index:05d}.json"


def save_part(directory: str, index: int, block: dict[str, np.ndarray]) -> None:
    """Shard `index`'s own rows, a block as the pool emits them (row, id, feature[, label])."""
    buf = io.BytesIO()
    np.savez(buf, **block)
    storage.write_bytes_atomic(storage.join(directory, part_name(index)), buf.getvalue())


def save_holdings(directory: str, index: int, parts: list[int]) -> None:
    """The shards whose saved parts this shard holds now, in the order it concatenated them."""
    storage.write_text_atomic(storage.join(directory, holdings_name(index)),
                              json.dumps({"version": HOLDINGS_VERSION, "parts": [int(p) for p in parts]}))


def _load_part(directory: str, index: int) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(storage.read_bytes(storage.join(directory, part_name(index)))),
                 allow_pickle=False) as z:
        return {name: z[name] for name in z.files}


def restore(directory: str, index: int) -> tuple[list[int], list[dict[str, np.ndarray]]] | None:
    """(parts, their blocks) as shard `index` last held them, or None when it never saved any."""
    path = storage.join(directory, holdings_name(index))
    if not storage.exists(path):
        return None
    meta = json.loads(storage.read_text(path))
    if meta.get("version") != HOLDINGS_VERSION or not isinstance(meta.get("parts"), list):
        raise ValueError(f"{path}: not a raydc shard holdings file (version {meta.get('version')!r})")
    parts = [int(p) for p in meta["parts"]]
    return parts, [_load_part(directory, p) for p in parts]
