"""`raydc assign`: put new images into a finished run's clusters.

The run's final state (`clustering.pt`: model weights and what the method kept, e.g. DeepCluster's PCA
projection and centroids) defines the clustering; the method that made the run assigns the new images its own
way (nearest centroid, argmax q, argmax of the label feature) through the same feature pool and shard actors,
and each shard actor writes its part of the result (`<out>/part-NNNNN.parquet`: row, id, path, cluster, distance).
`clustering.pt` is loaded without unpickling code (`RunDir.load_clustering`).
"""
from __future__ import annotations

from pathlib import Path

from raydc.config import Config
from raydc.config_loader import from_dict


def assign_images(run_dir: str, shard_dir: str, out: str | None = None) -> str:
    from raydc import storage
    from raydc.core.extractor import run_arithmetic_of
    from raydc.data.manifest import load_manifest
    from raydc.engine.clustering import ClusteringService, ShardPlacement
    from raydc.engine.contexts import RankZeroContext
    from raydc.engine.rundir import RunDir
    from raydc.engine.runtime import init_ray
    from raydc.methods import build_method

    run = RunDir(run_dir)
    saved = run.load_clustering()
    cfg: Config = from_dict(Config, saved["config"])
    train_manifest = load_manifest(cfg.data.shards) if storage.exists(cfg.data.shards) else None
    manifest = load_manifest(shard_dir)
    method = build_method(cfg, train_manifest or manifest)
    model = method.build_model()
    model.load_state_dict(saved["model"])
    model.eval()

    init_ray(cfg.ray, train_cpus=0)
    if not storage.is_uri(shard_dir):
        shard_dir = str(Path(shard_dir).resolve())
    precision, memory_format = run_arithmetic_of(saved)
    ctx = RankZeroContext(cfg, manifest, shard_dir,
                          lambda: ClusteringService(cfg.cluster.num_shards, cfg.cluster.num_gpus, cfg.cluster.use_gpu,
                                                    placement=ShardPlacement.from_config(cfg.cluster)),
                          print, precision=precision, memory_format=memory_format)
    if out:
        path = out if storage.is_uri(out) else str(Path(out).expanduser().resolve())
    else:
        path = run.join(f"assign-{shard_dir.rstrip('/').rsplit('/', 1)[-1]}")
    try:
        final = method.place_new_images(ctx, model, saved["artifacts"])
        storage.delete_dir(path)  # the parts of an earlier assign into the same place
        ctx.write_assignments(final, path)
    finally:
        ctx.shutdown()
    return path
