"""Where a run's files go: absolute paths for workers, and never Ray's temporary copy of a job's working dir."""
from __future__ import annotations

from pathlib import Path

import pytest

from raydc.config import load_config
from raydc.engine.paths import absolute_paths
from raydc.errors import ConfigError


def _cfg(shards: str, run_dir: str):
    return load_config(None, [f"data.shards={shards}", f"run.dir={run_dir}"])


def test_relative_paths_resolve_against_the_current_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("RAYDC_BASE_DIR", raising=False)
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR", raising=False)
    monkeypatch.chdir(tmp_path)
    cfg = _cfg("shards/x", "runs/y")
    absolute_paths(cfg)
    assert (cfg.data.shards, cfg.run.dir) == (str(tmp_path / "shards/x"), str(tmp_path / "runs/y"))


def test_inside_a_ray_job_a_relative_path_needs_a_base(tmp_path, monkeypatch):
    # Ray Jobs sets this variable for a submitted entry point, whose cwd is Ray's temporary package directory.
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")
    monkeypatch.delenv("RAYDC_BASE_DIR", raising=False)
    with pytest.raises(ConfigError, match=r"'run\.dir'.*relative.*RAYDC_BASE_DIR"):
        absolute_paths(_cfg(str(tmp_path / "shards"), "runs/demo"))
    with pytest.raises(ConfigError, match=r"'data\.shards'"):
        absolute_paths(_cfg("shards/mnist", str(tmp_path / "run")))
    cfg = _cfg(str(tmp_path / "s"), "s3://bucket/runs/demo")  # a URI is the user's named location
    absolute_paths(cfg)
    assert (cfg.data.shards, cfg.run.dir) == (str(tmp_path / "s"), "s3://bucket/runs/demo")
    monkeypatch.setenv("RAYDC_BASE_DIR", str(tmp_path / "base"))
    cfg = _cfg("shards/mnist", "runs/demo")
    absolute_paths(cfg)
    assert Path(cfg.run.dir) == tmp_path / "base" / "runs" / "demo"
    assert Path(cfg.data.shards) == tmp_path / "base" / "shards" / "mnist"
    monkeypatch.setenv("RAYDC_BASE_DIR", "relative/base")
    with pytest.raises(ConfigError, match="RAYDC_BASE_DIR"):
        absolute_paths(_cfg("shards/mnist", "runs/demo"))
