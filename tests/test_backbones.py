"""Published backbones (raydc.core.backbones) and `model.weights`: features equal to torchvision's own with the
same file; a pickled weights file refused without running its code."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from raydc.config import load_config
from raydc.errors import ConfigError


@pytest.fixture(scope="module")
def rgb_shards(tmp_path_factory):
    """Twelve 32 px colour images with labels: a real shard directory (npz source)."""
    from raydc.data.prepare import prepare

    base = tmp_path_factory.mktemp("rgb")
    rng = np.random.default_rng(0)
    np.savez(base / "d.npz", images=rng.integers(0, 256, (12, 32, 32, 3), dtype=np.uint8), labels=np.arange(12) % 3)
    return prepare("npz", base / "shards", root=base / "d.npz", progress=False), base / "shards"


def _method(shards, *overrides):
    from raydc.methods import build_method

    manifest, where = shards
    cfg = load_config(None, [f"data.shards={where}", "cluster.k=3", "cluster.pca_dim=16", "train.batch_size=4",
                             *overrides])
    return build_method(cfg, manifest)


def test_resnet18_from_a_state_dict_file_gives_torchvision_features(rgb_shards, tmp_path, one_torch_thread):
    from torchvision.models import resnet18

    torch.manual_seed(3)
    reference = resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)  # as torchvision publishes its weights: a plain state dict

    method = _method(rgb_shards, "model.arch=torchvision:resnet18", f"model.weights={path}", "model.input_size=64")
    assert method.backbone.feature_dim == 512 and method.input_size == 64
    model = method.build_model()
    torch.manual_seed(4)  # the run's network starts elsewhere: only the file can make the two agree
    method.load_initial_weights(model)
    model.eval()

    same = resnet18(weights=None)
    same.load_state_dict(torch.load(path, weights_only=True))
    same.fc = torch.nn.Identity()
    same.eval()
    x = torch.rand(2, 3, 64, 64)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        ours, theirs = model.embed(x), same((x - mean) / std)
    assert ours.shape == (2, 512)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # without the file the network is another one
    with torch.no_grad():
        assert not torch.allclose(method.build_model().eval().embed(x), theirs, atol=1e-3)


def test_backbone_defaults_to_its_own_resolution_and_states_it(rgb_shards):
    method = _method(rgb_shards, "model.arch=torchvision:vit_b_16")
    assert method.input_size == 224 and method.backbone.feature_dim == 768
    line = method.describe_input()
    assert "the backbone's own" in line and "0.485" in line and "no Sobel" in line
    method.check_data()
    with pytest.raises(ConfigError, match="model.input_size.*224"):
        _method(rgb_shards, "model.arch=torchvision:vit_b_16", "model.input_size=64").check_data()
    _method(rgb_shards, "model.arch=torchvision:resnet50", "model.input_size=64").check_data()  # convnets: any side


def test_a_weights_file_of_another_network_is_refused_naming_the_field(rgb_shards, tmp_path):
    from torchvision.models import resnet18

    path = tmp_path / "r18.pth"
    torch.save(resnet18(weights=None).state_dict(), path)
    method = _method(rgb_shards, "model.arch=torchvision:resnet50", f"model.weights={path}", "model.input_size=32")
    with pytest.raises(ConfigError, match="model.weights.*does not fit"):
        method.load_initial_weights(method.build_model())


def test_unknown_backbones_and_missing_timm_name_the_field(monkeypatch):
    with pytest.raises(ConfigError, match="model.arch.*resnet19"):
        load_config(None, ["data.shards=x", "model.arch=torchvision:resnet19"])
    monkeypatch.setitem(__import__("sys").modules, "timm", None)  # `import timm` fails as if not installed
    with pytest.raises(ConfigError, match=r"model.arch.*raydc\[timm\]"):
        load_config(None, ["data.shards=x", "model.arch=timm:resnet18"])


def test_timm_backbone_from_its_state_dict(rgb_shards, tmp_path, one_torch_thread):
    timm = pytest.importorskip("timm")
    torch.manual_seed(5)
    reference = timm.create_model("resnet18", pretrained=False)
    path = tmp_path / "timm-resnet18.pth"
    torch.save({"state_dict": reference.state_dict()}, path)  # a training checkpoint's wrapper
    method = _method(rgb_shards, "model.arch=timm:resnet18", f"model.weights={path}", "model.input_size=64")
    model = method.build_model()
    method.load_initial_weights(model)
    reference.reset_classifier(0)
    x = torch.rand(2, 3, 64, 64)
    mean = torch.tensor(reference.pretrained_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(reference.pretrained_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        torch.testing.assert_close(model.eval().embed(x), reference.eval()((x - mean) / std), rtol=1e-5, atol=1e-5)


def test_freeze_trunk_keeps_its_weights_and_batchnorm_statistics(rgb_shards, one_torch_thread):
    method = _method(rgb_shards, "model.freeze=trunk")
    model = method.build_model()
    model.train()
    assert not model.features.training and model.classifier.training
    assert all(not p.requires_grad for p in model.features.parameters())
    before = {k: v.clone() for k, v in model.features.state_dict().items()}
    model(torch.rand(4, 3, 32, 32)).sum().backward()  # BN in train mode would move its running stats
    for k, v in model.features.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.body_parameters() and all(p.requires_grad for p in model.body_parameters())


class _Payload:
    """Unpickling this creates a file: what a malicious weights file could do instead."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickled_weights_file_is_refused_with_exit_2_and_runs_no_code(rgb_shards, tmp_path, capsys):
    from raydc.cli import main

    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"conv1.weight": torch.zeros(1), "payload": _Payload(marker)}, path, pickle_protocol=2)
    _, shards = rgb_shards
    rc = main(["train", "--set", f"data.shards={shards}", "--set", f"run.dir={tmp_path / 'run'}",
               "--set", "model.arch=torchvision:resnet18", "--set", f"model.weights={path}",
               "--set", "model.input_size=32", "--set", "cluster.k=3", "--set", "cluster.pca_dim=16",
               "--set", "train.batch_size=4"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "model.weights" in err and "pickled" in err
    assert not marker.exists()
    assert not (tmp_path / "run").exists()  # refused before the run directory was made
    # the file really runs code when unpickled without weights_only: the refusal above is what stopped it
    torch.load(path, weights_only=False)
    assert marker.exists()


def test_weights_from_an_earlier_run_directory(rgb_shards, tmp_path, one_torch_thread):
    """`model.weights: <run dir>` loads the run's final network (clustering.pt, as the engine writes it), all
    but its top layer; a run of another architecture is refused naming the field."""
    from raydc.config_loader import to_dict
    from raydc.engine.rundir import RunDir

    first = _method(rgb_shards, "cluster.k=3")
    torch.manual_seed(1)
    trained = first.build_model()
    RunDir(tmp_path / "run").save_clustering({"round": 2, "model": trained.state_dict(), "artifacts": {},
                                              "config": to_dict(first.cfg)})
    second = _method(rgb_shards, f"model.weights={tmp_path / 'run'}", "cluster.k=3")
    torch.manual_seed(2)
    model = second.build_model()
    second.load_initial_weights(model)
    torch.manual_seed(2)
    fresh = second.build_model()  # seeded from 2 as well: what the network would be without the file
    assert not torch.equal(fresh.features[0].weight, trained.features[0].weight)
    for k, v in trained.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k

    other = _method(rgb_shards, f"model.weights={tmp_path / 'run'}", "model.arch=torchvision:resnet18",
                    "model.input_size=32")
    with pytest.raises(ConfigError, match="model.weights.*smallconvnet"):
        other.load_initial_weights(other.build_model())


def _resnet18_file(tmp_path, seed: int = 3):
    from torchvision.models import resnet18

    torch.manual_seed(seed)
    reference = resnet18(weights=None)
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    reference.fc = torch.nn.Identity()
    return path, reference.eval()


def _torchvision_features(reference, x):
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        return reference((x - mean) / std)


def test_dac_trains_its_head_on_a_frozen_backbone_from_a_file(rgb_shards, tmp_path, one_torch_thread):
    """DAC with `model.arch: torchvision:resnet18`: the file's weights go under DAC's label-feature head, and with
    `model.freeze: trunk` a training step moves the head and leaves every backbone weight and batch-norm
    statistic as the file gave them."""
    path, reference = _resnet18_file(tmp_path)
    method = _method(rgb_shards, "method=dac", "model.arch=torchvision:resnet18", f"model.weights={path}",
                     "model.input_size=64", "model.freeze=trunk", "dac.batch_size=4")
    model = method.build_model()
    torch.manual_seed(4)
    method.load_initial_weights(model)
    trunk = model.scores[0]
    x = torch.rand(6, 3, 64, 64)
    trunk.eval()
    torch.testing.assert_close(trunk.embed(x), _torchvision_features(reference, x), rtol=1e-5, atol=1e-5)

    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.train()
    assert not trunk.features.training  # frozen parts stay in eval mode: their statistics do not move
    opt = method.optimizers(model, method.init_state())["net"]
    s = model(x) @ model(x).T
    loss = ((s - torch.eye(6)) ** 2).mean()
    loss.backward()
    opt.step()
    after = model.state_dict()
    moved = {k for k in before if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith(("scores.0.top_layer.", "scores.1.")) for k in moved), sorted(moved)[:5]

    # a DeepCluster run's network of the same backbone starts DAC's too (its head stays DAC's own)
    from raydc.config_loader import to_dict
    from raydc.engine.rundir import RunDir

    dc = _method(rgb_shards, "model.arch=torchvision:resnet18", "model.input_size=64")
    torch.manual_seed(5)
    dc_net = dc.build_model()
    RunDir(tmp_path / "dc").save_clustering({"round": 1, "model": dc_net.state_dict(), "artifacts": {},
                                             "config": to_dict(dc.cfg)})
    again = _method(rgb_shards, "method=dac", "model.arch=torchvision:resnet18", f"model.weights={tmp_path / 'dc'}",
                    "model.input_size=64", "dac.batch_size=4")
    started = again.build_model()
    again.load_initial_weights(started)
    for k, v in dc_net.state_dict().items():
        if not k.startswith("top_layer."):
            assert torch.equal(started.scores[0].state_dict()[k], v), k


def test_dec_clusters_a_frozen_backbones_features_through_its_autoencoder(rgb_shards, tmp_path, one_torch_thread):
    """DEC with a backbone: the autoencoder's input is the file's ResNet-18 features (512-d), the backbone gets no
    gradient and stays in eval mode; without freezing, the config is refused naming the field, and a backbone's
    file with no backbone named is refused when it is loaded into the autoencoder."""
    from raydc.core.augment import MEAN, STD

    path, reference = _resnet18_file(tmp_path)
    method = _method(rgb_shards, "method=dec", "cluster.pca_dim=0", "model.arch=torchvision:resnet18",
                     f"model.weights={path}", "model.input_size=64", "model.freeze=all", "model.ae_dims=[32,8]")
    assert method.input_dim == 512
    model = method.build_model()
    method.load_initial_weights(model)
    x01 = torch.rand(6, 3, 64, 64)
    x = (x01 - MEAN) / STD  # the engine's normalised input
    model.train()
    assert not model.front.training
    torch.testing.assert_close(model.inputs(x), _torchvision_features(reference, x01), rtol=1e-4, atol=1e-4)
    assert model.embed(x).shape == (6, 8)
    model(x, task="finetune").backward()
    assert all(p.grad is None for p in model.front.parameters())
    assert any(p.grad is not None for p in model.ae.parameters())

    with pytest.raises(ConfigError, match="model.freeze"):
        _method(rgb_shards, "method=dec", "cluster.pca_dim=0", "model.arch=torchvision:resnet18")
    # the network saved whole (an earlier DEC run's own file: its keys under `front.`) starts another k whole
    own = tmp_path / "dec_net.pt"
    torch.save(model.state_dict(), own)
    again = _method(rgb_shards, "method=dec", "cluster.pca_dim=0", "model.arch=torchvision:resnet18",
                    f"model.weights={own}", "model.input_size=64", "model.freeze=all", "model.ae_dims=[32,8]",
                    "cluster.k=4")
    started = again.build_model()
    again.load_initial_weights(started)
    for key, value in model.state_dict().items():
        if not key.startswith("cluster."):
            assert torch.equal(started.state_dict()[key], value), key
    no_backbone = _method(rgb_shards, "method=dec", "cluster.pca_dim=0", f"model.weights={path}")
    with pytest.raises(ConfigError, match="model.weights"):  # a ResNet's file is not an autoencoder's
        no_backbone.load_initial_weights(no_backbone.build_model())
