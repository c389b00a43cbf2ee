"""DAC's pairwise training step: raydc's production round (`DAC.train_round` inside Ray Train + Ray Data, the
global-batch gather, the selection pass, augmentation, BCE on the selected pairs) against a plain
single-process loop over the same decoded images with the same model, optimizer and pair maths
(`raydc.core.dac`), same batch size. Same run, interleaved, ratios reported; the fit's start-up is apart.

Both sides use the reference MNIST net (`model.arch: dac_mnist`) at a mid-curriculum threshold pair.
"""
from __future__ import annotations

import time

import numpy as np

from benchmarks.bench_train import interleaved
from benchmarks.common import Context, decoded_images, summarize

NAME = "dac"
NEEDS_RAY = True

CONFIGS = {
    "quick": {"split": "test", "limit": 512, "workers": [1], "passes": 2, "batch_size": 64},
    "full": {"split": "train", "limit": 6_400, "workers": [1, 2], "passes": 3, "batch_size": 128},
}
DAC_SETS = ["method=dac", "model.arch=dac_mnist", "model.sobel=false", "cluster.pca_dim=0", "train.epochs=20"]


def plain_pass(method, model, opt, images: np.ndarray, batch_size: int, epoch: int) -> tuple[float, int]:
    """One pass of the same step, written directly: no Ray, no streaming, no gather."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from raydc.core.augment import random_affine, resize_center, to_float
    from raydc.core.dac import frozen_bn_stats, pair_loss, select_pairs, similarity_matrix

    d, size = method.opts, method.input_size
    upper, lower = method.schedule().at(method.cfg.train.epochs // 2)
    loader = DataLoader(TensorDataset(torch.arange(len(images)), torch.from_numpy(images)), batch_size=batch_size,
                        shuffle=True, drop_last=True, generator=torch.Generator().manual_seed(epoch))
    rng = np.random.default_rng(epoch)
    model.train()
    n, t0 = 0, time.perf_counter()
    for _, imgs in loader:
        x = resize_center(to_float(imgs.numpy()), size)
        with torch.no_grad(), frozen_bn_stats(model):
            select = similarity_matrix(model(x))
        x_aug = random_affine(x, rng.random((len(x), 5)), rotation_deg=d.rotation_deg, shift=d.shift,
                              zoom=(d.zoom_min, d.zoom_max), flip=d.hflip)
        sim = similarity_matrix(model(x_aug))
        same, different = select_pairs(select, upper, lower)
        loss = pair_loss(sim, same, different, d.loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        n += len(imgs)
    return time.perf_counter() - t0, n


def run(ctx: Context) -> dict:
    import torch

    from benchmarks.bench_train import _config
    from raydc.methods import build_method

    cfg_b = CONFIGS[ctx.mode]
    ctx.ensure_ray()
    shard_dir, manifest = ctx.mnist_shards(cfg_b["split"], cfg_b["limit"])
    _, images = decoded_images(shard_dir, manifest)
    bs = cfg_b["batch_size"]
    sets = [*DAC_SETS, f"dac.batch_size={bs}"]
    method = build_method(_config(shard_dir, 1, bs, *sets), manifest)
    model = method.build_model()
    opt = method.optimizers(model, method.init_state())["net"]

    plain: list[tuple[float, int]] = []

    def plain_once():
        plain.append(plain_pass(method, model, opt, images, bs, len(plain)))

    ctx.log(f"  {manifest.count} MNIST images, DAC pairs over batches of {bs}/worker, {cfg_b['passes']} passes "
            f"per fit (1 warm-up)")
    ray_rows, plain, plain_ips = interleaved(ctx, shard_dir, cfg_b, plain_once, plain, *sets, streamed=False)
    return {
        "config": {**cfg_b, "images": manifest.count, "torch_threads_plain": torch.get_num_threads(),
                   "ray_side": "minimal TorchTrainer loop calling raydc.methods.dac.DAC.train_round (the production "
                               "per-round training: stop-grad selection pass, augmentation, global gather, BCE)",
                   "plain_side": "DataLoader(TensorDataset) + the same raydc.core.dac maths, same model, optimizer, "
                                 "batch size and thresholds"},
        "results": {**ray_rows, "plain_loop": {"images_per_s": plain_ips, "seconds_per_pass": summarize(
            [s for s, _ in plain]), "images_per_pass": plain[0][1], "ratio_vs_plain": 1.0}},
    }
