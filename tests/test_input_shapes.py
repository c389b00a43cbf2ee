"""Any image size and channel count: the network's input side comes from the manifest unless
`model.input_size` sets one, every method runs unchanged on 16 px grayscale and 32 px RGB, and a size the
network cannot take is an error naming the field (never a shape traceback from deep inside a worker)."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from raydc.config import load_config
from raydc.errors import ConfigError
from raydc.methods import build_method, method_class
from tests.helpers import classes_of_images
from tests.inprocess import run_method_in_process

K, PER_CLASS = 3, 40

pytestmark = pytest.mark.usefixtures("one_torch_thread")

METHOD_SETS = {
    "deepcluster": ["cluster.pca_dim=0", "train.epochs=2", "train.batch_size=32", "train.hflip=false",
                    "model.feature_dim=32"],
    "dec": ["cluster.pca_dim=0", "cluster.n_init=2", "model.ae_dims=[32,16,3]", "dec.pretrain_epochs=1",
            "dec.finetune_epochs=1", "dec.pretrain_optimizer=adam", "dec.pretrain_lr=0.001",
            "dec.pretrain_batch_size=32", "dec.batch_size=32", "dec.update_interval=4", "dec.tol=0.99",
            "dec.max_iterations=8"],
    "dac": ["cluster.pca_dim=0", "model.sobel=false", "model.feature_dim=32", "train.epochs=2",
            "dac.batch_size=32", "dac.augment=false"],
}


def manifest(shape, mode="L", count=K * PER_CLASS):
    return SimpleNamespace(image_shape=shape, mode=mode, count=count, has_labels=True)


def config(method: str, *extra: str):
    return load_config(None, [f"method={method}", "data.shards=unused", f"cluster.k={K}", "cluster.num_shards=2",
                              "train.torch_threads=1", "train.seed=3", *METHOD_SETS[method], *extra])


@pytest.mark.parametrize("method", sorted(METHOD_SETS))
@pytest.mark.parametrize("side,channels", [(16, 1), (32, 3)])
def test_every_method_runs_at_the_images_own_size(method, side, channels):
    cfg = config(method)
    assert cfg.model.input_size is None  # nothing in the config says 28
    m = manifest([side, side, channels], "L" if channels == 1 else "RGB")
    images, labels = classes_of_images(side, channels)
    meth, _, rows, final = run_method_in_process(method_class(method), cfg, (images, labels), m)
    assert meth.input_size == side and meth.in_channels == channels
    assert meth.describe_input() == f"network input {side}x{side}x{channels} (from the manifest)"
    if method == "dec":
        assert meth.input_dim == side * side * channels  # the autoencoder's input follows the data
    assert rows[-1]["final"] and sorted(final.ids.tolist()) == list(range(len(labels)))
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)


def test_a_set_size_resizes_and_the_log_says_what_the_images_are():
    cfg = config("deepcluster", "model.input_size=24")
    m = manifest([16, 16, 1])
    images, labels = classes_of_images(16, 1)
    meth, _, rows, _ = run_method_in_process(method_class("deepcluster"), cfg, (images, labels), m)
    assert meth.input_size == 24
    assert meth.describe_input() == "network input 24x24x1 (model.input_size; the images are 16x16x1)"
    assert rows[-1]["final"]


def test_non_square_images_take_their_shorter_side():
    assert build_method(config("deepcluster"), manifest([20, 28, 3], "RGB")).input_size == 20


def test_mixed_sizes_need_a_size_and_the_error_names_the_field():
    with pytest.raises(ConfigError, match=r"model\.input_size.*mixed sizes"):
        build_method(config("deepcluster"), manifest(None, "RGB"))
    assert build_method(config("deepcluster", "model.input_size=32"), manifest(None, "RGB")).input_size == 32


@pytest.mark.parametrize("method,sets", [
    ("deepcluster", ["model.arch=alexnet"]),
    ("dac", ["model.arch=dac_mnist"]),
])
def test_a_network_too_big_for_the_images_names_the_field(method, sets):
    meth = build_method(config(method, *sets), manifest([16, 16, 1]))
    with pytest.raises(ConfigError, match=r"model\.input_size.*16x16x1"):
        meth.check_data()


# ---- a folder of mixed sizes through the real engine ------------------------------------------------------
def test_mixed_size_folder_without_a_size_fails_before_any_work(mixed_folder_shards, tmp_path):
    from raydc.engine.trainer import run_training

    cfg = load_config(None, [f"data.shards={mixed_folder_shards}", f"run.dir={tmp_path / 'run'}", "cluster.k=3"])
    with pytest.raises(ConfigError, match=r"model\.input_size"):
        run_training(cfg, log=lambda *a: None)
    assert not (tmp_path / "run").exists()


@pytest.mark.ray
@pytest.mark.slow  # a whole run per method; the fast suite's CLI test runs DeepCluster's
# first round on this folder (tests/test_cli_run.py)
@pytest.mark.parametrize("method", ["deepcluster", "dec", "dac"])
def test_mixed_size_folder_runs_through_the_engine(ray_local, mixed_folder_shards, tmp_path, method):
    from raydc.engine.trainer import run_training

    cfg = config(method, f"data.shards={mixed_folder_shards}", f"run.dir={tmp_path / 'run'}",
                 "model.input_size=20", "features.batch_size=32", "run.montage_per_cluster=4",
                 "train.batch_size=16", "dac.batch_size=16", "dac.chunk_size=32", "dec.batch_size=16",
                 "dec.pretrain_batch_size=16")
    lines: list[str] = []
    run = run_training(cfg, log=lines.append)
    assert "network input 20x20x3 (model.input_size; the images are mixed sizes, RGB)" in lines
    rows = run.read_metrics()
    assert rows[-1]["final"] and sum(rows[-1]["size_histogram"]) == 72
    assert (Path(run.report_dir) / "montage.png").exists()
