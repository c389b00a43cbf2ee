import pytest

from raydc.config import Config, load_config
from raydc.config_loader import dump_yaml, from_dict, read_yaml
from raydc.errors import ConfigError, UserError
from tests.conftest import REPO


def test_shipped_configs_load():
    for path in sorted((REPO / "jobs" / "configs").glob("*.yaml")):
        cfg = load_config(str(path))
        assert cfg.data.shards, path


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
                                            ("dec.tol=2", "dec.tol")])
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
