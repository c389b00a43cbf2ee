"""What the loop hands a method: `WorkerContext` on every Train worker (its batches, the one SGD loop,
collectives) and `RankZeroContext` on rank 0 (the feature pass and the shard actors, saved columns). The
Protocols they keep are `raydc.methods.api.TrainContext` and `RoundContext`; mypy checks it below."""
from __future__ import annotations

import dataclasses
import time
from collections import Counter
from typing import Any, Callable

import numpy as np
import torch
import torch.nn as nn

from raydc.config import Config
from raydc.core.extractor import ExtractorSpec
from raydc.core.seeding import derive_seed
from raydc.core.stream import decoded_rows, shuffled_batches
from raydc.errors import NumericalError
from raydc.methods.api import ExtractInfo, PassStats, RoundContext, ShardService, TrainContext
from raydc.methods.base import FinalClustering

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
    """What a method's `plan`/`finalize`/`place_new_images` may use on rank 0: the feature pool over `shard_dir` and the
    shard actors (`service`), started on first use: a method that never asks pays nothing for them."""

    def __init__(self, cfg: Config, manifest, shard_dir: str, make_service: Callable[[], Any], log,
                 precision: str = "fp32", memory_format: str | None = None, manifold_actor: bool = True):
        self.cfg, self.manifest, self.shard_dir, self.log = cfg, manifest, shard_dir, log
        self.precision = precision  # rank 0's resolved precision: the feature passes run in it too
        self.memory_format = memory_format  # the run's weights' layout (None: each pool resolves `auto`)
        self._make_service = make_service
        self._service = None
        self._published: dict = {}  # saved column dir -> its RowBlocks in the object store (the latest only)
        self._features_clock: Counter = Counter()
        self._fitter: Any = None  # the manifold readout's actor (raydc.engine.manifold_fitter), once asked for
        # False: the fit always runs here (the in-process harness, which must not start actors even where another
        # test has left Ray running)
        self._manifold_actor = manifold_actor

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
        if spec.memory_format is None and self.memory_format is not None:
            spec = dataclasses.replace(spec, memory_format=self.memory_format)
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

    def prepare_manifold(self, dims: int, n_neighbors: int, metric: str, sample: int, *,
                         warm_up: bool = True, graph: str = "nndescent") -> None:
        """Start the actor that will fit the manifold readout on at most `sample` rows, compiling its JIT code
        meanwhile (`warm_up`): the code of the neighbour search UMAP will take for the sample it will get (no more
        rows than the data has), none for an exact `graph`. Idempotent; without Ray, or in the in-process harness,
        nothing happens and the fit runs here."""
        import ray

        if self._fitter is None and self._manifold_actor and ray.is_initialized():
            from raydc.core.merge import umap_search
            from raydc.engine.manifold_fitter import start_fitter

            rows = min(sample, self.manifest.count) if getattr(self.manifest, "count", None) else sample
            self._fitter = start_fitter(dims, n_neighbors, metric, warm_up, search=umap_search(rows, graph))

    def manifold_consensus(self, sample: np.ndarray, k: int, **kwargs) -> tuple[np.ndarray, np.ndarray, dict]:
        """`raydc.core.merge.manifold_consensus(sample, k, **kwargs)` in the prepared actor (else here, also when the
        actor died: its node gone, say), and what the row records of where it ran."""
        import ray

        from raydc.core.merge import manifold_consensus

        if self._fitter is not None:
            try:
                labels, agreement, info = ray.get(self._fitter.fit.remote(sample, k, kwargs))
                return labels, agreement, {key: v for key, v in info.items() if v is not None}
            except ray.exceptions.RayActorError as e:
                self.log(f"the manifold readout's actor is gone ({type(e).__name__}): fitting on rank 0 instead")
                self._fitter = None
        labels, agreement = manifold_consensus(sample, k, **kwargs)
        return labels, agreement, {}

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
        if self._fitter is not None:
            import ray

            ray.kill(self._fitter)
            self._fitter = None
        if self._service is not None:
            self._service.shutdown()
            self._service = None


def _contexts_keep_the_contract(rctx: RankZeroContext, wctx: WorkerContext) -> tuple[RoundContext, TrainContext]:
    """Never called: mypy checks here that the engine's contexts are what raydc.methods.api promises methods."""
    return rctx, wctx
