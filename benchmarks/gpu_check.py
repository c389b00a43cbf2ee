"""The core's GPU paths against its CPU results on the same input, without Ray (issue #14, item 5).

    python -m benchmarks.gpu_check [--out results.json]      # --against cpu: the CPU against itself (tests)

Each check runs one piece of the pure compute core on the CPU and on CUDA from the same weights and input, and
reports the largest relative difference (or, for k-means, the share of points assigned alike and the
objective's relative difference):
- faiss k-means from the same initial centroids on one GPU and on all GPUs (faiss GPU build only);
- the DeepCluster feature extractor (`embed`) of the small convnet and of AlexNet-BN;
- one SGD step of DeepCluster's classification loss, of DEC's autoencoder reconstruction and KL stage, and of
  DAC's pairwise loss: the loss and the updated weights after the step;
- bf16 against float32 on the device itself, same weights and input (issue #27): the small convnet's features
  under `torch.autocast(dtype=torch.bfloat16)`, and one DeepCluster SGD step with the forward under autocast
  (loss in float32): relative error of the features and of the loss, and the cosine between the two steps'
  weight updates. bf16 keeps 8 significant bits, so these have tolerances of their own.
Without CUDA (or without a faiss GPU build) those checks print SKIP with the reason; the CPU side still runs,
so the script is exercised wherever the tests run. Exit status 1 if any check FAILs.

What it needs travels small: the `raydc` package and torch (faiss only for the k-means check).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np

# float32 on different kernels (cuDNN convolutions, TF32 off): differences of this order are rounding.
TOLERANCE = {"features": 1e-3, "step": 1e-3, "kmeans_agree": 0.99, "kmeans_objective": 1e-3}
# bf16 autocast against float32 on the same device: relative (Frobenius) error of the features and of the loss,
# and the least cosine between the float32 and the bf16 step's weight updates.
BF16_TOLERANCE = {"features": 3e-2, "loss": 3e-2, "update_cosine": 0.95}


@dataclass
class Check:
    name: str
    status: str            # PASS | FAIL | SKIP
    detail: str
    seconds: float


def _rel(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-12))


def _cuda():
    import torch

    return torch.device("cuda") if torch.cuda.is_available() else None


def check_kmeans(n: int = 20000, d: int = 64, k: int = 100) -> list[Check]:
    out = []
    try:
        from raydc.core.faiss_backend import faiss_gpu_count, import_faiss

        import_faiss()
    except Exception as e:  # noqa: BLE001 - no faiss here: say so and go on
        return [Check("kmeans_gpu", "SKIP", f"faiss not importable ({type(e).__name__}: {e})", 0.0)]
    from raydc.core.kmeans import kmeans, sample_init_centroids

    rng = np.random.default_rng(0)
    x = (rng.standard_normal((n, d)) + 3 * rng.standard_normal((k, d))[rng.integers(0, k, n)]).astype(np.float32)
    init = sample_init_centroids(x, k, seed=1)
    t0 = time.perf_counter()
    # faiss on the CPU against faiss on the GPU, whatever "auto" picks (see raydc.core.kmeans.BF16_AUTO).
    ref = kmeans(x, k, niter=10, seed=0, init_centroids=init, use_gpu="never", assign_precision="fp32")
    ngpu = faiss_gpu_count()
    if ngpu == 0:
        return [Check("kmeans_gpu", "SKIP", f"CPU reference ran ({ref.backend}); no faiss GPU", time.perf_counter() - t0)]
    from raydc.core.kmeans import _one_run  # one restart on exactly `gpus` GPUs (the public call takes all)

    for label, gpus in (("one", 1), ("all", ngpu)):
        t0 = time.perf_counter()
        _, labels, distances, _, _ = _one_run(x, k, 10, 0, init, gpus, False)
        agree = float((labels == ref.labels).mean())
        obj = abs(float(distances.sum(dtype=np.float64)) - ref.final_objective) / abs(ref.final_objective)
        ok = agree >= TOLERANCE["kmeans_agree"] and obj <= TOLERANCE["kmeans_objective"]
        out.append(Check(f"kmeans_gpu_{label}", "PASS" if ok else "FAIL",
                         f"{gpus} GPU(s): {agree:.4%} of points assigned as on CPU, objective rel. diff {obj:.2e}",
                         time.perf_counter() - t0))
    # A distributed Lloyd step's assignment on the GPU index each process keeps (emptied and refilled per
    # step): twice with different centroids, each against the CPU's.
    from raydc.core.kmeans import nearest_centroids

    t0 = time.perf_counter()
    worst = 1.0
    for c in (init, ref.centroids):
        lab_cpu, _ = nearest_centroids(x, c, use_gpu="never")
        lab_gpu, _ = nearest_centroids(x, c, use_gpu="always")
        worst = min(worst, float((lab_cpu == lab_gpu).mean()))
    out.append(Check("assign_gpu_reused_index", "PASS" if worst >= TOLERANCE["kmeans_agree"] else "FAIL",
                     f"{ngpu} GPU(s), one index refilled: at least {worst:.4%} of points assigned as on CPU",
                     time.perf_counter() - t0))
    return out


def _pair(build, device):
    """A model on the CPU and an identical copy on `device`."""
    import copy

    import torch

    torch.manual_seed(0)
    cpu = build()
    return cpu, copy.deepcopy(cpu).to(device)


def check_features(device) -> list[Check]:
    import torch

    from raydc.core.models import alexnet_bn, small_convnet

    out = []
    for name, build, shape in (("small_convnet", lambda: small_convnet(1, sobel=True), (64, 1, 28, 28)),
                               ("alexnet_bn", lambda: alexnet_bn(3, sobel=True), (8, 3, 224, 224))):
        t0 = time.perf_counter()
        x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
        cpu, _ = _pair(build, "cpu")
        with torch.no_grad():
            a = cpu.eval().embed(x).numpy()
        if device is None:
            out.append(Check(f"features_{name}", "SKIP", f"CPU ran, embedding {a.shape}; no CUDA",
                             time.perf_counter() - t0))
            continue
        cpu, gpu = _pair(build, device)
        with torch.no_grad():
            a = cpu.eval().embed(x).numpy()
            b = gpu.eval().embed(x.to(device)).cpu().numpy()
        r = _rel(a, b)
        out.append(Check(f"features_{name}", "PASS" if r <= TOLERANCE["features"] else "FAIL",
                         f"embedding {a.shape}, max rel. diff {r:.2e}", time.perf_counter() - t0))
    return out


def _step(model, loss_fn, device, lr: float = 0.05) -> tuple[float, list[np.ndarray]]:
    import torch

    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    opt.zero_grad(set_to_none=True)
    loss = loss_fn(model, device)
    loss.backward()
    opt.step()
    return float(loss.detach().cpu()), [p.detach().cpu().numpy().copy() for p in model.parameters()]


def _deepcluster_loss(model, device):
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
    return F.cross_entropy(model(x.to(device)), y.to(device))


def _dec_reconstruction_loss(model, device):
    import torch

    x = torch.rand(64, 784, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(4)  # the denoising dropout mask: the same draws on CPU; CUDA draws its own (see below)
    return model.finetune_loss(x.to(device))


def _dec_kl_loss(model, device):
    import torch

    from raydc.core.dec import kl_loss, target_distribution

    x = torch.rand(64, 784, generator=torch.Generator().manual_seed(5))
    q = model.cluster(model.ae.encode(x.to(device)))
    return kl_loss(q, target_distribution(q.detach()))


def _dac_loss(model, device):
    import torch

    from raydc.core.dac import pair_loss, select_pairs, similarity_matrix

    x = torch.randn(32, 1, 28, 28, generator=torch.Generator().manual_seed(6))
    s = similarity_matrix(model(x.to(device)))
    same, different = select_pairs(s.detach(), 0.9, 0.5)
    return pair_loss(s, same, different)


def _dec_net():
    import torch

    from raydc.core.dec import DECNet

    net = DECNet(784, [500, 500, 2000, 10], 0.0, 10, 1.0, seed=0)
    with torch.no_grad():  # spread centres (k-means sets them in a run): q is far from uniform, the loss from 0
        net.cluster.centers.copy_(torch.randn(net.cluster.centers.shape, generator=torch.Generator().manual_seed(7)))
    return net


def check_steps(device) -> list[Check]:
    from raydc.core.autoencoder import StackedAutoencoder
    from raydc.core.dac import LabelFeatureNet, dac_convnet

    cases = [
        ("deepcluster_step", _deepcluster_net, _deepcluster_loss),
        # Dropout off: CPU and CUDA generators draw different masks, and a check of kernels must not compare them.
        ("dec_reconstruction_step", lambda: StackedAutoencoder(784, [500, 500, 2000, 10], corruption=0.0, seed=0),
         _dec_reconstruction_loss),
        ("dec_kl_step", _dec_net, _dec_kl_loss),
        ("dac_step", lambda: LabelFeatureNet(dac_convnet(1, 10, variant="mnist")), _dac_loss),
    ]
    out = []
    for name, build, loss_fn in cases:
        t0 = time.perf_counter()
        cpu, _ = _pair(build, "cpu")
        loss_a, params_a = _step(cpu, loss_fn, "cpu")
        if device is None:
            out.append(Check(name, "SKIP", f"CPU ran, loss {loss_a:.4f}; no CUDA", time.perf_counter() - t0))
            continue
        cpu, gpu = _pair(build, device)
        loss_a, params_a = _step(cpu, loss_fn, "cpu")
        loss_b, params_b = _step(gpu, loss_fn, device)
        r_loss = abs(loss_a - loss_b) / max(abs(loss_a), 1e-12)
        r_params = max(_rel(a, b) for a, b in zip(params_a, params_b))
        ok = r_loss <= TOLERANCE["step"] and r_params <= TOLERANCE["step"]
        out.append(Check(name, "PASS" if ok else "FAIL",
                         f"loss {loss_a:.5f} vs {loss_b:.5f} (rel. {r_loss:.2e}), updated weights max rel. diff "
                         f"{r_params:.2e}", time.perf_counter() - t0))
    return out


def _rel_fro(a, b) -> float:
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(a), 1e-12))


def _deepcluster_net():
    import torch.nn as nn

    from raydc.core.models import small_convnet

    m = small_convnet(1, sobel=True)
    m.top_layer = nn.Linear(m.feature_dim, 10)
    return m


def _update(before: list[np.ndarray], after: list[np.ndarray]) -> np.ndarray:
    return np.concatenate([(b - a).ravel() for a, b in zip(before, after)]).astype(np.float64)


def check_bf16(device) -> list[Check]:
    """float32 against bf16 autocast on `device` (CUDA; the CPU with --against cpu), same weights and input."""
    import copy

    import torch

    if device is None:
        return [Check(name, "SKIP", "no CUDA", 0.0) for name in ("features_small_convnet_bf16", "deepcluster_step_bf16")]
    out = []
    t0 = time.perf_counter()
    torch.manual_seed(0)
    model = _deepcluster_net().to(device).eval()
    x = torch.randn(64, 1, 28, 28, generator=torch.Generator().manual_seed(1)).to(device)
    with torch.no_grad():
        a = model.embed(x).float().cpu().numpy()
        with torch.autocast(device.type, dtype=torch.bfloat16):
            b = model.embed(x).float().cpu().numpy()
    r = _rel_fro(a, b)
    out.append(Check("features_small_convnet_bf16", "PASS" if r <= BF16_TOLERANCE["features"] else "FAIL",
                     f"{device.type}: embedding {a.shape}, bf16 vs float32 rel. error {r:.2e}", time.perf_counter() - t0))

    t0 = time.perf_counter()
    torch.manual_seed(0)
    fp32 = _deepcluster_net().to(device)
    bf16 = copy.deepcopy(fp32)
    before = [p.detach().cpu().numpy().copy() for p in fp32.parameters()]

    def bf16_loss(model, dev):
        import torch.nn.functional as F

        g = torch.Generator().manual_seed(2)
        xb, y = torch.randn(32, 1, 28, 28, generator=g), torch.randint(0, 10, (32,), generator=g)
        with torch.autocast(dev.type, dtype=torch.bfloat16):
            logits = model(xb.to(dev))
        return F.cross_entropy(logits.float(), y.to(dev))

    loss_a, params_a = _step(fp32, _deepcluster_loss, device)
    loss_b, params_b = _step(bf16, bf16_loss, device)
    r_loss = abs(loss_a - loss_b) / max(abs(loss_a), 1e-12)
    ua, ub = _update(before, params_a), _update(before, params_b)
    cos = float(ua @ ub / max(np.linalg.norm(ua) * np.linalg.norm(ub), 1e-30))
    ok = r_loss <= BF16_TOLERANCE["loss"] and cos >= BF16_TOLERANCE["update_cosine"]
    out.append(Check("deepcluster_step_bf16", "PASS" if ok else "FAIL",
                     f"{device.type}: loss {loss_a:.5f} float32 vs {loss_b:.5f} bf16 (rel. {r_loss:.2e}), "
                     f"weight updates' cosine {cos:.5f}", time.perf_counter() - t0))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--against", choices=("cuda", "cpu"), default="cuda",
                    help="cpu: compare the CPU with itself (the comparisons must then be exact; for testing)")
    args = ap.parse_args(argv)
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False  # compare float32 with float32, not with TF32
    torch.backends.cudnn.allow_tf32 = False
    device = _cuda() if args.against == "cuda" else torch.device("cpu")
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "gpus": torch.cuda.device_count(),
           "device_name": torch.cuda.get_device_name(0) if device is not None and device.type == "cuda" else None,
           "against": args.against}
    print(f"torch {env['torch']}, CUDA {env['cuda']}, {env['gpus']} GPU(s)"
          + (f": {env['device_name']}" if env["device_name"] else ""), flush=True)
    checks: list[Check] = []
    for group in (check_kmeans, lambda: check_features(device), lambda: check_steps(device),
                  lambda: check_bf16(device)):
        for c in group():
            print(f"{c.status:4s} {c.name}: {c.detail} [{c.seconds:.1f} s]", flush=True)
            checks.append(c)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"env": env, "tolerance": TOLERANCE, "bf16_tolerance": BF16_TOLERANCE, "checks": [asdict(c) for c in checks]}, f, indent=1)
    return 1 if any(c.status == "FAIL" for c in checks) else 0


if __name__ == "__main__":
    sys.exit(main())
