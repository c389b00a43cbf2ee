"""`raydc evaluate --probe knn|linear|both`: the k-NN and/or linear probe of a finished run's network
(raydc.core.probes).

The run's final network (clustering.pt, loaded without unpickling code) computes the features of a labelled
training split and a labelled test split through the persistent feature pool, the same actors and eval
transform as training's feature passes; the method decides which layer (`Method.probe_extractor`). A split is
a shard directory, or a torchvision split name (train, test, all) of the run's `data.source`, prepared once
beside the run's shards (`<data.shards>-<split>`) with the run's class filter and limit. The features stay in
Ray's object store as the pool's blocks: the k-NN bank (the training split) is gathered on the driver, the test
split is scored block by block; the linear probe fits in memory below `LINEAR_IN_MEMORY_ROWS` training images
and streams the blocks through a torch linear layer above it. Both probes share one feature pass. Each result
goes to `<run>/probes/<probe>-<train>-<test>.json`.
"""
from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from raydc.errors import UserError

SPLIT_NAMES = ("train", "test", "all")
LINEAR_IN_MEMORY_ROWS = 200_000  # sklearn's L-BFGS holds the n x d features (float32) and a few copies


def resolve_split(cfg, value: str, flag: str) -> tuple[str, object, str]:
    """(shard dir, its manifest, a short name for the result file) of `--train-split`/`--test-split`."""
    from raydc import storage
    from raydc.data.manifest import MANIFEST_NAME, load_manifest
    from raydc.data.prepare import prepare_from_config

    if value not in SPLIT_NAMES:
        if not storage.exists(storage.join(value, MANIFEST_NAME)):
            raise UserError(f"{flag} {value!r} is neither a split ({', '.join(SPLIT_NAMES)}) nor a shard "
                            f"directory with a {MANIFEST_NAME}")
        where, name = value, value.rstrip("/").rsplit("/", 1)[-1]
    elif cfg.data.split == value and storage.exists(storage.join(cfg.data.shards, MANIFEST_NAME)):
        where, name = cfg.data.shards, value
    else:
        if not cfg.data.source:
            raise UserError(f"{flag} {value}: the run's data has no data.source to take a {value} split from; "
                            f"pass a shard directory of labelled images instead")
        where, name = cfg.data.shards.rstrip("/") + f"-{value}", value
        if not storage.exists(storage.join(where, MANIFEST_NAME)):
            print(f"preparing the {value} split of {cfg.data.source} at {where}")
            prepare_from_config(dataclasses.replace(cfg.data, split=value, shards=where), progress=False)
    manifest = load_manifest(where)
    if not manifest.has_labels:
        raise UserError(f"{flag}: the shards at {where} carry no labels, which a probe needs")
    return where, manifest, name


class _SplitFeatures:
    """One split's features as the pool's blocks in the object store; iterated block by block."""

    def __init__(self, shard_dir: str, manifest, spec, features_cfg, pool):
        import ray

        t = time.perf_counter()
        self.refs = pool.extract(manifest.shard_paths(shard_dir), spec, features_cfg.batch_size)
        ray.wait(self.refs, num_returns=len(self.refs), fetch_local=False)
        self.seconds = time.perf_counter() - t
        self.count = manifest.count

    def blocks(self):
        import ray

        for ref in self.refs:
            b = ray.get(ref)
            if len(b["id"]):
                yield np.asarray(b["feature"], np.float32), np.asarray(b["label"], np.int64)

    def gather(self) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = zip(*self.blocks())
        return np.concatenate(xs), np.concatenate(ys)


def _split_features(splits, spec, features_cfg) -> list[_SplitFeatures]:
    """Each (shard dir, manifest)'s features; one pool serves every split whose images decode alike."""
    from raydc.engine.persistent_pool import PersistentFeaturePool

    pools: dict = {}
    try:
        out = []
        for where, manifest in splits:
            key = (manifest.encoding, tuple(manifest.image_shape or ()), manifest.mode)
            if key not in pools:
                pools[key] = PersistentFeaturePool(manifest.header(), features_cfg.concurrency)
            out.append(_SplitFeatures(where, manifest, spec, features_cfg, pools[key]))
        return out
    finally:
        for pool in pools.values():
            pool.shutdown()


def probe_run(run_dir: str, probe: str, train_split: str = "train", test_split: str = "test") -> dict:
    """One probe's result (see `probe_runs`)."""
    return probe_runs(run_dir, (probe,), train_split, test_split)[probe]


def probe_runs(run_dir: str, probes: tuple[str, ...], train_split: str = "train",
               test_split: str = "test") -> dict[str, dict]:
    """Each of `probes` (knn, linear) on one feature pass of each split; every result is also written to
    the run directory."""
    from raydc import storage
    from raydc.config import Config
    from raydc.config_loader import from_dict
    from raydc.core.extractor import as_computed_by
    from raydc.data.manifest import load_manifest
    from raydc.engine.evaluate import open_run
    from raydc.engine.runtime import init_ray
    from raydc.methods import build_method

    run, _ = open_run(run_dir)
    saved = run.load_clustering()
    cfg = from_dict(Config, saved["config"])
    train_dir, train_m, train_name = resolve_split(cfg, train_split, "--train-split")
    test_dir, test_m, test_name = resolve_split(cfg, test_split, "--test-split")
    run_manifest = load_manifest(cfg.data.shards) if storage.exists(cfg.data.shards) else train_m
    method = build_method(cfg, run_manifest)
    model = method.build_model()
    model.load_state_dict(saved["model"])
    model.eval()
    spec = as_computed_by(method.probe_extractor(model), saved)
    num_classes = 1 + max(max(int(c) for c in (m.label_counts or {0: 0})) for m in (train_m, test_m))

    init_ray(cfg.ray, train_cpus=0)
    train, test = _split_features([(train_dir, train_m), (test_dir, test_m)], spec, cfg.features)
    results = {}
    for probe in probes:
        t = time.perf_counter()
        out = _score(probe, train, test, num_classes, cfg.train.seed)
        out = {"probe": probe, "run": str(run.location), "method": cfg.method, "arch": cfg.model.arch,
               "round": int(saved.get("round", -1)), "layer": spec.call, "train_split": train_name,
               "test_split": test_name, "train_shards": str(train_dir), "test_shards": str(test_dir),
               **out, "time_features": round(train.seconds + test.seconds, 3),
               "time_probe": round(time.perf_counter() - t, 3)}
        out["path"] = write_result(run, out)
        results[probe] = out
    return results


def _score(probe: str, train: _SplitFeatures, test: _SplitFeatures, num_classes: int, seed: int) -> dict:
    from raydc.core.probes import KNNProbe, StreamedLinearProbe, linear_probe_in_memory

    if probe == "knn":
        x, y = train.gather()
        knn = KNNProbe(x, y, num_classes=num_classes)
        for bx, by in test.blocks():
            knn.add_test(bx, by)
        return {**knn.result(), "feature_dim": int(x.shape[1])}
    if probe != "linear":
        raise UserError(f"unknown probe {probe!r}: knn or linear")
    if train.count <= LINEAR_IN_MEMORY_ROWS:
        x, y = train.gather()
        tx, ty = test.gather()
        return {**linear_probe_in_memory(x, y, tx, ty, seed=seed), "feature_dim": int(x.shape[1])}
    lin = StreamedLinearProbe(num_classes=num_classes, seed=seed).fit(train.blocks)
    return lin.score(test.blocks())


def write_result(run, result: dict) -> str:
    from raydc import storage

    path = run.join("probes", f"{result['probe']}-{result['train_split']}-{result['test_split']}.json")
    if not storage.is_uri(path):
        Path(path).parent.mkdir(parents=True, exist_ok=True)
    storage.write_bytes_atomic(path, (json.dumps(result, indent=1, sort_keys=True) + "\n").encode())
    return path


def probe_command(args) -> int:
    """`raydc evaluate --probe ...`: prints each result, one `key: value` a line."""
    probes = ("knn", "linear") if args.probe == "both" else (args.probe,)
    for out in probe_runs(args.run, probes, args.train_split, args.test_split).values():
        for k, v in out.items():
            print(f"{k}: {v}")
    return 0
