"""BatchNorm folded into the layer before it for a feature pass (raydc.core.bn_fold): the same features, the
trained network untouched, and only where a spec and the run ask for it."""
import numpy as np
import torch
import torch.nn as nn

from raydc.core.bn_fold import fold_batchnorm
from raydc.core.models import small_convnet


def _trained_convnet(seed: int = 0) -> nn.Module:
    """A small convnet whose BatchNorms hold running statistics and affine parameters far from (0, 1)."""
    torch.manual_seed(seed)
    net = small_convnet(1, sobel=True)
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.weight.uniform_(0.5, 2.0)
                m.bias.uniform_(-0.5, 0.5)
        net.train()
        for _ in range(3):
            net.embed(torch.randn(64, 1, 28, 28) * 2 + 0.3)
    return net.eval()


def test_folded_features_equal_the_networks_own_and_the_original_is_untouched():
    net = _trained_convnet()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    x = torch.randn(32, 1, 28, 28)
    with torch.no_grad():
        want = net.embed(x)
        folded, n = fold_batchnorm(net)
        got = folded.embed(x)
    assert n == 4  # three conv stages and the hidden FC layer
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in folded.modules())
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * float(want.abs().max()))
    # the trained network keeps its BatchNorms and its weights: a checkpoint never sees the fold
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 3
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_only_a_batchnorm_right_after_a_conv_or_linear_with_running_statistics_is_folded():
    torch.manual_seed(0)
    after_relu = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)).eval()
    batch_stats = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4, track_running_stats=False)).eval()
    mismatched = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2), nn.BatchNorm2d(2)).eval()
    for seq, folds in ((after_relu, 0), (batch_stats, 0), (mismatched, 1)):
        x = torch.randn(5, 1, 6, 6) if isinstance(seq[0], nn.Conv2d) else torch.randn(5, 3)
        folded, n = fold_batchnorm(seq)
        assert n == folds
        if isinstance(seq[0], nn.Conv2d):
            with torch.no_grad():
                torch.testing.assert_close(folded(x), seq(x))


def test_a_pass_folds_only_when_its_spec_asks_and_the_spec_follows_the_runs_config():
    from raydc.config import Config
    from raydc.config_loader import from_dict, resumable_keys, to_dict
    from raydc.core.extractor import ExtractorSpec, build_network
    from raydc.methods.deepcluster import DeepCluster
    from tests.test_deepcluster_method import config, manifest

    net = _trained_convnet(1)
    spec = ExtractorSpec(build=lambda: small_convnet(1, sobel=True), state=net.state_dict(), fold_batchnorm=True)

    def has_bn(m):
        return any(isinstance(x, nn.BatchNorm2d) for x in m.modules())

    assert not has_bn(build_network(spec))
    assert has_bn(build_network(ExtractorSpec(build=spec.build, state=spec.state)))  # not asked: as built
    x = torch.from_numpy(np.random.default_rng(0).normal(size=(8, 1, 28, 28)).astype(np.float32))
    with torch.no_grad():
        torch.testing.assert_close(build_network(spec).embed(x), net.embed(x), rtol=1e-4, atol=1e-4)

    # DeepCluster asks exactly when its run's config says so; a config saved before the field (a finished run's
    # clustering.pt, read by `raydc assign` / `embed`) loads with it off, and a resume may not change it
    method = DeepCluster(config("features.fold_batchnorm=true"), manifest())
    assert method.extractor(method.build_model()).fold_batchnorm
    assert not DeepCluster(config(), manifest()).extractor(method.build_model()).fold_batchnorm
    saved = to_dict(config())
    del saved["features"]["fold_batchnorm"]
    assert not from_dict(Config, saved).features.fold_batchnorm
    assert "features.fold_batchnorm" not in resumable_keys(Config)
