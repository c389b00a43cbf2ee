"""--resume keeps the run's saved config; only budget/placement fields may change, anything else is named."""
from __future__ import annotations

import pytest

from raydc.config import Config, load_config
from raydc.config_loader import to_dict
from raydc.engine.rundir import RunDir
from raydc.engine.trainer import resolve_config
from raydc.errors import ConfigError


def _cfg(run_dir, *extra):
    return load_config(None, [f"run.dir={run_dir}", "data.shards=shards/x", "cluster.k=5", *extra])


def _saved(tmp_path, *extra):
    cfg = _cfg(tmp_path / "run", *extra)
    RunDir(cfg.run.dir).create(cfg.to_yaml(), resume=False, overwrite=False)
    return cfg


def test_same_config_resumes_unchanged(tmp_path, monkeypatch):
    """The run continues from its saved config, not the one given: here the given config names the same shards
    by a relative path, which compares equal, so nothing is logged and the saved spelling comes back."""
    saved = _saved(tmp_path, f"data.shards={tmp_path / 'shards' / 'x'}")
    monkeypatch.chdir(tmp_path)
    said: list[str] = []
    out = resolve_config(_cfg(tmp_path / "run"), resume=True, log=said.append)
    assert out.data.shards == str(tmp_path / "shards" / "x") and said == []
    assert to_dict(out) == to_dict(saved)


def test_budget_may_change_and_is_logged(tmp_path):
    _saved(tmp_path, "train.epochs=3")
    said = []
    out = resolve_config(_cfg(tmp_path / "run", "train.epochs=7"), resume=True, log=said.append)
    assert out.train.epochs == 7
    assert any("train.epochs" in s and "3" in s and "7" in s for s in said), said


def test_a_method_adds_its_own_budgets(tmp_path):
    """DEC's budgets (declared `resumable` in DECConfig) may change on a DEC run, shortening the autoencoder stage too;
    on a DeepCluster run they are not among the fields that may change."""
    dec = ["method=dec", "cluster.pca_dim=0"]
    _saved(tmp_path, *dec)
    out = resolve_config(_cfg(tmp_path / "run", *dec, "dec.max_iterations=100", "dec.finetune_epochs=7"),
                         resume=True, log=lambda *_: None)
    assert out.dec.max_iterations == 100 and out.dec.finetune_epochs == 7
    with pytest.raises(ConfigError, match=r"dec\.lr"):
        resolve_config(_cfg(tmp_path / "run", *dec, "dec.lr=0.5"), resume=True, log=lambda *_: None)
    _saved(tmp_path / "dc")
    with pytest.raises(ConfigError, match=r"dec\.max_iterations"):
        resolve_config(_cfg(tmp_path / "dc" / "run", "dec.max_iterations=100"), resume=True, log=lambda *_: None)


def test_other_change_is_an_error_naming_the_field(tmp_path):
    _saved(tmp_path)
    with pytest.raises(ConfigError, match=r"cluster\.k.*7.*5"):
        resolve_config(_cfg(tmp_path / "run", "cluster.k=7"), resume=True, log=lambda *_: None)


def test_without_saved_config_the_given_one_is_used(tmp_path):
    out = resolve_config(_cfg(tmp_path / "fresh", "cluster.k=9"), resume=True, log=lambda *_: None)
    assert out.cluster.k == 9


def test_resume_rewrites_the_saved_config(tmp_path):
    cfg = _saved(tmp_path, "train.epochs=3")
    new = resolve_config(_cfg(tmp_path / "run", "train.epochs=8"), resume=True, log=lambda *_: None)
    RunDir(cfg.run.dir).create(new.to_yaml(), resume=True, overwrite=False)
    again = resolve_config(_cfg(tmp_path / "run", "train.epochs=8"), resume=True, log=lambda *_: None)
    assert again.train.epochs == 8


def test_a_moved_run_directory_resumes_where_it_is(tmp_path):
    import shutil

    _saved(tmp_path)
    shutil.move(str(tmp_path / "run"), str(tmp_path / "moved"))
    out = resolve_config(_cfg(tmp_path / "moved"), resume=True, log=lambda *_: None)
    assert out.run.dir == str(tmp_path / "moved")


# ---- decisions made on the cluster, once, before config.yaml is written --------------------------------------
def test_feature_gpus_are_decided_on_the_cluster_and_the_given_config_is_left_alone(tmp_path):
    from raydc.engine.trainer import place_on_cluster

    given = _cfg(tmp_path / "run", "train.num_workers=1")
    out, use_gpu = place_on_cluster(given, gpus=0)
    assert (out.features.num_gpus, use_gpu) == (0.0, False)
    out, use_gpu = place_on_cluster(given, gpus=2)                         # more GPUs than Train workers
    assert (out.features.num_gpus, use_gpu) == (1.0, True) and given.features.num_gpus == 0.0
    assert place_on_cluster(given, gpus=1)[0].features.num_gpus == 0.0     # the one GPU goes to training
    always = _cfg(tmp_path / "run", "features.use_gpu=always")
    assert place_on_cluster(always, gpus=1)[0].features.num_gpus == 1.0
    never = _cfg(tmp_path / "run", "features.use_gpu=never", "train.use_gpu=never")
    assert place_on_cluster(never, gpus=4) == (never, False)
    chosen = _cfg(tmp_path / "run", "features.num_gpus=0.25")
    assert place_on_cluster(chosen, gpus=4)[0].features.num_gpus == 0.25
    with pytest.raises(ConfigError, match=r"train\.use_gpu"):
        place_on_cluster(_cfg(tmp_path / "run", "train.use_gpu=always"), gpus=0)


def test_a_run_saved_with_decided_feature_gpus_resumes_from_the_given_config(tmp_path):
    """config.yaml holds the decision (1 GPU per feature actor); the same command resumes, and the cluster it
    resumes on decides again."""
    _saved(tmp_path, "features.num_gpus=1.0")
    said = []
    out = resolve_config(_cfg(tmp_path / "run"), resume=True, log=said.append)
    assert out.features.num_gpus == 0.0 and any("features.num_gpus" in s for s in said)


def test_the_resumable_fields_are_the_ones_declared_beside_them():
    """`resumable(...)` beside a field is the whole declaration: engine, method and sweep sections alike; a field
    not declared so (what a round computes from) is not resumable."""
    from raydc.config_loader import config_diff, resumable_keys
    from raydc.sweep.config import SweepConfig

    keys = resumable_keys(Config)
    assert {"train.epochs", "ray.address", "features.batch_size", "run.trackers", "dec.max_iterations",
            "dec.tol"} <= keys
    assert not {"train.lr", "train.seed", "cluster.k", "dec.alpha", "dac.lr", "data.shards"} & keys
    assert resumable_keys(SweepConfig) == {"resources.max_concurrent_trials", "select.metric", "select.mode",
                                           "select.supervised"}
    saved = {"train": {"epochs": 2, "lr": 0.1}, "space": {"cluster.k": {"grid": [2]}}}
    given = {"train": {"epochs": 3, "lr": 0.1}, "space": {"cluster.k": {"grid": [3]}}}
    assert config_diff(saved, given, opaque=("space",)) == [("space", {"cluster.k": {"grid": [2]}},
                                                             {"cluster.k": {"grid": [3]}}),
                                                            ("train.epochs", 2, 3)]
