"""From a checked sweep to what Tune runs: the search space, and each trial's full run config.

A trial's config is the base config with the sampled values set by their dotted names, loaded through the same
typed loader as `raydc train`, so a sampled value that the run config refuses fails with the run config's own
message. The probes (every grid value, each range's ends) go through that loader and the data checks before
any trial starts: a bad combination costs seconds, not a failed trial an hour in.
"""
from __future__ import annotations

import itertools
from typing import Any

from raydc.config import Config
from raydc.config_loader import from_dict, set_field
from raydc.errors import ConfigError
from raydc.sweep.config import Param, SweepConfig

# Past this many probe combinations, each parameter's probes are checked alone (the others at their first).
MAX_PROBE_COMBINATIONS = 512


def _in_trial(e: ConfigError, values: dict[str, Any]) -> ConfigError:
    """The same error, saying which trial's values gave it."""
    shown = ", ".join(f"{k}={v!r}" for k, v in values.items())
    return ConfigError(e.field, f"{e.detail} (in the trial with {shown})")


def trial_config(base: dict, values: dict[str, Any], run_dir: str) -> Config:
    """The full run config of one trial. Errors name the field and the trial's values."""
    data = base
    for name, value in values.items():
        data = set_field(data, name.split("."), value)
    data = set_field(data, ["run", "dir"], run_dir)
    try:
        return from_dict(Config, data)
    except ConfigError as e:
        raise _in_trial(e, values) from None


def probe_values(params: list[Param]) -> list[dict[str, Any]]:
    probes = [p.probes() for p in params]
    total = 1
    for values in probes:
        total *= len(values)
    if total <= MAX_PROBE_COMBINATIONS:
        return [dict(zip([p.name for p in params], combo)) for combo in itertools.product(*probes)]
    first = {p.name: v[0] for p, v in zip(params, probes)}
    return [{**first, p.name: v} for p, values in zip(params, probes) for v in values]


def check_space(sweep: SweepConfig, base: dict, manifest=None) -> int:
    """Load every probe config (and check it against the data when a manifest is given). Returns the count."""
    from raydc.engine.trainer import check_against_data

    probes = probe_values(sweep.params())
    for values in probes:
        cfg = trial_config(base, values, run_dir="probe")
        if manifest is not None:
            try:
                check_against_data(cfg, manifest)
            except ConfigError as e:
                raise _in_trial(e, values) from None
    return len(probes)


def tune_space(sweep: SweepConfig) -> dict[str, Any]:
    """Tune's param_space: one flat key per dotted field, so Tune's table and trial names show `cluster.k`."""
    from ray import tune

    make = {"grid": tune.grid_search, "choice": tune.choice,
            "uniform": lambda v: tune.uniform(*v), "loguniform": lambda v: tune.loguniform(*v),
            "randint": lambda v: tune.randint(*v)}
    return {p.name: make[p.kind](p.values) for p in sweep.params()}


def grid_size(sweep: SweepConfig) -> int:
    n = 1
    for p in sweep.params():
        if p.is_grid:
            n *= len(p.values)
    return n
