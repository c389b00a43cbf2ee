"""The stacked denoising autoencoder: shapes, which parameters each greedy stage trains, and that it learns."""
from __future__ import annotations

import math

import pytest
import torch

from raydc.core.autoencoder import StackedAutoencoder

SMALL = (32, 16, 3)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors


def _manifold_data(n: int = 256, d: int = 64, seed: int = 0) -> torch.Tensor:
    """Pixels in [0, 1] on a 3-d manifold: a small AE can learn far more than the per-pixel mean."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.rand(n, 3, generator=g)
    basis = torch.rand(3, d, generator=g)
    return torch.sigmoid(4 * (latent @ basis - basis.sum(0) / 2))


def _sgd(model, params, loss_fn, x, steps: int, lr: float, gen: torch.Generator) -> None:
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    model.train()
    for _ in range(steps):
        batch = x[torch.randint(0, len(x), (32,), generator=gen)]
        loss = loss_fn(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


def test_shapes_and_default_dims():
    ae = StackedAutoencoder(784, seed=0)
    assert ae.dims == (784, 500, 500, 2000, 10) and ae.n_layers == 4 and ae.embedding_dim == 10
    x = torch.rand(5, 1, 28, 28)
    z = ae.encode(x)
    assert z.shape == (5, 10)
    assert ae.decode(z).shape == (5, 784)
    assert ae(x).shape == (5, 784)
    assert ae.encode(x.flatten(1)).shape == (5, 10)  # already flat inputs work too
    assert [tuple(layer.weight.shape) for layer in ae.decoder_layers] == [(784, 500), (500, 500), (500, 2000),
                                                                        (2000, 10)]


def test_rgb_input_is_flattened_and_wrong_size_is_rejected():
    ae = StackedAutoencoder(3 * 8 * 8, dims=SMALL, seed=0)
    assert ae.encode(torch.rand(2, 3, 8, 8)).shape == (2, 3)
    with pytest.raises(ValueError, match="192 features"):
        ae.encode(torch.rand(2, 1, 8, 8))


def test_last_encoder_and_decoder_layers_are_linear():
    # A linear embedding can be negative; a ReLU one could not. Same for the reconstruction.
    ae = StackedAutoencoder(20, dims=(8, 4), seed=0)
    with torch.no_grad():
        ae.encoder_layers[1].bias.fill_(-100.0)
        ae.decoder_layers[0].bias.fill_(-100.0)
        x = torch.rand(4, 20)
        assert (ae.encode(x) < 0).all()
        assert (ae(x) < 0).all()
        ae.decoder_layers[1].bias.fill_(-100.0)  # an inner decoder layer has a ReLU: its output clips at 0
        assert (ae.decode(torch.zeros(1, 4)) == ae.decoder_layers[0].bias).all()


@pytest.mark.parametrize("i", [0, 1, 2])
def test_layerwise_loss_trains_only_layer_i(i):
    ae = StackedAutoencoder(64, dims=SMALL, seed=0)
    loss = ae.layerwise_loss(_manifold_data(n=16), i)
    loss.backward()
    mine = {id(p) for p in ae.layer_parameters(i)}
    assert len(mine) == 4  # weight and bias of encoder layer i and of its mirror decoder layer
    for name, p in ae.named_parameters():
        if id(p) in mine:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None, name


def test_layerwise_target_is_clean_output_of_frozen_layers():
    ae = StackedAutoencoder(64, dims=SMALL, corruption=0.2, seed=0).eval()
    x = _manifold_data(n=8)
    with torch.no_grad():
        h = torch.relu(ae.encoder_layers[0](x))
        code = torch.relu(ae.encoder_layers[1](h))
        expected = torch.nn.functional.mse_loss(torch.relu(ae.decoder_layers[1](code)), h)
    torch.testing.assert_close(ae.layerwise_loss(x, 1), expected)
    with pytest.raises(IndexError):
        ae.layerwise_loss(x, 3)


def test_corruption_follows_training_mode():
    ae = StackedAutoencoder(64, dims=SMALL, corruption=0.5, seed=0)
    x = _manifold_data(n=32)
    torch.manual_seed(0)
    ae.train()
    assert ae.layerwise_loss(x, 0) != ae.layerwise_loss(x, 0)       # dropout draws differ
    assert ae.finetune_loss(x) == ae.finetune_loss(x)               # no corruption in fine-tuning by default
    noisy = StackedAutoencoder(64, dims=SMALL, corruption=0.5, corruption_in_finetune=True, seed=0)
    assert noisy.finetune_loss(x) != noisy.finetune_loss(x)
    ae.eval()
    assert ae.layerwise_loss(x, 0) == ae.layerwise_loss(x, 0)


def test_init_weights_variance_scaling_and_seeded():
    a = StackedAutoencoder(64, dims=SMALL, seed=3)
    b = StackedAutoencoder(64, dims=SMALL, seed=3)
    c = StackedAutoencoder(64, dims=SMALL, seed=4)
    for la, lb in zip(a.encoder_layers, b.encoder_layers):
        assert torch.equal(la.weight, lb.weight)
    assert not torch.equal(a.encoder_layers[0].weight, c.encoder_layers[0].weight)
    for layer in [*a.encoder_layers, *a.decoder_layers]:
        bound = math.sqrt(1.0 / layer.in_features)
        assert layer.weight.abs().max() <= bound
        assert layer.weight.abs().max() > 0.8 * bound  # uniform over the whole range, not a narrower init
        assert torch.count_nonzero(layer.bias) == 0
    a.init_weights(4)
    assert torch.equal(a.encoder_layers[0].weight, c.encoder_layers[0].weight)


def test_finetune_loss_drops_with_sgd():
    x = _manifold_data()
    ae = StackedAutoencoder(64, dims=SMALL, seed=0).eval()
    start = ae.finetune_loss(x).item()
    _sgd(ae, ae.parameters(), ae.finetune_loss, x, steps=100, lr=0.1, gen=torch.Generator().manual_seed(1))
    end = ae.finetune_loss(x).item()
    assert end < 0.7 * start, (start, end)


def test_greedy_pretraining_then_finetuning_learns_structure():
    # Predicting each pixel's mean scores the mean per-pixel variance; the data are 3-d, so the AE must do better.
    x = _manifold_data()
    mean_baseline = x.var(0, unbiased=False).mean().item()
    ae = StackedAutoencoder(64, dims=SMALL, seed=0)
    gen = torch.Generator().manual_seed(1)
    for i in range(ae.n_layers):
        ae.eval()
        before = ae.layerwise_loss(x, i).item()
        _sgd(ae, ae.layer_parameters(i), lambda b, i=i: ae.layerwise_loss(b, i), x, 100, 0.1, gen)
        assert ae.layerwise_loss(x, i).item() < 0.7 * before, i
    _sgd(ae, ae.parameters(), ae.finetune_loss, x, 100, 0.1, gen)
    assert ae.finetune_loss(x).item() < 0.5 * mean_baseline
