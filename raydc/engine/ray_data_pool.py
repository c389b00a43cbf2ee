"""The feature actor pool: a Ray Data `map_batches` stage whose actors hold the current network.

Each actor fetches the weights once from the object store (the ref is passed to its constructor; Ray Data
does not resolve refs in `fn_constructor_kwargs`, so the actor `ray.get`s it), then maps batches of encoded
images to `(row, id, feature[, label])` rows with the deterministic eval transform. The output blocks stay in
the object store, spread over the nodes that computed them; nothing is collected on the driver.

The worker also applies the round's reduction (`FeatureReduction`: PCA projection, L2, float16), so only the
reduced features leave it: an AlexNet feature is 4096 floats, its PCA-256 projection 256, and at 10^8 images
that is the difference between 1.6 TB and 100 GB in the object store.
"""
from __future__ import annotations

import os
from collections import Counter

import numpy as np

from raydc.core.extractor import ExtractorSpec, build_network, keep_mask, pool_device, reduce_features


class FeatureExtractor:
    """Ray Data callable class; one instance per pool actor."""

    def __init__(self, spec_ref, manifest, threads: int = 0):
        import ray
        import torch

        from raydc.engine.sealed_spec import open_spec

        spec: ExtractorSpec = open_spec(ray.get(spec_ref[0]) if isinstance(spec_ref, list) else spec_ref)
        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device(pool_device())
        self.model = build_network(spec).to(self.device)
        self.fn = getattr(self.model, spec.call)
        self.spec = spec
        self.manifest = manifest

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return features_of(self.fn, self.spec, self.manifest, batch, device=self.device)


def features_of(fn, spec: ExtractorSpec, manifest, batch: dict[str, np.ndarray], device=None,
                clock: Counter | None = None) -> dict[str, np.ndarray]:
    """Encoded images -> `(row, id, feature[, label])`: decode, the deterministic eval transform, the network's
    feature method `fn` (`getattr(model, spec.call)`), the reduction. Shared by both pools, so they compute the
    same thing. `clock`, when given, accumulates the seconds spent decoding and in the network."""
    import time

    import torch

    from raydc.core.augment import resize_center, to_float
    from raydc.data.decode import decode_batch

    r = spec.reduction
    if r is not None and r.keep_fraction < 1.0:  # a sampling pass: decode and embed only the kept rows
        keep = keep_mask(np.asarray(batch["id"], np.int64), r.keep_fraction, r.seed)
        batch = {c: np.asarray(v)[keep] for c, v in batch.items()}
    t0 = time.perf_counter()
    d = decode_batch(batch, manifest, size=None if manifest.image_shape else spec.input_size,
                     channels=spec.channels)
    t1 = time.perf_counter()
    if len(d["id"]) == 0:
        feats = np.zeros((0, 0), np.float32)
    else:
        from raydc.core.precision import autocast, resolve_precision

        x = resize_center(to_float(d["image"]), spec.input_size)
        x = x.to(device) if device is not None else x
        precision = resolve_precision(spec.precision or "fp32", x.device.type)
        with torch.inference_mode(), autocast(precision, x.device.type):
            out = fn(x)
        feats = reduce_features(out.float().cpu().numpy(), r)
    if clock is not None:
        clock["decode_s"] += t1 - t0
        clock["embed_s"] += time.perf_counter() - t1
    out = {"row": d["row"], "id": d["id"].astype(np.int64), "feature": feats}
    if "label" in d:
        out["label"] = d["label"].astype(np.int64)
    return out


def extract_features(shard_dir: str, manifest, spec: ExtractorSpec, *, concurrency: int, num_cpus: float,
                     num_gpus: float, batch_size: int, read_cpus: float = 0.25) -> list:
    """Run the pool over every image; returns the object refs of the output blocks (numpy dicts)."""
    import ray
    from ray.data import ActorPoolStrategy

    from raydc.engine.datasets import read_shards

    spec_ref = ray.put(spec)
    threads = max(1, (os.cpu_count() or 1) // max(1, concurrency)) if num_gpus == 0 else 0
    ds = read_shards(shard_dir, read_cpus=read_cpus)
    feats = ds.map_batches(
        FeatureExtractor,
        fn_constructor_kwargs={"spec_ref": [spec_ref], "manifest": manifest, "threads": threads},
        compute=ActorPoolStrategy(size=concurrency),
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        zero_copy_batch=True,
    )
    return list(feats.to_numpy_refs())
