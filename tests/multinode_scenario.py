"""The multi-node scenario of tests/test_multinode.py, run in its own process (it starts its own Ray cluster:
a head with the coordinator's resource and three worker nodes with one `shard_slot` each, on this host).

Prints one JSON object with what the test asserts on."""
from __future__ import annotations

import json
import sys
import tempfile

import numpy as np


def main(part: str) -> None:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"coordinator": 1}, "object_store_memory": 200 << 20, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1, resources={"shard_slot": 1}, object_store_memory=100 << 20)
               for _ in range(3)]
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        scenario = _lose_a_node if part == "node-loss" else _placement
        out = scenario(cluster, workers, ray)
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(out))


def _placement(cluster, workers, ray) -> dict:
    """Where the shard actors and the coordinator land, blocks kept on their node, and the sharded results
    (Lloyd, the sharded reduction, the parts written) equal to one process's."""
    import pyarrow.parquet as pq

    from raydc.core import kmeans as km
    from raydc.engine.clustering import CoordinatorProxy, ShardPlacement

    out: dict = {}
    head_id = ray.get_runtime_context().get_node_id()
    out["worker_nodes"] = sorted(w.node_id for w in workers)
    out["head_node"] = head_id
    proxy = CoordinatorProxy(3, placement=ShardPlacement("strict_spread", 32 << 20, "shard_slot"),
                             resource="coordinator")
    out["coordinator_node"] = ray.get(proxy.handle.node.remote())
    out["shard_nodes"] = proxy.nodes()

    rng = np.random.default_rng(0)
    n, d, k = 9000, 16, 20
    centres = rng.normal(0, 3, (k, d))
    y = rng.integers(0, k, n)
    x = (centres[y] + rng.normal(0, 1, (n, d))).astype(np.float32)
    ids = rng.permutation(np.unique(rng.integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, 2 * n)))[:n]
    refs = [ray.put({"row": r, "id": ids[r], "feature": x[r], "label": y[r]})
            for r in np.array_split(np.arange(n), 12)]
    out["load"] = proxy.load(refs)
    init = km.sample_init_centroids(x, k, seed=3)
    ref = km.kmeans(x, k, niter=10, init_centroids=init)
    res = proxy.kmeans(k, niter=10, seed=3, mode="distributed", init_centroids=init)
    out["objective"], out["faiss_objective"] = res.objective, list(ref.objective)
    out["bytes_per_iteration"] = res.bytes_per_iteration
    out["bound"] = 3 * (k * d * 8 + k * 8 + 8)
    # the sharded reduction across the nodes: the star's centroids to the bit; only counts reach the coordinator
    star = proxy.kmeans(k, niter=10, seed=3, mode="distributed", init_centroids=init, reduction="star")
    sharded = proxy.kmeans(k, niter=10, seed=3, mode="distributed", init_centroids=init, reduction="sharded")
    out["sharded_equals_star"] = bool(np.array_equal(star.centroids, sharded.centroids)
                                      and star.objective == sharded.objective)
    out["sharded_bytes"] = sharded.bytes_per_iteration
    pairs = proxy.counts("true", "cluster")
    out["n_counted"] = pairs.n
    with tempfile.TemporaryDirectory() as tmp:
        parts = proxy.write_parts(tmp, {"cluster": "cluster"})
        tables = [pq.read_table(p) for p in parts]
        out["parts"] = len(parts)
        rows = np.concatenate([t.column("row").to_numpy() for t in tables])
        got_ids = np.concatenate([t.column("id").to_numpy() for t in tables])
        out["rows_cover_once"] = bool(np.array_equal(np.sort(rows), np.arange(n)))
        out["ids_are_their_rows"] = bool(np.array_equal(got_ids, ids[rows]))
        labels = np.empty(n, np.int64)
        labels[rows] = np.concatenate([t.column("cluster").to_numpy() for t in tables])
        out["nmi_vs_faiss"] = float(__import__("raydc.core.metrics", fromlist=["nmi"]).nmi(ref.labels, labels))
    out.update(_blocks_stay_on_their_node(proxy, workers, ray))
    proxy.shutdown()
    return out


def _blocks_stay_on_their_node(proxy, workers, ray) -> dict:
    """Feature blocks made by tasks on each worker node (as the pool's workers make them) are taken by the shard
    on that node. Rows r of node j's blocks are j * 8000 + ..., so each shard's rows tell where they came from."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # One task per node makes that node's four blocks (each 2,000 x 16 float32 plus ids: above Ray's 100 KiB inline
    # limit, in plasma): a zero-CPU task per block would start a worker process per block.
    @ray.remote(num_cpus=0, num_returns=4)
    def blocks(first: int, n: int):
        out = []
        for start in range(first, first + 4 * n, n):
            rows = np.arange(start, start + n, dtype=np.int64)
            out.append({"row": rows, "id": rows,
                        "feature": np.random.default_rng(start).random((n, 16), dtype=np.float32)})
        return tuple(out)

    refs, node_of_row = [], {}
    for j, w in enumerate(workers):
        refs.extend(blocks.options(scheduling_strategy=NodeAffinitySchedulingStrategy(w.node_id, soft=False))
                    .remote(j * 8000, 2000))
        node_of_row[j] = w.node_id
    refs = refs[::2] + refs[1::2]  # interleaved, so round-robin would mix the nodes
    ray.wait(refs, num_returns=len(refs))
    info = proxy.load(refs)
    nodes = proxy.nodes()
    with tempfile.TemporaryDirectory() as tmp:
        import pyarrow.parquet as pq

        parts = proxy.write_parts(tmp, {})
        ok = True
        sizes = []
        for p in parts:
            i = int(p.rsplit("part-", 1)[1].split(".")[0])
            rows = pq.read_table(p).column("row").to_numpy()
            sizes.append(len(rows))
            ok &= all(node_of_row[int(r) // 8000] == nodes[i] for r in rows)
    return {"local_load": info, "local_rows_on_their_node": bool(ok), "local_sizes": sorted(sizes)}


def _lose_a_node(cluster, workers, ray) -> dict:
    """A node holding a shard is removed in the middle of a distributed k-means, then a node takes its place:
    the k-means must end as the uninterrupted one did, to the bit. Then a node is removed with none to take its
    place: the k-means must fail with a clear error within cluster.recovery_timeout_s, not hang."""
    import time

    from raydc.core import kmeans as km
    from raydc.engine.clustering import CoordinatorProxy, ShardPlacement, ShardRecovery

    out: dict = {}
    rng = np.random.default_rng(1)
    n, d, k = 90_000, 64, 1000  # uniform points: Lloyd is far from its fixed point after niter steps
    x = rng.random((n, d), dtype=np.float32)
    with tempfile.TemporaryDirectory() as tmp:
        proxy = CoordinatorProxy(3, placement=ShardPlacement("strict_spread", 32 << 20, "shard_slot"),
                                 resource="coordinator", recovery=ShardRecovery(tmp, 3, timeout_s=15.0))
        proxy.load([ray.put({"row": r, "id": r, "feature": x[r]}) for r in np.array_split(np.arange(n), 6)])
        init = km.sample_init_centroids(x, k, seed=0)
        args = dict(niter=30, seed=0, mode="distributed", init_centroids=init, reduction="sharded")
        t = time.perf_counter()
        ref = proxy.kmeans(k, **args)
        out["kmeans_seconds"] = time.perf_counter() - t
        nodes = proxy.nodes()
        victim = next(w for w in workers if w.node_id == nodes[1])
        pending = proxy.handle.call.remote("kmeans", k, **args)
        time.sleep(out["kmeans_seconds"] * 0.4)
        cluster.remove_node(victim)
        time.sleep(1.0)
        fresh = cluster.add_node(num_cpus=1, resources={"shard_slot": 1}, object_store_memory=100 << 20)
        got = ray.get(pending, timeout=600)
        out["recovered_equal"] = bool(np.array_equal(got.centroids, ref.centroids) and got.objective == ref.objective
                                      and np.array_equal(got.sizes, ref.sizes))
        out["recoveries"] = got.bytes_per_iteration["recoveries"]
        out["restarted_on_new_node"] = proxy.nodes()[1] == fresh.node_id
        out["restored"] = ray.get(proxy.handle.call.remote("await_shards")) is None
        # no node to take the place of a lost one: a clear error, bounded in time
        nodes = proxy.nodes()
        pending = proxy.handle.call.remote("kmeans", k, **{**args, "reduction": "star"})
        time.sleep(1.0)
        cluster.remove_node(next(w for w in workers + [fresh] if w.node_id == nodes[2]))
        t = time.perf_counter()
        try:
            ray.get(pending, timeout=300)
            out["no_node_error"] = None
        except Exception as e:  # noqa: BLE001 - the test asserts on its text
            out["no_node_error"] = str(e)[-600:]
        out["no_node_seconds"] = time.perf_counter() - t
        try:
            proxy.shutdown()
        except Exception:  # noqa: BLE001 - the lost shard's actor cannot answer; what matters was asserted
            ray.kill(proxy.handle)
    return out


if __name__ == "__main__":
    # "placement": shards, blocks and the k-means across nodes (make test); "node-loss": a node lost mid k-means (slow)
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "placement"))
