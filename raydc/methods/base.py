"""What a clustering method is to the engine: a strategy the engine's one training loop drives.

The engine owns Ray: datasets, the Train workers, the feature pool, the shard actors, checkpoints, the run
directory. A method owns the science and everything specific to it: its config section and the checks of it,
its checks against the data, the fields a resumed run may change, which network, what the feature pool
extracts, how features become targets (pseudo-labels, a target distribution, a threshold schedule), the loss,
when to stop, what the final clustering keeps and how new images are assigned. The loop, per round:

    rank 0:  plan, row = method.plan(ctx, model, state, round)       # may use ctx.extract / ctx.service
    all:     plan = broadcast(plan)                                   # the engine puts it in the object store
    all:     row += method.train_round(wctx, model, plan, state, round)
    rank 0:  metrics row, checkpoint(model, optimizers, state)
    after the last round, rank 0: final, row = method.finalize(ctx, model, state, round)

Methods never touch Ray themselves, and never hold per-image arrays: each image's cluster, target or score is a
column on the shard actors (`ctx.service`: k-means writes one, `apply` runs a method's function there, `counts`
reduces two columns to pair counts for the metrics). A round's per-image targets reach the workers as
`RowBlocks` (`ctx.service.publish`: blocks in the object store, indexed by row), which `wctx.batches(targets=)`
joins to the stream; training goes through `wctx.sgd_pass`, the engine's one SGD loop, fed with the method's
loss. What must survive a resume is saved as Parquet parts (`ctx.save_column`), and the state keeps the path.

`state` is a small dataclass the method keeps across rounds (phase, counters, paths); it is checkpointed with the
model as plain types and tensors, so a resumed run continues exactly where it stopped. Fields made with
`rank0_field` live on rank 0 only: the other ranks get the state without them.
A new method is one new file in this package defining a `Method` subclass and `METHOD = ThatClass`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np

if TYPE_CHECKING:
    import torch.nn as nn

    from raydc.core.extractor import ExtractorSpec
    from raydc.methods.api import RoundContext, ShardView, TrainContext

    from raydc.config import Config


@dataclass
class RoundPlan:
    """What rank 0 decided for one round, as every worker receives it."""

    targets: Any = None         # the method's own dataclass for this round's training
    state: Any = None           # the method state after planning, without rank-0 fields (the engine sets it)
    stop: str | None = None     # set: no training this round, the method is done (the reason is logged)


@dataclass
class FinalClustering:
    """The clustering a run ends with. Its per-image columns stay on the shard actors (each shard writes its own
    part of the assignments); `artifacts` is what `raydc assign` needs to put new images into it."""

    col: str = "cluster"                        # the shards' column holding each image's cluster
    distance_col: str = "cluster_distance"      # ... and its distance to it (squared L2, 1 - max q, ...)
    artifacts: dict[str, Any] = field(default_factory=dict)  # tensors and plain values: saved in clustering.pt


def resolve_input_size(configured: int | None, manifest) -> tuple[int, str]:
    """(side, where it came from): the config's `model.input_size` if set (images are resized to it), else the
    images' own shorter side from the manifest. Mixed sizes have no side of their own: the user must choose."""
    from raydc.errors import ConfigError

    if configured is not None:
        return int(configured), "config"
    shape = manifest.image_shape
    if shape is None:
        raise ConfigError("model.input_size", "is needed: the shards hold images of mixed sizes, so the network "
                                              "has no size of its own to take; set one and they are resized to it")
    return int(min(shape[0], shape[1])), "manifest"


def rank0_field(default: Any = None) -> Any:
    """A state field kept on rank 0 only (per-image arrays): checkpointed, never broadcast."""
    return field(default=default, metadata={"rank0": True})


def shared_view(state: Any) -> Any:
    """The state as the other ranks get it: a copy with every rank-0 field left at None."""
    if state is None:
        return None
    rank0 = {f.name: None for f in dataclasses.fields(state) if f.metadata.get("rank0")}
    return dataclasses.replace(state, **rank0)


def shard_argmax(view: "ShardView", col: str) -> None:
    """Run on a shard actor: each held row's largest column of the extracted features (DEC's q, DAC's label
    features) as column `col`, and 1 - that value as `col`_distance."""
    if view.x is None or len(view.ids) == 0:
        view.cols[col], view.cols[col + "_distance"] = np.zeros(0, np.int64), np.zeros(0, np.float32)
        return None
    x = np.asarray(view.x, np.float32)
    view.cols[col] = x.argmax(axis=1).astype(np.int64)
    view.cols[col + "_distance"] = (1.0 - x.max(axis=1)).astype(np.float32)
    return None


def clustering_row(ctx: "RoundContext", col: str, k: int, *, prev=None, majority: bool = False,
                   transitions: bool = False) -> dict:
    """Scores of the clustering the shards hold in `col`, from pair counts reduced over the shards (never from
    gathered labels): sizes; NMI with `prev` (RowBlocks of an earlier clustering) when given, and with
    `transitions` its splits and merges (`metrics.transition_counts`); ACC/NMI/ARI (and majority-vote ACC)
    against the evaluation labels when the shards have them."""
    from raydc.core import metrics as M
    from raydc.methods.api import TRUE

    service = ctx.service
    row: dict[str, Any] = {}
    true = service.counts(TRUE, col) if ctx.labelled else None
    sizes = (true if true is not None else service.counts(col, col)).b_sizes(k)
    row.update(M.size_stats_counts(sizes))
    if prev is not None:
        pairs = service.counts(prev, col)
        row["nmi_prev"] = M.nmi_counts(pairs)
        if transitions:
            row.update({f"{name}_prev": v for name, v in M.transition_counts(pairs).items()})
    if true is not None:
        row.update(M.evaluate_counts(true))
        if majority:
            row["acc_majority"] = M.majority_acc_counts(true)
    return row


def check_backbone_arch(arch: str) -> None:
    """A `torchvision:<name>` / `timm:<name>` that can be built here (the name exists, timm is installed), or
    an error naming `model.arch`."""
    from raydc.core.backbones import backbone_info
    from raydc.errors import ConfigError

    try:
        backbone_info(arch)
    except (KeyError, ImportError) as e:
        raise ConfigError("model.arch", str(e).strip("'\"")) from None


class Method:
    name: str = ""                        # the `method:` value that selects it (raydc.methods finds it by this)
    section: str | None = None            # the config section this method owns (`cfg.<section>`)
    options: type | None = None           # that section's dataclass
    archs: tuple[str, ...] = ("smallconvnet", "alexnet", "vgg16")  # `model.arch` values it can train
    backbones: bool = False               # also `torchvision:<name>` / `timm:<name>` (raydc.core.backbones)
    frozen: bool = False                  # `train.epochs: 0` clusters the untrained (or loaded) network's features

    min_input_size: dict[str, int] = {"alexnet": 64, "vgg16": 64}  # `model.arch` -> the smallest side it takes
    # Its own figures in the round's line, (row key, format), before the shared ones the engine formats.
    summary_fields: tuple[tuple[str, str], ...] = ()
    # Shared config fields this method never reads (its own section has its equivalents): a run that sets one
    # is told it is ignored, rather than left to wonder why it changed nothing.
    ignored_fields: tuple[str, ...] = ()
    # The method's own values for shared fields a config leaves out ("section.field": value), applied while the
    # config is read (raydc.config.with_method_defaults): DEC and DAC never run PCA, so their configs need not
    # say `cluster.pca_dim: 0`. A value the config states is kept, and the method's checks still judge it.
    shared_defaults: ClassVar[dict[str, object]] = {}

    def __init__(self, cfg: "Config", manifest):
        self.cfg = cfg
        self.manifest = manifest
        shape = manifest.image_shape
        self.in_channels = int(shape[2]) if shape else (1 if manifest.mode == "L" else 3)
        from raydc.core.backbones import backbone_info, is_backbone

        self.backbone = None
        if is_backbone(cfg.model.arch):
            self.backbone = backbone_info(cfg.model.arch)
        if self.backbone is not None and cfg.model.input_size is None:  # the resolution it was published for
            self.input_size, self.input_size_from = self.backbone.input_size, "backbone"
        else:
            self.input_size, self.input_size_from = resolve_input_size(cfg.model.input_size, manifest)

    def ignored_settings(self) -> list[str]:
        """The `ignored_fields` this run's config sets away from their defaults."""
        from raydc.config import Config

        default, out = Config(), []
        for name in self.ignored_fields:
            section, field_name = name.split(".")
            unset = self.shared_defaults.get(name, getattr(getattr(default, section), field_name))
            if getattr(getattr(self.cfg, section), field_name) != unset:
                out.append(name)
        return out

    def describe_input(self) -> str:
        """The line a run logs about its input, so a silent upscale (config 28, images 16) is visible."""
        shape = self.manifest.image_shape
        seen = f"{shape[0]}x{shape[1]}x{shape[2]}" if shape else f"mixed sizes, {self.manifest.mode}"
        how = {"manifest": "from the manifest", "backbone": f"the backbone's own; the images are {seen}"}.get(
            self.input_size_from, f"model.input_size; the images are {seen}")
        line = f"network input {self.input_size}x{self.input_size}x{self.in_channels} ({how})"
        if self.backbone is not None:
            line += f"; {self.backbone.describe()}" + (", grey repeated to RGB" if self.in_channels == 1 else "")
            line += ", no Sobel" if self.cfg.model.sobel else ""
        if self.cfg.model.weights:
            line += f"; initial weights {self.cfg.model.weights}"
        if self.cfg.model.freeze != "none":
            line += f"; frozen: {self.cfg.model.freeze}"
        return line

    @property
    def opts(self):
        """This method's own config section."""
        return getattr(self.cfg, self.section)

    # ---- checks ---------------------------------------------------------------------------------
    @classmethod
    def validate_config(cls, cfg: "Config") -> None:
        """Checks that need only the config (run when it is loaded); each error names its field."""
        from raydc.errors import ConfigError

        if cfg.train.epochs == 0 and not cls.frozen:
            raise ConfigError("train.epochs", f"0 (cluster a frozen network's features, no training) is not a "
                                              f"schedule {cfg.method} has; use method deepcluster for it")
        from raydc.core.backbones import is_backbone

        if is_backbone(cfg.model.arch) and cls.backbones:
            check_backbone_arch(cfg.model.arch)
        elif cfg.model.arch not in cls.archs:
            more = ", torchvision:<name>, timm:<name>" if cls.backbones else ""
            raise ConfigError("model.arch", f"{cfg.model.arch!r} is not a network {cfg.method} trains; "
                                            f"expected one of {', '.join(cls.archs)}{more}")
        if (cfg.model.weights or cfg.model.freeze != "none") and not cls.backbones:
            field_name = "model.weights" if cfg.model.weights else "model.freeze"
            raise ConfigError(field_name, f"{cfg.method} builds its network from scratch; it takes no initial "
                                          f"weights or freezing")

    def check_data(self) -> None:
        """Checks that need the data (run before any worker starts); each error names its field."""
        from raydc.errors import ConfigError

        m = self.cfg.model
        if (m.weights or m.freeze != "none") and not self.backbones:  # (DEC does not call validate_config's)
            raise ConfigError("model.weights" if m.weights else "model.freeze",
                              f"{self.cfg.method} builds its network from scratch; it takes no initial weights "
                              f"or freezing")
        if m.weights:  # read and fitted now: a bad file fails before any worker starts
            self.load_initial_weights(self.build_model())
        n = self.manifest.count
        if self.cfg.cluster.k > n:
            raise ConfigError("cluster.k", f"{self.cfg.cluster.k} clusters but only {n} images")
        if self.backbone is not None and self.backbone.fixed_size and self.input_size != self.backbone.input_size:
            raise ConfigError("model.input_size", f"{self.cfg.model.arch} takes {self.backbone.input_size} px "
                                                  f"inputs only, got {self.input_size}; leave it unset")
        need = self.min_input_size.get(self.cfg.model.arch)
        if need is not None and self.input_size < need:
            raise ConfigError("model.input_size", f"{self.cfg.model.arch} needs >= {need} px inputs, got "
                                                  f"{self.input_size} ({self.describe_input()}); set "
                                                  f"model.input_size to resize the images")

    def check_batch(self, field_name: str, batch_size: int) -> None:
        """A batch must fit in one worker's share of the images (DDP workers stop at the same step)."""
        from raydc.errors import ConfigError

        per_worker = self.manifest.count // self.cfg.train.num_workers
        if batch_size > per_worker:
            raise ConfigError(field_name, f"{batch_size} is larger than a worker's shard ({per_worker} images "
                                          f"over {self.cfg.train.num_workers} workers)")

    # ---- model and state ------------------------------------------------------------------------

    def initial_weights(self) -> tuple[str, dict] | None:
        """`model.weights` as ("published", the published network's state dict) for a backbone's weights file,
        or ("network", a state dict of this method's network) for an earlier run or a file of raydc's own net.
        Never unpickles: every read is torch.load(weights_only=True)."""
        from raydc import storage
        from raydc.core.backbones import WeightsError, as_state_dict, safe_load
        from raydc.errors import ConfigError

        loc = self.cfg.model.weights
        if not loc:
            return None
        try:
            run_file = storage.join(loc, "clustering.pt")
            if storage.is_file(run_file):  # an earlier raydc run: its final network
                saved = safe_load(storage.read_bytes(run_file), run_file)
                sd = as_state_dict(saved, run_file)
                arch = (saved.get("config") or {}).get("model", {}).get("arch")
                if arch != self.cfg.model.arch:
                    raise ConfigError("model.weights", f"the run {loc} trained {arch!r}, not model.arch "
                                                       f"{self.cfg.model.arch!r}")
                return "network", sd
            if not storage.is_file(loc):
                raise ConfigError("model.weights", f"{loc} is neither a weights file nor a finished raydc run "
                                                   f"directory (one with clustering.pt)")
            sd = as_state_dict(safe_load(storage.read_bytes(loc), loc), loc)
        except WeightsError as e:
            raise ConfigError("model.weights", str(e)) from None
        own = any(k == "adapter.mean" or k.endswith(".adapter.mean") for k in sd)  # a raydc network's own
        if self.backbone is not None and not own:
            return "published", sd
        return "network", sd

    def weights_target(self, model: "nn.Module") -> "nn.Module":
        """The module of this method's network that `model.weights` (a published backbone's file) loads into."""
        return model

    def is_head_key(self, key: str) -> bool:
        """A state-dict key of the part that scores this run's clusters: never carried into a new run, whose k
        and clusters are its own. DeepCluster's `top_layer`, at any depth (under DAC's head too)."""
        return "top_layer" in key.split(".")

    def load_initial_weights(self, model: "nn.Module") -> None:
        """`model.weights` into a freshly built network (a new run; a resumed one loads its checkpoint). The
        top layer is left as built: the clusters it scored are not this run's."""
        from raydc.core.backbones import WeightsError, build_backbone
        from raydc.errors import ConfigError

        got = self.initial_weights() if self.backbones else None
        if got is None:
            return
        kind, sd = got
        # an earlier run of this method holds the whole network; a published file or another method's run
        # (DeepCluster's backbone under DAC's head) the part `weights_target` names
        target = model if kind == "network" and set(sd) & set(model.state_dict()) else self.weights_target(model)
        try:
            if kind == "published":  # the published keys, checked strictly against the published network
                sd = build_backbone(self.cfg.model.arch, self.in_channels, weights=sd).state_dict()
            sd = {k: v for k, v in sd.items() if not self.is_head_key(k)}
            missing, unexpected = target.load_state_dict(sd, strict=False)
        except (WeightsError, RuntimeError) as e:
            raise ConfigError("model.weights", f"{self.cfg.model.weights} does not fit {self.cfg.model.arch}: "
                                               f"{str(e).strip()[:400]}") from None
        missing = [k for k in missing if not self.is_head_key(k)]
        if missing or unexpected:
            raise ConfigError("model.weights", f"{self.cfg.model.weights} does not fit {self.cfg.model.arch}: "
                                               f"missing {missing[:5]}, unexpected {unexpected[:5]}")

    def init_state(self) -> Any:
        """A dataclass instance (fields of plain types or numpy arrays)."""
        raise NotImplementedError

    def is_done(self, state: Any, round_idx: int) -> bool:
        raise NotImplementedError

    def comparable_final(self, final_row: dict) -> tuple[str, float | None]:
        """(a column of the run's first clustering's row, the final row's figure in its terms): the engine warns
        when the final is lower. The same number of clusters, scored the same way."""
        return "acc", final_row.get("acc")

    def epoch_of(self, state: Any, round_idx: int) -> int:
        """The `epoch` number written to metrics.jsonl for this round."""
        return round_idx

    def optimizers(self, model: "nn.Module", state: Any) -> dict:
        """Optimizers whose state persists across rounds (checkpointed). Per-round ones are made in train_round."""
        return {}

    def network_factory(self) -> Callable[[], "nn.Module"]:
        """A picklable function that builds this method's network: the Train workers, the feature pool's actors
        and `raydc assign` each build their copy from it, then load the weights."""
        raise NotImplementedError

    def build_model(self) -> "nn.Module":
        return self.network_factory()()

    def extractor_of(self, model: "nn.Module", call: str, **spec) -> "ExtractorSpec":
        """What a feature pass runs: this network with `model`'s current weights (a copy on the CPU), mapping
        images through its `call` method at the method's input size."""
        from raydc.core.extractor import ExtractorSpec

        sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return ExtractorSpec(build=self.network_factory(), state=sd, call=call, input_size=self.input_size,
                             channels=self.in_channels, **spec)

    def probe_extractor(self, model: "nn.Module") -> "ExtractorSpec":
        """What `raydc evaluate --probe` measures: the network's `embed` (the clustered layer of DeepCluster's
        nets, DEC's encoder) where it has one, else its output (DAC's label features)."""
        return self.extractor_of(model, "embed" if hasattr(model, "embed") else "forward")

    # ---- rank 0 ---------------------------------------------------------------------------------
    def plan(self, ctx: "RoundContext", model: "nn.Module", state: Any, round_idx: int) -> tuple[RoundPlan, dict]:
        raise NotImplementedError

    def finalize(self, ctx: "RoundContext", model: "nn.Module",
                 state: Any, round_idx: int) -> tuple[FinalClustering, dict]:
        """After the last round: the final clustering (its columns on the shards) and its metrics row. Leave the
        clustered features on the shard actors (the engine scores a sample of them without labels, has each
        shard write its assignments, then releases them)."""
        raise NotImplementedError

    def place_new_images(self, ctx: "RoundContext", model: "nn.Module", artifacts: dict) -> FinalClustering:
        """`raydc assign`: put the images `ctx` reads into the final clustering that `artifacts` (what `finalize`
        kept) and `model` define; the clusters stay on the shards, in the columns the result names."""
        raise NotImplementedError

    # ---- all workers ----------------------------------------------------------------------------
    def train_round(self, wctx: "TrainContext", model: "nn.Module", plan: RoundPlan,
                    state: Any, round_idx: int) -> dict:
        raise NotImplementedError
