"""Several Ray nodes on this host (`ray.cluster_utils.Cluster`): where the shard actors and the coordinator land,
and that the sharded results are exact across nodes. `make test-multinode` runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

pytestmark = pytest.mark.ray  # four raylets of its own on this host per scenario; the node losses are `slow`


def _scenario(part: str) -> dict:
    """tests/multinode_scenario.py's `part`, on a cluster of its own in a fresh process; its RESULT line."""
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0")
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-m", "tests.multinode_scenario", part], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=900)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert p.returncode == 0 and line, (p.stdout[-3000:], p.stderr[-3000:])
    return json.loads(line[len("RESULT "):])


def test_shards_spread_over_nodes_and_results_are_exact():
    r = _scenario("placement")
    # strict_spread with one `shard_slot` per worker node: one shard on each worker node, none on the head;
    # the coordinator where its resource is
    assert sorted(r["shard_nodes"]) == r["worker_nodes"]
    assert r["coordinator_node"] == r["head_node"]
    assert {k: r["load"][k] for k in ("n", "dim", "finite")} == {"n": 9000, "dim": 16, "finite": True}
    # blocks made on each worker node go to the shard on that node (balanced: four blocks each)
    assert r["local_load"]["local_blocks"] == 1.0 and r["local_load"]["n"] == 3 * 4 * 2000
    assert r["local_rows_on_their_node"] and r["local_sizes"] == [8000, 8000, 8000]
    # distributed Lloyd across nodes equals single-process faiss from the same initial centroids
    assert len(r["objective"]) == len(r["faiss_objective"])
    assert all(abs(a - b) <= 1e-4 * abs(b) for a, b in zip(r["objective"], r["faiss_objective"]))
    assert r["nmi_vs_faiss"] > 0.99
    # what reaches the coordinator per iteration: k x d sums and k counts per shard, nothing per image
    assert 0 < r["bytes_per_iteration"]["received"] <= r["bound"]
    assert r["n_counted"] == 9000
    # one part per shard (three nodes), covering every row once, each with its own random int64 id
    assert r["parts"] == 3 and r["rows_cover_once"] and r["ids_are_their_rows"]
    # the sharded reduction over three nodes: the star's centroids; the coordinator gets k counts and 3 objectives
    assert r["sharded_equals_star"]
    assert r["sharded_bytes"]["coordinator_received"] == 20 * 8 + 3 * 8
    assert r["sharded_bytes"]["shard_received_max"] <= 2 * 7 * (16 * 8 + 8) + 20 * 16 * 4


@pytest.mark.slow  # three k = 1,000 k-means on 90,000 points and a recovery timeout waited out: ~1 min
def test_a_shards_node_lost_mid_kmeans_is_replaced_or_named_in_a_clear_error():
    r = _scenario("node-loss")
    # a node lost in the middle of k-means, then replaced: the restarted shard reloads its saved rows on the new
    # node and the k-means resumes from the last centroids, ending exactly as the uninterrupted one
    assert r["recoveries"] >= 1, "the node was removed after the k-means ended: nothing was tested"
    assert r["recovered_equal"] and r["restarted_on_new_node"] and r["restored"]
    # a node lost with none to replace it: a clear error within cluster.recovery_timeout_s (15 s here), not a hang
    assert r["no_node_error"] and "recovery_timeout_s" in r["no_node_error"], r["no_node_error"]
    assert r["no_node_seconds"] < 120


@pytest.mark.slow  # two tiny DDP runs on a 4-raylet cluster and a worker group restarted by Ray Train: ~2-4 min
def test_a_train_workers_node_lost_after_a_checkpoint_ends_as_the_uninterrupted_run(mnist_root):
    # The data root the fixture found (RAYDC_DATA_ROOT or ../shared/data), so a plain `pytest` run works too.
    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0", RAYDC_DATA_ROOT=str(mnist_root))
    env.pop("RAY_ADDRESS", None)
    p = subprocess.run([sys.executable, "-m", "tests.multinode_train_scenario"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=1500)
    line = next((x for x in p.stdout.splitlines() if x.startswith("RESULT ")), None)
    assert p.returncode == 0 and line, (p.stdout[-3000:], p.stderr[-3000:])
    r = json.loads(line[len("RESULT "):])
    assert r["checkpoint_before_loss"] == 0 and r["rank0_on_a_trainer_node"]
    assert r["error"] is None, r["error"]
    # the lost node took rank 1 with it: Ray Train started a second group of two workers inside the same fit
    assert r["train_workers_started"] == 4 and r["fits"] == ["000"]
    assert r["epochs"] == r["ref_epochs"] == [0, 1, 2, 3]
    assert r["metrics_equal"] and r["assignments_equal"]
