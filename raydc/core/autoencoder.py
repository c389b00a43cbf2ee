"""DEC's stacked denoising autoencoder, d-500-500-2000-10, with greedy layer-wise pretraining as in the paper.

The model is an encoder of Linear+ReLU layers ending in a linear embedding, and a mirrored decoder of Linear+ReLU
layers ending in a linear reconstruction (DEC Sec. 3.2: g2 of the first pair is linear so it can reproduce the
input, g1 of the last pair is linear so the embedding keeps full information). Inputs are pixels scaled to [0, 1]
and the loss is the mean squared error, as in the reference code (Caffe EuclideanLoss; DEC-keras 'mse').

Pretraining has two stages, both driven by the engine through the losses below:
1. Greedy, layer by layer (`layerwise_loss(x, i)` with the optimiser over `layer_parameters(i)`): layer i and its
   mirror decoder layer form a one-hidden-layer denoising autoencoder on the clean output of the already-trained
   layers 0..i-1, which stay frozen.
2. End-to-end fine-tuning of the whole autoencoder (`finetune_loss(x)`), without corruption as in the paper.

Corruption is dropout, following the reference Caffe code (piiswrong/dec `pretrain.py`, `pretrain_main`):
- on the input of layer i: the paper's Eq. (1), x~ = Dropout(x), for every layer. (The Caffe code sets the rate
  to 0 for raw pixels, layer 0, and `corruption` for deeper layers; we follow the paper here.)
- on the hidden code of layer i for every layer except the last: the paper's Eq. (3) and the Caffe code, which
  does not drop the linear 10-d embedding (with 10 units, 20 % dropout would remove two whole dimensions).
Dropout follows `self.training`: in `eval()` mode both losses are clean reconstruction errors (for validation).

Our MSE is a mean over elements, so learning rates from the Caffe code (EuclideanLoss = sum / 2N) do not carry
over unchanged; DEC-keras pretrains with MSE and SGD(lr=1, momentum=0.9).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

DEC_DIMS: tuple[int, ...] = (500, 500, 2000, 10)


class StackedAutoencoder(nn.Module):
    """Encoder layer i maps dims[i] -> dims[i+1]; decoder layer i is its mirror, dims[i+1] -> dims[i].

    `encoder_layers[i]` and `decoder_layers[i]` are one greedy pretraining pair, which is why the decoder list is
    indexed like the encoder (and run in reverse), rather than in execution order.
    """

    def __init__(self, input_dim: int, dims: Sequence[int] = DEC_DIMS, corruption: float = 0.2, *,
                 corruption_in_finetune: bool = False, seed: int | None = None):
        super().__init__()
        if input_dim < 1 or len(dims) < 1 or any(int(d) < 1 for d in dims):
            raise ValueError(f"input_dim and every entry of dims must be >= 1; got {input_dim}, {list(dims)}")
        if not 0.0 <= corruption < 1.0:
            raise ValueError(f"corruption is a dropout rate in [0, 1), got {corruption}")
        self.input_dim = int(input_dim)
        self.dims: tuple[int, ...] = (self.input_dim, *(int(d) for d in dims))
        self.corruption = float(corruption)
        self.corruption_in_finetune = bool(corruption_in_finetune)
        pairs = list(zip(self.dims[:-1], self.dims[1:]))
        self.encoder_layers = nn.ModuleList(nn.Linear(a, b) for a, b in pairs)
        self.decoder_layers = nn.ModuleList(nn.Linear(b, a) for a, b in pairs)
        self.init_weights(seed)

    @property
    def n_layers(self) -> int:
        return len(self.encoder_layers)

    @property
    def embedding_dim(self) -> int:
        return self.dims[-1]

    @torch.no_grad()
    def init_weights(self, seed: int | None = None) -> None:
        """VarianceScaling(scale=1/3, mode='fan_in', distribution='uniform') weights and zero biases.

        DEC-keras uses it for MNIST and Fashion-MNIST and reports 91 % DEC accuracy on MNIST against the paper's
        84 %, which its author attributes to pretraining and initialisation (issue #14). The weight bound
        sqrt(3 * scale / fan_in) = 1/sqrt(fan_in) equals torch's default Linear bound; the difference is the zero
        bias. Values are drawn on the CPU from a private generator, so a seed gives the same weights on every
        device; seed=None draws from torch's global RNG (so `torch.manual_seed` governs it).
        """
        gen = None if seed is None else torch.Generator().manual_seed(int(seed))
        for layer in [*self.encoder_layers, *self.decoder_layers]:
            bound = math.sqrt(1.0 / layer.in_features)
            w = torch.empty(layer.weight.shape, dtype=layer.weight.dtype).uniform_(-bound, bound, generator=gen)
            layer.weight.copy_(w)
            layer.bias.zero_()

    def _flatten(self, x: Tensor) -> Tensor:
        x = x.flatten(1) if x.ndim > 2 else x
        if x.ndim != 2 or x.shape[1] != self.input_dim:
            raise ValueError(f"expected inputs with {self.input_dim} features per row (after flattening "
                             f"(N, C, H, W)), got shape {tuple(x.shape)}")
        return x

    def _check_layer(self, i: int) -> None:
        if not 0 <= i < self.n_layers:
            raise IndexError(f"layer index {i} out of range for {self.n_layers} layers")

    def _encode_layer(self, i: int, h: Tensor) -> Tensor:
        h = self.encoder_layers[i](h)
        return h if i == self.n_layers - 1 else F.relu(h)

    def _decode_layer(self, i: int, h: Tensor) -> Tensor:
        h = self.decoder_layers[i](h)
        return h if i == 0 else F.relu(h)

    def encode(self, x: Tensor) -> Tensor:
        """The embedding (N, dims[-1]) of a batch (N, input_dim) or (N, C, H, W)."""
        h = self._flatten(x)
        for i in range(self.n_layers):
            h = self._encode_layer(i, h)
        return h

    def decode(self, z: Tensor) -> Tensor:
        """The flat reconstruction (N, input_dim) of embeddings (N, dims[-1])."""
        h = z
        for i in reversed(range(self.n_layers)):
            h = self._decode_layer(i, h)
        return h

    def forward(self, x: Tensor) -> Tensor:
        """Flat reconstruction (N, input_dim), without corruption: corruption belongs to the training losses."""
        return self.decode(self.encode(x))

    def layer_parameters(self, i: int) -> list[nn.Parameter]:
        """What the optimiser trains in greedy stage i: encoder layer i and its mirror decoder layer."""
        self._check_layer(i)
        return [*self.encoder_layers[i].parameters(), *self.decoder_layers[i].parameters()]

    def layerwise_loss(self, x: Tensor, i: int) -> Tensor:
        """Denoising loss of pretraining pair i on a raw input batch x.

        Layers below i are run without autograd: they are already trained and frozen, and skipping their graph
        keeps stage i as cheap as a one-hidden-layer autoencoder.
        """
        self._check_layer(i)
        h = self._flatten(x)
        with torch.no_grad():
            for j in range(i):
                h = self._encode_layer(j, h)
        code = self._encode_layer(i, F.dropout(h, self.corruption, self.training))
        if i != self.n_layers - 1:
            code = F.dropout(code, self.corruption, self.training)
        return F.mse_loss(self._decode_layer(i, code), h)

    def finetune_loss(self, x: Tensor) -> Tensor:
        """End-to-end reconstruction MSE; input dropout only when `corruption_in_finetune` (off, as in the paper)."""
        x = self._flatten(x)
        inp = F.dropout(x, self.corruption, self.training) if self.corruption_in_finetune else x
        return F.mse_loss(self.decode(self.encode(inp)), x)
