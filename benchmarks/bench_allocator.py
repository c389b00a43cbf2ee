"""Freed batches kept mapped (raydc/_malloc.py) against glibc's defaults, each in a fresh process.

The setting is per process and glibc's own threshold moves with what the process has done, so every sample is
its own `python -m benchmarks.bench_allocator --worker ...` process: `default` (RAYDC_MALLOC=default, what a feature
pool actor ran before), `default_trained` (the same after three SGD steps, which raise glibc's threshold by itself:
why a pass in a process that had trained ran faster than in one that never had) and `retain` (what `import
raydc` now sets). The networks, batches and layouts are the shipped presets' (bench_precision's `_build`, weights
channels_last as train.memory_format auto picks for convolutions). Variants are interleaved across repeats; the
ratio is retain / default per phase.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from contextlib import nullcontext

from benchmarks.common import REPO, Context, ratio, summarize

VARIANTS = ("default", "default_trained", "retain")
NETS = ("deepcluster_smallconvnet", "dac_convnet", "dec_autoencoder")


def _worker(name: str, phase: str, variant: str, batch: int, steps: int) -> dict:
    """One sample, in this process: images/s of `steps` training steps or feature batches after one warm-up."""
    import torch

    from benchmarks.bench_precision import _build
    from raydc._malloc import retain_freed_memory
    from raydc.core.augment import to_float

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    model, loss_fn, feat_fn, shape = _build(name)
    conv = len(shape) == 3
    if conv:
        model = model.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(batch, *shape, generator=gen)
    x_feat = to_float(torch.randint(0, 256, (batch, shape[1], shape[2], shape[0]), generator=gen,
                                    dtype=torch.uint8).numpy()) if conv else x
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def train(n: int) -> None:
        model.train()
        for _ in range(n):
            opt.zero_grad(set_to_none=True)
            loss_fn(model, x, nullcontext()).backward()
            opt.step()

    def features(n: int) -> None:
        model.eval()
        with torch.no_grad():
            for _ in range(n):
                feat_fn(model, x_feat)

    if variant == "default_trained":
        train(3)
    fn = train if phase == "train_step" else features
    fn(1)
    t0 = time.perf_counter()
    fn(steps)
    seconds = time.perf_counter() - t0
    return {"images_per_s": batch * steps / seconds, "seconds": seconds, "malloc": retain_freed_memory()}


def _sample(name: str, phase: str, variant: str, batch: int, steps: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "RAYDC_MALLOC"))}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    if variant.startswith("default"):
        env["RAYDC_MALLOC"] = "default"
    out = subprocess.run([sys.executable, "-m", "benchmarks.bench_allocator", "--worker", name, phase, variant,
                          str(batch), str(steps)], env=env, cwd=REPO, capture_output=True, text=True, check=True,
                         timeout=600)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run(ctx: Context) -> dict:
    from raydc._malloc import MMAP_THRESHOLD, TRIM_THRESHOLD, glibc_version

    quick = ctx.mode == "quick"
    repeats, steps = (1, 2) if quick else (3, 8)
    batches = {"train_step": 256, "feature_pass": 512}  # the presets' train.batch_size / features.batch_size
    results: dict = {}
    for name in NETS[:1] if quick else NETS:
        results[name] = {}
        for phase, batch in batches.items():
            samples: dict[str, list[dict]] = {v: [] for v in VARIANTS}
            for _ in range(repeats):
                for v in VARIANTS:
                    samples[v].append(_sample(name, phase, v, batch, steps))
            rows = {v: {"seconds": summarize([s["seconds"] for s in ss]),
                        "images_per_s": summarize([s["images_per_s"] for s in ss]),
                        "malloc": ss[0]["malloc"]} for v, ss in samples.items()}
            for v in rows:
                rows[v]["speedup_vs_default"] = ratio(rows["default"]["seconds"], rows[v]["seconds"])
            results[name][phase] = rows
            print(f"  {name} {phase}: " + ", ".join(
                f"{v} {r['images_per_s']['median']:,.0f} img/s ({r['speedup_vs_default']:.2f}x)"
                for v, r in rows.items()), flush=True)
    return {"config": {"repeats": repeats, "steps": steps, "batches": batches, "glibc": glibc_version(),
                       "mmap_threshold": MMAP_THRESHOLD, "trim_threshold": TRIM_THRESHOLD,
                       "memory_format": "channels_last (convolutions)", "threads": os.cpu_count()},
            "results": results}


if __name__ == "__main__" and len(sys.argv) == 7 and sys.argv[1] == "--worker":
    print(json.dumps(_worker(sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), int(sys.argv[6]))))
