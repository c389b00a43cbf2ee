"""Resume = uninterrupted for each method, in process: every round's checkpoint saved by the functions the engine's
loop saves with for Ray Train (`checkpoint_contents`: model, method state through `to_plain`, optimizers), then a
run continued from an earlier one, restored by the loop's own `restore_model_and_state` and `restore_optimizers`,
must give the same rows and clusters to the bit. The Ray path (Ray Train's checkpoint storage, a new worker group,
S3) is `make test-all`'s: the resume tests of test_engine_deepcluster, test_dec_method, test_dac_method and
test_object_storage."""
from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest

from raydc.config import Config
from raydc.config_loader import from_dict
from raydc.methods.dac import DAC
from raydc.methods.dec import DEC
from raydc.methods.deepcluster import DeepCluster
from tests.helpers import K, PER_CLUSTER, SIDE, blobs
from tests.inprocess import run_method_in_process

pytestmark = pytest.mark.usefixtures("one_torch_thread")

COMMON = {"data": {"shards": "unused"}, "features": {"batch_size": 128},
          "train": {"num_workers": 1, "seed": 5, "torch_threads": 1}, "run": {"montage_per_cluster": 4}}
# name: (method, its config sections, the round whose checkpoint the resumed run starts after)
SETTINGS = {
    # k-means pseudo-labels, the head reset each round, SGD with momentum: 3 rounds, resumed after round 0
    "deepcluster": (DeepCluster, {"model": {"arch": "smallconvnet", "sobel": False, "input_size": SIDE,
                                            "feature_dim": 32},
                                  "cluster": {"k": K, "pca_dim": 0, "num_shards": 2},
                                  "train": {"epochs": 3, "batch_size": 32, "hflip": False}}, 0),
    # greedy pretraining (rounds 0-1), fine-tuning (2), then k-means init and KL rounds: resumed after the
    # fine-tuning round, so the resumed run redoes the k-means init and every KL round
    "dec": (DEC, {"model": {"input_size": SIDE, "ae_dims": [16, 4]},
                  "cluster": {"k": K, "pca_dim": 0, "n_init": 3, "niter": 20, "num_shards": 2},
                  "dec": {"pretrain_epochs": 1, "finetune_epochs": 1, "pretrain_optimizer": "adam",
                          "pretrain_lr": 1e-3, "pretrain_batch_size": 32, "batch_size": 32, "update_interval": 4,
                          "tol": 0.0, "max_iterations": 24}}, 2),
    # the MNIST recipe (one threshold, MSE, chunks x local epochs, augmentation, RMSprop): resumed after round 0
    "dac": (DAC, {"model": {"arch": "smallconvnet", "sobel": False, "input_size": SIDE},
                  "cluster": {"k": K, "pca_dim": 0, "num_shards": 2}, "train": {"epochs": 3},
                  "dac": {"schedule": "official_mnist", "batch_size": 64, "lr": 0.003, "augment": True,
                          "chunk_size": 128, "local_epochs": 2, "readout_batch": 32}}, 0),
}


def _config(name: str, run_dir: str) -> Config:
    _, own, _ = SETTINGS[name]
    merged = {k: dict(v) for k, v in COMMON.items()}
    for section, values in own.items():
        merged.setdefault(section, {}).update(values)
    merged["run"]["dir"] = run_dir
    return from_dict(Config, {"method": name, **merged})


def _same(a, b) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


TIMING = ("time_", "memory", "features_clock", "images_per_s")


@pytest.mark.parametrize("name", list(SETTINGS))
def test_a_run_resumed_from_an_earlier_round_ends_as_the_uninterrupted_one(name, tmp_path):
    cls, _, back_to = SETTINGS[name]
    manifest = SimpleNamespace(image_shape=[SIDE, SIDE, 1], mode="L", count=K * PER_CLUSTER, has_labels=True)
    whole = run_method_in_process(cls, _config(name, str(tmp_path / "run")), blobs(), manifest,
                                  checkpoints=str(tmp_path / "ckpt"))
    redone = [r for r in whole[2] if r["round"] > back_to or r.get("final")]
    assert len(redone) >= 3, [r["round"] for r in whole[2]]  # at least two rounds and the final redone
    resumed = run_method_in_process(cls, _config(name, str(tmp_path / "run")), blobs(), manifest,
                                    resume_from=str(tmp_path / "ckpt" / f"round-{back_to}"))
    b_rows = resumed[2]
    assert [r["round"] for r in b_rows] == [r["round"] for r in redone]
    for a, b in zip(redone, b_rows):
        keys = {k for k in a if not k.startswith(TIMING)}
        assert keys == {k for k in b if not k.startswith(TIMING)}
        for k in keys:
            assert _same(a[k], b[k]), (a["round"], k, a[k], b[k])
    assert np.array_equal(whole[3].ids, resumed[3].ids) and np.array_equal(whole[3].labels, resumed[3].labels)
    np.testing.assert_array_equal(whole[3].distances, resumed[3].distances)
