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
import json
import os
import tempfile
import time
from collections import Counter
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from raydc.config import Config
from raydc.config_loader import from_dict
from raydc.core.precision import resolve_precision
from raydc.core.seeding import derive_seed
from raydc.engine.console import LineSink
from raydc.engine.rundir import RunDir, from_plain, to_plain
from raydc.core.stream import decoded_rows, shuffled_batches
from raydc.errors import NumericalError
from raydc.methods import build_method
from raydc.core.extractor import ExtractorSpec
from raydc.methods.api import ExtractInfo, PassStats, RoundContext, ShardService, TrainContext
from raydc.methods.base import FinalClustering, Method, RoundPlan, shared_view
from raydc.tracking import rank_zero_run

LABEL_FREE_SAMPLE = 5000  # rows of the final features scored without labels (silhouette is O(n^2))


class WorkerContext:
    """What a method's `train_round` may use on every worker."""

    def __init__(self, cfg: Config, manifest, shard, rank: int, world: int, device: torch.device,
                 optimizers: dict, in_channels: int, log: Callable[[str], None], input_size: int | None = None,
                 precision: str = "fp32"):
        self.cfg, self.manifest, self.shard = cfg, manifest, shard
        self.precision = precision  # resolved (raydc.core.precision): the dtype `loss_of` runs its forward in
        self.input_size = input_size  # the method's (config or manifest); decoding resizes mixed sizes to it
        self.rank, self.world, self.device = rank, world, device
        self.optimizers = optimizers
        self.in_channels = in_channels
        self.log = log
        self._last_progress = time.perf_counter()
        self._round = 0
        self._t0 = time.perf_counter()

    @staticmethod
    def unwrap(model: nn.Module) -> nn.Module:
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def lookup(self, blocks):
        """A per-row reader of a method's sharded targets (raydc.core.rowblocks), None for None."""
        from raydc.engine.row_lookup import RowLookup

        return None if blocks is None else RowLookup(blocks)

    def start_round(self, round_idx: int) -> None:
        """The round the progress lines name (the loop's, whatever passes a method makes within it)."""
        self._round = round_idx

    def batches(self, pass_id: int, *, targets=None, repeats=None, batch_size: int | None = None,
                shuffle: bool = True, max_steps: int | None = None):
        """Fixed-size `Batch`es (ids, rows, copy index, uint8 images, and each row's value in `targets`, a
        RowBlocks, when given), shuffled by (seed, `pass_id`); all workers stop at the same step (DDP needs equal
        step counts; streaming splits give equal rows but resampling does not), at the latest after
        `max_steps`."""
        self._t0 = time.perf_counter()
        fixed = self.manifest.image_shape is not None
        rows = decoded_rows(self.shard, self.manifest, read_batch_size=1024,
                            size=None if fixed else self.input_size, channels=self.in_channels,
                            targets=self.lookup(targets))
        gen = shuffled_batches(rows, batch_size=batch_size or self.cfg.train.batch_size, seed=self.cfg.train.seed,
                               epoch=pass_id, repeats=repeats, shuffle=shuffle)
        steps = 0
        for item in gen:
            if (max_steps is not None and steps >= max_steps) or not self._all_have(True):
                break
            steps += 1
            yield item
        else:
            self._all_have(False)
            return
        if max_steps is not None and steps >= max_steps:
            self._all_have(False)  # the others are waiting in theirs: every rank stops at this same step
        for _ in gen:  # drain: the streaming split expects every split to finish its pass
            pass

    def sgd_pass(self, batches, optimizers: list, loss_of: Callable[..., Any], *, epoch: int,
                 phase: str, what: str) -> PassStats:
        """The engine's one SGD loop: for each batch, `loss_of(batch)` (the method's loss on a
        `raydc.core.stream.Batch`, or `(loss, {name: value})` with per-step figures to average), then zero_grad,
        backward and step over `optimizers`. A non-finite loss stops the run with a NumericalError naming `what`
        at (epoch, phase), keeping the last good checkpoint."""
        from raydc.core.precision import autocast, grad_scaler

        loss_sum, n_seen, steps = 0.0, 0, 0
        figures: Counter = Counter()
        scaler = grad_scaler(self.precision, self.device.type)
        t0 = time.perf_counter()
        for batch in batches:
            with autocast(self.precision, self.device.type):
                loss = loss_of(batch)
            if isinstance(loss, tuple):
                loss, step_figures = loss
                figures.update(step_figures)
            if not torch.isfinite(loss):
                raise NumericalError(epoch, phase, what)
            for opt in optimizers:
                opt.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
                for opt in optimizers:
                    opt.step()
            else:
                scaler.scale(loss).backward()
                for opt in optimizers:
                    scaler.step(opt)
                scaler.update()
            loss_sum += loss.detach().item() * len(batch)
            n_seen += len(batch)
            steps += 1
            self.progress(steps, n_seen, loss_sum / max(n_seen, 1))
        seconds = time.perf_counter() - t0
        total_loss, total_images = self.all_reduce_sum([loss_sum, n_seen])
        return PassStats(total_loss / max(total_images, 1), int(total_images), steps, seconds,
                         {k: v / max(steps, 1) for k, v in figures.items()})

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

    def all_gather(self, t: torch.Tensor) -> torch.Tensor:
        """Every worker's `t` concatenated along dim 0 in rank order, with gradients flowing back to each
        worker's own part (the backward sums every worker's gradient for it), for losses over the global
        batch. Every worker must pass the same shape."""
        if self.world == 1:
            return t
        import warnings

        from torch.distributed.nn.functional import all_gather

        with warnings.catch_warnings():  # its replacement in _functional_collectives has no autograd on gloo
            warnings.simplefilter("ignore", FutureWarning)
            return torch.cat(all_gather(t), dim=0)

    def progress(self, steps: int, images: int, loss: float, every_s: float = 15.0) -> None:
        now = time.perf_counter()
        if self.rank == 0 and self.cfg.run.progress and now - self._last_progress >= every_s:
            self._last_progress = now
            rate = images / max(now - self._t0, 1e-9)
            self.log(f"  round {self._round} step {steps}: {images} images, {rate:.0f} img/s/worker, "
                     f"loss {loss:.4f}")


class RankZeroContext:
    """What a method's `plan`/`finalize`/`assign` may use on rank 0: the feature pool over `shard_dir` and the
    shard actors (`service`), started on first use: a method that never asks pays nothing for them."""

    def __init__(self, cfg: Config, manifest, shard_dir: str, make_service: Callable[[], Any], log,
                 precision: str = "fp32"):
        self.cfg, self.manifest, self.shard_dir, self.log = cfg, manifest, shard_dir, log
        self.precision = precision  # rank 0's resolved precision: the feature passes run in it too
        self._make_service = make_service
        self._service = None
        self._published: dict = {}  # saved column dir -> its RowBlocks in the object store (the latest only)
        self._features_clock: Counter = Counter()

    def _coordinator(self) -> Any:
        """The shard actors' proxy with all its calls (the engine's); methods see the `ShardService` part."""
        if self._service is None:
            self._service = self._make_service()
        return self._service

    @property
    def service(self) -> ShardService:
        return self._coordinator()

    def extract(self, spec: ExtractorSpec, **reduction) -> ExtractInfo:
        """Every image's features onto the shard actors, reduced as `reduction` says (see
        ClusteringService.extract: pca_dim, whiten, l2_normalize, seed, projection)."""
        if spec.precision is None:
            spec = dataclasses.replace(spec, precision=self.precision)
        info = self._coordinator().extract(spec, self.shard_dir, self.manifest, self.cfg.features, **reduction)
        self._features_clock.update(info.clock)  # Counter.update adds
        return info

    def take_features_clock(self) -> dict[str, float]:
        """The feature passes' seconds since the last call (ExtractInfo.clock summed): the round row's profile."""
        out, self._features_clock = self._features_clock, Counter()
        return {k: round(v, 4) for k, v in out.items()}

    @property
    def labelled(self) -> bool:
        """Whether the shards carry evaluation labels (scores against them are computed, never trained on)."""
        return bool(self.manifest.has_labels)

    def save_column(self, col: str, name: str, round_idx: int) -> str:
        """Each shard writes its rows' `col` to <run.dir>/<name>/round=R/part-*.parquet; older rounds beyond
        the checkpoints kept are removed. Returns the directory (what a checkpoint records instead of the
        array)."""
        from raydc import storage

        base = storage.join(self.cfg.run.dir, name)
        out = storage.join(base, f"round={round_idx:04d}")
        storage.delete_dir(out)  # a redone round (after a resume) writes its parts afresh
        self._coordinator().write_parts(out, {"value": col})
        # Every kept checkpoint points at one of the newest keep_checkpoints + 1 dirs; the final clustering's
        # write comes after the last checkpoint, hence + 2.
        keep = self.cfg.run.keep_checkpoints + 2
        for old in storage.list_dirs(base, prefix="round=")[:-keep]:
            storage.delete_dir(old)
        return out

    def column_blocks(self, path: str | None):
        """The RowBlocks of a column saved at `path`: the ones `remember`ed for it in this process, else read
        back from its parts (a resumed run). None for None."""
        if path is None:
            return None
        got = self._published.get(path)
        if got is None:
            from raydc import storage
            from raydc.errors import UserError

            if not storage.exists(path) or not storage.list_files(path, suffix=".parquet"):
                raise UserError(f"the checkpoint's saved clustering {path} is missing: the run directory lost "
                                f"files since it was written; start the run again with --overwrite")
            got = self._coordinator().read_parts(path, "value")
            self._published = {path: got}
        return got

    def remember(self, path: str, blocks) -> None:
        """Keep `blocks` as what `path` holds (published from the same column), so the next round need not
        read the parts back."""
        self._published = {path: blocks}

    def release(self) -> None:
        if self._service is not None:
            self._service.release()

    def label_free_scores(self, final: FinalClustering) -> dict:
        """Silhouette and Calinski-Harabasz of the final clustering on a fixed sample (drawn from the run seed)
        of the features the shards still hold; {} when they hold none."""
        from raydc.core.selection import label_free_scores

        if self._service is None:
            return {}
        ids, x, cols = self._coordinator().sample_features(LABEL_FREE_SAMPLE, derive_seed(self.cfg.train.seed, 23),
                                                    (final.col,))
        if len(ids) == 0 or final.col not in cols:
            return {}
        return {**label_free_scores(x, cols[final.col]), "label_free_sample": int(len(ids))}

    def memory(self) -> dict:
        """Peak resident set and peak private memory (bytes) so far of rank 0, the coordinator and each shard
        actor (raydc.engine.memory): what must stay flat in N, the shards excepted, in the scaling benchmark."""
        from raydc.engine.memory import peak

        me = peak()
        out: dict[str, Any] = {"rank0_peak_rss": me["peak_rss"], "rank0_peak_anon": me["peak_anon"]}
        if self._service is not None:
            parts = self._service.peak_rss()
            out["coordinator_peak_rss"] = parts[-1]["peak_rss"]
            out["coordinator_peak_anon"] = parts[-1]["peak_anon"]
            out["shard_peak_rss"] = [p["peak_rss"] for p in parts[:-1]]
            out["shard_peak_anon"] = [p["peak_anon"] for p in parts[:-1]]
        return out

    def write_assignments(self, final: FinalClustering, directory: str) -> list[str]:
        """Each shard writes its part of the final clustering: row, id, path, cluster, distance (`path` null,
        said once here, when the shards carry none)."""
        from raydc.engine.source_paths import path_sources

        sources = path_sources(self.manifest, self.shard_dir)
        if sources is None:
            self.log(f"note: the shards in {self.shard_dir} carry no source paths (an array source, or folder "
                     f"shards prepared before raydc kept paths: re-run `raydc prepare` to get them); "
                     f"the assignments' `path` column is empty")
        return self._coordinator().write_parts(directory, {"cluster": final.col, "distance": final.distance_col},
                                        paths=sources or [])

    def shutdown(self) -> None:
        if self._service is not None:
            self._service.shutdown()
            self._service = None


def _contexts_keep_the_contract(rctx: RankZeroContext, wctx: WorkerContext) -> tuple[RoundContext, TrainContext]:
    """Never called: mypy checks here that the engine's contexts are what raydc.methods.api promises methods."""
    return rctx, wctx


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
                        **precision_fields(wctx.precision)})
            if rctx is not None:
                row["memory"] = rctx.memory()
                if clock := rctx.take_features_clock():
                    row["features_clock"] = clock
        end_round(r, row, state)
        r += 1
    return r, state


def precision_fields(precision: str) -> dict:
    """What every metrics row says about the arithmetic: the training precision and whether the CPU has bf16
    instructions (what `auto` decided from), beside the faiss backend the clustering rows name."""
    from raydc.core.precision import cpu_bf16_supported

    return {"precision": precision, "cpu_bf16": cpu_bf16_supported()}


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
                "time_round": time.perf_counter() - t_final, **precision_fields(rctx.precision)})
    return final, row


def quality_regression(rows: list[dict], final: dict, tolerance: float = 0.005) -> str | None:
    """A sentence when the final clustering scores below the first clustering the run made (round 0's, or
    DEC's AE + k-means start): training made things worse, which a user must hear rather than find later.
    Evaluation only (it reads the labels' ACC, when the shards have labels), and it never changes the result."""
    first = next((r for r in rows if r.get("acc") is not None and not r.get("final")), None)
    # Like with like: an over-clustered run's final row is at final_k; its training-k score is what round 0 had.
    acc = final.get("train_k_acc", final.get("acc"))
    if first is None or acc is None:
        return None
    if acc >= first["acc"] - tolerance:
        return None
    return (f"the final clustering (ACC {acc:.3f}) is worse than the run's first one at epoch "
            f"{first.get('epoch')} (ACC {first['acc']:.3f}): training lowered the quality")


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

    import dataclasses
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
        model.load_state_dict(ckpt["model"])
        state, start = from_plain(type(method.init_state()), ckpt["state"]), ckpt["round"] + 1
    else:
        state, start = method.init_state(), 0
        method.load_initial_weights(model)  # model.weights: a new run only (a resumed one has its checkpoint)
    if rank != 0:
        state = shared_view(state)
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    optimizers = method.optimizers(WorkerContext.unwrap(model), state)
    if ckpt is not None:
        for name, opt in optimizers.items():
            if name in ckpt.get("optimizers", {}):
                opt.load_state_dict(ckpt["optimizers"][name])

    shard = ray.train.get_dataset_shard("train")
    # A resumed run keeps the precision its first start resolved (`auto` on another machine could differ).
    precision = (ckpt or {}).get("precision") or resolve_precision(cfg.train.precision, device.type)
    wctx = WorkerContext(cfg, manifest, shard, rank, world, device, optimizers, method.in_channels, _log,
                         method.input_size, precision=precision)
    rctx = None
    if rank == 0:
        rctx = RankZeroContext(cfg, manifest, cfg.data.shards, lambda: make_coordinator(cfg), _log,
                               precision=precision)
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
            save_round_checkpoint(tmp, r, {
                "round": r, "model": WorkerContext.unwrap(model).state_dict(), "state": to_plain(state),
                "optimizers": {n: o.state_dict() for n, o in optimizers.items()}, "config": loop_cfg["config"],
                "precision": precision,
            })
            # Ray Train persists it to <run.dir>/checkpoints before report returns: the round's commit point.
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        _log(summary_line(row))

    r, state = run_rounds(method, model, state, start, wctx=wctx, rctx=rctx, broadcast=broadcast,
                          end_round=end_round, log=_log)
    if rank == 0:
        try:
            def write(final: FinalClustering) -> None:
                run.clear_assignments()
                rctx.write_assignments(final, str(run.assignments_dir))

            final, row = finish(method, rctx, WorkerContext.unwrap(model), state, r, write)
            warning = quality_regression(run.read_metrics(), row)
            if warning:
                row["quality_warning"] = warning
            run.save_clustering({"round": r, "model": WorkerContext.unwrap(model).state_dict(),
                                 "artifacts": final.artifacts, "config": loop_cfg["config"]})
            run.append_metrics(row)
            _log(summary_line(row))
            if warning:
                _log(f"warning: {warning}")
        finally:
            rctx.shutdown()
    ray.train.report({"done": 1})


def save_round_checkpoint(directory: str, round_idx: int, contents: dict) -> None:
    """A round's checkpoint as Ray Train carries it: a directory of the safe-loading state file and a small
    JSON saying which round it closes (what tools read without loading the state)."""
    from raydc.engine.rundir import CHECKPOINT_INFO, CHECKPOINT_STATE, save_safe

    save_safe(os.path.join(directory, CHECKPOINT_STATE), contents)
    with open(os.path.join(directory, CHECKPOINT_INFO), "w") as f:
        json.dump({"round": int(round_idx)}, f)


def load_round_checkpoint(checkpoint, fallback: str | None = None) -> dict | None:
    """The state saved by `save_round_checkpoint`: in a `ray.train.Checkpoint` (`as_directory` downloads it
    from object storage), else in the checkpoint directory `fallback` (a location), else None (a fresh run)."""
    from raydc import storage
    from raydc.engine.rundir import CHECKPOINT_STATE, load_safe

    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            return load_safe(os.path.join(d, CHECKPOINT_STATE))
    if fallback is not None:
        return load_safe(storage.join(fallback, CHECKPOINT_STATE))
    return None


def summary_line(row: dict) -> str:
    """The one line a round prints: what it achieved, then where its time went."""
    parts = ["final" if row.get("final") else f"epoch {row.get('epoch')}"]
    for key, fmt in (("phase", "{}"), ("loss", "loss {:.4f}"), ("kmeans_objective", "obj {:.5g}"),
                     ("upper", "u {:.3f}"), ("lower", "l {:.3f}"), ("selected_pairs", "pairs {:.1%}"),
                     ("delta_label", "changed {:.2%}"), ("nmi_prev", "NMI(t-1,t) {:.3f}"),
                     ("acc", "ACC {:.3f}"), ("acc_majority", "majority ACC {:.3f}"), ("nmi", "NMI {:.3f}"),
                     ("ari", "ARI {:.3f}"),
                     ("n_empty", "empty {}"), ("silhouette", "silhouette {:.3f}"),
                     ("images_per_s_train", "{:.0f} img/s train")):
        if row.get(key) is not None and not (key == "phase" and row[key] == "final"):
            parts.append(fmt.format(row[key]))
    phases = [f"{k[5:]} {v:.1f}s" for k, v in row.items() if k.startswith("time_") and k != "time_round"
              and isinstance(v, (int, float))]
    if phases:
        parts.append("[" + ", ".join(phases) + "]")
    return " | ".join(parts)
