"""Where a run's files go: `data.shards` and `run.dir` made absolute before anything uses them.

Train workers, actors and a resumed run each have their own working directory, so every path the driver hands
on must be absolute. A relative path means "relative to where I ran the command" on a laptop. Inside a job
started with `ray job submit --working-dir .`, the driver runs in Ray's temporary copy of that directory
(`.../runtime_resources/working_dir_files/_ray_pkg_.../`): a relative `run.dir` would put the results where Ray
deletes them. There a relative path must be resolved against a base the user named, RAYDC_BASE_DIR, or is
refused with an error naming the field.
"""
from __future__ import annotations

import os
from pathlib import Path

from raydc.errors import ConfigError

BASE_DIR_ENV = "RAYDC_BASE_DIR"
# Ray Jobs sets this in the environment of a submitted job's entry point (ray._private.runtime_env.constants).
_RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
FIELDS = ("data.shards", "run.dir", "model.weights")


def is_uri(path: str) -> bool:
    from raydc.storage import is_uri as storage_is_uri

    return storage_is_uri(path)


def in_ray_job() -> bool:
    return _RAY_JOB_ENV in os.environ


def absolute_path(field: str, value: str) -> str:
    """`value` of config field `field` as an absolute path (URIs are returned as they are)."""
    if is_uri(value):
        return value
    p = Path(value).expanduser()
    if p.is_absolute():
        return str(p.resolve())
    base = os.environ.get(BASE_DIR_ENV, "").strip()
    if base:
        b = Path(base).expanduser()
        if not b.is_absolute():
            raise ConfigError(field, f"{value!r} is relative and {BASE_DIR_ENV}={base!r} is not an absolute path")
        return str((b / p).resolve())
    if in_ray_job():
        raise ConfigError(field, f"{value!r} is a relative path, and this Ray job runs in a temporary copy of its "
                                 f"working dir ({Path.cwd()}) that Ray deletes: give an absolute path on storage "
                                 f"every node can read (--set {field}=/shared/...), or set {BASE_DIR_ENV} to a "
                                 f"directory to resolve relative paths against")
    return str(p.resolve())


def absolute_paths(cfg) -> None:
    """Make `cfg.data.shards` and `cfg.run.dir` absolute in place (see the module docstring for the rule)."""
    cfg.data.shards = absolute_path("data.shards", cfg.data.shards)
    cfg.run.dir = absolute_path("run.dir", cfg.run.dir)
    if getattr(cfg.model, "weights", None):
        cfg.model.weights = absolute_path("model.weights", cfg.model.weights)
