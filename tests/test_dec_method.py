"""DEC as an engine method: the model's input mapping, the schedule, the sharded target, the stopping rule (in
process, with a stand-in for the clustering service), then one tiny run through the real engine and its
resume from an earlier checkpoint."""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from raydc.config import Config
from raydc.config_loader import from_dict
from raydc.core.augment import to_float
from raydc.core.dec import soft_assignment, target_distribution
from raydc.core.dec import shard_mass, shard_targets
from raydc.methods.api import ShardView
from raydc.errors import ConfigError
from raydc.methods.dec import DEC, ROUND_EPOCHS, AutoencoderChunk
from tests.helpers import K, PER_CLUSTER, SIDE, blobs
from tests.inprocess import assign_in_process, run_method_in_process

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors


def tiny_config(shards: str, run_dir: str, **dec) -> Config:
    return from_dict(Config, {
        "method": "dec",
        "data": {"shards": shards},
        "model": {"input_size": SIDE, "ae_dims": [32, 16, 4]},
        "cluster": {"k": K, "pca_dim": 0, "n_init": 3, "niter": 20, "num_shards": 2},
        "features": {"batch_size": 128},
        "train": {"num_workers": 1, "seed": 5, "torch_threads": 1},
        "dec": {"pretrain_epochs": 1, "finetune_epochs": 1, "pretrain_optimizer": "adam", "pretrain_lr": 1e-3,
                "pretrain_batch_size": 32, "batch_size": 32, "update_interval": 4, "tol": 0.99,
                "max_iterations": 1000, **dec},
        "run": {"dir": run_dir, "montage_per_cluster": 4},
    })


def manifest_for(channels: int = 1):
    return SimpleNamespace(image_shape=[SIDE, SIDE, channels], mode="L", count=K * PER_CLUSTER, has_labels=True)


def run_in_process(cfg: Config, data):
    return run_method_in_process(DEC, cfg, data, manifest_for())


# ---- unit tests -----------------------------------------------------------------------------------------
def test_model_undoes_the_engine_normalisation_once():
    cfg = tiny_config("unused", "unused")
    model = DEC(cfg, manifest_for()).build_model()
    u8 = np.random.default_rng(1).integers(0, 256, (5, SIDE, SIDE, 1), dtype=np.uint8)
    pixels = torch.from_numpy(u8).float().div(255).flatten(1)  # HWC with C = 1 flattens like CHW
    with torch.no_grad():
        torch.testing.assert_close(model.embed(to_float(u8)), model.ae.encode(pixels), rtol=1e-5, atol=1e-5)
        q = model.soft_assign(to_float(u8))
    assert q.shape == (5, K) and torch.allclose(q.sum(1), torch.ones(5))


def test_pca_must_be_off():
    with pytest.raises(ConfigError, match="cluster.pca_dim"):
        from_dict(Config, {"method": "dec", "data": {"shards": "x"}, "cluster": {"pca_dim": 2}})


def autoencoder_plan(method: DEC, state) -> list[tuple]:
    """Plan rounds until the autoencoder stages are over: (phase, layer, start, epochs, epoch_of) each."""
    out = []
    while any(total > (state.stage_epoch if i == state.stage else 0)
              for i, (_, _, total) in enumerate(method.stages()) if i >= state.stage):
        plan, _ = method.plan(None, None, state, 0)  # the k-means round would need a service: stop before it
        c = plan.targets
        assert isinstance(c, AutoencoderChunk)
        out.append((c.phase, c.layer, c.start, c.epochs, method.epoch_of(state, 0)))
    return out


def test_schedule_chunks_each_stage_and_counts_epochs():
    cfg = tiny_config("unused", "unused", pretrain_epochs=7, finetune_epochs=3)
    cfg.model.ae_dims = [16, 4]
    method = DEC(cfg, manifest_for())
    state = method.init_state()
    assert autoencoder_plan(method, state) == [
        ("pretrain", 0, 0, ROUND_EPOCHS, 5), ("pretrain", 0, 5, 2, 7), ("pretrain", 1, 0, 5, 12),
        ("pretrain", 1, 5, 2, 14), ("finetune", -1, 0, 3, 17)]
    assert not state.initialised


def test_a_shortened_stage_ends_at_its_new_budget():
    """`dec.finetune_epochs` may change on --resume: a stage already past its new budget is skipped, one short
    of it gets only the epochs left, and empty stages never plan a round."""
    cfg = tiny_config("unused", "unused", pretrain_epochs=0, finetune_epochs=12)
    cfg.model.ae_dims = [16, 4]
    method = DEC(cfg, manifest_for())
    state = method.init_state()
    first, _ = method.plan(None, None, state, 0)
    assert (first.targets.phase, first.targets.start, first.targets.epochs) == ("finetune", 0, 5)
    method.opts.finetune_epochs = 7  # as a resumed run with a shorter budget would see it
    assert autoencoder_plan(method, state) == [("finetune", -1, 5, 2, 7)]
    method.opts.finetune_epochs = 4  # already past it: nothing left to plan
    assert autoencoder_plan(method, state) == []


def test_sharded_target_equals_single_process():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(50, 3)).astype(np.float32)
    centres = rng.normal(size=(K, 3)).astype(np.float32)
    ids = np.arange(50)
    shards = [ShardView(ids[:20], ids[:20], z[:20], None, {}), ShardView(ids[20:], ids[20:], z[20:], None, {})]
    mass = np.sum([shard_mass(v, centres, 1.0, K) for v in shards], axis=0)
    assert all(shard_targets(v, centres, 1.0, mass) for v in shards)
    p = np.concatenate([v.cols["p"] for v in shards])
    q = soft_assignment(torch.from_numpy(z), torch.from_numpy(centres)).double().numpy()
    np.testing.assert_allclose(p, target_distribution(q), rtol=1e-5, atol=1e-6)
    assert np.array_equal(np.concatenate([v.cols["pred"] for v in shards]), q.argmax(axis=1))
    assert shard_mass(ShardView(ids[:0], ids[:0], None, None, {}), centres, 1.0, K).shape == (K,)


def test_huge_tol_stops_at_the_second_update():
    cfg = tiny_config("unused", "unused", tol=0.99)
    method, state, rows, out = run_in_process(cfg, blobs())
    dec_rows = [r for r in rows if r.get("phase") == "dec"]
    assert len(dec_rows) == 1 and dec_rows[0]["dec_update"] == 1  # k-means init + one interval of training
    assert state.n_updates == 2 and state.stop_reason.startswith("converged")
    final = rows[-1]
    assert final["phase"] == "final" and final["dec_iterations"] == dec_rows[0]["dec_steps"] > 0
    assert {"ae_kmeans_acc", "ae_kmeans_nmi", "ae_kmeans_ari", "acc", "nmi", "ari"} <= set(final)
    # the label-free score for choosing k, measured on the embedding before DEC (K separated blobs: reproducible)
    assert 0.5 < final["ae_kmeans_stability"] <= 1.0, final["ae_kmeans_stability"]
    assert [r["epoch"] for r in rows] == sorted({r["epoch"] for r in rows})  # strictly increasing
    assert sorted(out.ids.tolist()) == list(range(K * PER_CLUSTER))


def test_zero_tol_runs_to_exactly_max_iterations():
    cfg = tiny_config("unused", "unused", tol=0.0, max_iterations=10, pretrain_epochs=0, finetune_epochs=1)
    method, state, rows, out = run_in_process(cfg, blobs())
    assert state.stop_reason.startswith("max_iterations")
    # rounds of update_interval (4) steps in expectation, the last one cut to what is left: exactly 10, not more
    steps = [r["dec_steps"] for r in rows if "dec_steps" in r]
    assert state.dec_iter == 10 and sum(steps) == 10 and len(steps) >= 2
    # NMI with the previous update on every update after the first, and the last one's on the final row
    updates = [r for r in rows if "dec_update" in r]
    assert "nmi_prev" not in updates[0] and all(0 <= r["nmi_prev"] <= 1 for r in updates[1:])
    assert rows[-1]["nmi_prev"] == updates[-1]["nmi_prev"]
    assert state.n_updates >= 3
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert rows[-1]["acc"] > 0.9  # well-separated blobs


def test_a_small_dataset_updates_the_target_at_least_once_a_pass():
    """160 iterations of batch 256 are half a pass over MNIST but 29 passes over 1,400 images (uncapped by
    default: the cap was measured worse)."""
    cfg = tiny_config("unused", "unused", update_interval=160, batch_size=256)
    method = DEC(cfg, manifest_for())
    assert method.update_steps(1_400) == 160
    method.opts.max_update_epochs = 1.0
    assert method.update_steps(70_000) == 160
    assert method.update_steps(1_400) == 6  # ceil(1400 / 256)
    method.opts.max_update_epochs = 3.0
    assert method.update_steps(1_400) == 17
    cfg.train.num_workers = 2  # a pass is shared by the workers' global batch
    assert method.update_steps(1_400) == 9


def _update_with_q(method: DEC, q: np.ndarray, state, prev: np.ndarray):
    """One target update (`DEC._targets`) over q's held in two in-process shards, as the actors would hold them;
    `prev` (the last update's labels) saved where the state says."""
    import tempfile

    from raydc.engine.clustering import local_service
    from raydc.engine.contexts import RankZeroContext

    ids = np.arange(len(q))
    service = local_service(2)
    half = len(q) // 2
    service.load([{"row": ids[:half], "id": ids[:half], "feature": q[:half]},   # one block per shard
                  {"row": ids[half:], "id": ids[half:], "feature": q[half:]}])
    method.cfg.run.dir = tempfile.mkdtemp()
    ctx = RankZeroContext(method.cfg, SimpleNamespace(has_labels=False), "unused", lambda: service, print)
    service.apply(_set_prev, prev)
    state.pred_path = ctx.save_column("prev", "labels", 4)
    return method._targets(ctx, state, 5, None, n=len(q), row={})


def _set_prev(view, prev):
    view.cols["prev"] = prev[view.rows]


@pytest.mark.parametrize("growth,stops", [(2.0, True), (0.0, False), (4.0, False)])
def test_collapse_guard_stops_when_one_cluster_swallows_the_others(growth, stops):
    cfg = tiny_config("unused", "unused", collapse_growth=growth, tol=0.0)
    method = DEC(cfg, manifest_for())
    n = 400
    pred = np.repeat(np.arange(K), n // K)
    pred[: int(0.6 * n)] = 0          # 60 % of the images in cluster 0, after 25 % at k-means (K = 4)
    q = np.full((n, K), 0.02, np.float32)
    q[np.arange(n), pred] = 1 - 0.02 * (K - 1)
    state = method.init_state()
    state.initialised, state.n_updates, state.init_largest_share = True, 3, 0.25
    plan = _update_with_q(method, q, state, pred.copy())
    assert (plan.stop is not None) == stops, plan.stop
    if stops:
        assert plan.stop.startswith("collapse guard") and "60.0%" in plan.stop and "dec.collapse_growth" in plan.stop


def test_bad_guard_settings_name_the_field():
    with pytest.raises(ConfigError, match=r"dec\.collapse_growth"):
        from_dict(Config, {"method": "dec", "data": {"shards": "x"}, "cluster": {"pca_dim": 0},
                           "dec": {"collapse_growth": 0.5}})
    with pytest.raises(ConfigError, match=r"dec\.max_update_epochs"):
        from_dict(Config, {"method": "dec", "data": {"shards": "x"}, "cluster": {"pca_dim": 0},
                           "dec": {"max_update_epochs": -1}})


# ---- through the real engine ----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, ray_local):
    from raydc.data.prepare import prepare
    from raydc.engine.trainer import run_training

    d = tmp_path_factory.mktemp("dec")
    images, labels = blobs()
    np.savez(d / "src.npz", images=images, labels=labels)
    prepare("npz", d / "shards", root=d / "src.npz", rows_per_shard=150, progress=False)
    cfg = tiny_config(str(d / "shards"), str(d / "run"))
    cfg.model.ae_dims = [16, 4]  # two greedy rounds, not three: each round through Ray costs seconds
    run = run_training(cfg, log=lambda *a: None)
    return cfg, run


# DEC through Ray Train (its phases on the Train workers, its k-means init on the shard actors) and its resume
# from Ray Train's checkpoint: `make test-all`. The fast suite runs DEC's rounds through the engine's own control
# flow in process (above; tests/test_resume_in_process.py for resume = uninterrupted), and the Ray path itself
# through DAC's and DeepCluster's runs.
@pytest.mark.ray
@pytest.mark.slow
def test_end_to_end_run_directory(tiny_run):
    cfg, run = tiny_run
    rows = run.read_metrics()
    phases = [r.get("phase") for r in rows]
    assert phases == ["pretrain", "pretrain", "finetune", "dec", "final"]
    assert [r["layer"] for r in rows[:2]] == [0, 1]
    for r in rows[:-1]:
        assert np.isfinite(r["loss"]) and any(k.startswith("time_") for k in r) and "epoch" in r
    init = rows[3]
    assert {"ae_kmeans_acc", "ae_kmeans_nmi", "ae_kmeans_ari", "time_kmeans", "time_features",
            "time_train"} <= set(init)
    final = rows[-1]
    assert final["final"] and final["stop_reason"].startswith("converged")
    assert final["ae_kmeans_acc"] == init["ae_kmeans_acc"]
    assert {"acc", "nmi", "ari", "delta_label", "dec_iterations"} <= set(final)
    assert final["acc"] > 0.9 and final["dec_iterations"] > 0
    a = run.read_assignments()
    assert sorted(a["id"].tolist()) == list(range(K * PER_CLUSTER))
    assert set(np.unique(a["cluster"])) <= set(range(K)) and (a["distance"] >= 0).all()
    for png in ("curves.png", "phases.png", "montage.png"):
        assert (Path(run.report_dir) / png).stat().st_size > 0
    assert json.loads(Path(run.metrics_path).read_text().splitlines()[-1])["phase"] == "final"


@pytest.mark.ray
@pytest.mark.slow
def test_assign_and_evaluate_after_a_dec_run(tiny_run, tmp_path):
    """`raydc assign` crashed on every DEC run (it assumed centroids): DEC now assigns by argmax q itself, and on
    the training images it reproduces the run's own final assignment and distances."""
    import pyarrow.parquet as pq

    from raydc.engine.assign import assign_images
    from raydc.engine.evaluate import evaluate_run

    cfg, run = tiny_run
    path = assign_images(str(run.path), cfg.data.shards, str(tmp_path / "assigned.parquet"))
    t = pq.read_table(path).sort_by("id")
    a = run.read_assignments()
    order = np.argsort(a["id"])
    np.testing.assert_array_equal(t.column("cluster").to_numpy(), a["cluster"][order])
    np.testing.assert_allclose(t.column("distance").to_numpy(), a["distance"][order], atol=1e-6)
    assert evaluate_run(str(run.path))["acc"] == pytest.approx(run.read_metrics()[-1]["acc"])


@pytest.mark.ray
@pytest.mark.slow
def test_resume_from_an_earlier_checkpoint_gives_the_same_result(tiny_run, tmp_path):
    from raydc.engine.rundir import RunDir
    from raydc.engine.trainer import run_training

    cfg, run = tiny_run
    copy = RunDir(shutil.copytree(run.path, tmp_path / "run"))
    # Drop the last checkpoint (the DEC round): the resumed run redoes k-means, the round and the final update.
    shutil.rmtree(copy.latest_checkpoint())
    assert copy.checkpoint_round() == 2
    cfg.run.dir = str(copy.path)
    run_training(cfg, resume=True, log=lambda *a: None)
    a, b = run.read_assignments(), copy.read_assignments()
    assert np.array_equal(a["id"], b["id"]) and np.array_equal(a["cluster"], b["cluster"])
    np.testing.assert_array_equal(a["distance"], b["distance"])
    ra, rb = run.read_metrics(), copy.read_metrics()
    assert [r["round"] for r in ra] == [r["round"] for r in rb]
    for key in ("loss", "ae_kmeans_acc", "acc"):
        assert [r.get(key) for r in ra] == [r.get(key) for r in rb]


@pytest.mark.parametrize("preset", ["dec_mnist_keras.yaml", "dec_fmnist_keras.yaml"])
def test_the_dec_keras_preset_pretrains_end_to_end_with_sgd_and_no_dropout(preset):
    """jobs/configs/dec_{mnist,fmnist}_keras.yaml: one 300-epoch end-to-end stage (no greedy pairs), SGD lr 1
    momentum 0.9 in batches of 256, no dropout, VarianceScaling(1/3, fan_in, uniform) weights with zero biases."""
    from raydc.config import load_config
    from tests.conftest import REPO

    cfg = load_config(str(REPO / "jobs" / "configs" / preset))
    method = DEC(cfg, SimpleNamespace(image_shape=[28, 28, 1], mode="L", count=70_000, has_labels=True))
    assert [(phase, epochs) for phase, _, epochs in method.stages() if epochs] == [("finetune", 300)]
    model = method.build_model()
    assert model.ae.corruption == 0.0 and cfg.dec.pretrain_batch_size == 256
    opt = method.optimizers(model, method.init_state())["finetune"]
    assert isinstance(opt, torch.optim.SGD)
    assert opt.defaults["lr"] == 1.0 and opt.defaults["momentum"] == 0.9
    first = model.ae.encoder_layers[0]
    assert first.weight.abs().max() <= (1.0 / first.in_features) ** 0.5 and not first.bias.any()


# ---- a pretrained start ---------------------------------------------------------------------------------
def _dec_net_file(tmp_path, k: int, seed: int = 99) -> tuple[Path, dict]:
    """A DEC network's state dict, saved as a user would save one: the autoencoder plus its k centres."""
    cfg = tiny_config("unused", "unused")
    cfg.cluster.k, cfg.train.seed = k, seed
    torch.manual_seed(seed)
    net = DEC(cfg, manifest_for()).build_model()
    path = tmp_path / "dec_net.pt"
    torch.save(net.state_dict(), path)
    return path, net.state_dict()


def test_a_pretrained_autoencoder_starts_a_run_at_another_k(tmp_path):
    """model.weights without a backbone: the autoencoder comes from the file and the centres do not (the file's
    are for k = 3, this run's for k = 5), so a sweep over k can pretrain once."""
    path, saved = _dec_net_file(tmp_path, k=3)
    cfg = tiny_config("unused", "unused")
    cfg.cluster.k, cfg.model.weights = 5, str(path)
    method = DEC(cfg, manifest_for())
    method.validate_config(cfg)
    model = method.build_model()
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    method.load_initial_weights(model)
    got = model.state_dict()
    for key, value in saved.items():
        if key.startswith("ae."):
            assert torch.equal(got[key], value), key
    assert got["cluster.centers"].shape == (5, 4) and torch.equal(got["cluster.centers"], fresh["cluster.centers"])
    assert not torch.equal(got["ae.encoder_layers.0.weight"], fresh["ae.encoder_layers.0.weight"])


def test_a_pretrained_start_skips_pretraining_and_clusters_the_files_embedding(tmp_path):
    """With both pretraining budgets at 0 the run's first round is the k-means start, and it clusters the file's
    embedding: the same seed without the file (its own random autoencoder) starts from another objective."""
    path, _ = _dec_net_file(tmp_path, k=K)
    data = blobs()
    starts = []
    for weights in (str(path), None):
        cfg = tiny_config("unused", "unused", pretrain_epochs=0, finetune_epochs=0, max_iterations=0)
        cfg.model.weights = weights
        _, _, rows, _ = run_in_process(cfg, data)
        assert not {"pretrain", "finetune"} & {r.get("phase") for r in rows}
        assert rows[-1]["stop_reason"].startswith("max_iterations")
        starts.append(rows[-1]["ae_kmeans_objective"])
    assert starts[0] != starts[1]


def test_a_pretrained_start_refuses_what_does_not_fit(tmp_path):
    """An autoencoder of other sizes, and freezing with no backbone to freeze, are refused naming the field."""
    path, _ = _dec_net_file(tmp_path, k=K)
    cfg = tiny_config("unused", "unused")
    cfg.model.ae_dims, cfg.model.weights = [32, 8], str(path)
    method = DEC(cfg, manifest_for())
    with pytest.raises(ConfigError, match="model.weights"):
        method.load_initial_weights(method.build_model())
    cfg = tiny_config("unused", "unused")
    cfg.model.freeze = "trunk"
    with pytest.raises(ConfigError, match="model.freeze"):
        DEC.validate_config(cfg)


def test_the_q_readout_is_the_default_and_assign_still_uses_argmax_q():
    """Without the field a run delivers argmax q (the paper's DEC) and keeps no sample; assign agrees with it."""
    data = blobs()
    method, _, rows, final = run_in_process(tiny_config("unused", "unused", max_iterations=8), data)
    assert final.final.col == "pred" and "vote_sample" not in final.artifacts and "dec_acc" not in rows[-1]
    _, labels = assign_in_process(method, final.model, final.artifacts, data)
    assert np.array_equal(labels, final.labels)


@pytest.mark.parametrize("field,value", [("readout_sample", 0), ("readout_dims", 1), ("readout_neighbors", 1),
                                         ("readout_vote", 0), ("readout_restarts", 0), ("readout", "tsne")])
def test_bad_readout_settings_name_the_field(field, value):
    with pytest.raises(ConfigError, match=f"dec.{field}"):
        tiny_config("unused", "unused", **{field: value}).validate()
