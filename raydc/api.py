"""The Python API: what `raydc train`, `raydc sweep` and a run directory are, for a notebook or a script.

    run = raydc.train("jobs/configs/demo.yaml", cluster={"k": 20}, train__epochs=3, overwrite=True)
    run.metrics[-1]["silhouette"]; run.assignments().to_table(); run.result  # Ray Train's Result
    same = raydc.load_run(run.dir)

Each call joins the Ray the process already has (a notebook's `ray.init()`, or RAY_ADDRESS), or starts a local
one and shuts it down on return; either way Ray's loggers, its console output and Ray Data's context are left
as the call found them, so the API can be called any number of times in one interpreter.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raydc.errors import UserError


@dataclass
class Run:
    """A run directory (local or on object storage) and its saved config. `result` is Ray Train's Result of the
    fit that `raydc.train` ran (None for a run loaded from its directory)."""

    dir: str
    config: Any
    result: Any = field(default=None, repr=False)

    @property
    def metrics(self) -> list[dict]:
        """metrics.jsonl: one dict per round, the final clustering's row (`final: True`) last."""
        from raydc.engine.rundir import RunDir

        return RunDir(self.dir).read_metrics()

    @property
    def final(self) -> dict | None:
        rows = self.metrics
        return rows[-1] if rows and rows[-1].get("final") else None

    @property
    def report_dir(self) -> str:
        return _rundir(self.dir).report_dir

    @property
    def tensorboard_dir(self) -> str:
        from raydc.tracking import TENSORBOARD_DIR

        return _rundir(self.dir).join(TENSORBOARD_DIR)

    def assignments(self):
        """The final assignments (`row, id, cluster, distance`) as a pyarrow Dataset over the run's Parquet
        parts: `.to_table()`, `.to_batches()`, `.to_pandas()` or a filter, without loading every part."""
        import pyarrow.dataset as ds

        from raydc import storage

        parts = _rundir(self.dir).assignment_parts()
        if not parts:
            raise UserError(f"{self.dir} holds no assignments: the run has not finished")
        if storage.is_uri(self.dir):
            fs, _ = storage.resolve(self.dir)
            return ds.dataset([storage.resolve(p)[1] for p in parts], format="parquet", filesystem=fs)
        return ds.dataset(parts, format="parquet")


def _rundir(location: str):
    from raydc.engine.rundir import RunDir

    return RunDir(location)


def load_run(directory: str | os.PathLike) -> Run:
    """A run directory written by `raydc train` (finished or not) or by a sweep trial."""
    from raydc.engine.evaluate import open_run

    run, cfg = open_run(str(directory))
    return Run(run.location, cfg)


def _overrides(kwargs: dict[str, Any]) -> dict:
    """`cluster={"k": 4}` and `cluster__k=4` (a keyword cannot hold a dot) as one nested mapping."""
    out: dict = {}
    for key, value in kwargs.items():
        path = key.split("__")
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
        if isinstance(value, dict) and isinstance(node.get(path[-1]), dict):
            node[path[-1]].update(value)
        else:
            node[path[-1]] = copy.deepcopy(value)
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def resolve_config(config_or_path, overrides: dict[str, Any]):
    """A Config from a YAML path, a mapping or a Config, with keyword overrides; checked like a file is."""
    from raydc.config import Config, with_method_defaults
    from raydc.config_loader import from_dict, read_yaml, to_dict

    if isinstance(config_or_path, (str, os.PathLike)):
        data = read_yaml(config_or_path)
    elif isinstance(config_or_path, dict):
        data = copy.deepcopy(config_or_path)
    elif isinstance(config_or_path, Config):
        data = to_dict(config_or_path)
    elif config_or_path is None:
        data = {}
    else:
        raise UserError(f"raydc.train takes a YAML path, a mapping or a raydc Config, not "
                        f"{type(config_or_path).__name__}")
    return from_dict(Config, with_method_defaults(_merge(data, _overrides(overrides))))


def train(config_or_path=None, *, resume: bool = False, overwrite: bool = False, verbose: bool = False,
          log=print, **overrides) -> Run:
    """`raydc train`: one run, start to report. `overrides` are config fields, as sections
    (`cluster={"k": 20}`) or with `__` for the dot (`cluster__k=20`); `resume`/`overwrite` are the CLI's."""
    from raydc.engine.runtime import ray_state_kept
    from raydc.engine.trainer import run_training

    cfg = resolve_config(config_or_path, overrides)
    with ray_state_kept(verbose):
        run = run_training(cfg, resume=resume, overwrite=overwrite, log=log)
    return Run(run.location, load_run(run.location).config, getattr(run, "result", None))


def sweep(config_or_path, sweep_path: str | os.PathLike, *, sweep_dir: str | None = None, resume: bool = False,
          overwrite: bool = False, supervised: bool = False, verbose: bool = False, log=print, **overrides):
    """`raydc sweep`: the trials through Ray Tune; returns the SweepOutcome (records, best, the trials' run
    directories: `load_run(r.run_dir)` for each record)."""
    import tempfile

    from raydc.config_loader import dump_yaml
    from raydc.engine.runtime import ray_state_kept
    from raydc.sweep.runner import run_sweep

    cfg = resolve_config(config_or_path, overrides)
    with tempfile.TemporaryDirectory(prefix="raydc-sweep-") as tmp:
        base = Path(tmp) / "base.yaml"  # the sweep reads its base config from a file (and saves a copy)
        base.write_text(dump_yaml(cfg))
        with ray_state_kept(verbose):
            return run_sweep(str(base), str(sweep_path), [], resume=resume, overwrite=overwrite,
                             supervised=supervised, sweep_dir=sweep_dir, log=log)
