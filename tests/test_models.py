import pytest
import torch

from raydc.core.models import Sobel, build_convnet


def test_sobel_is_fixed_and_computes_gradients():
    s = Sobel(3)
    assert list(s.parameters()) == []  # buffers only: no optimizer ever sees them
    # A horizontal ramp: x-gradient constant inside, y-gradient zero.
    ramp = torch.arange(8.0).repeat(8, 1)
    x = ramp.expand(1, 3, 8, 8).clone()
    out = s(x)
    assert out.shape == (1, 2, 8, 8)
    inner = out[0, :, 2:-2, 2:-2]
    assert torch.allclose(inner[0], torch.full_like(inner[0], -8.0))  # [1,0,-1] x [1,2,1] on slope 1
    assert torch.allclose(inner[1], torch.zeros_like(inner[1]))


def test_sobel_gray_input_skips_grayscale():
    s = Sobel(1)
    x = torch.randn(2, 1, 10, 10)
    assert s(x).shape == (2, 2, 10, 10)


@pytest.mark.parametrize("arch,size,channels,dim", [("smallconvnet", 28, 1, 256), ("smallconvnet", 32, 3, 256),
                                                    ("alexnet", 224, 3, 4096), ("vgg16", 64, 3, 4096)])
def test_embed_is_pre_relu_and_head_has_k_outputs(arch, size, channels, dim):
    torch.manual_seed(0)
    net = build_convnet(arch, channels, sobel=True)
    net.reset_head(7)
    net.eval()
    x = torch.randn(3, channels, size, size)
    with torch.no_grad():
        feats = net.embed(x)
        logits = net(x)
    assert feats.shape == (3, dim)
    assert (feats < 0).any(), "features must be taken before the last ReLU"
    assert logits.shape == (3, 7)
    with torch.no_grad():
        assert torch.allclose(logits, net.top_layer(torch.relu(feats)), atol=1e-5)


def test_reset_head_is_normal_001_and_body_excludes_head():
    net = build_convnet("smallconvnet", 1, sobel=True)
    head = net.reset_head(1000, torch.Generator().manual_seed(1))
    assert abs(head.weight.std().item() - 0.01) < 0.001
    assert torch.all(head.bias == 0)
    body_ids = {id(p) for p in net.body_parameters()}
    assert id(head.weight) not in body_ids and id(head.bias) not in body_ids
    assert len(body_ids) == len(list(net.parameters())) - 2


def test_without_sobel_first_conv_takes_image_channels():
    net = build_convnet("smallconvnet", 3, sobel=False)
    assert net.sobel is None
    assert net.features[0].in_channels == 3
