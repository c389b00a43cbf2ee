"""The shard actors of a run, as one set: created once (placed, restarted after a loss), fed each round's
feature blocks, and asked for per-image results that stay on them (columns: clusters, targets, distances) and
come back only reduced (pair counts, sums, a bounded sample, Parquet parts each shard writes itself).

`raydc.engine.feature_pass` fills them, `raydc.engine.sharded_kmeans` clusters what they hold, and
`raydc.engine.clustering.ClusteringService` puts the three behind the one service rank 0 calls.
"""
from __future__ import annotations

from typing import Any, Callable

import numpy as np
import ray

from raydc.core.metrics import PairCounts
from raydc.core.rowblocks import RowBlocks
from raydc.engine.shard_placement import ShardPlacement, ShardRecovery, _placement_group
from raydc.engine.shard_store import FeatureShard
from raydc.methods.api import ShardView

__all__ = ["ShardSet"]


class ShardSet:
    """The shard actors (or in-process `LocalShard`s in tests) and what the caller knows of them: how many rows
    each holds, the feature width, whether one shard holds everything (single-process k-means)."""

    def __init__(self, num_shards: int, num_gpus: float = 0.0, use_gpu: str = "auto", log=print,
                 shards: list | None = None, placement: ShardPlacement | None = None,
                 recovery: ShardRecovery | None = None):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.local = shards is not None
        self.pg = None
        self.recovery = recovery or ShardRecovery()
        if shards is None:
            placement = placement or ShardPlacement("none")
            if placement.strategy != "none":
                self.pg = _placement_group(num_shards, num_gpus, placement)
            rec = self.recovery
            if rec.directory:
                from raydc import storage

                storage.makedirs(rec.directory)
            # max_task_retries: a call in flight when the actor died runs again on the restarted one, which has
            # reloaded its rows (ShardStore.__init__), so most losses cost one call, not the round.
            shards = [FeatureShard.options(
                num_gpus=num_gpus, max_restarts=rec.max_restarts, max_task_retries=rec.max_restarts,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, i)
                if self.pg is not None else None).remote(0, True, rec.directory, i) for i in range(num_shards)]
        self.shards = shards
        self.shard_nodes = self.nodes()
        self.get([s.set_peers.remote(self.shard_nodes.count(n)) for s, n in zip(self.shards, self.shard_nodes)])
        self.use_gpu = use_gpu
        self.log = log
        self.n = 0
        self.dim = 0
        self.sizes: list[int] = []
        self.single = False

    def get(self, refs):
        """ray.get that never hangs on a lost shard: while a shard actor is not alive (its node gone, Ray
        restarting it in its placement group bundle) the wait is bounded by `recovery.timeout_s`, then a clear
        error says which shard and why."""
        if self.local:
            return refs
        many = isinstance(refs, list)
        pending = list(refs) if many else [refs]
        down_since: float | None = None
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=2.0)
            if not pending:
                break
            down = self._shards_down()
            if not down:
                down_since = None
                continue
            import time

            down_since = down_since or time.monotonic()
            if time.monotonic() - down_since > self.recovery.timeout_s:
                from raydc.errors import UserError

                raise UserError(
                    f"shard actor(s) {', '.join(f'{i} ({st})' for i, st in down)} lost and not back within "
                    f"cluster.recovery_timeout_s = {self.recovery.timeout_s:g} s: the cluster has no node left for "
                    f"their placement group bundles (add nodes, or lower cluster.num_shards)")
        return ray.get(refs)

    def _shards_down(self) -> list[tuple[int, str]]:
        """(index, state) of the shard actors the GCS does not report ALIVE."""
        from ray._private import state

        out = []
        for i, s in enumerate(self.shards):
            st = state.actors(s._actor_id.hex()).get("State", "ALIVE")
            if st != "ALIVE":
                out.append((i, st))
        return out

    def put(self, value):
        return value if self.local else ray.put(value)

    def await_shards(self) -> None:
        """After a loss: every shard answers (restarted ones have reloaded their rows) and holds what it held
        before, else a clear error (a restarted shard without saved features cannot rejoin the round)."""
        short = [(i, got, want) for i, (got, want) in enumerate(zip(self._sizes_now(), self.sizes)) if got != want]
        if short:
            from raydc.errors import UserError

            i, got, want = short[0]
            raise UserError(f"shard actor {i} was restarted holding {got} rows instead of {want}: "
                            + ("its saved features are missing or stale" if self.recovery.directory else
                               "cluster.persist_features is off, so a lost shard cannot rejoin the round"))

    def load(self, block_refs: list) -> dict:
        """Hand the feature blocks to the shards, each where possible to a shard on the node that holds it
        (`block_placement`); fail early on NaN/Inf. With every shard on one node there is nothing to prefer, and
        the blocks go round-robin, so the rows each shard holds do not depend on the object store's state."""
        from raydc.engine.block_placement import assign_blocks, round_robin

        owner = round_robin(len(block_refs), len(self.shards))
        local = None
        if not self.local:
            self.shard_nodes = self.nodes()  # a restarted shard may be on another node now
        if not self.local and len(set(self.shard_nodes)) > 1 and block_refs:
            where = ray.experimental.get_object_locations(list(block_refs))
            nodes = [where.get(r, {}).get("node_ids") or [] for r in block_refs]
            sizes = [int(where.get(r, {}).get("object_size") or 0) for r in block_refs]
            owner = assign_blocks(nodes, sizes, self.shard_nodes)
            local = sum(self.shard_nodes[o] in n for o, n in zip(owner, nodes)) / len(block_refs)
        groups = [[r for r, o in zip(block_refs, owner) if o == i] for i in range(len(self.shards))]
        infos = self.get([s.load.remote(g) for s, g in zip(self.shards, groups)])
        self.sizes = [i["n"] for i in infos]
        self.n = sum(self.sizes)
        self.dim = max(i["dim"] for i in infos)
        self.single = False
        out = {"n": self.n, "dim": self.dim, "finite": all(i["finite"] for i in infos)}
        if local is not None:
            out["local_blocks"] = local  # share of blocks taken by a shard on their own node
        return out

    def sample_rows(self, k: int, rng: np.random.Generator) -> np.ndarray:
        """k distinct rows drawn uniformly over all shards (the same rule as faiss' random init)."""
        picks = np.sort(rng.choice(self.n, size=k, replace=False))
        bounds = np.cumsum([0] + self.sizes)
        out = []
        for i, s in enumerate(self.shards):
            local = picks[(picks >= bounds[i]) & (picks < bounds[i + 1])] - bounds[i]
            if len(local):
                out.append(self.get(s.rows_at.remote(local)))
        rows = np.concatenate(out)
        return rows[rng.permutation(len(rows))]

    # ---- per-image results, kept on the shards ----------------------------------------------------------
    def counts(self, a, b) -> PairCounts | None:
        """(a, b) pair counts summed over the shards; a and b are column names, TRUE, or RowBlocks. None when
        a shard lacks one of them (no evaluation labels, say)."""
        parts = self.get([s.counts.remote(a, b) for s in self.shards])
        if any(p is None for p in parts):
            return None
        merged = PairCounts.merge(parts)
        return merged if merged.n else None

    def _sizes_now(self) -> list[int]:
        return self.get([s.size.remote() for s in self.shards])

    def publish(self, col: str, dtype: str | None = None, fill: Any = -1) -> RowBlocks:
        """Column `col` of every shard into the object store, by contiguous row range."""
        return RowBlocks.merge(self.get([s.publish.remote(col, dtype, fill) for s in self.shards]), fill)

    def write_parts(self, directory: str, columns: dict[str, str], paths: list | None = None) -> list[str]:
        """Each shard writes its rows to `directory`/part-NNNNN.parquet (columns: row, id[, path], then
        `columns`; `paths`: see ShardStore.write_part)."""
        from raydc import storage

        storage.makedirs(directory)
        parts = [storage.join(directory, f"part-{i:05d}.parquet") for i in range(len(self.shards))]
        written = self.get([s.write_part.remote(p, columns, paths) for s, p in zip(self.shards, parts)])
        return [p for p, n in zip(parts, written) if n]

    def read_parts(self, directory: str, column: str, dtype: str | None = None, fill: Any = -1) -> RowBlocks:
        """Parts written by `write_parts` back into the object store, spread over the shards."""
        from raydc import storage

        paths = [p for p in storage.list_files(directory, suffix=".parquet")
                 if p.rsplit("/", 1)[-1].startswith("part-")]
        groups = [paths[i::len(self.shards)] for i in range(len(self.shards))]
        return RowBlocks.merge(self.get([s.read_parts.remote(g, column, dtype, fill)
                                          for s, g in zip(self.shards, groups) if g]), fill)

    def sample_features(self, n: int, seed: int, cols: tuple[str, ...] = ()) -> tuple[np.ndarray, np.ndarray, dict]:
        """(ids, features, {col: values}) of at most n rows drawn uniformly, without replacement, from what the
        shards hold now: a bounded sample, whatever N is."""
        sizes = self._sizes_now()
        total = int(sum(sizes))
        if total == 0:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32), {}
        picks = np.sort(np.random.default_rng(seed).choice(total, size=min(n, total), replace=False))
        bounds = np.cumsum([0] + sizes)
        refs = [s.sample.remote(picks[(picks >= lo) & (picks < hi)] - lo, cols)
                for s, lo, hi in zip(self.shards, bounds[:-1], bounds[1:]) if ((picks >= lo) & (picks < hi)).any()]
        parts = self.get(refs)
        values = {c: np.concatenate([p[2][c] for p in parts]) for c in cols if all(c in p[2] for p in parts)}
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]), values

    def column_total(self, col: str) -> float:
        """The float64 sum of a per-row column over every shard (the final k-means objective: `col`_distance)."""
        return float(np.sum(self.apply(_distance_sum, col)))

    def apply(self, fn: Callable, *args) -> list:
        # a large array goes into the object store once, not once per shard (Ray copies a by-value argument
        # into each task)
        args = tuple(self.put(a) if isinstance(a, np.ndarray) and a.nbytes > (1 << 20) else a for a in args)
        return self.get([s.apply.remote(fn, *args) for s in self.shards])

    def peak_rss(self) -> list[dict]:
        from raydc.engine.memory import peak

        return self.get([s.peak_rss.remote() for s in self.shards]) + [{"coordinator": True, **peak()}]

    def release(self) -> None:
        self.get([s.clear.remote() for s in self.shards])

    def nodes(self) -> list[str]:
        """The node id of each shard actor."""
        return self.get([s.node.remote() for s in self.shards])

    def shutdown(self) -> None:
        if not self.local:
            for s in self.shards:
                ray.kill(s)
        self.shards = []
        if self.pg is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.pg)
            self.pg = None




def _distance_sum(view: ShardView, col: str) -> float:
    return float(np.asarray(view.cols[col], np.float64).sum()) if len(view.ids) else 0.0
