"""Feature extraction: raydc's Ray Data actor pool (`extract_features`, concurrency 1 and 2) against a plain
`torch.no_grad()` loop over the same decoded images, the same network and weights, the same batch size.

Two pools: `persistent_cN`, raydc's default on CPU (`raydc.engine.persistent_pool`: actors started once per
run, each pass ships only the weights) and `ray_pool_cN`, the Ray Data pool (`features.pool: ray_data`, the
GPU default). Each `extract_features` call is what one DeepCluster epoch pays with the latter: it builds a fresh actor pool (process start,
imports, weights from the object store), reads and decodes the Parquet shards, runs the network and leaves
the feature blocks in the object store. Ray's own start-up is excluded (done once per suite, reported
separately). The pool's fixed cost per call is estimated from a call on a tiny shard set (full mode), so the
steady-state rate can be told apart from the start-up.

The plain loop gets the images already decoded to uint8 (decoding raw MNIST shards is one `np.frombuffer` per
batch, negligible here), runs the same `to_float` -> `resize_center` -> `embed` per batch and copies the
features to numpy, with torch's default threads.
"""
from __future__ import annotations

import functools
import time

import numpy as np

from benchmarks.common import Context, decoded_images, interleaved, ratio, summarize

NAME = "features"
NEEDS_RAY = True

CONFIGS = {
    # quick: a smoke test of every path (one call per pool: each call builds a pool, ~5-15 s here).
    "quick": {"split": "test", "limit": 1024, "batch_size": 512, "concurrency": [1, 2], "repeats": 1,
              "calibrate": False},
    "full": {"split": "train", "limit": 20_000, "batch_size": 512, "concurrency": [1, 2], "repeats": 3,
             "calibrate": True},
}
TINY = 64  # images in the calibration shard set


def _spec():
    import torch

    from raydc.core.models import build_convnet
    from raydc.core.extractor import ExtractorSpec

    torch.manual_seed(0)
    build = functools.partial(build_convnet, "smallconvnet", 1, True)
    net = build()
    return ExtractorSpec(build=build, state={k: v.detach().clone() for k, v in net.state_dict().items()},
                         call="embed", input_size=28, channels=1)


def plain_loop(spec, images: np.ndarray, batch_size: int) -> np.ndarray:
    import torch

    from raydc.core.augment import resize_center, to_float

    from raydc.core.extractor import build_network

    model = build_network(spec)  # the pools' network in the pools' memory format: the ratio is the pool's cost
    out = []
    with torch.no_grad():
        for i in range(0, len(images), batch_size):
            x = resize_center(to_float(images[i:i + batch_size]), spec.input_size)
            out.append(model.embed(x).float().numpy())
    return np.concatenate(out)


def _wait_for_pool_exit(timeout_s: float = 30.0) -> None:
    """Until Ray Data's map actors of the last call are gone. Measured without this, the persistent pool with
    concurrency 1, timed right after the Ray Data pool with concurrency 2, ran at 0.62x the plain loop while
    on its own it ran at 0.76-0.97x: the exiting actors' processes shared its two cores."""
    from ray._private import state

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = [a for a in state.actors().values()
                 if "MapWorker" in a.get("ActorClassName", "") and a.get("State") != "DEAD"]
        if not alive:
            return
        time.sleep(0.1)


def run(ctx: Context) -> dict:
    import ray

    from raydc.engine.ray_data_pool import extract_features

    cfg = CONFIGS[ctx.mode]
    ctx.ensure_ray()
    shard_dir, manifest = ctx.mnist_shards(cfg["split"], cfg["limit"])
    n = manifest.count
    ids, images = decoded_images(shard_dir, manifest)
    spec = _spec()
    bs = cfg["batch_size"]
    blocks_seen: dict[str, int] = {}

    def pool(conc: int, sdir=shard_dir, man=manifest, key: str | None = None):
        def call():
            refs = extract_features(str(sdir), man, spec, concurrency=conc, num_cpus=0.5, num_gpus=0.0,
                                    batch_size=bs)
            if key is not None:
                blocks_seen[key] = len(refs)
            _wait_for_pool_exit()  # its actors' shutdown is its cost, not the next path's (2 cores)
            return refs
        return call

    # The persistent pool (raydc's default on CPU): actors started once per run; its first pass (actor start
    # included) is timed on its own, the later passes are what each epoch pays.
    from raydc.engine.persistent_pool import PersistentFeaturePool

    paths = manifest.shard_paths(shard_dir)
    persistent, first_pass = {}, {}
    for c in cfg["concurrency"]:
        t0 = time.perf_counter()
        persistent[c] = PersistentFeaturePool(manifest, c)
        _timed_pool(persistent[c], paths, spec, bs)()
        first_pass[f"persistent_c{c}"] = time.perf_counter() - t0

    fns = {f"ray_pool_c{c}": pool(c, key=f"c{c}") for c in cfg["concurrency"]}
    clocks: dict[str, list] = {}
    for c in cfg["concurrency"]:
        fns[f"persistent_c{c}"] = _timed_pool(persistent[c], paths, spec, bs, clocks.setdefault(f"persistent_c{c}", []))
    fns["plain_loop"] = lambda: plain_loop(spec, images, bs)
    ctx.log(f"  {n} MNIST images ({len(manifest.shards)} shard file(s)), batch {bs}, {cfg['repeats']} repeats")
    times, last = interleaved(fns, repeats=cfg["repeats"], warmup=0,
                              log=ctx.log if ctx.verbose else None)
    # The plain loop had no warm-up above (the pools cannot have one: every call builds a new pool); give it
    # its fair warmed-up numbers too.
    warm, _ = interleaved({"plain_loop": fns["plain_loop"]}, repeats=max(3, cfg["repeats"]), warmup=1)

    # Sanity: the pool computed the same features as the plain loop.
    blocks = ray.get(last[f"ray_pool_c{cfg['concurrency'][0]}"])
    got_ids = np.concatenate([b["id"] for b in blocks])
    got = np.concatenate([b["feature"] for b in blocks])[np.argsort(got_ids)]
    ref = last["plain_loop"][np.argsort(ids)]
    max_abs_diff = float(np.max(np.abs(got - ref)))
    pblocks = ray.get(last[f"persistent_c{cfg['concurrency'][0]}"])
    p_ids = np.concatenate([b["id"] for b in pblocks])
    p_got = np.concatenate([b["feature"] for b in pblocks])[np.argsort(p_ids)]
    max_abs_diff_persistent = float(np.max(np.abs(p_got - ref)))
    del blocks, pblocks, last
    for p in persistent.values():
        p.shutdown()

    calib = {}
    if cfg["calibrate"]:
        tiny_dir, tiny_man = ctx.mnist_shards(cfg["split"], TINY)
        calib_times, _ = interleaved({f"ray_pool_c{c}": pool(c, tiny_dir, tiny_man) for c in cfg["concurrency"]},
                                     repeats=cfg["repeats"], warmup=0)
        for c in cfg["concurrency"]:
            t_tiny = calib_times[f"ray_pool_c{c}"]["median"]
            t_full = times[f"ray_pool_c{c}"]["median"]
            # Start-up varies by seconds from call to call here; when it swamps the work the difference says
            # nothing about the steady rate (a run measured "123x plain"): report none rather than noise.
            steady = (n - TINY) / (t_full - t_tiny) if t_full - t_tiny > 0.25 * t_full else None
            calib[f"ray_pool_c{c}"] = {"tiny_images": TINY, "tiny_seconds": calib_times[f"ray_pool_c{c}"],
                                       "fixed_cost_s": t_tiny, "steady_images_per_s": steady}

    plain_best = warm["plain_loop"]
    rows = {}
    for name, t in times.items():
        tt = plain_best if name == "plain_loop" else t
        rows[name] = {"seconds": tt, "images_per_s": n / tt["median"],
                      "images_per_s_iqr": [n / tt["q3"], n / tt["q1"]]}
    for name in rows:
        rows[name]["ratio_vs_plain"] = rows[name]["images_per_s"] / rows["plain_loop"]["images_per_s"]
    if calib:
        for name, c in calib.items():
            c["steady_ratio_vs_plain"] = (c["steady_images_per_s"] / rows["plain_loop"]["images_per_s"]
                                          if c["steady_images_per_s"] else None)
    for name, cl in clocks.items():  # where a persistent pass's time goes, beside the plain loop's seconds
        med = {key: summarize([c.get(key, 0.0) for c in cl])["median"] for key in ("read_s", "decode_s", "embed_s", "busy_s")}
        conc = int(name.rsplit("c", 1)[1])
        wall = rows[name]["seconds"]["median"]
        rows[name]["profile"] = {**med, "wall_s": wall, "plain_loop_s": plain_best["median"],
                                 "idle_share": max(0.0, 1.0 - med["busy_s"] / (conc * wall)),
                                 "embed_vs_plain": med["embed_s"] / conc / plain_best["median"]}
        ctx.log(f"  {name} profile: wall {wall:.2f}s, per actor busy {med['busy_s'] / conc:.2f}s (embed "
                f"{med['embed_s'] / conc:.2f}s, decode {med['decode_s'] / conc:.3f}s, read {med['read_s'] / conc:.3f}s); "
                f"plain loop {plain_best['median']:.2f}s")
    ctx.log("  " + ", ".join(f"{k} {v['images_per_s']:.0f} img/s ({v['ratio_vs_plain']:.2f}x plain)"
                             for k, v in rows.items()))
    return {
        "config": {**cfg, "images": n, "shard_files": len(manifest.shards), "model": "smallconvnet, Sobel, 1 channel",
                   "pool": "ray_pool_cN: extract_features (Ray Data, a new pool each pass; num_cpus=0.5 per actor, "
                           "read_cpus=0.25); persistent_cN: PersistentFeaturePool (actors kept between passes, "
                           "first pass timed apart); torch threads per actor = cores // concurrency", "plain": "torch.no_grad() loop, torch default threads, "
                           "images pre-decoded"},
        "results": rows,
        "plain_loop_cold_seconds": times["plain_loop"],
        "calibration": calib,
        "output_blocks": blocks_seen,
        "max_abs_feature_diff_pool_vs_plain": max_abs_diff,
        "max_abs_feature_diff_persistent_vs_plain": max_abs_diff_persistent,
        "persistent_first_pass_s": first_pass,
    }


def _timed_pool(pool, paths, spec, bs, clocks: list | None = None):
    """One pass of a persistent pool, to the last block computed (the blocks stay in the object store).
    `clocks` collects each pass's profile (the actors' read/decode/embed/busy seconds, `pass_clock`), read after
    the timed part."""
    import ray

    def call():
        refs = pool.extract(paths, spec, bs)
        ray.wait(refs, num_returns=len(refs), fetch_local=False)
        if clocks is not None:
            clocks.append(pool.pass_clock())
        return refs
    return call
