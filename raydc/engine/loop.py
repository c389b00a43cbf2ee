"""The one training loop every method runs inside a single `TorchTrainer.fit()`.

A fit costs ~14 s of start-up here, so the whole run, re-clustering included, happens inside one fit: between
rounds rank 0 drives the feature pool and the shard actors, and hands the result to all workers by object ref
(`broadcast_from_rank_zero` carries only the ref). Checkpoints are written by rank 0 into the run directory
after the round's metrics row, so the checkpoint is the commit point: whatever is past it is redone on resume,
whether the resume comes from `--resume` or from Ray Train restarting workers after a failure.

The control flow itself (`run_rounds`, `finish`) takes the broadcast and the end-of-round action as arguments,
so the same code runs under Ray Train here and in-process in the method tests.
"""
from __future__ import annotations

import dataclasses
import os
import tempfile
import time
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from raydc.config import Config
from raydc.config_loader import from_dict
from raydc.core.precision import in_memory_format, resolve_memory_format, resolve_precision
from raydc.core.seeding import derive_seed
from raydc.engine.console import LineSink
from raydc.engine.rundir import RunDir
from raydc.methods import build_method
from raydc.methods.base import FinalClustering, Method, RoundPlan, shared_view
from raydc.engine.contexts import RankZeroContext, WorkerContext
from raydc.engine.round_checkpoint import (checkpoint_contents, load_round_checkpoint, restore_model_and_state,
                                          restore_optimizers, save_round_checkpoint)
from raydc.engine.summary import quality_regression, summary_line
from raydc.tracking import rank_zero_run

def run_rounds(method: Method, model: nn.Module, state: Any, start: int, *, wctx: WorkerContext,
               rctx: RankZeroContext | None, broadcast: Callable[[Any], Any],
               end_round: Callable[[int, dict, Any], None], log: Callable[[str], None] = print) -> tuple[int, Any]:
    """Rounds from `start` until the method is done. Returns (the round after the last, the state).

    `broadcast` takes rank 0's plan (None elsewhere) and returns it on every rank; `end_round(r, row, state)`
    runs on every rank after training (rank 0 writes the metrics row and the checkpoint; the row is empty on
    the other ranks)."""
    seed, rank = method.cfg.train.seed, wctx.rank
    r = start
    while not method.is_done(state, r):
        t_round = time.perf_counter()
        # Dropout and any other torch randomness: a function of (seed, round, rank), so a resumed run replays it.
        torch.manual_seed(derive_seed(seed, r, rank, 17, bits=62))
        if rank == 0:
            plan, row = method.plan(rctx, wctx.unwrap(model), state, r)
            plan.state = shared_view(state)
        else:
            plan, row = None, {}
        plan: RoundPlan = broadcast(plan)
        if rank != 0:
            state = plan.state
        if plan.stop is not None:
            if rank == 0:
                log(f"round {r}: {plan.stop}")
            break
        wctx.start_round(r)
        row.update(method.train_round(wctx, model, plan, state, r))
        if rank == 0:
            row.update({"round": r, "epoch": method.epoch_of(state, r), "time_round": time.perf_counter() - t_round,
                        **precision_fields(wctx.precision, rctx.memory_format if rctx else None)})
            if rctx is not None:
                row["memory"] = rctx.memory()
                if clock := rctx.take_features_clock():
                    row["features_clock"] = clock
        end_round(r, row, state)
        r += 1
    return r, state


def precision_fields(precision: str, memory_format: str | None = None) -> dict:
    """What every metrics row says about the arithmetic: the training precision and whether the CPU has bf16
    instructions (what `auto` decided from), the weights' memory format, beside the faiss backend the clustering
    rows name, and whether this process keeps its freed batches mapped (raydc/_malloc.py)."""
    from raydc._malloc import retain_freed_memory
    from raydc.core.precision import cpu_bf16_supported

    row = {"precision": precision, "cpu_bf16": cpu_bf16_supported(), "malloc": retain_freed_memory()}
    if memory_format is not None:
        row["memory_format"] = memory_format
    return row


def run_arithmetic(cfg: Config, ckpt: dict | None, model: nn.Module, device_type: str) -> tuple[str, str]:
    """(precision, memory format) this run computes in. A resumed run keeps what its first start resolved
    (`auto` on another machine could differ); a checkpoint written before the layout was chosen was computed
    contiguous, and stays so."""
    if ckpt is not None:
        return (ckpt.get("precision") or resolve_precision(cfg.train.precision, device_type),
                ckpt.get("memory_format") or "contiguous")
    return (resolve_precision(cfg.train.precision, device_type),
            resolve_memory_format(cfg.train.memory_format, model, device_type))


def finish(method: Method, rctx: RankZeroContext, model: nn.Module, state: Any, r: int,
           write: Callable[[FinalClustering], None] | None = None) -> tuple[FinalClustering, dict]:
    """Rank 0, after the last round: the method's final clustering, scored without labels, and its row;
    `write(final)` runs while the shards still hold it (the assignments)."""
    t_final = time.perf_counter()
    final, row = method.finalize(rctx, model, state, r)
    row.update(rctx.label_free_scores(final))
    if write is not None:
        write(final)
    row["memory"] = rctx.memory()
    if clock := rctx.take_features_clock():
        row["features_clock"] = clock
    rctx.release()
    row.update({"round": r, "epoch": method.epoch_of(state, r), "final": True,
                "time_round": time.perf_counter() - t_final,
                **precision_fields(rctx.precision, rctx.memory_format)})
    return final, row


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


def make_coordinator(cfg: Config):
    from raydc import storage
    from raydc.engine.clustering import CoordinatorProxy, ShardPlacement, ShardRecovery

    import hashlib

    cc = cfg.cluster
    placement = dataclasses.replace(ShardPlacement.from_config(cc),
                                    name="raydc-shards-" + hashlib.sha1(str(cfg.run.dir).encode()).hexdigest()[:12])
    recovery = ShardRecovery(storage.join(cfg.run.dir, "shards") if cc.persist_features else None,
                             cc.shard_restarts, cc.recovery_timeout_s)
    return CoordinatorProxy(cc.num_shards, cc.num_gpus, cc.use_gpu, placement, cfg.ray.coordinator_resource,
                            recovery)


def train_loop_per_worker(loop_cfg: dict[str, Any]) -> None:
    import ray
    import ray.train
    import ray.train.torch
    from ray.train.collective import broadcast_from_rank_zero

    cfg, manifest, method, rank, world, device = worker_setup(loop_cfg["config"])
    # The run's lines go to the driver's console (raydc.engine.console); printed when no driver listens.
    _log = loop_cfg.get("log") or LineSink()
    run = rank_zero_run(RunDir(loop_cfg["run_dir"]), cfg, rank)  # rank 0: its rows also to run.trackers
    if rank == 0:
        from raydc.engine.memory import start_sampler

        start_sampler()

    torch.manual_seed(cfg.train.seed)  # the initial weights: the same run seed gives the same network
    np.random.seed(cfg.train.seed % (1 << 32))
    model = method.build_model()
    # This fit's newest checkpoint (a worker group restarted after a failure), else the one the driver chose
    # to resume from, else none.
    ckpt = load_round_checkpoint(ray.train.get_checkpoint(), loop_cfg.get("resume_from"))
    if ckpt is not None:
        state, start = restore_model_and_state(ckpt, model, type(method.init_state()))
    else:
        state, start = method.init_state(), 0
        method.load_initial_weights(model)  # model.weights: a new run only (a resumed one has its checkpoint)
    if rank != 0:
        state = shared_view(state)
    precision, memory_format = run_arithmetic(cfg, ckpt, model, device.type)
    in_memory_format(model, memory_format)  # before DDP and the optimizers see the parameters
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    optimizers = method.optimizers(WorkerContext.unwrap(model), state)
    if ckpt is not None:
        restore_optimizers(ckpt, optimizers)

    shard = ray.train.get_dataset_shard("train")
    wctx = WorkerContext(cfg, manifest, shard, rank, world, device, optimizers, method.in_channels, _log,
                         method.input_size, precision=precision)
    rctx = None
    if rank == 0:
        rctx = RankZeroContext(cfg, manifest, cfg.data.shards, lambda: make_coordinator(cfg), _log,
                               precision=precision, memory_format=memory_format)
        if start:
            run.truncate_metrics(upto_round=start)
            _log(f"resuming from the checkpoint of round {start - 1}: round {start}")

    def broadcast(plan):
        ref = broadcast_from_rank_zero([ray.put(plan) if rank == 0 else None])[0]
        return ray.get(ref)

    def end_round(r: int, row: dict, state) -> None:
        metrics = {k: v for k, v in row.items() if isinstance(v, (int, float))} if rank == 0 else {}
        if rank != 0:
            ray.train.report(metrics)
            return
        run.append_metrics(row)
        with tempfile.TemporaryDirectory(prefix="raydc-ckpt-") as tmp:
            save_round_checkpoint(tmp, r, checkpoint_contents(r, WorkerContext.unwrap(model), state, optimizers,
                                                              config=loop_cfg["config"], precision=precision,
                                                              memory_format=memory_format))
            # Ray Train persists it to <run.dir>/checkpoints before report returns: the round's commit point.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        _log(summary_line(row, method.summary_fields))

    r, state = run_rounds(method, model, state, start, wctx=wctx, rctx=rctx, broadcast=broadcast,
                          end_round=end_round, log=_log)
    if rank == 0:
        try:
            def write(final: FinalClustering) -> None:
                run.clear_assignments()
                rctx.write_assignments(final, str(run.assignments_dir))

            final, row = finish(method, rctx, WorkerContext.unwrap(model), state, r, write)
            key, value = method.comparable_final(row)
            warning = quality_regression(run.read_metrics(), value, key=key)
            if warning:
                row["quality_warning"] = warning
            weights = {k: v.contiguous() for k, v in WorkerContext.unwrap(model).state_dict().items()}
            run.save_clustering({"round": r, "model": weights, "artifacts": final.artifacts,
                                 "config": loop_cfg["config"], "precision": precision,
                                 "memory_format": memory_format})
            run.append_metrics(row)
            _log(summary_line(row, method.summary_fields))
            if warning:
                _log(f"warning: {warning}")
        finally:
            rctx.shutdown()
    ray.train.report({"done": 1})


