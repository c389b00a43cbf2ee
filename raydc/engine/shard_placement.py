"""Where the shard actors go (a placement group over the nodes) and how they survive losing one (restarts,
saved features, a bounded wait): the settings and the Ray calls, apart from what the shards compute."""
from __future__ import annotations

from dataclasses import dataclass

import ray

@dataclass
class ShardPlacement:
    """How the shard actors are laid over the nodes (`cluster.placement`, `cluster.shard_memory_mb`)."""

    strategy: str = "spread"          # spread | strict_spread | pack | none
    memory_bytes: int = 256 << 20     # reserved per shard in its bundle
    resource: str | None = None       # one unit of this custom resource per bundle: only nodes with it hold shards
    timeout_s: float = 120.0
    # The run's placement group name. A placement group outlives the actor that made it (Ray scopes it to the
    # job), so a worker group restarted by Ray Train would otherwise find the lost group's bundles still held.
    name: str | None = None

    @classmethod
    def from_config(cls, cc) -> "ShardPlacement":
        return cls(cc.placement, int(cc.shard_memory_mb) << 20, cc.shard_resource)


@dataclass
class ShardRecovery:
    """How the shard actors survive a lost process or node (`cluster.shard_restarts`, `cluster.persist_features`,
    `cluster.recovery_timeout_s`). `directory` is where each shard saves what it holds (the run directory's
    `shards/`); None keeps nothing, and a restarted shard then comes back empty, which fails the round clearly."""

    directory: str | None = None
    max_restarts: int = 3
    timeout_s: float = 300.0          # a lost shard must be back (restarted, its rows reloaded) within this
    checkpoint_every: int = 5         # sharded Lloyd: centroids gathered to the coordinator every so many steps


def _placement_group(num_shards: int, num_gpus: float, placement: ShardPlacement):
    """One bundle per shard; a clear error when the cluster cannot hold them (STRICT_SPREAD on too few nodes)."""
    from ray.util.placement_group import placement_group, remove_placement_group

    bundle = {"memory": placement.memory_bytes, **({"GPU": num_gpus} if num_gpus else {}),
              **({placement.resource: 1} if placement.resource else {})}
    if placement.name:
        try:
            stale = ray.util.get_placement_group(placement.name)
        except ValueError:  # none: the run's first coordinator
            stale = None
        if stale is not None:
            remove_placement_group(stale)  # an earlier attempt's, whose coordinator (and shards) are gone
    pg = placement_group([dict(bundle) for _ in range(num_shards)], strategy=placement.strategy.upper(),
                         name=placement.name or "")
    ready, _ = ray.wait([pg.ready()], timeout=placement.timeout_s)
    if not ready:
        remove_placement_group(pg)
        from raydc.errors import UserError

        nodes = sum(1 for n in ray.nodes() if n.get("Alive"))
        hint = "lower cluster.num_shards or cluster.shard_memory_mb" + (
            ", or use cluster.placement spread" if placement.strategy != "spread" else "") + (
            f", or start more nodes with the resource {placement.resource!r}" if placement.resource else "")
        raise UserError(f"cannot place {num_shards} shard actors with cluster.placement {placement.strategy} "
                        f"({bundle} each) on this cluster of {nodes} node(s) within {placement.timeout_s:.0f} s: "
                        f"{hint}")
    return pg
