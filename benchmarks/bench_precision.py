"""float32 against bf16 autocast, per network of the core (issue #27): one SGD step and one feature pass.

For DeepCluster's small convnet (Sobel + 3 conv stages + FC, 10-way head, cross-entropy), DEC's stacked
autoencoder (784-500-500-2000-10, reconstruction loss) and DAC's all-convolutional MNIST net (pairwise loss on
its label features), on random 28 x 28 inputs: images/s of a training step (forward, loss, backward, SGD with
momentum) and of a feature pass (`no_grad` forward in eval mode: DeepCluster's `embed`, DEC's encoder, DAC's
label features). bf16 is plain `torch.autocast("cpu", dtype=torch.bfloat16)` around the forward; the loss is
computed in float32 from the forward's output. Both precisions run in this process on the same weights and
inputs, round robin, after an untimed warm-up: the ratio bf16 / float32 is what to read on a shared machine.
"""
from __future__ import annotations

import copy
import time
from contextlib import nullcontext

from benchmarks.common import Context, ratio, summarize

NAME = "precision"
NEEDS_RAY = False

CONFIGS = {
    "quick": {"batch": 32, "steps_per_sample": 1, "repeats": 2},
    "full": {"batch": 256, "steps_per_sample": 2, "repeats": 5},
}
NETS = {
    "deepcluster_smallconvnet": "raydc.core.models.small_convnet(1, sobel=True) + Linear(256, 10), cross-entropy",
    "dec_autoencoder": "raydc.core.autoencoder.StackedAutoencoder(784, [500, 500, 2000, 10]), reconstruction MSE",
    "dac_convnet": "raydc.core.dac.LabelFeatureNet(dac_convnet(1, 10, variant='mnist')), pairwise BCE loss",
}


def _build(name: str):
    """(model, loss of (model, x, autocast context), features of (model, x), input shape)."""
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    from raydc.core.autoencoder import StackedAutoencoder
    from raydc.core.dac import LabelFeatureNet, dac_convnet, pair_loss, select_pairs, similarity_matrix
    from raydc.core.models import small_convnet

    torch.manual_seed(0)
    if name == "deepcluster_smallconvnet":
        model = small_convnet(1, sobel=True)
        model.top_layer = nn.Linear(model.feature_dim, 10)
        y = torch.randint(0, 10, (4096,), generator=torch.Generator().manual_seed(1))

        def loss(m, x, ac):
            with ac:
                out = m(x)
            return F.cross_entropy(out.float(), y[: len(x)])

        return model, loss, lambda m, x: m.embed(x), (1, 28, 28)
    if name == "dec_autoencoder":
        model = StackedAutoencoder(784, [500, 500, 2000, 10], corruption=0.0, seed=0)

        def loss(m, x, ac):
            with ac:
                out = m(x)
            return F.mse_loss(out.float(), x.flatten(1))

        return model, loss, lambda m, x: m.encode(x), (784,)
    if name == "dac_convnet":
        model = LabelFeatureNet(dac_convnet(1, 10, variant="mnist"))

        def loss(m, x, ac):
            with ac:
                out = m(x)
            s = similarity_matrix(out.float())
            same, different = select_pairs(s.detach(), 0.9, 0.5)
            return pair_loss(s, same, different)

        return model, loss, lambda m, x: m(x), (1, 28, 28)
    raise ValueError(name)


def _autocast(precision: str):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else nullcontext()


def measure(name: str, batch: int, steps: int, repeats: int) -> dict:
    import torch

    model, loss_fn, feat_fn, shape = _build(name)
    models = {"fp32": model, "bf16": copy.deepcopy(model)}
    opts = {p: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for p, m in models.items()}
    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(2))

    def train(p: str) -> None:
        m = models[p].train()
        for _ in range(steps):
            opts[p].zero_grad(set_to_none=True)
            loss_fn(m, x, _autocast(p)).backward()
            opts[p].step()

    def features(p: str) -> None:
        m = models[p].eval()
        with torch.no_grad(), _autocast(p):
            for _ in range(steps):
                feat_fn(m, x)

    out: dict = {}
    for phase, fn in (("train_step", train), ("feature_pass", features)):
        for p in models:  # warm-up: oneDNN builds its kernels for each shape and dtype once
            fn(p)
        samples: dict[str, list[float]] = {p: [] for p in models}
        for _ in range(repeats):
            for p in models:
                t0 = time.perf_counter()
                fn(p)
                samples[p].append(time.perf_counter() - t0)
        rows = {}
        for p, s in samples.items():
            summ = summarize(s)
            ips = [batch * steps / v for v in s]
            rows[p] = {"seconds": summ, "images_per_s": summarize(ips)}
        out[phase] = {**rows, "bf16_speedup": ratio(rows["fp32"]["seconds"], rows["bf16"]["seconds"])}
    # How far bf16 moves the features of the same weights (the networks after the steps above differ).
    fresh, _, feat, _ = _build(name)
    fresh.eval()
    with torch.no_grad():
        a = feat(fresh, x).float()
        with _autocast("bf16"):
            b = feat(fresh, x).float()
    out["feature_rel_error"] = float((a - b).norm() / a.norm().clamp_min(1e-12))
    return out


def run(ctx: Context) -> dict:
    import torch

    from raydc.core.kmeans import cpu_bf16_flag

    cfg = CONFIGS[ctx.mode]
    results = {}
    for name in NETS:
        ctx.log(f"  {name}: batch {cfg['batch']}, {cfg['steps_per_sample']} step(s) per sample, "
                f"{cfg['repeats']} repeats (interleaved)")
        r = measure(name, cfg["batch"], cfg["steps_per_sample"], cfg["repeats"])
        results[name] = r
        ctx.log("    " + "; ".join(f"{ph} fp32 {r[ph]['fp32']['images_per_s']['median']:.0f} img/s, "
                                   f"bf16 {r[ph]['bf16']['images_per_s']['median']:.0f} img/s = "
                                   f"{r[ph]['bf16_speedup']:.2f}x" for ph in ("train_step", "feature_pass"))
                + f"; feature rel. error {r['feature_rel_error']:.1e}")
    return {"config": {**cfg, "input": "torch.rand, 28 x 28 (DEC: 784 flat), same inputs and weights for both",
                       "bf16": "torch.autocast('cpu', dtype=torch.bfloat16) around the forward; loss in float32",
                       "speedup": "median float32 seconds / median bf16 seconds (> 1: bf16 faster)",
                       "cpu_bf16": cpu_bf16_flag(), "torch_threads": torch.get_num_threads()},
            "nets": NETS, "results": results}
