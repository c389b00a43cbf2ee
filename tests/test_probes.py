"""The k-NN and linear probes (raydc.core.probes) on data whose answers are known by hand."""
from __future__ import annotations

import math

import numpy as np
import pytest

from raydc.core.probes import KNNProbe, StreamedLinearProbe, linear_probe_in_memory


def _at(deg: float) -> list[float]:
    return [math.cos(math.radians(deg)), math.sin(math.radians(deg))]


def test_weighted_knn_follows_the_temperature_weights_not_the_majority():
    """Training points on the unit circle: class 0 at 0 deg, class 1 at +-40 deg, class 2 far away. The test
    point sits at 5 deg, so cos = 0.996 to class 0's point and 0.906 / 0.643 to the two of class 1. With k = 3
    a majority vote says 1; the weighted vote compares exp(0.996/0.07) = 1.5e6 with exp(0.906/0.07) +
    exp(0.643/0.07) = 4.2e5 + 9.7e3, and says 0. At k = 1 the nearest alone decides (0). The vectors are
    scaled to other lengths: the similarity is the cosine."""
    scale = np.array([[1], [3], [0.5], [2], [1]])
    train = np.array([_at(0), _at(40), _at(-40), _at(180), _at(170)], np.float32) * scale
    labels = np.array([0, 1, 1, 2, 2])
    probe = KNNProbe(train, labels, ks=(1, 3), num_classes=3)
    x = np.array([_at(5)], np.float32) * 7
    assert probe.predict(x, 3).tolist() == [0]
    # at T = 1 the weights are nearly equal, and the two class-1 neighbours outvote the one of class 0
    assert KNNProbe(train, labels, ks=(3,), temperature=1.0, num_classes=3).predict(x, 3).tolist() == [1]
    # a point at 175 deg: its 3 nearest are 180, 170 (class 2) and 40 (class 1): class 2
    probe.add_test(np.array([_at(5), _at(175), _at(38)], np.float32), np.array([0, 2, 0]))
    out = probe.result()
    assert out["knn_top1_k1"] == pytest.approx(2 / 3)  # 38 deg's nearest is the class-1 point at 40
    assert out["knn_top1_k3"] == pytest.approx(2 / 3)
    assert out["test_images"] == 3 and out["train_images"] == 5


def test_knn_k_larger_than_the_bank_uses_every_training_point():
    train = np.array([_at(0), _at(90)], np.float32)
    probe = KNNProbe(train, np.array([0, 1]), ks=(20, 200))
    probe.add_test(np.array([_at(10), _at(80)], np.float32), np.array([0, 1]))
    assert probe.result()["knn_top1_k200"] == 1.0


def _blobs(n: int, seed: int):
    """Two Gaussian blobs in 8-d, 10 sigma apart along a direction: a hyperplane separates them exactly."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, n)
    x = rng.normal(size=(n, 8)).astype(np.float32)
    x[:, 3] += np.where(y == 1, 10.0, -10.0) + 50.0  # offset: the probe must standardise or fit a bias
    return x, y


def test_linear_probe_separates_two_gaussian_blobs_exactly():
    xtr, ytr = _blobs(400, 0)
    xte, yte = _blobs(300, 1)
    assert linear_probe_in_memory(xtr, ytr, xte, yte)["linear_top1"] == 1.0
    # labels that do not follow the blobs cannot be fitted: the score comes from the labels given
    assert linear_probe_in_memory(xtr, ytr, xte, 1 - yte)["linear_top1"] == 0.0


def test_streamed_linear_probe_separates_the_blobs_from_blocks():
    xtr, ytr = _blobs(400, 0)
    xte, yte = _blobs(300, 1)

    def blocks():
        for i in range(0, len(xtr), 128):
            yield xtr[i:i + 128], ytr[i:i + 128]

    probe = StreamedLinearProbe(num_classes=2, epochs=3, seed=0).fit(blocks)
    out = probe.score([(xte[:150], yte[:150]), (xte[150:], yte[150:])])
    assert out["linear_top1"] == 1.0 and out["train_images"] == 400 and out["test_images"] == 300
    assert probe.standardiser.mean[3] == pytest.approx(xtr[:, 3].mean(), rel=1e-5)


def test_probe_splits_are_resolved_or_refused_by_flag(tmp_path):
    """A split name needs the run's data.source; anything else must be a shard directory with labels."""
    from raydc.config import load_config
    from raydc.data.prepare import prepare
    from raydc.engine.probe import resolve_split
    from raydc.errors import UserError

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "u.npz", images=rng.integers(0, 256, (6, 8, 8), dtype=np.uint8))
    prepare("npz", tmp_path / "unlabelled", root=tmp_path / "u.npz", progress=False)
    np.savez(tmp_path / "l.npz", images=rng.integers(0, 256, (6, 8, 8), dtype=np.uint8), labels=np.arange(6) % 2)
    prepare("npz", tmp_path / "labelled", root=tmp_path / "l.npz", progress=False)
    cfg = load_config(None, [f"data.shards={tmp_path / 'unlabelled'}"])
    with pytest.raises(UserError, match="--train-split train.*data.source"):
        resolve_split(cfg, "train", "--train-split")
    with pytest.raises(UserError, match="--test-split .*nowhere.*neither a split"):
        resolve_split(cfg, str(tmp_path / "nowhere"), "--test-split")
    with pytest.raises(UserError, match="--test-split.*no labels"):
        resolve_split(cfg, str(tmp_path / "unlabelled"), "--test-split")
    _, manifest, name = resolve_split(cfg, str(tmp_path / "labelled"), "--train-split")
    assert manifest.count == 6 and name == "labelled"
