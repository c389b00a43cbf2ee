"""DEC as an engine method: the model's input mapping, the schedule, the sharded target, the stopping rule (in
process, with a stand-in for the clustering service), then one tiny run through the real engine and its
resume from an earlier checkpoint."""
from __future__ import annotations

import json
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from raydc.config import Config
from raydc.config_loader import from_dict
from raydc.core import kmeans as km
from raydc.core.augment import to_float
from raydc.core.dec import soft_assignment, target_distribution
from raydc.engine.clustering import ClusterOutcome
from raydc.engine.stream import shuffled_batches
from raydc.errors import ConfigError
from raydc.methods.dec import DEC, ROUND_EPOCHS, shard_mass, shard_targets

K, SIDE, PER_CLUSTER = 4, 8, 100


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one thread is faster and avoids OpenMP spin-waits when other jobs load the CPUs."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def blobs(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """K well-separated classes of 8x8 gray images: a random binary template per class plus pixel noise."""
    rng = np.random.default_rng(seed)
    templates = rng.random((K, SIDE, SIDE)) < 0.5
    labels = np.repeat(np.arange(K), PER_CLUSTER)
    noise = rng.normal(0, 25, (len(labels), SIDE, SIDE))
    images = np.clip(30 + 190 * templates[labels] + noise, 0, 255).astype(np.uint8)
    order = rng.permutation(len(labels))
    return images[order], labels[order]


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
    return SimpleNamespace(image_shape=[SIDE, SIDE, channels], mode="L")


# ---- in-process stand-ins for the engine's contexts ----------------------------------------------------
class FakeService:
    """The clustering service's interface over in-memory arrays, in two shards (so the reduction is real)."""

    def __init__(self, ids, images, labels):
        self.ids, self.images, self.labels = ids, images, labels
        self.shards: list = []

    def extract(self, spec) -> dict:
        model = spec.build()
        model.load_state_dict(spec.state)
        model.eval()
        with torch.inference_mode():
            feats = getattr(model, spec.call)(to_float(self.images)).numpy()
        half = len(self.ids) // 2
        self.shards = [(self.ids[s], feats[s], self.labels[s]) for s in (slice(0, half), slice(half, None))]
        return {"n": len(self.ids), "dim": feats.shape[1], "finite": bool(np.isfinite(feats).all())}

    def project(self, proj, l2) -> bool:
        assert proj is None and not l2
        return True

    def kmeans(self, k, *, niter, seed, n_init, mode):
        assert mode == "single"
        x = np.concatenate([s[1] for s in self.shards])
        res = km.kmeans(x, k, niter=niter, seed=seed, n_init=n_init, use_gpu="never")
        ids = np.concatenate([s[0] for s in self.shards])
        true = np.concatenate([s[2] for s in self.shards])
        return ClusterOutcome(ids, res.labels, res.distances, res.centroids, list(res.objective), res.n_split,
                              res.backend, "single", true)

    def apply(self, fn, *args) -> list:
        return [fn(i, x, lab, *args) for i, x, lab in self.shards]

    def release(self) -> None:
        pass


class FakeWorker:
    rank, world, device = 0, 1, torch.device("cpu")

    def __init__(self, cfg, ids, images, optimizers):
        self.cfg, self.ids, self.images, self.optimizers = cfg, ids, images, optimizers

    unwrap = staticmethod(lambda m: m)

    def batches(self, round_idx, *, repeats=None, batch_size=None, shuffle=True):
        rows = iter([{"id": self.ids, "image": self.images}])
        yield from shuffled_batches(rows, batch_size=batch_size, seed=self.cfg.train.seed, epoch=round_idx,
                                    repeats=repeats, shuffle=shuffle)

    def progress(self, *a, **kw):
        pass

    def all_reduce_sum(self, values):
        return [float(v) for v in values]


def run_in_process(cfg: Config, data, monkeypatch) -> tuple[DEC, dict, list[dict], ClusterOutcome]:
    """The engine loop's control flow (loop.py) without Ray: rank 0 plans, the worker trains, then finalize.
    The object store is a list (refs are indices)."""
    import raydc.methods.dec as dec_module

    store: list = []
    monkeypatch.setattr(dec_module, "ray", SimpleNamespace(put=lambda v: store.append(v) or len(store) - 1,
                                                           get=lambda ref: store[ref]))
    images, labels = data
    ids = np.arange(len(labels), dtype=np.int64)
    images = images[..., None]
    method = DEC(cfg, manifest_for())
    model = method.build_model()
    state = method.init_state()
    wctx = FakeWorker(cfg, ids, images, method.optimizers(model, state))
    service = FakeService(ids, images, labels)
    ctx = SimpleNamespace(service=service, extract=service.extract)
    rows, r = [], 0
    while not method.is_done(state, r):
        targets, row = method.make_targets(ctx, model, state, r)
        if targets.stop:
            break
        state.update(targets.state)
        row.update(method.train_round(wctx, model, targets, state, r))
        row.update({"round": r, "epoch": method.epoch_of(state, r)})
        rows.append(row)
        r += 1
    out, final = method.finalize(ctx, model, state, r)
    final.update({"round": r, "epoch": method.epoch_of(state, r)})
    return method, state, rows + [final], out


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
    cfg = tiny_config("unused", "unused")
    cfg.cluster.pca_dim = 2
    with pytest.raises(ConfigError, match="cluster.pca_dim"):
        DEC(cfg, manifest_for())


def test_schedule_chunks_each_stage_and_counts_epochs():
    cfg = tiny_config("unused", "unused", pretrain_epochs=7, finetune_epochs=3)
    cfg.model.ae_dims = [16, 4]
    method = DEC(cfg, manifest_for())
    state = method.init_state()
    plan, epochs = [], []
    while state["stage"] < len(method.stages()):
        targets, row = method.make_targets(None, None, state, 0)
        c = targets.values["chunk"]
        plan.append((c["phase"], c["layer"], c["start"], c["epochs"]))
        epochs.append(method.epoch_of(state, 0))
    assert plan == [("pretrain", 0, 0, ROUND_EPOCHS), ("pretrain", 0, 5, 2), ("pretrain", 1, 0, 5),
                    ("pretrain", 1, 5, 2), ("finetune", -1, 0, 3)]
    assert epochs == [5, 7, 12, 14, 17]
    assert not state["initialised"]


def test_sharded_target_equals_single_process():
    rng = np.random.default_rng(3)
    z = rng.normal(size=(50, 3)).astype(np.float32)
    centres = rng.normal(size=(K, 3)).astype(np.float32)
    ids = np.arange(50)
    shards = [(ids[:20], z[:20]), (ids[20:], z[20:])]
    mass = np.sum([shard_mass(i, x, None, centres, 1.0, K) for i, x in shards], axis=0)
    p = np.concatenate([shard_targets(i, x, None, centres, 1.0, mass)[1] for i, x in shards])
    q = soft_assignment(torch.from_numpy(z), torch.from_numpy(centres)).double().numpy()
    np.testing.assert_allclose(p, target_distribution(q), rtol=1e-5, atol=1e-6)
    assert shard_mass(ids[:0], None, None, centres, 1.0, K).shape == (K,)


def test_huge_tol_stops_at_the_second_update(monkeypatch):
    cfg = tiny_config("unused", "unused", tol=0.99)
    method, state, rows, out = run_in_process(cfg, blobs(), monkeypatch)
    dec_rows = [r for r in rows if r.get("phase") == "dec"]
    assert len(dec_rows) == 1 and dec_rows[0]["dec_update"] == 1  # k-means init + one interval of training
    assert state["n_updates"] == 2 and state["stop_reason"].startswith("converged")
    final = rows[-1]
    assert final["phase"] == "final" and final["dec_iterations"] == dec_rows[0]["dec_steps"] > 0
    assert {"ae_kmeans_acc", "ae_kmeans_nmi", "ae_kmeans_ari", "acc", "nmi", "ari"} <= set(final)
    assert [r["epoch"] for r in rows] == sorted({r["epoch"] for r in rows})  # strictly increasing
    assert sorted(out.ids.tolist()) == list(range(K * PER_CLUSTER))


def test_zero_tol_runs_to_max_iterations(monkeypatch):
    cfg = tiny_config("unused", "unused", tol=0.0, max_iterations=10, pretrain_epochs=0, finetune_epochs=1)
    method, state, rows, out = run_in_process(cfg, blobs(), monkeypatch)
    assert state["stop_reason"].startswith("max_iterations")
    assert state["dec_iter"] >= 10 and state["n_updates"] >= 3
    assert all(np.isfinite(r["loss"]) for r in rows if "loss" in r)
    assert rows[-1]["acc"] > 0.9  # well-separated blobs


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


@pytest.mark.ray
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
        assert (run.report_dir / png).stat().st_size > 0
    assert json.loads(run.metrics_path.read_text().splitlines()[-1])["phase"] == "final"


@pytest.mark.ray
def test_resume_from_an_earlier_checkpoint_gives_the_same_result(tiny_run, tmp_path):
    from raydc.engine.rundir import RunDir
    from raydc.engine.trainer import run_training

    cfg, run = tiny_run
    copy = RunDir(shutil.copytree(run.path, tmp_path / "run"))
    # Drop the last checkpoint (the DEC round): the resumed run redoes k-means, the round and the final update.
    copy.latest_checkpoint().unlink()
    assert copy.latest_checkpoint().name == "round-0002.pt"
    cfg.run.dir = str(copy.path)
    run_training(cfg, resume=True, log=lambda *a: None)
    a, b = run.read_assignments(), copy.read_assignments()
    assert np.array_equal(a["id"], b["id"]) and np.array_equal(a["cluster"], b["cluster"])
    np.testing.assert_array_equal(a["distance"], b["distance"])
    ra, rb = run.read_metrics(), copy.read_metrics()
    assert [r["round"] for r in ra] == [r["round"] for r in rb]
    for key in ("loss", "ae_kmeans_acc", "acc"):
        assert [r.get(key) for r in ra] == [r.get(key) for r in rb]
