"""DeepCluster's departures from the paper, in process (the engine's control flow, in-memory stand-ins for
Ray): the v2 variant's frozen prototypes, the matched head, over-clustering with a delivered final_k, the lr
schedule and the floor on SGD steps per round. The paper's v1 through Ray is tests/test_engine_deepcluster.py."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from raydc.config import load_config
from raydc.core.metrics import PairCounts
from raydc.engine.summary import quality_regression
from raydc.errors import ConfigError
from raydc.methods.deepcluster import DeepCluster, matched_head_rows
from tests.helpers import classes_of_images
from tests.inprocess import run_method_in_process

pytestmark = pytest.mark.usefixtures("one_torch_thread")

N = 120  # 3 classes x 40, 16 x 16 gray


def config(*extra: str):
    return load_config(None, ["data.shards=unused", "cluster.k=3", "cluster.pca_dim=0", "train.epochs=2",
                              "train.batch_size=32", "train.hflip=false", "train.torch_threads=1",
                              "model.feature_dim=32", *extra])


def manifest():
    return SimpleNamespace(image_shape=[16, 16, 1], mode="L", count=N, has_labels=True)


def run(cfg):
    return run_method_in_process(DeepCluster, cfg, classes_of_images(16, 1), manifest())


@pytest.fixture
def rounds(monkeypatch) -> list[dict]:
    """Each training round's plan and the top layer's weights before and after it."""
    seen: list[dict] = []
    original = DeepCluster.train_round

    def train_round(method, wctx, model, plan, state, r):
        before = model.top_layer.weight.detach().clone()
        out = original(method, wctx, model, plan, state, r)
        seen.append({"plan": plan.targets, "before": before, "after": model.top_layer.weight.detach().clone()})
        return out

    monkeypatch.setattr(DeepCluster, "train_round", train_round)
    return seen


def test_v2_trains_against_the_centroids_as_frozen_prototypes(rounds):
    cfg = config("deepcluster.variant=v2", "deepcluster.temperature=0.2")
    method, _, rows, final = run(cfg)
    assert len(rounds) == 2
    for rec in rounds:
        protos = rec["plan"].prototypes
        assert protos.shape == (3, 32)
        np.testing.assert_allclose(np.linalg.norm(protos, axis=1), 1.0, rtol=1e-5)
        # the classifier is the prototypes / temperature, and training leaves it as it is
        torch.testing.assert_close(rec["after"], torch.from_numpy(protos) / 0.2)
    model = method.build_model()
    assert model.top_layer.bias is None and not model.top_layer.weight.requires_grad
    assert all(not n.startswith("top_layer") for n, p in model.named_parameters() if p.requires_grad)
    assert np.isfinite(rows[0]["loss"]) and rows[-1]["final"]


def test_v2_needs_the_embedding_itself():
    with pytest.raises(ConfigError, match=r"cluster\.pca_dim"):
        load_config(None, ["data.shards=x", "deepcluster.variant=v2", "cluster.pca_dim=16"])
    with pytest.raises(ConfigError, match=r"cluster\.l2_normalize"):
        load_config(None, ["data.shards=x", "deepcluster.variant=v2", "cluster.pca_dim=0",
                           "cluster.l2_normalize=false"])


def test_head_match_plans_the_matching_from_the_second_round(rounds):
    run(config("deepcluster.head=match"))
    first, second = rounds
    assert first["plan"].head_rows is None  # nothing to match in round 0: a fresh head
    assert sorted(second["plan"].head_rows.tolist()) == [0, 1, 2]


def test_final_k_above_the_training_k_names_the_field():
    with pytest.raises(ConfigError, match=r"deepcluster\.final_k"):
        load_config(None, ["data.shards=x", "cluster.k=4", "deepcluster.final_k=10"])


@pytest.mark.parametrize("sample,low,high", [(60, 35, 85), (0, 120, 120), (500, 120, 120)])
def test_pca_is_fitted_on_a_sample_and_applied_by_the_workers(sample, low, high):
    """features.pca_sample < N: a first pass embeds a uniform sample (by id) and the PCA is fitted on it; the
    full pass then gets projected, whitened, L2-normalised features from the workers. 0 or >= N: all images."""
    cfg = config("cluster.pca_dim=8", f"features.pca_sample={sample}", "cluster.whiten=true")
    method, state, rows, final = run(cfg)
    for r in rows:
        assert low <= r["pca_rows"] <= high, r["pca_rows"]
        assert np.isfinite(r["kmeans_objective"]) and r["size_max"] > 0
    proj = final.artifacts["projection"]
    assert proj["matrix"].shape == (32, 8) and proj["whiten"]


def test_float16_features_cluster_as_float32_do(monkeypatch):
    """features.dtype float16 halves what the shards hold; k-means still runs in float32 on them."""
    from raydc.engine.clustering import ShardStore

    held = []
    load = ShardStore.load

    def spy(self, refs):
        info = load(self, refs)
        held.append(None if self.x is None else self.x.dtype)
        return info

    monkeypatch.setattr(ShardStore, "load", spy)
    *_, rows16, _ = run(config("features.dtype=float16"))
    assert {d for d in held if d is not None} == {np.dtype(np.float16)}
    *_, rows32, _ = run(config())
    assert abs(rows16[-1]["acc"] - rows32[-1]["acc"]) < 0.1


def test_a_pca_sample_smaller_than_the_pca_is_refused():
    with pytest.raises(ConfigError, match=r"features\.pca_sample"):
        config("cluster.pca_dim=16", "features.pca_sample=10")


def test_matched_head_rows_follow_the_overlap():
    prev = np.array([0, 0, 0, 1, 1, 2, 2, 2])
    new = np.array([2, 2, 2, 0, 0, 1, 1, 1])  # the same clustering with its ids permuted
    def overlap(prev, new):  # what the shards reduce: counts(new column, previous blocks) as a k x k table
        return PairCounts.of(new, prev).dense(3, 3)

    src = matched_head_rows(overlap(prev, new))
    assert src.tolist() == [1, 2, 0]  # new cluster 0 was old 1, new 1 was old 2, new 2 was old 0
    assert sorted(matched_head_rows(overlap(np.zeros(8, np.int64), new)).tolist()) == [0, 1, 2]  # a permutation


def _targets(k=3, **kw):
    from raydc.methods.deepcluster import PseudoLabels

    return PseudoLabels(np.zeros(4, np.int64), np.ones(k, np.int64), 4, **kw)


def test_set_head_policies():
    method = DeepCluster(config(), manifest())
    net = method.build_model()
    with torch.no_grad():
        net.top_layer.weight.copy_(torch.arange(3 * 32, dtype=torch.float32).reshape(3, 32))
        net.top_layer.bias.copy_(torch.tensor([10.0, 11.0, 12.0]))
    old_w = net.top_layer.weight.clone()
    method.set_head(net, _targets(head_rows=np.array([2, 0, 1])), 1)           # head: match
    torch.testing.assert_close(net.top_layer.weight, old_w[[2, 0, 1]])
    assert net.top_layer.bias.tolist() == [12.0, 10.0, 11.0]
    method.set_head(net, _targets(), 1)                                          # head: reset (the paper)
    w1 = net.top_layer.weight.clone()
    assert 0.005 < w1.std() < 0.02 and (net.top_layer.bias == 0).all()
    method.set_head(net, _targets(), 2)
    assert not torch.allclose(net.top_layer.weight, w1)                          # a fresh draw per round
    method.set_head(net, _targets(), 1)
    torch.testing.assert_close(net.top_layer.weight, w1)                         # ... a function of the round


def test_over_clustering_delivers_final_k_and_scores_the_training_k():
    method, _, rows, final = run(config("cluster.k=9", "deepcluster.final_k=3"))
    last = rows[-1]
    assert last["final_k"] == 3 and len(last["size_histogram"]) == 3 and final.labels.max() < 3
    assert final.artifacts["centroids"].shape == (3, 32)
    assert {"train_k_acc", "train_k_acc_majority", "train_k_nmi"} <= set(last)
    assert {"acc", "acc_majority", "nmi"} <= set(last)
    # majority vote with 9 clusters is never below the one-to-one Hungarian ACC of the same clustering
    assert last["train_k_acc_majority"] >= last["train_k_acc"]
    assert all(len(r["size_histogram"]) == 9 for r in rows[:-1])


def test_spectral_merge_joins_chains_of_fine_clusters():
    from raydc.core.merge import coneighbour_counts, spectral_merge

    # two curved "classes", each a chain of 5 fine clusters: neighbours along a chain share many points
    counts = np.zeros((10, 10))
    for a in (0, 5):
        for i in range(a, a + 4):
            counts[i, i + 1] = counts[i + 1, i] = 50
    counts[4, 5] = counts[5, 4] = 1  # the chains touch at one end, barely
    groups = spectral_merge(counts, 2)
    assert len(set(groups[:5])) == 1 and len(set(groups[5:])) == 1 and groups[0] != groups[5]
    # points between centroids 0 and 1 (nearer 0) count once each way
    c = coneighbour_counts(np.array([[0.2, 0.0], [0.3, 0.0], [1.9, 0.0]]), np.array([[0.0, 0], [1, 0], [2, 0]]))
    assert c[0, 1] == c[1, 0] == 2 and c[1, 2] == c[2, 1] == 1 and c.sum() == 6


def test_over_clustering_with_the_spectral_merge():
    method, _, rows, final = run(config("cluster.k=9", "deepcluster.final_k=3", "deepcluster.final_merge=spectral"))
    last = rows[-1]
    groups = final.artifacts["groups"].numpy()
    assert groups.shape == (9,) and set(groups.tolist()) <= {0, 1, 2}
    assert final.artifacts["centroids"].shape == (9, 32)  # new images go to a fine centroid, then to its group
    assert final.labels.max() < 3 and last["final_k"] == 3 and "train_k_acc_majority" in last
    assert last["acc"] > 0.9, last["acc"]  # three well-separated template classes


def test_over_clustering_with_the_knn_merge_gathers_only_its_sample(traffic):
    """The k-NN readout's only per-point traffic to rank 0 is its sample; the shards send back k x k counts."""
    gathered, returned = traffic
    method, _, rows, final = run(config("cluster.k=9", "deepcluster.final_k=3", "deepcluster.final_merge=knn",
                                        "deepcluster.final_sample=50", "deepcluster.final_neighbors=5"))
    last = rows[-1]
    # the readout's sample comes first; then the engine's own label-free scores draw theirs (LABEL_FREE_SAMPLE)
    assert gathered[0] == 50 and last["merge_sample"] == 50, gathered
    assert {shape for name, shape in returned if name == "shard_knn_edges"} == {(9, 9)}, returned
    groups = final.artifacts["groups"].numpy()
    assert groups.shape == (9,) and set(groups.tolist()) == {0, 1, 2} and last["final_k"] == 3
    assert last["acc"] > 0.9, last["acc"]  # three well-separated template classes


def test_over_clustering_with_the_spectral_merge_groups_the_training_clusters(traffic):
    """The co-neighbour readout: the shards send k x k counts, each training cluster joins one group."""
    _, returned = traffic
    _, _, rows, final = run(config("cluster.k=9", "deepcluster.final_k=3", "deepcluster.final_merge=spectral"))
    assert {shape for name, shape in returned if name == "shard_coneighbours"} == {(9, 9)}, returned
    groups = final.artifacts["groups"].numpy()
    assert groups.shape == (9,) and set(groups.tolist()) == {0, 1, 2} and rows[-1]["final_k"] == 3
    assert rows[-1]["acc"] > 0.9, rows[-1]["acc"]


def test_cosine_lr_per_round_and_the_step_floor(rounds):
    cfg = config("train.lr_schedule=cosine", "train.lr_final=0.1", "train.epochs=4", "train.min_steps=7")
    _, _, rows, _ = run(cfg)
    lrs = [r["lr"] for r in rows[:-1]]
    assert lrs == pytest.approx([cfg.train.lr_at(r) for r in range(4)])
    assert lrs[0] == pytest.approx(0.05) and lrs == sorted(lrs, reverse=True) and lrs[-1] > 0.005
    # 120 images x reassign 1 is 3 batches of 32; the floor asks for 7 per round
    assert all(r["train_steps"] >= 5 for r in rows[:-1]), [r["train_steps"] for r in rows[:-1]]
    method = DeepCluster(cfg, manifest())
    assert method.images_per_round(N) == (7 * 32, True)
    assert method.images_per_round(10_000) == (10_000, False)


def test_quality_regression_is_said_only_when_the_final_is_worse():
    rows = [{"epoch": 0, "acc": 0.62}, {"epoch": 1, "acc": 0.7}]
    worse = quality_regression(rows, 0.47)
    assert "0.470" in worse and "0.620" in worse and "epoch 0" in worse
    assert quality_regression(rows, 0.618) is None  # within the tolerance
    assert quality_regression([{"epoch": 0}], 0.1) is None  # no labels: nothing to say
    dec_rows = [{"epoch": 5, "phase": "pretrain"}, {"epoch": 6, "acc": 0.59}]  # DEC: its AE + k-means start
    assert "epoch 6" in quality_regression(dec_rows, 0.42)
    # an over-clustered DeepCluster run is compared at its training k, the k its round 0 had, by majority ACC
    # (the Hungarian ACC of 100 clusters against 10 classes is near chance whatever the features)
    method = DeepCluster(config(), manifest())
    final = {"final": True, "acc": 0.9, "train_k_acc": 0.11, "train_k_acc_majority": 0.75}
    assert method.comparable_final(final) == ("acc_majority", 0.75)
    assert method.comparable_final({"final": True, "acc": 0.9}) == ("acc", 0.9)
    over = [{"epoch": 0, "acc": 0.12, "acc_majority": 0.73}]
    key, value = method.comparable_final(final)
    assert quality_regression(over, value, key=key) is None
    assert "majority ACC 0.700" in quality_regression(over, 0.70, key="acc_majority")
