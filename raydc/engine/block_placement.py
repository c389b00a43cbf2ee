"""Which shard actor takes which block of features: the one on the node that produced the block, where that
keeps the shards balanced.

Why: a block handed to a shard on another node crosses the network once more (object store to object store);
one produced on the shard's own node is read from shared memory. Why a cap: a node whose pool workers made
more blocks than its share would otherwise give its shard more rows, and the slowest shard sets the pace of
every distributed k-means step.
"""
from __future__ import annotations

from typing import Sequence


def assign_blocks(block_nodes: Sequence[Sequence[str]], block_sizes: Sequence[int], shard_nodes: Sequence[str],
                  slack: float = 0.1) -> list[int]:
    """The shard of each block. Shards on a node holding the block are preferred while their load stays under
    (1 + slack) x the mean load plus one block; else the least loaded shard anywhere takes it. Blocks are taken
    in order and ties go to the lower shard index, so the result is deterministic for given locations."""
    n_shards = len(shard_nodes)
    if n_shards == 0:
        raise ValueError("no shard actors to place blocks on")
    total = float(sum(block_sizes))
    biggest = float(max(block_sizes, default=0))
    cap = (1.0 + slack) * total / n_shards + biggest
    load = [0.0] * n_shards
    out = []
    for nodes, size in zip(block_nodes, block_sizes):
        here = set(nodes)
        local = [i for i in range(n_shards) if shard_nodes[i] in here and load[i] + size <= cap]
        pool = local or range(n_shards)
        best = min(pool, key=lambda i: (load[i], i))
        load[best] += size
        out.append(best)
    return out


def round_robin(n_blocks: int, n_shards: int) -> list[int]:
    return [i % n_shards for i in range(n_blocks)]
