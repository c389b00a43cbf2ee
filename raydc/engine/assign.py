"""`raydc assign`: put new images into a finished run's clusters.

The run's final state (`clustering.pt`: model weights, PCA projection, centroids) defines the feature space;
new images go through the same feature pool and projection, then to their nearest centroid on the shard
actors. Nothing but the small centroid matrix passes through the driver until the result is written.
"""
from __future__ import annotations

from pathlib import Path

import torch

from raydc.config import Config
from raydc.config_loader import from_dict
from raydc.errors import UserError


def assign_images(run_dir: str, shard_dir: str, out: str | None = None) -> Path:
    from raydc.data.manifest import load_manifest
    from raydc.engine.clustering import ClusteringService
    from raydc.engine.rundir import RunDir
    from raydc.engine.runtime import init_ray
    from raydc.methods import build_method

    run = RunDir(run_dir)
    state_path = run.path / "clustering.pt"
    if not state_path.exists():
        raise UserError(f"{run.path} has no clustering.pt: it is not a finished run (resume it first)")
    saved = torch.load(state_path, map_location="cpu", weights_only=False)
    cfg: Config = from_dict(Config, saved["config"])
    train_manifest = load_manifest(cfg.data.shards) if Path(cfg.data.shards).exists() else None
    manifest = load_manifest(shard_dir)
    method = build_method(cfg, train_manifest or manifest)
    model = method.build_model()
    model.load_state_dict(saved["model"])
    spec = method.extractor(model)

    init_ray(cfg.ray, train_cpus=0)
    service = ClusteringService(cfg.cluster.num_shards, cfg.cluster.num_gpus, cfg.cluster.use_gpu)
    try:
        info = service.extract(spec, str(Path(shard_dir).resolve()), manifest, cfg.features)
        if not info["finite"]:
            raise UserError("the network produced non-finite features for these images")
        service.project(saved["projection"], cfg.cluster.l2_normalize if saved["projection"] is not None
                        or cfg.method == "deepcluster" else False)
        ids, clusters, dist = service.assign_to(saved["centroids"])
    finally:
        service.shutdown()
    name = out or f"assign-{Path(shard_dir).resolve().name}.parquet"
    path = Path(name) if out else run.path / name
    target = RunDir(path.parent)
    return target.write_assignments(ids, clusters, dist, name=path.name)
