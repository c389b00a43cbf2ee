"""The Train side of tests/test_multinode.py, in its own process and Ray cluster on this host: a head (the
coordinator and the shard actors, by their resources) and two nodes with one `trainer` slot each, so the two
DDP workers of a tiny DeepCluster run land one per node. After the first round's checkpoint the node of the
worker that is not rank 0 is removed and a fresh node added; with `train.max_failures=1` Ray Train starts a new
worker group from that checkpoint, and the run must end with the uninterrupted run's metrics and assignments.

Prints one JSON object with what the test asserts on."""
from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np


def _rank0_node(ray) -> str | None:
    """Rank 0 creates the coordinator actor, so the coordinator's owner is rank 0's worker process."""
    from ray._private import state

    for info in state.actors().values():
        if info.get("ActorClassName", "").endswith("ClusterCoordinator") and info.get("State") == "ALIVE":
            return info.get("OwnerAddress", {}).get("NodeID")
    return None


def _train_workers_started() -> int:
    """Train worker actors this job has had, dead or alive: two per worker group started."""
    from ray._private import state

    return sum(1 for info in state.actors().values() if "TrainWorker" in info.get("ActorClassName", ""))


def main() -> None:
    import os

    import ray
    from ray.cluster_utils import Cluster

    from raydc.config import load_config
    from raydc.data.prepare import prepare
    from raydc.engine.rundir import RunDir
    from raydc.engine.trainer import run_training

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "resources": {"coordinator": 1, "shard_slot": 2}, "object_store_memory": 300 << 20,
        "include_dashboard": False})
    trainers = [cluster.add_node(num_cpus=1, resources={"trainer": 1}, object_store_memory=150 << 20)
                for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False)
    out: dict = {}
    try:
        tmp = Path(tempfile.mkdtemp(prefix="raydc-mn-train-"))
        shards = tmp / "shards"
        prepare("mnist", shards, root=os.environ["RAYDC_DATA_ROOT"], split="test", limit=600, rows_per_shard=200,
                progress=False)

        def config(run_dir: Path, *extra: str):
            return load_config(None, [
                f"data.shards={shards}", f"run.dir={run_dir}", "cluster.k=5", "cluster.pca_dim=16", "train.epochs=3",
                "train.batch_size=64", "train.crop_scale_min=0.5", "train.hflip=false", "features.batch_size=200",
                "run.montage_per_cluster=4", "train.num_workers=2", "train.worker_resource=trainer",
                "ray.coordinator_resource=coordinator", "cluster.shard_resource=shard_slot", "cluster.num_shards=2",
                "run.progress=false", *extra])

        ref = run_training(config(tmp / "ref"), log=lambda *a: None)
        run = RunDir(tmp / "faulty")
        done: dict = {}

        def train():
            try:
                done["run"] = run_training(config(run.path, "train.max_failures=1"), log=lambda *a: None)
            except BaseException as e:  # reported below
                done["error"] = repr(e)[-2000:]

        before = _train_workers_started()
        t = threading.Thread(target=train, daemon=True)
        t.start()
        deadline = time.time() + 600
        while time.time() < deadline and run.checkpoint_round() is None and t.is_alive():
            time.sleep(0.2)
        out["checkpoint_before_loss"] = run.checkpoint_round()
        rank0 = _rank0_node(ray)
        victim = next((w for w in trainers if w.node_id != rank0), None)
        out["rank0_on_a_trainer_node"] = rank0 in {w.node_id for w in trainers}
        cluster.remove_node(victim)
        time.sleep(1.0)
        cluster.add_node(num_cpus=1, resources={"trainer": 1}, object_store_memory=150 << 20)
        t.join(900)
        out["error"] = done.get("error")
        out["train_workers_started"] = _train_workers_started() - before
        if "run" in done:
            rows_a, rows_b = ref.read_metrics(), run.read_metrics()
            keys = ("loss", "kmeans_objective", "acc", "nmi", "nmi_prev")
            out["epochs"] = [r["epoch"] for r in rows_b]
            out["ref_epochs"] = [r["epoch"] for r in rows_a]
            out["metrics_equal"] = all(abs(ra[k] - rb[k]) <= 1e-6 * max(1.0, abs(ra[k]))
                                       for ra, rb in zip(rows_a, rows_b) for k in keys
                                       if ra.get(k) is not None and rb.get(k) is not None)
            a, b = ref.read_assignments(), run.read_assignments()
            out["assignments_equal"] = bool(np.array_equal(a["cluster"][np.argsort(a["id"])],
                                                           b["cluster"][np.argsort(b["id"])]))
            out["fits"] = sorted({c.split("/fit-")[1][:3] for c in run.checkpoints()})
    finally:
        ray.shutdown()
        cluster.shutdown()
    print("RESULT " + json.dumps(out))


if __name__ == "__main__":
    sys.exit(main())
