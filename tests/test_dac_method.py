"""DAC as an engine method: bad configs named before work starts, a tiny run in process through the engine's
own control flow, then through the real engine (Ray Train, the feature pool, the shard actors), its resume from
a mid-run checkpoint, and `raydc assign` / `evaluate` on the result."""
from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from raydc.config import Config, load_config
from raydc.config_loader import from_dict
from raydc.errors import ConfigError
from raydc.methods.dac import DAC
from tests.helpers import K, PER_CLUSTER, SIDE, blobs
from tests.inprocess import run_method_in_process


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors


def tiny_config(shards: str, run_dir: str, **dac) -> Config:
    return from_dict(Config, {
        "method": "dac",
        "data": {"shards": shards},
        "model": {"arch": "smallconvnet", "sobel": False, "input_size": SIDE},
        "cluster": {"k": K, "pca_dim": 0, "num_shards": 2},
        "features": {"batch_size": 128},
        "train": {"num_workers": 1, "seed": 5, "torch_threads": 1, "epochs": 4},
        "dac": {"schedule": "official_cifar", "batch_size": 64, "lr": 0.003, "augment": False, **dac},
        "run": {"dir": run_dir, "montage_per_cluster": 4},
    })


def manifest_for():
    return SimpleNamespace(image_shape=[SIDE, SIDE, 1], mode="L", count=K * PER_CLUSTER, has_labels=True)


@pytest.mark.parametrize("sets,field", [
    (["dac.schedule=official_cifar", "dac.upper=0.5", "dac.lower=0.6"], "dac.upper"),  # u must start above l
    (["dac.chunk_size=100", "dac.batch_size=64", "train.num_workers=2"], "dac.chunk_size"),  # < global batch
    (["cluster.k=1"], "cluster.k"),
    (["dac.batch_size=300", "train.num_workers=2", "dac.max_global_batch=512"], "dac.batch_size"),
    (["model.arch=dac_mnist", "model.input_size=16"], "model.input_size"),
    (["model.arch=autoencoder"], "model.arch"),
    (["dac.schedule=linear"], "dac.schedule"),
])
def test_bad_config_names_the_field_at_load(sets, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, ["method=dac", "data.shards=x", *sets])


def test_shared_sgd_settings_a_dac_run_would_ignore_are_named():
    from raydc.engine.trainer import check_against_data

    said: list[str] = []
    check_against_data(tiny_config("unused", "unused"), manifest_for(), said.append)
    assert not any(line.startswith("note:") for line in said), said  # tiny_config sets none of them
    cfg = tiny_config("unused", "unused")
    cfg.train.lr, cfg.train.batch_size = 0.5, 64
    said.clear()
    check_against_data(cfg, manifest_for(), said.append)
    assert said[-1] == ("note: train.batch_size, train.lr do not apply to dac and are ignored (its own settings "
                        "are under `dac:`)"), said
    cfg.cluster.pca_dim = 32  # DAC's own value is 0 (Method.shared_defaults): a PCA it would never run
    said.clear()
    check_against_data(cfg, manifest_for(), said.append)
    assert said[-1].startswith("note: cluster.pca_dim, train.batch_size, train.lr do not apply to dac"), said


def test_tiny_run_in_process_clusters_separated_blobs():
    cfg = tiny_config("unused", "unused")
    method, state, rows, final = run_method_in_process(DAC, cfg, blobs(), manifest_for())
    train_rows, last = rows[:-1], rows[-1]
    assert len(train_rows) == 4 and last["final"]
    # the official schedule: u falls and l rises every round, by (0.99 - 0.8) / 2 / epochs
    ups = [r["upper"] for r in train_rows]
    assert ups == pytest.approx([0.99 - r * 0.19 / 8 for r in range(4)])
    assert all(0 < r["selected_pairs"] <= 1 for r in train_rows) and all(np.isfinite(r["loss"]) for r in train_rows)
    assert "nmi_prev" in train_rows[1] and "nmi_prev" in last
    assert last["acc"] > 0.9, [r.get("acc") for r in rows]  # chance is about 0.25-0.3 for 4 balanced blobs
    assert last["acc"] > train_rows[0]["acc"] + 0.2  # it learned: the untrained net's argmax is far worse
    assert sorted(final.ids.tolist()) == list(range(K * PER_CLUSTER)) and (final.distances >= 0).all()
    assert np.isfinite(last["silhouette"]) and last["stop_reason"] in ("l >= u: every pair selected",
                                                                      "train.epochs rounds")


def test_zero_epochs_reads_out_the_untrained_network():
    """`train.epochs: 0` is the untrained baseline (the probe table's "untrained" row): no training step, the
    given weights read out as clusters. A DAC that trained anyway, or refused epochs 0, fails here."""
    cfg = tiny_config("unused", "unused", schedule="official_mnist")
    cfg.train.epochs = 0
    method, _, rows, final = run_method_in_process(DAC, cfg, blobs(), manifest_for())
    assert len(rows) == 1 and rows[0]["final"]  # no training round before the readout
    assert rows[0]["stop_reason"].startswith("train.epochs 0")
    assert 0 < rows[0]["acc"] <= 1
    assert sorted(final.ids.tolist()) == list(range(K * PER_CLUSTER))
    load_config(None, ["method=dac", "data.shards=x", "train.epochs=0"])  # accepted at load


def test_same_batch_selection_and_mse_run_too():
    """`dac.loss: mse` trains on another objective than bce: same data, seed and selection, other losses (an
    ignored `loss` would give bce's rows), each a mean squared error over similarities in [0, 1]."""
    losses = {}
    for loss in ("mse", "bce"):
        cfg = tiny_config("unused", "unused", selection="same_batch", loss=loss, schedule="paper")
        cfg.train.epochs = 2
        _, _, rows, _ = run_method_in_process(DAC, cfg, blobs(), manifest_for())
        assert [r["upper"] for r in rows[:-1]] == pytest.approx([0.95, 0.95 - 0.0099])
        assert all(np.isfinite(r["loss"]) for r in rows[:-1])
        losses[loss] = [r["loss"] for r in rows[:-1]]
    assert all(0 <= v <= 1 for v in losses["mse"]), losses
    assert all(abs(m - b) > 1e-3 for m, b in zip(losses["mse"], losses["bce"])), losses


# ---- through the real engine ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, ray_local):
    from raydc.data.prepare import prepare
    from raydc.engine.trainer import run_training

    d = tmp_path_factory.mktemp("dac")
    images, labels = blobs()
    np.savez(d / "src.npz", images=images, labels=labels)
    prepare("npz", d / "shards", root=d / "src.npz", rows_per_shard=150, progress=False)
    # The MNIST recipe end to end: one threshold, MSE, chunks of 128 x 2 local epochs, batch-statistics readout,
    # on two DDP workers (gloo): Ray Data's streaming split, the chunk's targets gathered over both workers, the
    # broadcast plan and the synchronised stop, with every pair of a step spanning the global batch.
    cfg = tiny_config(str(d / "shards"), str(d / "run"), augment=True, schedule="official_mnist", chunk_size=128,
                      local_epochs=2, readout_batch=32)
    cfg.train.epochs, cfg.train.num_workers, cfg.train.cpus_per_worker = 2, 2, 0.5
    cfg.train.memory_format = "channels_last"  # not the CPU's default: assign below must follow the run's layout
    run = run_training(cfg, log=lambda *a: None)
    return cfg, run, d / "shards"


@pytest.mark.ray
# `make test-all`: a two-worker Ray Train run; the fast suite keeps DAC's DDP steps (tests/test_dac_chunks.py,
# test_dac_core.py), its rounds in process (test_resume_in_process.py) and one Ray Train run (test_object_storage.py).
@pytest.mark.slow
def test_end_to_end_run_directory_and_assign(tiny_run, tmp_path):
    import pyarrow.parquet as pq

    from raydc.engine.assign import assign_images
    from raydc.engine.evaluate import evaluate_run

    cfg, run, shards = tiny_run
    rows = run.read_metrics()
    assert [r["round"] for r in rows] == [0, 1, 2] and rows[-1]["final"]
    for r in rows[:-1]:
        assert {"loss", "upper", "lower", "selected_pairs", "time_train", "time_features", "acc"} <= set(r)
    assert rows[-1]["acc"] > 0.6
    # train.memory_format channels_last: the conv net trained and read out in it, and clustering.pt says so, so
    # that `raydc assign` below lays the network out as the run's final pass did
    assert {r["memory_format"] for r in rows} == {"channels_last"}
    assert run.load_clustering()["memory_format"] == "channels_last"
    a = run.read_assignments()
    assert sorted(a["id"].tolist()) == list(range(K * PER_CLUSTER))
    for png in ("curves.png", "phases.png", "montage.png"):
        assert (Path(run.report_dir) / png).stat().st_size > 1000, png
    # `raydc assign` puts the training images where the run did (same model, argmax of the label feature)
    path = assign_images(str(run.path), str(shards), str(tmp_path / "assigned"))
    t = pq.read_table(path)
    mine = dict(zip(t.column("id").to_pylist(), t.column("cluster").to_pylist()))
    assert all(mine[i] == c for i, c in zip(a["id"].tolist(), a["cluster"].tolist()))
    assert evaluate_run(str(run.path))["acc"] == pytest.approx(rows[-1]["acc"])


@pytest.mark.ray
# A second fit: the slowest test of `make test` was this one. Resume = uninterrupted stays in the fast suite for
# DEC (tests/test_dec_method.py, one round redone); this one, and DeepCluster's, in test-all.
@pytest.mark.slow
def test_resume_from_a_mid_run_checkpoint_gives_the_same_result(tiny_run, tmp_path):
    from raydc.engine.rundir import RunDir
    from raydc.engine.trainer import run_training

    cfg, run, _ = tiny_run
    copy = RunDir(shutil.copytree(run.path, tmp_path / "run"))
    rounds = [copy.checkpoint_round(d) for d in copy.checkpoints()]
    for d in copy.checkpoints()[1:]:
        shutil.rmtree(d)  # back to the oldest checkpoint kept (keep_checkpoints 2)
    for p in [copy.clustering_path, *copy.assignment_parts()]:
        Path(p).unlink()
    assert len(rounds) == 2 and copy.checkpoint_round() == rounds[0] < rounds[1]
    cfg.run.dir = str(copy.path)
    run_training(cfg, resume=True, log=lambda *a: None)
    a, b = run.read_assignments(), copy.read_assignments()
    assert np.array_equal(a["id"], b["id"]) and np.array_equal(a["cluster"], b["cluster"])
    ra, rb = run.read_metrics(), copy.read_metrics()
    assert [r["round"] for r in ra] == [r["round"] for r in rb]
    for key in ("loss", "selected_pairs", "acc", "nmi_prev"):
        assert [r.get(key) for r in ra] == [r.get(key) for r in rb], key


def test_the_probe_reads_the_label_features_as_the_clusters_are_read():
    """`raydc evaluate --probe` on a DAC run: batch-statistics readout when the run clustered with it (eval-mode
    BatchNorm would use running averages the clusters never saw), the plain forward under `running`."""
    for readout, call in (("batch", "batch_readout"), ("running", "forward")):
        method = DAC(tiny_config("unused", "unused", bn_readout=readout), manifest_for())
        model = method.build_model()
        spec = method.probe_extractor(model)
        run = method.extractor(model)
        assert spec.call == run.call == call and spec.batch_align == run.batch_align
