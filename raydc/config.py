"""The run configuration: one typed tree for every method.

The engine's sections are defined here; each method defines its own section (`Method.section`/`options`, e.g.
`dec:`) in its own file, and `Config` is assembled from both. Field checks that need only the config live in
the sections' `validate()` and the method's `validate_config` and run at load time; checks that need the data
(k larger than the number of images, a batch larger than a worker's shard) are the method's `check_data`, run
before any work starts. Every error names its dotted field.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from raydc.config_loader import apply_overrides, dump_yaml, from_dict, parse_yaml, read_yaml, resumable
from raydc.errors import ConfigError

SOURCES = ("mnist", "fashionmnist", "cifar10", "usps", "stl10", "folder", "npz")


@dataclass
class DataConfig:
    """Where the image shards are, and how to make them when they are missing."""

    shards: str = ""                       # shard directory (Parquet + manifest.json)
    source: str | None = None              # prepare from this source when `shards` has no manifest
    root: str | None = None                # data root for `source`; default $RAYDC_DATA_ROOT
    split: Literal["train", "test", "all"] = "all"
    classes: list[int] | None = None       # keep only these labels (dataset construction, e.g. fmnist3)
    limit: int | None = None               # keep only the first `limit` images after the class filter
    rows_per_shard: int = 10_000
    download: bool = False                 # opt in to torchvision downloads
    # Read the shards' rows into Ray's object store once, before the fit, and train every pass from there: "auto"
    # when they take at most a quarter of the cluster's object store, "always", or "never" (stream every pass).
    cache: Literal["auto", "always", "never"] = resumable("auto")

    def validate(self) -> None:
        if not self.shards:
            raise ConfigError("data.shards", "is required (a directory for the Parquet shards)")
        if self.source is not None and self.source not in SOURCES:
            raise ConfigError("data.source", f"got {self.source!r}, expected one of {', '.join(SOURCES)}")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("data.limit", f"must be >= 1, got {self.limit}")
        if self.rows_per_shard < 1:
            raise ConfigError("data.rows_per_shard", f"must be >= 1, got {self.rows_per_shard}")

    def resolved_root(self) -> str | None:
        return self.root or os.environ.get("RAYDC_DATA_ROOT") or None  # an empty variable is no root


@dataclass
class ModelConfig:
    arch: str = "smallconvnet"             # which ones a method trains: its `archs` (checked by the method)
    sobel: bool = True
    input_size: int | None = None          # the network's input side; None: the images' own (from the manifest)
    width: int = 1                         # channel multiplier of smallconvnet
    feature_dim: int = 256                 # penultimate (clustered) layer of smallconvnet
    ae_dims: list[int] = field(default_factory=lambda: [500, 500, 2000, 10])  # DEC encoder after the input
    # Initial weights: a state dict file (path or URI; torchvision's/timm's published files for a backbone arch),
    # or an earlier raydc run directory (its final network). Read with weights_only=True, never unpickled.
    weights: str | None = None
    freeze: Literal["none", "trunk", "all"] = "none"  # trunk: the conv trunk (a backbone: all of it); all: + FC

    def validate(self) -> None:
        if self.input_size is not None and self.input_size < 8:
            raise ConfigError("model.input_size", f"must be >= 8, got {self.input_size}")
        if self.feature_dim < 2:
            raise ConfigError("model.feature_dim", f"must be >= 2, got {self.feature_dim}")
        if not self.ae_dims or any(d < 1 for d in self.ae_dims):
            raise ConfigError("model.ae_dims", f"must be a non-empty list of positive sizes, got {self.ae_dims}")


@dataclass
class ClusterConfig:
    """Features -> PCA (whitening) -> L2 -> k-means."""

    k: int = 10
    pca_dim: int = 256                     # 0 disables PCA
    whiten: bool = True
    l2_normalize: bool = True
    niter: int = 20
    n_init: int = 1                        # k-means restarts, best objective kept (DEC uses several)
    mode: Literal["auto", "single", "distributed"] = "auto"
    single_max_bytes: int = 4 << 30        # auto: one actor while N*d*4 stays below this
    num_shards: int = 2                    # shard actors for the sharded PCA / distributed k-means
    num_gpus: float = 0.0                  # per shard actor (faiss uses the GPUs Ray gives it)
    use_gpu: Literal["auto", "never", "always"] = "auto"
    # Where the shard actors go: a placement group of one bundle per shard reserving `shard_memory_mb` of each
    # node's memory, spread over the nodes ("spread": best effort; "strict_spread": one shard per node or fail;
    # "pack"; "none": Ray's default scheduling, no placement group).
    placement: Literal["spread", "strict_spread", "pack", "none"] = resumable("spread")
    shard_memory_mb: int = resumable(256)
    shard_resource: str | None = resumable(None)  # a custom resource each shard's bundle takes (shard nodes)
    # Distributed Lloyd's reduction of the per-cluster sums. star: all shards' k x d sums to the coordinator (one
    # round trip per iteration); sharded: a reduce-scatter among the shards (two round trips, and no process
    # receives more than about 12 k d bytes per iteration at any number of shards); auto: star while the
    # coordinator would receive at most star_max_mb per iteration. Both give the same centroids to the bit.
    reduction: Literal["auto", "star", "sharded"] = resumable("auto")
    star_max_mb: int = resumable(64)
    # Two-level k-means (DeeperCluster's): super_k super clusters (0: sqrt(k)), then k-means within each with a
    # share of k proportional to its size. auto: from hierarchical_min_k clusters on, where one k x N assignment
    # per iteration is the cost that no longer fits a round.
    hierarchical: Literal["auto", "never", "always"] = "auto"
    hierarchical_min_k: int = 50_000
    super_k: int = 0
    # A lost shard actor (its process, or its node) is restarted by Ray up to shard_restarts times, reloads the
    # features it held from the run directory's shards/ (persist_features; one write of the reduced features per
    # round), and the k-means resumes from the coordinator's last centroids. recovery_timeout_s bounds the wait
    # for a lost shard to come back: past it the round fails with a clear error instead of hanging.
    shard_restarts: int = resumable(3)
    persist_features: bool = resumable(True)
    recovery_timeout_s: float = resumable(300.0)

    def kmeans_args(self) -> dict:
        """The keywords of `ClusteringService.kmeans` that choose how a large k-means runs."""
        return {"reduction": self.reduction, "star_max_bytes": int(self.star_max_mb) << 20,
                "hierarchical": self.hierarchical, "hierarchical_min_k": self.hierarchical_min_k,
                "super_k": self.super_k}

    def validate(self) -> None:
        if self.super_k < 0 or self.super_k == 1 or self.super_k > self.k:
            raise ConfigError("cluster.super_k", f"must be 0 (sqrt(k)) or in [2, cluster.k], got {self.super_k}")
        if self.shard_restarts < 0:
            raise ConfigError("cluster.shard_restarts", f"must be >= 0, got {self.shard_restarts}")
        if self.recovery_timeout_s <= 0:
            raise ConfigError("cluster.recovery_timeout_s", f"must be > 0, got {self.recovery_timeout_s}")
        if self.star_max_mb < 0:
            raise ConfigError("cluster.star_max_mb", f"must be >= 0, got {self.star_max_mb}")
        if self.shard_memory_mb < 1:
            raise ConfigError("cluster.shard_memory_mb", f"must be >= 1, got {self.shard_memory_mb}")
        if self.k < 2:
            raise ConfigError("cluster.k", f"must be >= 2, got {self.k}")
        if self.pca_dim < 0:
            raise ConfigError("cluster.pca_dim", f"must be >= 0 (0 disables PCA), got {self.pca_dim}")
        if self.niter < 1:
            raise ConfigError("cluster.niter", f"must be >= 1, got {self.niter}")
        if self.n_init < 1:
            raise ConfigError("cluster.n_init", f"must be >= 1, got {self.n_init}")
        if self.num_shards < 1:
            raise ConfigError("cluster.num_shards", f"must be >= 1, got {self.num_shards}")


@dataclass
class FeatureConfig:
    """The actor pool that computes features between epochs."""

    concurrency: int = resumable(1)        # actors in the pool
    num_cpus: float = 0.5                  # per actor; fractional so reads are never starved
    num_gpus: float = resumable(0.0)       # per actor; 'auto' placement is decided by use_gpu below
    batch_size: int = resumable(512)
    use_gpu: Literal["auto", "never", "always"] = "auto"
    # persistent: actors started once per run, time-sharing the training's CPUs (see engine/persistent_pool.py);
    # ray_data: a Ray Data map_batches pool started each pass (GPU actors need it); auto: persistent on CPU.
    pool: Literal["auto", "persistent", "ray_data"] = "auto"
    # PCA is fitted on a uniform sample of this many images (0: all of them), as DeeperCluster does: the pool's
    # workers then project and L2-normalise themselves, so raw features never leave the worker that made them.
    pca_sample: int = 100_000
    dtype: Literal["float32", "float16"] = "float32"  # the reduced features the shards hold (float16 halves it)
    # Fold each BatchNorm into the layer before it for the feature passes of a method that allows it (DeepCluster's
    # embed; raydc.core.bn_fold): the same features up to rounding, a faster pass. Off by default: make demo's seeds
    # 31-33 ended at 0.797 / 0.915 / 0.833 with it against 0.919 / 0.907 / 0.921 without (benchmarks/RESULTS.md).
    fold_batchnorm: bool = False

    def validate(self) -> None:
        if self.pca_sample < 0:
            raise ConfigError("features.pca_sample", f"must be >= 0 (0: all images), got {self.pca_sample}")
        if self.concurrency < 1:
            raise ConfigError("features.concurrency", f"must be >= 1, got {self.concurrency}")
        if self.num_cpus <= 0:
            raise ConfigError("features.num_cpus", f"must be > 0, got {self.num_cpus}")
        if self.batch_size < 1:
            raise ConfigError("features.batch_size", f"must be >= 1, got {self.batch_size}")


@dataclass
class TrainConfig:
    epochs: int = resumable(10)
    batch_size: int = 256                  # per worker
    lr: float = 0.05
    momentum: float = 0.9
    weight_decay: float = 1e-5
    head_lr: float | None = None           # None: same as lr (the reference uses one lr, head momentum 0)
    lr_schedule: Literal["constant", "cosine"] = "constant"  # per round; cosine ends at lr * lr_final
    lr_final: float = 0.0                  # cosine: the last round's lr as a fraction of lr
    min_steps: int = 0                     # a round draws at least this many batches per worker (0: no floor)
    reassign: float = 1.0                  # an epoch draws reassign * N images
    uniform_sampling: bool = True
    augment: Literal["crop", "affine"] = "crop"  # RandomResizedCrop (+ flip), or rotation/shift/zoom (digits)
    crop_scale_min: float = 0.08           # RandomResizedCrop scale lower bound
    # Random erasing after the crop or affine: the probability that one rectangle (2-33 % of the image) of a
    # training image is set to its background (raydc.core.augment.random_erase). 0: off.
    erase: float = 0.0
    crop: bool = True
    hflip: bool = True
    num_workers: int = 1                   # Ray Train workers (DDP)
    cpus_per_worker: float = 1.0
    use_gpu: Literal["auto", "never", "always"] = "auto"
    torch_threads: int = 0                 # 0: leave torch's default
    # The training step's and the feature pass's autocast dtype (raydc.core.precision). auto: bf16 on CUDA and
    # on CPUs with bf16 instructions, fp32 elsewhere; fp16 only on CUDA (with a gradient scaler). Losses,
    # similarity matrices, k-means and PCA stay float32. A resumed run keeps the precision it started with.
    precision: Literal["fp32", "bf16", "fp16", "auto"] = "fp32"
    # The layout of the network's weights, in training and in every feature pass (raydc.core.precision). auto:
    # channels_last for a network with 2-d convolutions on CUDA (cuDNN's fast path), contiguous on the CPU (oneDNN's
    # NHWC step is faster there, but DeepCluster's 70k runs ended lower with it on every seed compared) and for the
    # rest. A resumed run keeps the layout it started with.
    memory_format: Literal["auto", "channels_last", "contiguous"] = "auto"
    seed: int = 31
    max_failures: int = resumable(0)       # Ray Train retries after a worker dies
    # A custom resource each Train worker takes one unit of: the worker group only on nodes started with it
    # (`ray start --resources='{"trainer": 1}'`: the GPU nodes, say, leaving the others to the shards)
    worker_resource: str | None = resumable(None)

    def lr_at(self, round_idx: int) -> float:
        """The body's lr in round `round_idx` of `epochs`: constant, or a cosine from lr towards lr * lr_final."""
        if self.lr_schedule == "constant":
            return self.lr
        t = min(round_idx, self.epochs) / self.epochs  # the last round trains above lr_final, never at 0
        return self.lr * (self.lr_final + (1 - self.lr_final) * 0.5 * (1 + math.cos(math.pi * t)))

    def validate(self) -> None:
        if self.epochs < 0:  # 0: no training, the frozen network's features are clustered once
            raise ConfigError("train.epochs", f"must be >= 0, got {self.epochs}")
        if self.batch_size < 1:
            raise ConfigError("train.batch_size", f"must be >= 1, got {self.batch_size}")
        if self.lr <= 0:
            raise ConfigError("train.lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ConfigError("train.momentum", f"must be in [0, 1), got {self.momentum}")
        if self.weight_decay < 0:
            raise ConfigError("train.weight_decay", f"must be >= 0, got {self.weight_decay}")
        if self.reassign <= 0:
            raise ConfigError("train.reassign", f"must be > 0, got {self.reassign}")
        if not 0 <= self.lr_final <= 1:
            raise ConfigError("train.lr_final", f"must be in [0, 1] (a fraction of train.lr), got {self.lr_final}")
        if self.min_steps < 0:
            raise ConfigError("train.min_steps", f"must be >= 0, got {self.min_steps}")
        if not 0 < self.crop_scale_min <= 1:
            raise ConfigError("train.crop_scale_min", f"must be in (0, 1], got {self.crop_scale_min}")
        if not 0 <= self.erase <= 1:
            raise ConfigError("train.erase", f"must be a probability in [0, 1], got {self.erase}")
        if self.num_workers < 1:
            raise ConfigError("train.num_workers", f"must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker <= 0:
            raise ConfigError("train.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")


@dataclass
class RayConfig:
    address: str | None = resumable(None)  # None: connect to a running cluster if any, else start a local one
    num_cpus: int | None = resumable(None)  # only for a local Ray started by raydc
    # A custom resource only some nodes have (`ray start --resources='{"coordinator": 1}'`): the coordinator actor,
    # which owns the shard actors and the feature pool, runs there (on-demand nodes of a cluster with spot workers).
    coordinator_resource: str | None = resumable(None)


@dataclass
class RunConfig:
    dir: str = "runs/default"
    montage_per_cluster: int = resumable(16)
    keep_checkpoints: int = resumable(2)
    progress: bool = resumable(True)
    # Where every metrics row also goes (raydc/tracking.py), written by rank 0 alone: "tensorboard" (event files in
    # <run.dir>/tensorboard) and "mlflow" (pip install 'raydc[mlflow]'), with the config as parameters and the
    # report's pictures as artefacts.
    trackers: list[Literal["tensorboard", "mlflow"]] = resumable(default_factory=list)
    mlflow_uri: str | None = resumable(None)  # None: $MLFLOW_TRACKING_URI, else a file store in <run.dir>/mlruns
    experiment: str | None = resumable(None)  # MLflow experiment; None: "raydc" (a sweep's trials: the sweep's name)
    # A writer's lease on run.dir (raydc.engine.lease) is taken over by the next writer once its heartbeat,
    # renewed every quarter of this, is older than this: how long a killed run blocks its directory.
    lease_timeout_s: float = resumable(60.0)

    def validate(self) -> None:
        from raydc.tracking import check

        if not self.lease_timeout_s > 0:
            raise ConfigError("run.lease_timeout_s", f"must be > 0, got {self.lease_timeout_s}")
        check(self)


class _ConfigBase:
    method: str  # a field of every assembled Config; declared here for the methods below

    def validate(self) -> None:
        from raydc.methods import method_class

        for f in dataclasses.fields(self):  # type: ignore[arg-type]  # self is always the assembled dataclass
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()  # sections left at their defaults were not checked while loading
        method_class(self.method).validate_config(self)

    def to_yaml(self) -> str:
        return dump_yaml(self)


def _make_config_class() -> type:
    """The engine's sections, then one section per method that owns one (`Method.section`, in the order the
    methods are found), then ray and run: adding a method adds its section here without editing this file."""
    from raydc.methods import methods

    found = methods()
    fields = [
        ("method", Literal[tuple(found)], field(default="deepcluster")),
        ("data", DataConfig, field(default_factory=DataConfig)),
        ("model", ModelConfig, field(default_factory=ModelConfig)),
        ("cluster", ClusterConfig, field(default_factory=ClusterConfig)),
        ("features", FeatureConfig, field(default_factory=FeatureConfig)),
        ("train", TrainConfig, field(default_factory=TrainConfig)),
    ]
    for cls in found.values():
        if cls.section:
            fields.append((cls.section, cls.options, field(default_factory=cls.options)))
    fields += [("ray", RayConfig, field(default_factory=RayConfig)),
               ("run", RunConfig, field(default_factory=RunConfig))]
    cls = dataclasses.make_dataclass("Config", fields, bases=(_ConfigBase,))
    cls.__module__ = __name__  # so instances pickle by reference to raydc.config.Config
    return cls


if TYPE_CHECKING:
    class Config(_ConfigBase):
        """What `_make_config_class` builds, spelled out for type checkers: the engine's sections are typed; a
        method's own section (`cfg.dec`, ...) reads as Any, since the real class gains it at import."""

        method: str
        data: DataConfig
        model: ModelConfig
        cluster: ClusterConfig
        features: FeatureConfig
        train: TrainConfig
        ray: RayConfig
        run: RunConfig

        def __init__(self, **sections: Any) -> None: ...
        def __getattr__(self, section: str) -> Any: ...
else:
    def __getattr__(name: str) -> Any:
        """`Config` is assembled on first use, not at import. Assembling it imports every method, and with them
        torch; a process that only unpickles a section (the clustering coordinator is sent `features`) or reads a
        field check then stays without torch."""
        if name == "Config":
            return _config_class()
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _config_class() -> type[Config]:
    cls = globals().get("Config")
    if cls is None:
        cls = globals()["Config"] = _make_config_class()
    return cls


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> Config:
    data = read_yaml(path) if path else {}
    data = apply_overrides(data, overrides)
    return from_dict(_config_class(), with_method_defaults(data))


def with_method_defaults(data: dict) -> dict:
    """`data` (a config as read, before it is checked) with its method's own values for the shared fields it
    leaves out (`Method.shared_defaults`). A copy: the caller's mapping is not changed. An unknown method is
    left for `from_dict` to name."""
    from raydc.methods import methods

    cls = methods().get(data.get("method", "deepcluster")) if isinstance(data, dict) else None
    if cls is None or not cls.shared_defaults:
        return data
    out = dict(data)
    for dotted, value in cls.shared_defaults.items():
        section, name = dotted.split(".")
        if out.get(section) is None:
            out[section] = {}
        if isinstance(out[section], dict) and name not in out[section]:
            out[section] = {**out[section], name: value}
    return out


def load_config_text(text: str, where: str) -> Config:
    """A config from its YAML text (a run directory's saved config, which may live on object storage)."""
    return from_dict(_config_class(), parse_yaml(text, where))
