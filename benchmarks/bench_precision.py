"""What one training step and one feature pass cost per network of the core, and the levers on it (issue #27).

For DeepCluster's small convnet (Sobel + 3 conv stages + FC, 10-way head, cross-entropy), DEC's stacked
autoencoder (784-500-500-2000-10, reconstruction loss) and DAC's all-convolutional MNIST net (pairwise loss on
its label features), on random 28 x 28 inputs: images/s of a training step (forward, loss, backward, SGD with
momentum) and of a feature pass (`no_grad` forward in eval mode: DeepCluster's `embed`, DEC's encoder, DAC's
label features), in these variants of the same weights and inputs, round robin after an untimed warm-up. The
inputs come in the engine's layouts: a training batch (augmented) contiguous NCHW; a feature pass's images
through `to_float`, a permuted NHWC view (a convolution follows its input's layout too, so the weights' layout
matters less there):

- `fp32`: what raydc runs where `train.precision` resolves to fp32 (the baseline of every ratio);
- `bf16`: `torch.autocast("cpu", dtype=torch.bfloat16)` around the forward, the loss in float32. Timed only on
  a CPU with bf16 instructions: elsewhere torch emulates bf16, many times slower, which says nothing about the
  path raydc would take there (train.precision auto picks fp32 on such a CPU);
- `channels_last` (the conv nets): the weights in channels-last memory format, oneDNN's preferred one, as
  `train.memory_format: auto` lays them out;
- `compile`: `torch.compile` of the model (inductor, C++ kernels); its compile time is reported, not timed;
- `folded` (feature pass only, DeepCluster's net): the channels_last weights with every BatchNorm folded into the
  layer before it (`raydc.core.bn_fold`), what DeepCluster's feature passes run with `features.fold_batchnorm`. Not DAC's:
  its readout normalises by batch statistics (`dac.bn_readout: batch`), which a fold cannot express.

FLOPs per image come from `torch.utils.flop_counter` on one float32 step; divided by the time they give the
GFLOP/s a network reaches, beside the float32 GEMM ceiling measured in the same process (torch.mm, 2048^3): the
share of the machine a step already uses, so what any kernel-level change could still win.

Then what the shipped 70k presets ask of these rates: images trained and images passed forward over a whole
run, from each preset's own fields (`workloads`), and the minutes that alone costs at the measured float32
rates: the floor under those runs' time to quality on this machine.
"""
from __future__ import annotations

import copy
import functools
import time
from contextlib import nullcontext
from pathlib import Path

from benchmarks.common import REPO, Context, ratio, summarize

NAME = "precision"
NEEDS_RAY = False

CONFIGS = {
    "quick": {"batch": 32, "steps_per_sample": 1, "repeats": 2},
    "full": {"batch": 256, "steps_per_sample": 2, "repeats": 5},
}
# Each network at its presets' batch in full mode (DAC's pairs span 128 images), so the rates are the runs' rates.
FULL_BATCH = {"deepcluster_smallconvnet": 256, "dec_autoencoder": 256, "dac_convnet": 128}
NETS = {
    "deepcluster_smallconvnet": "raydc.core.models.small_convnet(1, sobel=True) + Linear(256, 10), cross-entropy",
    "dec_autoencoder": "raydc.core.autoencoder.StackedAutoencoder(784, [500, 500, 2000, 10]), reconstruction MSE",
    "dac_convnet": "raydc.core.dac.LabelFeatureNet(dac_convnet(1, 10, variant='mnist')), pairwise BCE loss",
}
CONV_NETS = {"deepcluster_smallconvnet", "dac_convnet"}
VARIANTS = ("fp32", "bf16", "channels_last", "compile", "folded")
FOLDED_NETS = {"deepcluster_smallconvnet"}  # whose feature pass raydc folds (ExtractorSpec.fold_batchnorm)
N_70K = 70_000


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


def _autocast(variant: str):
    import torch

    return torch.autocast("cpu", dtype=torch.bfloat16) if variant == "bf16" else nullcontext()


def gemm_gflops(repeats: int = 5, n: int = 2048) -> float:
    """float32 torch.mm of two n x n matrices, median GFLOP/s: the ceiling a conv or linear layer is bounded by."""
    import torch

    a, b = torch.rand(n, n), torch.rand(n, n)
    torch.mm(a, b)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, b)
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / summarize(times)["median"] / 1e9


def variants_here(name: str, bf16_flag: str | None) -> dict[str, str]:
    """{variant: why it is not timed} for the variants left out on this machine and network."""
    out = {}
    if not bf16_flag:
        out["bf16"] = "no bf16 instructions on this CPU: torch would emulate bf16"
    if name not in CONV_NETS:
        out["channels_last"] = "no convolutions"
    if name not in FOLDED_NETS:
        out["folded"] = "raydc does not fold this network's feature pass"
    return out


def measure(name: str, batch: int, steps: int, repeats: int, bf16_flag: str | None) -> dict:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from raydc.core.augment import to_float

    model, loss_fn, feat_fn, shape = _build(name)
    gen = torch.Generator().manual_seed(2)
    # The inputs in the layouts the engine feeds: an augmented training batch is contiguous NCHW (the affine and
    # crop transforms write a new tensor); a feature pass takes `to_float` of the decoded uint8 NHWC images, a
    # permuted view that torch already reads as channels_last (a convolution follows its input's layout).
    x = torch.rand(batch, *shape, generator=gen)
    if len(shape) == 3:
        x_feat = to_float(torch.randint(0, 256, (batch, shape[1], shape[2], shape[0]), generator=gen,
                                        dtype=torch.uint8).numpy())
    else:
        x_feat = x
    skipped = variants_here(name, bf16_flag)
    models, callers, feature_fns, compile_s = {}, {}, {}, {}
    for v in VARIANTS:
        if v in skipped:
            continue
        m = copy.deepcopy(model)
        if v in ("channels_last", "folded"):  # the weights only, as train.memory_format does
            m = m.to(memory_format=torch.channels_last)
        if v == "folded":  # an eval copy, as the feature pool runs it; trained weights stay those of the others
            from raydc.core.bn_fold import fold_batchnorm

            unfolded = copy.deepcopy(model).eval()  # what the fold's features are compared with, below
            m = fold_batchnorm(unfolded)[0].to(memory_format=torch.channels_last)
        models[v] = m
        callers[v] = torch.compile(m) if v == "compile" else m
        # the feature function itself compiled (a compiled module's call is its forward, not `embed`/`encode`)
        feature_fns[v] = torch.compile(functools.partial(feat_fn, m)) if v == "compile" else \
            functools.partial(feat_fn, m)
    opts = {v: torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for v, m in models.items() if v != "folded"}

    def train(v: str) -> None:
        models[v].train()
        for _ in range(steps):
            opts[v].zero_grad(set_to_none=True)
            loss_fn(callers[v], x, _autocast(v)).backward()
            opts[v].step()

    def features(v: str) -> None:
        models[v].eval()
        with torch.no_grad(), _autocast(v):
            for _ in range(steps):
                feature_fns[v](x_feat)

    flops = {}
    with FlopCounterMode(display=False) as fc:
        loss_fn(model.train(), x, nullcontext()).backward()
    flops["train_step"] = fc.get_total_flops() / batch
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        feat_fn(model.eval(), x_feat)
    flops["feature_pass"] = fc.get_total_flops() / batch

    out: dict = {"skipped": skipped, "flops_per_image": flops}
    for phase, fn in (("train_step", train), ("feature_pass", features)):
        timed = [v for v in models if not (v == "folded" and phase == "train_step")]  # a fold is inference only
        for v in timed:  # warm-up: oneDNN builds its kernels for each shape once; inductor compiles here
            t0 = time.perf_counter()
            fn(v)
            if v == "compile":
                compile_s[phase] = time.perf_counter() - t0
        samples: dict[str, list[float]] = {v: [] for v in timed}
        for _ in range(repeats):
            for v in timed:
                t0 = time.perf_counter()
                fn(v)
                samples[v].append(time.perf_counter() - t0)
        rows = {}
        for v, s in samples.items():
            summ = summarize(s)
            rows[v] = {"seconds": summ, "images_per_s": summarize([batch * steps / t for t in s]),
                       "gflops": flops[phase] * batch * steps / summ["median"] / 1e9}
        for v in rows:
            rows[v]["speedup_vs_fp32"] = ratio(rows["fp32"]["seconds"], rows[v]["seconds"])
        out[phase] = rows
    out["compile_seconds"] = compile_s
    # How far bf16 moves the features of the same weights (cheap, so measured even where bf16 is emulated).
    fresh, _, feat, _ = _build(name)
    fresh.eval()
    with torch.no_grad():
        a = feat(fresh, x_feat).float()
        with _autocast("bf16"):
            b = feat(fresh, x_feat).float()
    out["feature_rel_error"] = float((a - b).norm() / a.norm().clamp_min(1e-12))
    if "folded" in models:  # how far the fold moves them: rounding only
        with torch.no_grad():
            f = feat_fn(models["folded"], x_feat)
            ref = feat_fn(unfolded, x_feat)
        out["folded_rel_error"] = float((f - ref).norm() / ref.norm().clamp_min(1e-12))
    return out


def gradient_errors(name: str, batch: int) -> dict:
    """How far one training step's gradients lie from a float64 step on the same weights and batch, per layout:
    {layout: {"all": relative error of every gradient together, "worst": the worst parameter's, "worst_param": its
    name}}. Why: on the CPU, oneDNN's channels_last convolution and BatchNorm backward are a different
    computation, not only a different order of the same additions, and a less accurate gradient is a cost a
    speed ratio does not show."""
    import torch

    model, loss_fn, _, shape = _build(name)
    x = torch.rand(batch, *shape, generator=torch.Generator().manual_seed(2))
    model.train()

    def grads(m, inp) -> dict[str, "torch.Tensor"]:
        m.zero_grad(set_to_none=True)
        loss_fn(m, inp, nullcontext()).backward()
        return {n: p.grad.detach().double().clone() for n, p in m.named_parameters() if p.grad is not None}

    ref = grads(copy.deepcopy(model).double(), x.double())  # the loss itself still casts to float32 (.float())
    # a bias right before a BatchNorm has a zero gradient up to rounding: a relative error means nothing there
    largest = max(float(g.norm()) for g in ref.values())
    scored = [n for n in ref if float(ref[n].norm()) > 1e-6 * largest]
    out = {}
    for layout, fmt in (("fp32", torch.contiguous_format), ("channels_last", torch.channels_last)):
        got = grads(copy.deepcopy(model).to(memory_format=fmt), x)
        per = {n: float((got[n] - ref[n]).norm() / ref[n].norm()) for n in scored}
        cat = torch.cat([(got[n] - ref[n]).flatten() for n in per]), torch.cat([ref[n].flatten() for n in per])
        worst = max(per, key=per.get)
        out[layout] = {"all": float(cat[0].norm() / cat[1].norm()), "worst": per[worst], "worst_param": worst}
    return out


def workloads(configs: Path = REPO / "jobs" / "configs") -> list[dict]:
    """Images trained and images passed forward by a whole run of each shipped 70k preset, from its fields.

    DeepCluster: a feature pass over all N images before each of its `epochs` rounds and one after the last, and
    N x `reassign` images trained per round. DEC (the DEC-keras presets): the autoencoder's
    `pretrain_epochs` + `finetune_epochs` passes over N (the greedy stage's layer pairs counted as whole passes:
    an upper bound) before any DEC step; the DEC step itself is left out (it stops at `tol`, and costs minutes).
    DAC (official_mnist schedule): each of `epochs` rounds computes the targets of every chunk once (a forward
    pass over N) and trains `local_epochs` passes over N, and its diagnostic pass reads every image out each
    `eval_every` rounds (plus round 0's)."""
    from raydc.config import load_config

    out = []
    for name, net in (("mnist.yaml", "deepcluster_smallconvnet"), ("fmnist.yaml", "deepcluster_smallconvnet"),
                      ("dec_mnist_keras.yaml", "dec_autoencoder"), ("dec_fmnist_keras.yaml", "dec_autoencoder"),
                      ("dac_mnist.yaml", "dac_convnet"), ("dac_fmnist.yaml", "dac_convnet")):
        cfg = load_config(configs / name)
        n, rounds = N_70K, cfg.train.epochs
        if cfg.method == "deepcluster":
            train = rounds * round(n * cfg.train.reassign) if cfg.train.reassign else rounds * n
            forward = (rounds + 1) * n
            what = f"{rounds} rounds x {train // rounds:,} images trained; {rounds + 1} feature passes over N"
        elif cfg.method == "dec":
            d = cfg.dec
            epochs = d.pretrain_epochs + d.finetune_epochs
            train, forward = epochs * n, 0
            what = f"{epochs} autoencoder epochs over N (the DEC step after it not counted)"
        else:
            d = cfg.dac
            evals = rounds // max(1, d.eval_every) + 1 if d.eval_every else 1
            train, forward = rounds * d.passes * n, rounds * n + evals * n
            what = (f"{rounds} rounds x {d.passes} passes over N trained; targets once per round, "
                    f"{evals} read-outs over N")
        out.append({"config": name, "method": cfg.method, "net": net, "images": n, "train_images": train,
                    "forward_images": forward, "what": what})
    return out


def run(ctx: Context) -> dict:
    import torch

    from raydc.core.kmeans import cpu_bf16_flag

    cfg = CONFIGS[ctx.mode]
    flag = cpu_bf16_flag()
    ceiling = gemm_gflops()
    ctx.log(f"  float32 GEMM ceiling (torch.mm 2048^3): {ceiling:.0f} GFLOP/s; CPU bf16 instructions: {flag}")
    results = {}
    for name in NETS:
        batch = FULL_BATCH[name] if ctx.mode == "full" else cfg["batch"]
        ctx.log(f"  {name}: batch {batch}, {cfg['steps_per_sample']} step(s) per sample, "
                f"{cfg['repeats']} repeats (interleaved)")
        r = measure(name, batch, cfg["steps_per_sample"], cfg["repeats"], flag)
        if name in CONV_NETS:
            r["grad_error_vs_float64"] = gradient_errors(name, batch)
            ctx.log("    gradient error vs float64: " + ", ".join(
                f"{v} {e['all']:.2e} (worst {e['worst_param']} {e['worst']:.2e})"
                for v, e in r["grad_error_vs_float64"].items()))
        results[name] = {**r, "batch": batch}
        for ph in ("train_step", "feature_pass"):
            ctx.log(f"    {ph}: " + ", ".join(f"{v} {row['images_per_s']['median']:.0f} img/s "
                                              f"({row['speedup_vs_fp32']:.2f}x)" for v, row in r[ph].items())
                    + f"; fp32 {r[ph]['fp32']['gflops']:.0f} GFLOP/s")
    return {"config": {**cfg, "input": "training: torch.rand, contiguous NCHW 28 x 28 (DEC: 784 flat); feature pass: to_float of "
                                "uint8 NHWC (DEC: the same flat rows); same inputs and weights for every variant",
                       "bf16": "torch.autocast('cpu', dtype=torch.bfloat16) around the forward; loss in float32",
                       "speedup": "median float32 seconds / median seconds of the variant (> 1: faster)",
                       "cpu_bf16": flag, "torch_threads": torch.get_num_threads()},
            "gemm_ceiling_gflops": ceiling, "nets": NETS, "results": results, "workloads": workloads()}
