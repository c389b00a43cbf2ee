"""The sweep file is checked like the run config, before any trial starts: every error names its field."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest
import yaml

from raydc.config import Config
from raydc.config_loader import from_dict
from raydc.errors import ConfigError
from raydc.sweep import config as sweep_config
from raydc.sweep.config import SweepConfig, load_sweep
from raydc.sweep.space import check_space, probe_values, trial_config, tune_space

BASE = {"data": {"shards": "/tmp/none"}, "cluster": {"k": 3, "pca_dim": 0}}


def sweep(**data) -> SweepConfig:
    return from_dict(SweepConfig, data)


def field_of(excinfo) -> str:
    return excinfo.value.field


@pytest.mark.parametrize("space, where, words", [
    ({"cluster.kk": {"grid": [2, 3]}}, "space.cluster.kk", "unknown field 'cluster.kk'"),
    ({"clustr.k": {"grid": [2, 3]}}, "space.clustr.k", "unknown field"),
    ({"cluster": {"grid": [2, 3]}}, "space.cluster", "is a section"),
    ({"cluster.k.x": {"grid": [2]}}, "space.cluster.k.x", "is a field, not a section"),
    ({"cluster.k": {"grid": []}}, "space.cluster.k.grid", "is empty"),
    ({"cluster.k": {"grid": [2, 2]}}, "space.cluster.k.grid", "repeated"),
    ({"cluster.k": {"grid": [2, "many"]}}, "space.cluster.k.grid[1]", "expected an integer"),
    ({"cluster.k": {"uniform": [2, 9]}}, "space.cluster.k.uniform", "draws real numbers"),
    ({"train.lr": {"uniform": [0.1, 0.01]}}, "space.train.lr.uniform", "low must be below high"),
    ({"train.lr": {"loguniform": [0.0, 0.1]}}, "space.train.lr.loguniform", "must be > 0"),
    ({"train.lr": {"uniform": [0.1]}}, "space.train.lr.uniform", "expected [low, high]"),
    ({"train.lr": {"normal": [0, 1]}}, "space.train.lr.normal", "unknown distribution"),
    ({"train.lr": {"grid": [0.1], "choice": [0.2]}}, "space.train.lr", "one distribution"),
    ({"run.dir": {"grid": ["a", "b"]}}, "space.run.dir", "set by the sweep"),
    ({"cluster.mode": {"grid": ["single", "fast"]}}, "space.cluster.mode.grid[1]", "expected one of"),
])
def test_bad_space_entries_name_their_field(space, where, words):
    with pytest.raises(ConfigError) as e:
        sweep(space=space, search={"algorithm": "random"})
    assert field_of(e) == where, str(e.value)
    assert words in str(e.value)


@pytest.mark.parametrize("data, where", [
    ({}, "space"),
    ({"space": {"train.lr": {"uniform": [0.01, 0.1]}}}, "space.train.lr"),                # grid search, not a grid
    ({"space": {"cluster.k": {"grid": [2, 3]}}, "search": {"algorithm": "optuna"}}, "space.cluster.k"),
    ({"space": {"cluster.k": {"grid": [2, 3]}}, "search": {"num_samples": 0}}, "search.num_samples"),
    ({"space": {"cluster.k": {"grid": [2, 3]}}, "search": {"algorithm": "bayes"}}, "search.algorithm"),
    ({"space": {"cluster.k": {"grid": [2, 3]}}, "select": {"metric": "acc"}}, "select.metric"),  # labels, no flag
    ({"space": {"cluster.k": {"grid": [2, 3]}}, "select": {"metric": "accuracy"}}, "select.metric"),
    ({"space": {"cluster.k": {"grid": [2, 3]}}, "select": {"metric": "kmeans_objective"}}, "select.metric"),
    ({"space": {"cluster.k": {"grid": [2, 3]}}, "scheduler": {"name": "asha", "grace_period": 0}},
     "scheduler.grace_period"),
    ({"space": {"cluster.k": {"grid": [2, 3]}}, "resources": {"max_concurrent_trials": 0}},
     "resources.max_concurrent_trials"),
    ({"space": {"cluster.k": {"grid": [2, 3]}}, "selct": {}}, "selct"),
])
def test_bad_sections_name_their_field(data, where):
    with pytest.raises(ConfigError) as e:
        sweep(**data)
    assert field_of(e) == where, str(e.value)


def test_supervised_metric_needs_the_explicit_flag(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"space": {"cluster.k": {"grid": [2, 3]}}, "select": {"metric": "nmi"}}))
    with pytest.raises(ConfigError, match="select.supervised"):
        load_sweep(str(path))
    s = load_sweep(str(path), {"select.supervised": True})  # what --supervised-selection passes
    assert s.select.metric == "nmi" and s.select.direction == "max"


def test_a_sampled_value_the_run_config_refuses_fails_before_any_trial():
    s = sweep(space={"cluster.k": {"grid": [2, 3]}, "train.lr": {"grid": [0.05, -1.0]}})
    with pytest.raises(ConfigError) as e:
        check_space(s, BASE)
    assert field_of(e) == "train.lr" and "train.lr=-1.0" in str(e.value) and "must be > 0" in str(e.value)
    # a range's end is checked too: momentum must stay below 1
    s = sweep(space={"train.momentum": {"uniform": [0.5, 1.0]}}, search={"algorithm": "random"})
    with pytest.raises(ConfigError) as e:
        check_space(s, BASE)
    assert field_of(e) == "train.momentum"
    # k = 1 passes the sweep's own type check (an int) but not the run config's
    s = sweep(space={"cluster.k": {"grid": [1, 3]}})
    with pytest.raises(ConfigError, match="cluster.k=1"):
        check_space(s, BASE)


def test_values_are_checked_against_the_data():
    manifest = SimpleNamespace(count=4, image_shape=[8, 8, 1], mode="L")
    base = {**BASE, "train": {"batch_size": 2}}
    s = sweep(space={"cluster.k": {"grid": [2, 3, 5]}})
    with pytest.raises(ConfigError) as e:
        check_space(s, base, manifest)
    assert field_of(e) == "cluster.k" and "only 4 images" in str(e.value) and "cluster.k=5" in str(e.value)
    assert check_space(sweep(space={"cluster.k": {"grid": [2, 3]}}), base, manifest) == 2


def test_probes_cover_grids_and_range_ends():
    s = sweep(space={"cluster.k": {"grid": [2, 3]}, "train.lr": {"loguniform": [0.01, 0.1]},
                     "train.epochs": {"randint": [1, 4]}}, search={"algorithm": "random"})
    probes = probe_values(s.params())
    assert len(probes) == 8
    assert {p["train.epochs"] for p in probes} == {1, 3}  # randint's high is exclusive, as in Tune
    assert {p["train.lr"] for p in probes} == {0.01, 0.1}


def test_trial_config_sets_dotted_fields_and_its_own_run_dir():
    cfg = trial_config(BASE, {"cluster.k": 5, "train.lr": 0.01}, "/sweep/runs/abc")
    assert cfg.cluster.k == 5 and cfg.train.lr == 0.01 and cfg.run.dir == "/sweep/runs/abc"
    assert cfg.cluster.pca_dim == 0  # the base is kept
    assert BASE["cluster"] == {"k": 3, "pca_dim": 0}  # and not modified


def test_tune_space_has_one_flat_key_per_field():
    from ray import tune

    s = sweep(space={"cluster.k": {"grid": [2, 3]}, "train.lr": {"loguniform": [0.01, 0.1]}},
              search={"algorithm": "random"})
    space = tune_space(s)
    assert space["cluster.k"] == tune.grid_search([2, 3])
    assert isinstance(space["train.lr"], tune.search.sample.Float)


@dataclass
class DACConfig:
    upper: float = 0.95
    lower: float = 0.45


@dataclass
class WithDAC(Config):
    dac: DACConfig = field(default_factory=DACConfig)


def test_a_new_method_section_is_sweepable_without_a_change(monkeypatch):
    """Names are checked against the typed Config tree itself: a `dac:` section (as DAC adds) just works."""
    monkeypatch.setattr(sweep_config, "Config", WithDAC)
    s = sweep(space={"dac.upper": {"uniform": [0.9, 0.99]}, "dac.lower": {"uniform": [0.3, 0.6]}},
              search={"algorithm": "random", "num_samples": 4})
    assert [p.name for p in s.params()] == ["dac.upper", "dac.lower"]
    with pytest.raises(ConfigError) as e:
        sweep(space={"dac.uper": {"uniform": [0.9, 0.99]}}, search={"algorithm": "random"})
    assert field_of(e) == "space.dac.uper" and "upper" in str(e.value)
    assert dataclasses.is_dataclass(WithDAC)


def test_shipped_sweep_files_load():
    from tests.conftest import REPO

    for path in sorted((REPO / "jobs" / "sweeps").glob("*.yaml")):
        text = path.read_text()
        if "dac." in text and not hasattr(Config(), "dac"):
            continue  # the DAC sweep needs DAC's config section
        s = load_sweep(str(path))
        check_space(s, {"data": {"shards": "/tmp/none"}})


def test_a_resumed_sweep_may_change_only_its_resumable_fields(tmp_path):
    """`--resume` takes the saved inputs; the new files may change how many trials run at once and how the
    winner is picked (declared `resumable`), and of the base config only where Ray runs: a changed space or a
    changed budget of the trials is refused, naming the field."""
    from raydc.config import load_config
    from raydc.config_loader import dump_yaml
    from raydc.sweep.runner import prepare_inputs

    shards, out = tmp_path / "shards", tmp_path / "out"
    shards.mkdir()
    out.mkdir()
    base = tmp_path / "base.yaml"
    base.write_text(yaml.safe_dump({"data": {"shards": str(shards)}, "train": {"epochs": 2}}))
    sweep_file = tmp_path / "sweep.yaml"

    def write_sweep(**extra):
        sweep_file.write_text(yaml.safe_dump({"space": {"cluster.k": {"grid": [2, 3]}}, "dir": str(out), **extra}))

    write_sweep()
    (out / "sweep.yaml").write_text(dump_yaml(load_sweep(str(sweep_file), {})))
    (out / "base.yaml").write_text(load_config(str(base)).to_yaml())

    def resume(*overrides):
        return prepare_inputs(str(base), str(sweep_file), list(overrides), supervised=False, resume=True,
                              overwrite=False, log=lambda *_: None)

    write_sweep(resources={"max_concurrent_trials": 2}, select={"metric": "calinski_harabasz"})
    cfg, sw, _ = resume("ray.num_cpus=3")
    assert (sw.resources.max_concurrent_trials, sw.select.metric, cfg.ray.num_cpus) == (2, "calinski_harabasz", 3)
    with pytest.raises(ConfigError) as e:
        resume("train.epochs=3")  # resumable for a run, but every trial of a sweep must train alike
    assert field_of(e) == "train.epochs"
    write_sweep(space={"cluster.k": {"grid": [2, 4]}})
    with pytest.raises(ConfigError) as e:
        resume()
    assert field_of(e) == "space"
