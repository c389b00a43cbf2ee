"""The sweep file: typed dataclasses, loaded and checked like the run config, before any trial starts.

A sweep names config fields by their dotted run-config names (`cluster.k`, `train.lr`, `dac.upper`). Names
are checked by walking the typed `Config` tree, never against a list, so a method that adds a section (DAC's
`dac:`) is sweepable the moment its dataclass exists. Every error is a `ConfigError` naming the sweep-file
field (`space.cluster.k.grid`, `search.num_samples`).
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Literal, get_type_hints

from raydc.config import Config
from raydc.config_loader import coerce, from_dict, read_yaml, resumable, type_name
from raydc.errors import ConfigError

DISTRIBUTIONS = ("grid", "choice", "uniform", "loguniform", "randint")

# Fields a sweep may not vary: each trial's run directory and its Ray connection belong to the sweep.
NOT_SWEEPABLE = ("run.dir", "ray.address", "ray.num_cpus")

# Metrics in every method's final row that need no labels (what a label-free sweep may select on), with
# the direction that is better. `kmeans_objective` falls with k whatever the data: never compare it across k.
LABEL_FREE = {"silhouette": "max", "calinski_harabasz": "max", "nmi_prev": "max", "loss": "min",
              "kmeans_objective": "min", "ae_kmeans_stability": "max",
              "ae_manifold_silhouette": "max"}  # the last two: DEC only (the second with dec.manifold_score_sample)
SUPERVISED = {"acc": "max", "nmi": "max", "ari": "max"}


@dataclass
class Param:
    """One swept field: its dotted name in the run config, the distribution, and that distribution's values."""

    name: str
    kind: Literal["grid", "choice", "uniform", "loguniform", "randint"]
    values: list[Any]

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"

    def probes(self) -> list[Any]:
        """Values every trial config is checked with before the sweep starts: all of a finite set, the ends
        of a range (a range's inside cannot fail a check its ends pass: the run config checks bounds)."""
        if self.kind in ("grid", "choice"):
            return list(self.values)
        lo, hi = self.values
        return [lo, hi - 1] if self.kind == "randint" else [lo, hi]


@dataclass
class SearchConfig:
    algorithm: Literal["grid", "random", "optuna"] = "grid"
    num_samples: int = 1              # grid: passes over the grid; random/optuna: trials (times the grid, if any)
    seed: int = 0                     # the search algorithm's own seed (each trial keeps the run config's seed)

    def validate(self) -> None:
        if self.num_samples < 1:
            raise ConfigError("search.num_samples", f"must be >= 1, got {self.num_samples}")


@dataclass
class SchedulerConfig:
    """Early stopping over rounds. ASHA compares trials round by round on a metric every round reports,
    so it needs one comparable across the space (the final-row scores do not exist before the end)."""

    name: Literal["none", "asha"] = "none"
    metric: str = "nmi_prev"
    mode: Literal["min", "max"] = "max"
    grace_period: int = 1             # rounds every trial runs before it may be stopped
    reduction_factor: int = 3
    max_t: int = 100                  # rounds at which ASHA's last rung sits

    def validate(self) -> None:
        if self.grace_period < 1:
            raise ConfigError("scheduler.grace_period", f"must be >= 1, got {self.grace_period}")
        if self.reduction_factor < 2:
            raise ConfigError("scheduler.reduction_factor", f"must be >= 2, got {self.reduction_factor}")
        if self.max_t < self.grace_period:
            raise ConfigError("scheduler.max_t", f"must be >= scheduler.grace_period ({self.grace_period}), "
                                                 f"got {self.max_t}")


@dataclass
class ResourcesConfig:
    """Placement. Per-trial workers and GPUs override the base config's `train.*` for every trial."""

    max_concurrent_trials: int | None = resumable(None)  # None: 1 on an embedded local Ray, else what fits
    num_workers: int | None = None             # train.num_workers of each trial
    cpus_per_worker: float | None = None       # train.cpus_per_worker
    use_gpu: Literal["auto", "never", "always"] | None = None   # train.use_gpu (a GPU per worker)

    def validate(self) -> None:
        if self.max_concurrent_trials is not None and self.max_concurrent_trials < 1:
            raise ConfigError("resources.max_concurrent_trials", f"must be >= 1, got {self.max_concurrent_trials}")
        if self.num_workers is not None and self.num_workers < 1:
            raise ConfigError("resources.num_workers", f"must be >= 1, got {self.num_workers}")
        if self.cpus_per_worker is not None and self.cpus_per_worker <= 0:
            raise ConfigError("resources.cpus_per_worker", f"must be > 0, got {self.cpus_per_worker}")

    def overrides(self) -> dict[str, Any]:
        pairs = {"train.num_workers": self.num_workers, "train.cpus_per_worker": self.cpus_per_worker,
                 "train.use_gpu": self.use_gpu}
        return {k: v for k, v in pairs.items() if v is not None}


@dataclass
class SelectConfig:
    """How the winner is chosen. Label-free by default: a sweep on unlabeled images must still pick."""

    metric: str = resumable("silhouette")
    mode: Literal["min", "max"] | None = resumable(None)  # None: the metric's natural direction
    supervised: bool = resumable(False)    # allow acc/nmi/ari (needs labels; the summary says so)

    def validate(self) -> None:
        known = {**LABEL_FREE, **SUPERVISED}
        if self.metric not in known:
            raise ConfigError("select.metric", f"got {self.metric!r}, expected one of {', '.join(known)}")
        if self.metric in SUPERVISED and not self.supervised:
            raise ConfigError("select.metric", f"{self.metric!r} needs labels: set select.supervised: true "
                                               f"(or pass --supervised-selection) to select on it")

    @property
    def direction(self) -> str:
        return self.mode or {**LABEL_FREE, **SUPERVISED}[self.metric]


@dataclass
class SweepConfig:
    space: dict[str, Any] = field(default_factory=dict)
    search: SearchConfig = field(default_factory=SearchConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    dir: str = "runs/sweep"           # the sweep directory: Tune's results, runs/<trial>, trials.csv, best.yaml

    def validate(self) -> None:
        self.params()  # parses and checks every entry of `space`
        if not self.space:
            raise ConfigError("space", "is empty: name at least one config field to sweep")
        if self.search.algorithm == "grid":
            for p in self.params():
                if not p.is_grid:
                    raise ConfigError(f"space.{p.name}", f"is {p.kind} but search.algorithm is grid: use "
                                                         f"{{grid: [...]}} or search.algorithm: random")
        if self.search.algorithm == "optuna":
            for p in self.params():
                if p.is_grid:
                    raise ConfigError(f"space.{p.name}", "is a grid, which Optuna cannot search: use "
                                                         "{choice: [...]}")
        if self.select.metric == "kmeans_objective" and "cluster.k" in self.space:
            raise ConfigError("select.metric", "kmeans_objective falls as k grows whatever the data: it cannot "
                                               "compare trials with different cluster.k")

    def params(self) -> list[Param]:
        return [parse_param(name, spec) for name, spec in self.space.items()]


def field_type(dotted: str, where: str) -> Any:
    """The annotated type of a dotted run-config field, found by walking the typed Config tree."""
    cls: Any = Config
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        if not dataclasses.is_dataclass(cls):
            raise ConfigError(where, f"{'.'.join(parts[:i])} is a field, not a section")
        names = {f.name for f in dataclasses.fields(cls)}
        if part not in names:
            section = ".".join(parts[:i]) or "the run config"
            raise ConfigError(where, f"unknown field {dotted!r}: {section} has {', '.join(sorted(names))}")
        cls = get_type_hints(cls)[part]
    if dataclasses.is_dataclass(cls):
        raise ConfigError(where, f"{dotted!r} is a section: name one of its fields, e.g. {dotted}."
                                 f"{dataclasses.fields(cls)[0].name}")
    return cls


def parse_param(name: str, spec: Any) -> Param:
    where = f"space.{name}"
    if name in NOT_SWEEPABLE:
        raise ConfigError(where, "is set by the sweep for every trial and cannot be swept")
    tp = field_type(name, where)
    if not isinstance(spec, dict) or len(spec) != 1:
        raise ConfigError(where, f"expected one distribution, e.g. {{grid: [...]}}; one of {', '.join(DISTRIBUTIONS)}")
    (kind, values), = spec.items()
    where = f"{where}.{kind}"
    if kind not in DISTRIBUTIONS:
        raise ConfigError(where, f"unknown distribution; expected one of {', '.join(DISTRIBUTIONS)}")
    if not isinstance(values, list):
        raise ConfigError(where, f"expected a list, got {values!r}")
    if kind in ("grid", "choice"):
        if not values:
            raise ConfigError(where, "is empty: give at least one value")
        values = [coerce(v, tp, f"{where}[{i}]") for i, v in enumerate(values)]
        if len({repr(v) for v in values}) != len(values):
            raise ConfigError(where, f"has repeated values: {values}")
        return Param(name, kind, values)
    if len(values) != 2:
        raise ConfigError(where, f"expected [low, high], got {values!r}")
    want = int if kind == "randint" else float
    lo, hi = (coerce(v, want, f"{where}[{i}]") for i, v in enumerate(values))
    if kind != "randint":
        try:  # a continuous distribution draws non-integers: the field must take them (an int field does not)
            coerce(0.5, tp, where)
        except ConfigError:
            raise ConfigError(where, f"draws real numbers but {name} is {type_name(tp)}: "
                                     f"use randint or grid") from None
    for i, v in enumerate((lo, hi)):
        coerce(v, tp, f"{where}[{i}]")
        if not math.isfinite(v):
            raise ConfigError(f"{where}[{i}]", f"must be finite, got {v}")
    if not lo < hi:
        raise ConfigError(where, f"low must be below high, got [{lo}, {hi}]")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(where, f"low must be > 0 for a log scale, got {lo}")
    return Param(name, kind, [lo, hi])


def load_sweep(path: str | None, overrides: dict[str, Any] | None = None) -> SweepConfig:
    data = read_yaml(path) if path else {}
    for key, value in (overrides or {}).items():
        section, name = key.split(".", 1)
        data.setdefault(section, {})
        data[section] = {**(data[section] or {}), name: value}
    return from_dict(SweepConfig, data)
