"""The one training loop every method runs inside a single `TorchTrainer.fit()`.

A fit costs ~14 s of start-up here, so the whole run, re-clustering included, happens inside one fit: between
rounds rank 0 drives the feature pool and the shard actors, and hands the result to all workers by object ref
(`broadcast_from_rank_zero` carries only the ref). Checkpoints are written by rank 0 into the run directory
after the round's metrics row, so the checkpoint is the commit point: whatever is past it is redone on resume,
whether the resume comes from `--resume` or from Ray Train restarting workers after a failure.
"""
from __future__ import annotations

import os
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from raydc.config import Config
from raydc.config_loader import from_dict
from raydc.engine.rundir import RunDir
from raydc.engine.stream import decoded_rows, shuffled_batches
from raydc.methods import build_method


class WorkerContext:
    """What a method's `train_round` may use on every worker."""

    def __init__(self, cfg: Config, manifest, shard, rank: int, world: int, device: torch.device,
                 optimizers: dict, in_channels: int, log: Callable[[str], None]):
        self.cfg, self.manifest, self.shard = cfg, manifest, shard
        self.rank, self.world, self.device = rank, world, device
        self.optimizers = optimizers
        self.in_channels = in_channels
        self.log = log
        self._last_progress = 0.0
        self._round = 0

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def batches(self, round_idx: int, *, repeats=None, batch_size: int | None = None, shuffle: bool = True):
        """Fixed-size batches of (ids, copy index, uint8 images); all workers stop at the same step (DDP
        needs equal step counts; streaming splits give equal rows but resampling does not)."""
        self._round = round_idx
        self._t0 = time.perf_counter()
        fixed = self.manifest.image_shape is not None
        rows = decoded_rows(self.shard, self.manifest, read_batch_size=1024,
                            size=None if fixed else self.cfg.model.input_size, channels=self.in_channels)
        gen = shuffled_batches(rows, batch_size=batch_size or self.cfg.train.batch_size, seed=self.cfg.train.seed,
                               epoch=round_idx, repeats=repeats, shuffle=shuffle)
        for item in gen:
            if not self._all_have(True):
                break
            yield item
        else:
            self._all_have(False)
            return
        for _ in gen:  # drain: the streaming split expects every split to finish its pass
            pass

    def _all_have(self, have: bool) -> bool:
        if self.world == 1:
            return have
        import torch.distributed as dist

        t = torch.tensor([1 if have else 0], dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
        return bool(t.item())

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        if self.world == 1:
            return [float(v) for v in values]
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def progress(self, steps: int, images: int, loss: float, every_s: float = 15.0) -> None:
        now = time.perf_counter()
        if self.rank == 0 and now - self._last_progress >= every_s:
            self._last_progress = now
            rate = images / max(now - self._t0, 1e-9)
            self.log(f"  round {self._round} step {steps}: {images} images, {rate:.0f} img/s/worker, "
                     f"loss {loss:.4f}")


class RankZeroContext:
    """What a method's `make_targets`/`finalize` may use on rank 0: the feature pool and the shard actors."""

    def __init__(self, cfg: Config, manifest, service, log):
        self.cfg, self.manifest, self.service, self.log = cfg, manifest, service, log

    def extract(self, spec) -> dict:
        return self.service.extract(spec, self.cfg.data.shards, self.manifest, self.cfg.features)


def _log(msg: str) -> None:
    print(msg, flush=True)


def _torch_threads(cfg: Config) -> int:
    if cfg.train.torch_threads > 0:
        return cfg.train.torch_threads
    return max(1, (os.cpu_count() or 1) // cfg.train.num_workers)


def worker_setup(config: dict[str, Any]):
    """What every training worker does first (the benchmarks' training loop too, so it measures the same):
    the typed config, the shards' manifest, the method, this worker's rank and world size, its torch threads
    and device. Returns (cfg, manifest, method, rank, world, device)."""
    import ray.train
    import ray.train.torch

    from raydc.data.manifest import load_manifest

    cfg: Config = from_dict(Config, config)
    manifest = load_manifest(cfg.data.shards)
    method = build_method(cfg, manifest)
    tctx = ray.train.get_context()
    torch.set_num_threads(_torch_threads(cfg))
    return cfg, manifest, method, tctx.get_world_rank(), tctx.get_world_size(), ray.train.torch.get_device()


def train_loop_per_worker(loop_cfg: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch
    from ray.train.collective import broadcast_from_rank_zero

    from raydc.engine.clustering import CoordinatorProxy

    cfg, manifest, method, rank, world, device = worker_setup(loop_cfg["config"])
    run = RunDir(loop_cfg["run_dir"])

    torch.manual_seed(cfg.train.seed)  # the initial weights: the same run seed gives the same network
    np.random.seed(cfg.train.seed % (1 << 32))
    model = method.build_model()
    ckpt = run.load_checkpoint()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        state, start = ckpt["state"], ckpt["round"] + 1
    else:
        state, start = method.init_state(), 0
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    optimizers = method.optimizers(WorkerContext.unwrap(model), state)
    if ckpt is not None:
        for name, opt in optimizers.items():
            if name in ckpt.get("optimizers", {}):
                opt.load_state_dict(ckpt["optimizers"][name])

    shard = ray.train.get_dataset_shard("train")
    wctx = WorkerContext(cfg, manifest, shard, rank, world, device, optimizers, method.in_channels, _log)
    service = rctx = None
    if rank == 0:
        service = CoordinatorProxy(cfg.cluster.num_shards, cfg.cluster.num_gpus, cfg.cluster.use_gpu)
        rctx = RankZeroContext(cfg, manifest, service, _log)
        if start:
            run.truncate_metrics(upto_round=start)
            _log(f"resuming from {run.latest_checkpoint().name}: round {start}")

    r = start
    while not method.is_done(state, r):
        t_round = time.perf_counter()
        # Dropout and any other torch randomness: a function of (seed, round, rank), so a resumed run replays it.
        torch.manual_seed(int(np.random.default_rng([cfg.train.seed, r, rank, 17]).integers(1 << 62)))
        if rank == 0:
            targets, row = method.make_targets(rctx, WorkerContext.unwrap(model), state, r)
            ref = ray.put(targets)
        else:
            row, ref = {}, None
        ref = broadcast_from_rank_zero([ref])[0]
        targets = ray.get(ref)
        if targets.stop:
            if rank == 0:
                _log(f"round {r}: {targets.values.get('stop_reason', 'converged')}")
                state.update(targets.state)
            break
        state.update(targets.state)
        row.update(method.train_round(wctx, model, targets, state, r))
        if rank == 0:
            row.update({"round": r, "epoch": method.epoch_of(state, r), "time_round": time.perf_counter() - t_round})
            run.append_metrics(row)
            run.save_checkpoint(r, {
                "round": r, "model": WorkerContext.unwrap(model).state_dict(), "state": state,
                "optimizers": {n: o.state_dict() for n, o in optimizers.items()}, "config": loop_cfg["config"],
            }, keep=cfg.run.keep_checkpoints)
            _log(_summary_line(row))
        ray.train.report({k: v for k, v in row.items() if isinstance(v, (int, float))} if rank == 0 else {})
        r += 1

    if rank == 0:
        t_final = time.perf_counter()
        out, row = method.finalize(rctx, WorkerContext.unwrap(model), state, r)
        run.write_assignments(out.ids, out.labels, out.distances)
        torch.save({"projection": out.projection, "centroids": out.centroids, "round": r,
                    "model": WorkerContext.unwrap(model).state_dict(), "config": loop_cfg["config"]},
                   run.path / ".clustering.pt.tmp")
        os.replace(run.path / ".clustering.pt.tmp", run.path / "clustering.pt")
        row.update({"round": r, "epoch": method.epoch_of(state, r), "final": True,
                    "time_round": time.perf_counter() - t_final})
        run.append_metrics(row)
        _log(_summary_line(row))
        service.shutdown()
    ray.train.report({"done": 1})


def _summary_line(row: dict) -> str:
    parts = [f"epoch {row.get('epoch')}"]
    for key, fmt in (("loss", "loss {:.4f}"), ("kmeans_objective", "obj {:.5g}"), ("nmi_prev", "NMI(t-1,t) {:.3f}"),
                     ("acc", "ACC {:.3f}"), ("nmi", "NMI {:.3f}"), ("ari", "ARI {:.3f}"),
                     ("n_empty", "empty {}"), ("images_per_s_train", "{:.0f} img/s train")):
        if key in row and row[key] is not None:
            parts.append(fmt.format(row[key]))
    phases = [f"{k[5:]} {row[k]:.1f}s" for k in ("time_features", "time_pca", "time_kmeans", "time_train") if k in row]
    if phases:
        parts.append("[" + ", ".join(phases) + "]")
    return " | ".join(parts)
