"""Training throughput: DeepCluster's training epoch through Ray Train + Ray Data (1 and 2 workers) against a
plain PyTorch loop with a `DataLoader` over the same decoded uint8 images.

How the Ray side is run (a minimal TorchTrainer loop, not `run_training`): one `TorchTrainer.fit()` per worker
count whose loop builds the model, optimizers and `WorkerContext` exactly as `raydc.engine.loop` does and then
calls `DeepCluster.train_round` -- the production per-epoch training code: streaming split of the Parquet
shards, decode, Poisson uniform-over-clusters resampling, bounded shuffle, `to_model_input` augmentation,
a fresh top layer, SGD, DDP with `find_unused_parameters`, the per-step all-reduce that keeps workers in step.
Pseudo-labels are fixed random labels over k=10 clusters (clustering is not what is measured here; see the
`epoch` benchmark for a whole DeepCluster epoch). The first pass is a warm-up; the median over the next ones
is reported. The fit's own start-up (workers, process group, dataset planning) is measured separately.

Plain loop: `DataLoader(TensorDataset(ids, uint8 images), batch_size=256, shuffle=True, drop_last=True)`,
the same `to_model_input` augmentation (same `Augment` settings), same model and optimizers (body SGD with
momentum, head SGD), cross-entropy; torch's default threads (= what one Ray Train worker gets here).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from benchmarks.common import Context, decoded_images, summarize

NAME = "train"
NEEDS_RAY = True

CONFIGS = {
    # quick: a smoke test (1 warm-up + 1 timed pass; small batches so 2 workers both get steps).
    "quick": {"split": "test", "limit": 512, "workers": [1, 2], "passes": 2, "batch_size": 64},
    "full": {"split": "train", "limit": 20_000, "workers": [1, 2], "passes": 4, "batch_size": 256},
}
K = 10


def _config(shard_dir: Path, workers: int, batch_size: int, *extra: str):
    from raydc.config import load_config

    return load_config(None, [
        f"data.shards={shard_dir}", "cluster.k=10", f"train.num_workers={workers}",
        f"train.batch_size={batch_size}", "train.crop_scale_min=0.5", "train.hflip=false", "train.use_gpu=never",
        *extra,
    ])


def _labels(n: int) -> tuple[np.ndarray, np.ndarray]:
    labels = np.random.default_rng(0).integers(K, size=n).astype(np.int64)
    return labels, np.bincount(labels, minlength=K)


def _train_loop(conf: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray
    import ray.train.torch
    import torch

    from raydc.engine.contexts import WorkerContext
    from raydc.engine.loop import worker_setup
    from raydc.methods.base import RoundPlan
    from raydc.methods.deepcluster import PseudoLabels

    t_enter = time.time()
    cfg, manifest, method, rank, world, device = worker_setup(conf["config"])
    model = method.build_model()
    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": True})
    state = method.init_state()
    optimizers = method.optimizers(WorkerContext.unwrap(model), state)
    shard = ray.train.get_dataset_shard("train")
    wctx = WorkerContext(cfg, manifest, shard, rank, world, device, optimizers, method.in_channels, lambda m: None,
                         method.input_size)
    if cfg.method == "dac":  # a mid-curriculum round: u and l where a 20-round official schedule has them
        from raydc.methods.dac import PairThresholds

        plan = RoundPlan(targets=PairThresholds(*method.schedule().at(cfg.train.epochs // 2)))
    else:
        from raydc.core.rowblocks import RowBlocks

        labels, sizes = _labels(manifest.count)  # one in-process block over every row (rows are 0..N-1)
        blocks = RowBlocks(np.array([0]), np.array([manifest.count]), [labels.astype(np.int32)])
        plan = RoundPlan(targets=PseudoLabels(blocks, sizes, manifest.count))
    passes = []
    t_ready = time.time()
    for r in range(conf["passes"]):
        t0 = time.perf_counter()
        row = method.train_round(wctx, model, plan, state, r)
        row["wall_s"] = time.perf_counter() - t0
        passes.append(row)
    if rank == 0:
        out = {"t_enter": t_enter, "t_ready": t_ready, "t_done": time.time(), "world": world,
               "torch_threads": torch.get_num_threads(), "passes": passes}
        Path(conf["out"]).write_text(json.dumps(out))


def ray_train(ctx: Context, shard_dir: Path, workers: int, passes: int, batch_size: int, *extra: str) -> dict:
    """`passes` production training rounds (`Method.train_round`) inside one fit, for the method `extra`
    selects (DeepCluster by default)."""
    from ray.data import ExecutionOptions
    from ray.train import DataConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raydc.config_loader import to_dict
    from raydc.data.manifest import load_manifest
    from raydc.engine.datasets import check_shard_footers
    from raydc.engine.trainer import training_dataset

    cfg = _config(shard_dir, workers, batch_size, *extra)
    # The dataset exactly as run_training builds it (data.cache: cached in the object store when it fits).
    dataset = training_dataset(cfg, check_shard_footers(load_manifest(shard_dir), shard_dir), log=lambda m: None)
    out = ctx.work / f"train-{cfg.method}-w{workers}-{cfg.data.cache}.json"
    out.unlink(missing_ok=True)
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={"config": to_dict(cfg), "passes": passes, "out": str(out)},
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=False,
                                     resources_per_worker={"CPU": cfg.train.cpus_per_worker}),
        datasets={"train": dataset},
        dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
        run_config=RunConfig(name=f"bench-train-{cfg.method}-w{workers}-{cfg.data.cache}",
                             storage_path=str(ctx.work / "ray_train")),
    )
    t_call = time.time()
    trainer.fit()
    t_ret = time.time()
    res = json.loads(out.read_text())
    timed = res["passes"][1:] or res["passes"]
    ips = [p["images_per_s_train"] for p in timed]
    return {
        "workers": workers,
        "data_cache": cfg.data.cache,
        "torch_threads_per_worker": res["torch_threads"],
        "images_per_s": summarize(ips),
        "seconds_per_pass": summarize([p["time_train"] for p in timed]),
        "images_per_pass": [p["train_images"] for p in res["passes"]],
        "warmup_pass": res["passes"][0],
        "fit_seconds": t_ret - t_call,
        "fit_startup_s": res["t_enter"] - t_call,         # TorchTrainer.fit() until the loop runs
        "loop_setup_s": res["t_ready"] - res["t_enter"],  # model, DDP, dataset shard
        "fit_teardown_s": t_ret - res["t_done"],
    }


def plain_pass(method, model, images: np.ndarray, labels: np.ndarray, batch_size: int, epoch: int, seed: int,
               body_opt) -> tuple[float, int]:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from raydc.core.stream import Augment, to_model_input

    t = method.cfg.train
    aug = Augment(method.input_size, crop=t.crop, flip=t.hflip, scale_min=t.crop_scale_min,
                  kind=t.augment)
    ds = TensorDataset(torch.arange(len(images)), torch.from_numpy(images))
    loader = DataLoader(ds, batch_size=batch_size, shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(seed + epoch))
    g = torch.Generator().manual_seed(seed + epoch)
    with torch.no_grad():
        model.top_layer.weight.copy_(torch.randn(model.top_layer.weight.shape, generator=g) * 0.01)
        model.top_layer.bias.zero_()
    head_opt = torch.optim.SGD(model.top_layer.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    model.train()
    n = 0
    t0 = time.perf_counter()
    for ids, imgs in loader:
        ids_np = ids.numpy()
        x = to_model_input(ids_np, np.zeros(len(ids_np), np.int64), imgs.numpy(), seed=seed, epoch=epoch,
                           augment=aug, size=method.input_size)
        y = torch.from_numpy(labels[ids_np])
        loss = F.cross_entropy(model(x), y)
        body_opt.zero_grad(set_to_none=True)
        head_opt.zero_grad(set_to_none=True)
        loss.backward()
        body_opt.step()
        head_opt.step()
        n += len(ids_np)
    return time.perf_counter() - t0, n


def interleaved(ctx: Context, shard_dir: Path, cfg_b: dict, plain_once, plain: list, *extra: str,
                streamed: bool = True):
    """One warm-up plain pass, then Ray Train fits for each worker count with plain passes spread between them
    (so a change in the machine's load hits both sides). Returns (rows per fit with their ratio to the plain
    median, the timed plain passes, the plain summary)."""
    plain_once()  # warm-up
    plain.clear()
    plain_once()
    ray_rows = {}
    # The default (data.cache: auto, which caches these shards) for each worker count, then 1 worker streaming
    # the shards every pass (data.cache: never), the path datasets too large for the object store take.
    fits = [(f"ray_train_w{w}", w, ()) for w in cfg_b["workers"]]
    if streamed:
        fits.append((f"ray_train_w{cfg_b['workers'][0]}_streamed", cfg_b["workers"][0], ("data.cache=never",)))
    for name, w, more in fits:
        row = ray_train(ctx, shard_dir, w, cfg_b["passes"], cfg_b["batch_size"], *extra, *more)
        ray_rows[name] = row
        ctx.log(f"  {name}: {row['images_per_s']['median']:.0f} img/s (fit start-up {row['fit_startup_s']:.1f}s)")
        plain_once()
    while len(plain) < max(2, cfg_b["passes"] - 1):
        plain_once()
    plain_ips = summarize([n / s for s, n in plain])
    ctx.log(f"  plain_loop: {plain_ips['median']:.0f} img/s")
    for row in ray_rows.values():
        row["ratio_vs_plain"] = row["images_per_s"]["median"] / plain_ips["median"]
    return ray_rows, plain, plain_ips


def run(ctx: Context) -> dict:
    import torch

    from raydc.methods import build_method

    cfg_b = CONFIGS[ctx.mode]
    ctx.ensure_ray()
    shard_dir, manifest = ctx.mnist_shards(cfg_b["split"], cfg_b["limit"])
    _, images = decoded_images(shard_dir, manifest)
    labels, _ = _labels(manifest.count)
    cfg = _config(shard_dir, 1, cfg_b["batch_size"])
    method = build_method(cfg, manifest)
    model = method.build_model()
    body_opt = method.optimizers(model, {})["body"]
    bs = cfg_b["batch_size"]

    plain: list[tuple[float, int]] = []
    epoch = 0

    def plain_once():
        nonlocal epoch
        plain.append(plain_pass(method, model, images, labels, bs, epoch, cfg.train.seed, body_opt))
        epoch += 1

    ctx.log(f"  {manifest.count} MNIST images, batch {bs}/worker, {cfg_b['passes']} passes per fit (1 warm-up)")
    ray_rows, plain, plain_ips = interleaved(ctx, shard_dir, cfg_b, plain_once, plain)
    return {
        "config": {**cfg_b, "images": manifest.count, "k": K, "torch_threads_plain": torch.get_num_threads(),
                   "ray_side": "minimal TorchTrainer loop calling raydc.methods.deepcluster.DeepCluster.train_round "
                               "(the production per-epoch training code) with fixed random pseudo-labels",
                   "plain_side": "DataLoader(TensorDataset) + raydc.core.stream.to_model_input, same model and "
                                 "optimizers"},
        "results": {**ray_rows, "plain_loop": {"images_per_s": plain_ips, "seconds_per_pass": summarize(
            [s for s, _ in plain]), "images_per_pass": plain[0][1], "ratio_vs_plain": 1.0}},
    }
