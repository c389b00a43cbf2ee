"""The multi-node scenario of tests/test_multinode.py, run in its own process (it starts its own Ray cluster:
a head with the coordinator's resource and three worker nodes with one `shard_slot` each, on this host).

Prints one JSON object with what the test asserts on."""
from __future__ import annotations

import json
import sys
import tempfile

import numpy as np


def main() -> None:
    import ray
    from ray.cluster_utils import Cluster

    import pyarrow.parquet as pq

    from raydc.core import kmeans as km
    from raydc.engine.clustering import CoordinatorProxy, ShardPlacement

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"coordinator": 1}, "object_store_memory": 200 << 20, "include_dashboard": False})
    workers = [cluster.add_node(num_cpus=1, resources={"shard_slot": 1}, object_store_memory=100 << 20)
               for _ in range(3)]
    ray.init(address=cluster.address, log_to_driver=False)
    out: dict = {}
    try:
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
        proxy.shutdown()
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
