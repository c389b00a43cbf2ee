"""A method run through the engine's own control flow (`run_rounds`, `finish`, `WorkerContext.sgd_pass`) with
Ray's parts replaced by in-memory stand-ins: one worker, an identity broadcast, a clustering service over
arrays in two shards. Fast enough for many method tests; the Ray path itself has its own end-to-end tests."""
from __future__ import annotations

import numpy as np
import torch

from raydc.core import kmeans as km
from raydc.core.augment import resize_center, to_float
from raydc.engine.clustering import ClusterOutcome
from raydc.engine.loop import RankZeroContext, WorkerContext, finish, run_rounds
from raydc.engine.stream import shuffled_batches


class FakeService:
    """The clustering service's interface over in-memory arrays, in two shards (so reductions are real)."""

    def __init__(self, ids, images, labels):
        self.ids, self.images, self.labels = ids, images, labels
        self.shards: list = []

    def extract(self, spec, shard_dir, manifest, features_cfg) -> dict:
        model = spec.build()
        model.load_state_dict(spec.state)
        model.eval()
        with torch.inference_mode():
            feats = getattr(model, spec.call)(resize_center(to_float(self.images), spec.input_size)).numpy()
        half = len(self.ids) // 2
        self.shards = [(self.ids[s], feats[s], self.labels[s]) for s in (slice(0, half), slice(half, None))]
        return {"n": len(self.ids), "dim": feats.shape[1], "finite": bool(np.isfinite(feats).all())}

    def fit_projection(self, pca_dim, whiten):
        assert pca_dim == 0, "the stand-in has no PCA: test with cluster.pca_dim 0"
        return None

    def project(self, proj, l2) -> bool:
        assert proj is None
        if l2:
            self.shards = [(i, x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12), lab)
                           for i, x, lab in self.shards]
        return True

    def choose_mode(self, mode, single_max_bytes) -> str:
        return "single"

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

    def sample_features(self, n, seed):
        if not self.shards:
            return np.zeros(0, np.int64), np.zeros((0, 0), np.float32)
        ids = np.concatenate([s[0] for s in self.shards])
        x = np.concatenate([s[1] for s in self.shards])
        pick = np.random.default_rng(seed).choice(len(ids), size=min(n, len(ids)), replace=False)
        return ids[pick], x[pick]

    def release(self) -> None:
        self.shards = []

    def shutdown(self) -> None:
        self.shards = []


class FakeWorker(WorkerContext):
    """The engine's WorkerContext (its SGD pass, reductions) over one in-memory shard."""

    def __init__(self, cfg, manifest, ids, images, optimizers, in_channels: int, input_size: int | None = None):
        super().__init__(cfg, manifest, None, 0, 1, torch.device("cpu"), optimizers, in_channels, lambda m: None,
                         input_size)
        self.ids, self.images = ids, images

    def batches(self, round_idx, *, repeats=None, batch_size=None, shuffle=True, max_steps=None):
        rows = iter([{"id": self.ids, "image": self.images}])
        gen = shuffled_batches(rows, batch_size=batch_size or self.cfg.train.batch_size, seed=self.cfg.train.seed,
                               epoch=round_idx, repeats=repeats, shuffle=shuffle)
        for i, item in enumerate(gen):
            if max_steps is not None and i >= max_steps:
                return
            yield item


def run_method_in_process(method_cls, cfg, data, manifest):
    """(method, final state, every metrics row with the final one last, FinalClustering). `data` is
    (uint8 images N x H x W [x C], labels)."""
    images, labels = data
    ids = np.arange(len(labels), dtype=np.int64)
    if images.ndim == 3:
        images = images[..., None]
    method = method_cls(cfg, manifest)
    torch.manual_seed(cfg.train.seed)
    model = method.build_model()
    state = method.init_state()
    wctx = FakeWorker(cfg, manifest, ids, images, method.optimizers(model, state), method.in_channels,
                      method.input_size)
    service = FakeService(ids, images, labels)
    rctx = RankZeroContext(cfg, manifest, "unused", lambda: service, lambda m: None)
    rows: list[dict] = []
    r, state = run_rounds(method, model, state, 0, wctx=wctx, rctx=rctx, broadcast=lambda plan: plan,
                          end_round=lambda r, row, state: rows.append(row), log=lambda m: None)
    final, row = finish(method, rctx, model, state, r)
    return method, state, rows + [row], final
