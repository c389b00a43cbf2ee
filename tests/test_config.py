import pytest

from raydc.config import Config, load_config
from raydc.config_loader import dump_yaml, from_dict, read_yaml
from raydc.errors import ConfigError, UserError
from tests.conftest import REPO


def test_shipped_configs_load_and_do_not_collide():
    """Every shipped config loads and round-trips. Two configs never share a run directory (the second would
    refuse to start or, with --overwrite, delete the first's results), and configs sharing a shard directory
    describe the same data: `train` prepares shards only when they are missing, so the second config would
    otherwise train on the first one's images without a word."""
    run_dirs, shard_data = {}, {}
    for path in sorted((REPO / "jobs" / "configs").glob("*.yaml")):
        cfg = load_config(str(path))
        assert from_dict(Config, read_yaml_text(dump_yaml(cfg))) == cfg, path.name
        assert cfg.run.dir not in run_dirs, f"{path.name} and {run_dirs.get(cfg.run.dir)} share run.dir"
        run_dirs[cfg.run.dir] = path.name
        d = cfg.data
        what = (d.source, d.split, tuple(d.classes or ()), d.limit)
        if d.source is not None:
            first = shard_data.setdefault(d.shards, (what, path.name))
            assert first[0] == what, f"{path.name} and {first[1]} share data.shards={d.shards} but not the data"
    assert len(run_dirs) >= 7


def read_yaml_text(text: str) -> dict:
    import yaml

    return yaml.safe_load(text)


def test_unknown_field_is_named():
    with pytest.raises(ConfigError, match="train.lrr"):
        load_config(None, ["data.shards=/x", "train.lrr=0.1"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="cluster.k.*integer"):
        load_config(None, ["data.shards=/x", "cluster.k=ten"])
    with pytest.raises(ConfigError, match="model.arch"):
        load_config(None, ["data.shards=/x", "model.arch=resnet"])


@pytest.mark.parametrize("override,field", [("cluster.k=1", "cluster.k"), ("train.lr=-1", "train.lr"),
                                            ("cluster.pca_dim=512", "cluster.pca_dim"),
                                            ("train.momentum=1.5", "train.momentum"),
                                            ("dec.tol=2", "dec.tol"), ("train.erase=1.5", "train.erase")])
def test_invalid_values_are_named(override, field):
    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(None, ["data.shards=/x", override])


def test_missing_shards_is_named():
    with pytest.raises(ConfigError, match="data.shards"):
        load_config(None, [])


def test_overrides_parse_yaml_values_and_round_trip(tmp_path):
    cfg = load_config(None, ["data.shards=/x", "data.classes=[0,1,2]", "train.weight_decay=1e-5",
                             "train.head_lr=null", "model.sobel=false"])
    assert cfg.data.classes == [0, 1, 2] and cfg.train.weight_decay == 1e-5 and cfg.model.sobel is False
    p = tmp_path / "c.yaml"
    p.write_text(dump_yaml(cfg))
    assert from_dict(Config, read_yaml(p)) == cfg


def test_bad_set_syntax():
    with pytest.raises(UserError, match="key=value"):
        load_config(None, ["data.shards"])


def test_errors_raised_in_a_ray_worker_reach_the_driver_intact():
    """Ray pickles a worker's exception to the driver: a ConfigError or NumericalError must come back as itself,
    with its message (the default pickling called __init__ with one argument and raised a TypeError instead)."""
    import pickle

    from raydc.errors import NumericalError

    e = pickle.loads(pickle.dumps(ConfigError("cluster.k", "must be >= 2, got 1")))
    assert isinstance(e, ConfigError) and e.field == "cluster.k"
    assert str(e) == "config field 'cluster.k': must be >= 2, got 1"
    n = pickle.loads(pickle.dumps(NumericalError(3, "features", "the network's features")))
    assert (n.epoch, n.phase) == (3, "features") and "epoch 3" in str(n)


def test_a_method_supplies_its_own_value_for_a_shared_field_the_config_leaves_out():
    """DEC and DAC never run PCA: their configs need not say `cluster.pca_dim: 0` (Method.shared_defaults), the
    shared default stays DeepCluster's, and a value the config does state is still judged by the method."""
    import raydc

    default = Config().cluster.pca_dim
    assert default != 0  # else this test could not tell the method's value from the shared one
    for method in ("dec", "dac"):
        assert load_config(None, [f"method={method}", "data.shards=x"]).cluster.pca_dim == 0
        assert raydc.api.resolve_config({"method": method, "data": {"shards": "x"}}, {}).cluster.pca_dim == 0
    with pytest.raises(ConfigError) as e:  # DEC refuses a PCA; DAC names it as ignored (tests/test_dac_method.py)
        load_config(None, ["method=dec", "data.shards=x", "cluster.pca_dim=32"]).validate()
    assert e.value.field == "cluster.pca_dim"
    assert load_config(None, ["data.shards=x"]).cluster.pca_dim == default
    given = {"method": "dec", "data": {"shards": "x"}}
    raydc.api.resolve_config(given, {})
    assert given == {"method": "dec", "data": {"shards": "x"}}  # the caller's mapping is left as it was
    for name in ("dec_mnist.yaml", "dac_mnist.yaml"):  # the shipped configs rely on it
        assert "pca_dim" not in (REPO / "jobs" / "configs" / name).read_text()
        assert load_config(str(REPO / "jobs" / "configs" / name)).cluster.pca_dim == 0
