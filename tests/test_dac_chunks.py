"""DAC's chunked selection (the official MNIST script's loop): a chunk's targets are computed once and reused for
every local epoch; across two DDP workers each step's pairs are the global batch's block of the global chunk's
targets, and its loss and gradients equal one process holding that global batch."""
from __future__ import annotations

import os
import socket

import numpy as np
import pytest
import torch

from raydc.config import Config
from raydc.config_loader import from_dict
from raydc.core.dac import LabelFeatureNet, pair_loss, similarity_matrix
from raydc.engine.contexts import WorkerContext
from raydc.core.stream import Batch
from raydc.methods.dac import DAC
from tests.inprocess import run_method_in_process
from tests.helpers import K, PER_CLUSTER, SIDE, blobs

CHUNK, BATCH, PASSES = 40, 8, 3


def chunk_config(workers: int = 1, **dac) -> Config:
    return from_dict(Config, {
        "method": "dac", "data": {"shards": "unused"},
        "model": {"arch": "smallconvnet", "sobel": False, "input_size": SIDE},
        "cluster": {"k": K, "pca_dim": 0, "num_shards": 2}, "features": {"batch_size": 128},
        "train": {"num_workers": workers, "seed": 5, "torch_threads": 1, "epochs": 2},
        "dac": {"schedule": "official_mnist", "chunk_size": CHUNK, "local_epochs": PASSES, "batch_size": BATCH,
                "augment": False, **dac},
        "run": {"dir": "unused"},
    })


def manifest(n: int = K * PER_CLUSTER):
    from types import SimpleNamespace

    return SimpleNamespace(image_shape=[SIDE, SIDE, 1], mode="L", count=n, has_labels=True)


def test_a_chunk_is_selected_once_and_trained_on_for_every_local_epoch(one_torch_thread, monkeypatch):
    calls: list[int] = []
    original = DAC._selection_features

    def counted(self, wctx, model, x):
        calls.append(len(x))
        return original(self, wctx, model, x)

    monkeypatch.setattr(DAC, "_selection_features", counted)
    cfg = chunk_config()
    images, labels = blobs()
    _, _, rows, _ = run_method_in_process(DAC, cfg, (images, labels), manifest())
    chunks_per_round = len(labels) // CHUNK  # the stream drops the remainder, as every batch stream does
    assert calls == [CHUNK] * chunks_per_round * cfg.train.epochs
    for r in rows[:-1]:
        assert r["train_images"] == chunks_per_round * PASSES * CHUNK, r
        assert r["selected_pairs"] == pytest.approx(1.0)  # one threshold: every pair is a target
    assert rows[0]["upper"] == rows[0]["lower"] == pytest.approx(0.9)


# ---- two DDP workers ----------------------------------------------------------------------------------
class ChunkWorker(WorkerContext):
    """The engine's WorkerContext whose stream is one chunk: this rank's half of `images`."""

    def __init__(self, cfg, rank, world, images):
        super().__init__(cfg, None, None, rank, world, torch.device("cpu"), {}, 1, lambda m: None, SIDE)
        self.images = images

    def batches(self, round_idx, *, batch_size=None, **_):
        part = np.array_split(np.arange(len(self.images)), self.world)[self.rank]
        assert len(part) == batch_size
        yield Batch(part.astype(np.int64), part.astype(np.int64), np.zeros(len(part), np.int64), self.images[part])


def _net() -> LabelFeatureNet:
    """No BatchNorm: DDP workers normalise by their own halves, so only a BN-free net can equal one process."""
    torch.manual_seed(0)
    return LabelFeatureNet(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(SIDE * SIDE, K)))


def _steps(rank: int, world: int, port: int, images: np.ndarray, n_steps: int) -> list:
    import torch.distributed as dist

    from raydc.core.augment import resize_center, to_float

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    cfg = chunk_config(world, bn_readout="running", threshold=0.3, batch_size=BATCH // world)
    method = DAC(cfg, manifest(len(images)))
    model = _net()
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    wctx = ChunkWorker(cfg, rank, world, images)
    out = []
    for _, step in zip(range(n_steps), method._chunk_steps(wctx, ddp, 0, 0.3, 0.3)):
        x = resize_center(to_float(step.images), SIDE)
        feats = wctx.all_gather(ddp(x))
        model.zero_grad()
        loss = pair_loss(similarity_matrix(feats), step.same, step.different, "mse")
        loss.backward()
        out.append((step.ids.tolist(), step.same.numpy().copy(), loss.item(),
                    [p.grad.numpy().copy() for p in model.parameters()]))
    if world > 1:
        dist.destroy_process_group()
    return out


def _worker(rank, world, port, images, n_steps, queue):
    queue.put((rank, _steps(rank, world, port, images, n_steps)))


def test_two_ddp_workers_train_each_step_on_the_global_batch_block_of_the_global_chunk_targets():
    import torch.multiprocessing as mp

    from raydc.core.augment import resize_center, to_float

    images = blobs()[0][:CHUNK][..., None]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, images, 4, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = dict(queue.get(timeout=180) for _ in procs)
    for p in procs:
        p.join(timeout=60)
    net = _net().eval()
    for i in range(4):
        ids0, same0, loss0, grads0 = results[0][i]
        ids1, same1, loss1, grads1 = results[1][i]
        assert np.array_equal(same0, same1) and loss0 == pytest.approx(loss1, rel=1e-6)
        rows = ids0 + ids1  # the global batch in rank order, as all_gather concatenates it
        assert len(set(ids0) & set(ids1)) == 0 and all(r >= CHUNK // 2 for r in ids1)
        # One process holding that global batch: the same targets (selected from these images' features with
        # the weights before any step, since a chunk is selected once) and, at the first step, the same loss
        # and gradients.
        x = resize_center(to_float(images[rows]), SIDE)
        with torch.no_grad():
            f0 = net(x)
        assert np.array_equal(same0, (similarity_matrix(f0) >= 0.3).numpy())
        if i == 0:
            single = _net()
            loss = pair_loss(similarity_matrix(single(x)), torch.as_tensor(same0), ~torch.as_tensor(same0), "mse")
            loss.backward()
            assert loss0 == pytest.approx(loss.item(), rel=1e-5)
            for g, p in zip(grads0, single.parameters()):
                np.testing.assert_allclose(g, p.grad.numpy(), rtol=1e-4, atol=1e-6)
