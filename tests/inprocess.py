"""A method run through the engine's own control flow (`run_rounds`, `finish`, `WorkerContext.sgd_pass`) with
Ray's parts replaced by in-process stand-ins: one worker, an identity broadcast, and the engine's own clustering
service and shard code (`ClusteringService` over `ShardStore`s called in process), with only the feature pool
replaced by a direct forward pass over in-memory images. Fast enough for many method tests; the Ray path itself
has its own end-to-end tests."""
from __future__ import annotations

import atexit
import shutil
import tempfile

import numpy as np
import torch

from raydc.core.augment import resize_center, to_float
from raydc.core.precision import in_memory_format
from raydc.engine.clustering import ClusteringService, LocalShard, ShardStore
from raydc.engine.feature_pass import FeaturePass
from raydc.core.extractor import build_network, keep_mask, reduce_features
from raydc.engine.contexts import RankZeroContext, WorkerContext
from raydc.engine.loop import finish, run_arithmetic, run_rounds
from raydc.engine.round_checkpoint import (checkpoint_contents, load_round_checkpoint, restore_model_and_state,
                                          restore_optimizers, save_round_checkpoint)
from raydc.core.stream import shuffled_batches

PIECES = 4  # blocks of contiguous rows, spread round-robin over the shards as the real pool's pieces are


class InProcessService(ClusteringService):
    """The real service and shard code over two in-process shards; the pool is a forward pass."""

    def __init__(self, ids, images, labels, num_shards: int = 2):
        super().__init__(num_shards, log=lambda m: None,
                         shards=[LocalShard(ShardStore(in_ray=False)) for _ in range(num_shards)])
        self.features = InProcessPass(self.shard_set, ids, images, labels)


class InProcessPass(FeaturePass):
    """The engine's feature pass (sampled PCA, projection, loading the shards) whose pool is a forward pass."""

    def __init__(self, shard_set, ids, images, labels):
        super().__init__(shard_set)
        self.ids, self.images, self.labels = ids, images, labels
        self.rows = np.arange(len(ids), dtype=np.int64)

    def _run_pool(self, spec, shard_dir, manifest, f) -> list:
        model = build_network(spec)  # as the engine's pools lay it out
        r = spec.reduction
        blocks = []
        for sel in np.array_split(np.arange(len(self.ids)), PIECES):
            if r is not None and r.keep_fraction < 1.0:
                sel = sel[keep_mask(self.ids[sel], r.keep_fraction, r.seed)]
            with torch.inference_mode():
                x = resize_center(to_float(self.images[sel]), spec.input_size)
                feats = reduce_features(getattr(model, spec.call)(x).float().numpy(), r)
            blocks.append({"row": self.rows[sel], "id": self.ids[sel], "feature": feats, "label": self.labels[sel]})
        return blocks


class FakeWorker(WorkerContext):
    """The engine's WorkerContext (its SGD pass, reductions, target lookups) over one in-memory shard."""

    def __init__(self, cfg, manifest, ids, images, optimizers, in_channels: int, input_size: int | None = None):
        super().__init__(cfg, manifest, None, 0, 1, torch.device("cpu"), optimizers, in_channels, lambda m: None,
                         input_size)
        self.ids, self.images = ids, images

    def batches(self, round_idx, *, targets=None, repeats=None, batch_size=None, shuffle=True, max_steps=None):
        row = {"id": self.ids, "row": np.arange(len(self.ids), dtype=np.int64), "image": self.images}
        if targets is not None:
            row["target"] = self.lookup(targets)(row["row"])
        gen = shuffled_batches(iter([row]), batch_size=batch_size or self.cfg.train.batch_size,
                               seed=self.cfg.train.seed, epoch=round_idx, repeats=repeats, shuffle=shuffle)
        for i, item in enumerate(gen):
            if max_steps is not None and i >= max_steps:
                return
            yield item


def run_method_in_process(method_cls, cfg, data, manifest, ids=None, *, checkpoints: str | None = None,
                          resume_from: str | None = None):
    """(method, final state, every metrics row with the final one last, {id: cluster} of the final clustering
    as two arrays `(ids, clusters)`). `data` is (uint8 images N x H x W [x C], labels); `ids` default 0..N-1.
    The run directory (the saved label parts) is a fresh temporary one unless `cfg.run.dir` is absolute.

    `checkpoints`: each round's checkpoint saved under it (`round-R`) by the engine's own functions, as its loop
    saves them for Ray Train; `resume_from`: one such directory to continue from, restored by the functions the
    loop restores with (model, method state, optimizers; the next round after it)."""
    import os

    images, labels, ids = _as_arrays(data, ids)
    if not os.path.isabs(cfg.run.dir):
        cfg.run.dir = tempfile.mkdtemp(prefix="raydc-inprocess-")
        atexit.register(shutil.rmtree, cfg.run.dir, ignore_errors=True)  # the tests read it before they end
    method = method_cls(cfg, manifest)
    torch.manual_seed(cfg.train.seed)
    model = method.build_model()
    state, start = method.init_state(), 0
    ckpt = load_round_checkpoint(None, resume_from) if resume_from else None
    if ckpt is not None:
        state, start = restore_model_and_state(ckpt, model, type(state))
    else:
        method.load_initial_weights(model)  # model.weights: a new run only, as the engine's loop
    precision, memory_format = run_arithmetic(cfg, ckpt, model, "cpu")
    in_memory_format(model, memory_format)
    optimizers = method.optimizers(model, state)
    if ckpt is not None:
        restore_optimizers(ckpt, optimizers)
    wctx = FakeWorker(cfg, manifest, ids, images, optimizers, method.in_channels, method.input_size)
    service = InProcessService(ids, images, labels)
    rctx = RankZeroContext(cfg, manifest, "unused", lambda: service, lambda m: None, precision=precision,
                           memory_format=memory_format, manifold_actor=False)
    rows: list[dict] = []

    def end_round(r: int, row: dict, state) -> None:
        rows.append(row)
        if checkpoints is not None:
            d = os.path.join(checkpoints, f"round-{r}")
            os.makedirs(d)
            save_round_checkpoint(d, r, checkpoint_contents(r, model, state, optimizers, precision=precision,
                                                            memory_format=memory_format))

    r, state = run_rounds(method, model, state, start, wctx=wctx, rctx=rctx, broadcast=lambda plan: plan,
                          end_round=end_round, log=lambda m: None)
    out: dict = {}

    def keep(final):
        got_ids, (got, distances) = _read_by_id(service, len(ids), (final.col, final.distance_col))
        out.update(ids=got_ids, labels=got, distances=distances)

    final, row = finish(method, rctx, model, state, r, keep)
    return method, state, rows + [row], Assigned(final, model=model, **out)


class Assigned:
    """The final clustering as the tests read it: ids (sorted), their clusters and distances, and the final
    network (what `raydc assign` loads with the artifacts)."""

    def __init__(self, final, ids, labels, distances, model=None):
        self.final, self.ids, self.labels, self.distances = final, ids, labels, distances
        self.artifacts, self.model = final.artifacts, model


def assign_in_process(method, model, artifacts: dict, data, ids=None) -> tuple[np.ndarray, np.ndarray]:
    """`raydc assign`'s step in process: images put into a finished run's clustering by the method's
    `place_new_images`, over shards of their own. Returns (ids sorted, their clusters)."""
    images, labels, ids = _as_arrays(data, ids)
    service = InProcessService(ids, images, labels)
    rctx = RankZeroContext(method.cfg, method.manifest, "unused", lambda: service, lambda m: None)
    model.eval()
    final = method.place_new_images(rctx, model, artifacts)
    got_ids, (got,) = _read_by_id(service, len(ids), (final.col,))
    return got_ids, got


def _as_arrays(data, ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(images N x H x W x C, labels, ids): a channel axis added to gray images, ids 0..N-1 unless given."""
    images, labels = data
    ids = np.arange(len(labels), dtype=np.int64) if ids is None else np.asarray(ids, np.int64)
    return (images[..., None] if images.ndim == 3 else images), labels, ids


def _read_by_id(service, n: int, cols: tuple[str, ...]) -> tuple[np.ndarray, list[np.ndarray]]:
    """Every row's id and `cols` as the shards hold them, sorted by id."""
    got_ids, _, got = service.sample_features(n, 0, cols)
    order = np.argsort(got_ids)
    return got_ids[order], [got[c][order] for c in cols]
