"""DEC's clustering objective (Xie, Girshick, Farhadi, ICML 2016), written so it can be computed in shards.

DEC soft-assigns each embedding z_i to learnable centres mu_j with a Student's t kernel (Eq. 1), sharpens the
assignment into a target P (Eq. 3) and minimises KL(P || Q) (Eq. 2) with respect to both the encoder and the
centres. P needs one global quantity, the soft cluster mass f_j = sum_i q_ij, so the engine computes it in
shards: every shard returns `cluster_mass(q_shard)`, the driver sums the k-vectors, and every shard then builds
its own rows of P with `target_distribution(q_shard, cluster_mass=f)`. No shard ever sees another's rows.

Training stops when fewer than `tol` (paper: 0.1 %) of the hard labels changed between two target updates.
"""
from __future__ import annotations

from typing import TypeVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

ArrayT = TypeVar("ArrayT", Tensor, np.ndarray)


def _squared_distances(z: Tensor, centers: Tensor) -> Tensor:
    # The direct (non-GEMM) mode is exact: the expanded ||z||^2 - 2 z.mu + ||mu||^2 form cancels badly when the
    # embeddings are far from the origin, which unnormalised autoencoder codes often are. At DEC's sizes
    # (k ~ 10, d ~ 10) the direct mode is also the faster one; its backward is finite at zero distance.
    return torch.cdist(z, centers, compute_mode="donot_use_mm_for_euclid_dist").pow(2)


def soft_assignment(z: Tensor, centers: Tensor, alpha: float = 1.0) -> Tensor:
    """Student's t similarity q_ij between embeddings z (N, d) and centres (k, d), rows normalised over j.

    Computed as a softmax over the log-kernel -(alpha+1)/2 * log(1 + d^2/alpha), so a point far from every
    centre still gets a valid distribution instead of 0/0 when all its kernel values underflow.
    """
    if z.ndim != 2 or centers.ndim != 2 or z.shape[1] != centers.shape[1]:
        raise ValueError(f"soft_assignment needs z (N, d) and centers (k, d); got {tuple(z.shape)} and "
                         f"{tuple(centers.shape)}")
    if alpha <= 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    log_kernel = -(alpha + 1.0) / 2.0 * torch.log1p(_squared_distances(z, centers) / alpha)
    return torch.softmax(log_kernel, dim=1)


def cluster_mass(q: ArrayT) -> ArrayT:
    """This shard's partial f_j = sum_i q_ij; the engine sums the partials of all shards to get the global f."""
    if isinstance(q, Tensor):
        return q.detach().sum(dim=0)
    return np.asarray(q).sum(axis=0)


def target_distribution(q: ArrayT, cluster_mass: Tensor | np.ndarray | None = None) -> ArrayT:
    """DEC's target p_ij = (q_ij^2 / f_j) / sum_j' (q_ij'^2 / f_j'), for the rows of q given.

    Squaring sharpens confident assignments; dividing by f_j keeps large clusters from absorbing everything.
    `cluster_mass` is the global f (summed over all shards); without it f is this q's own column sum, which is
    the single-process definition. P is a fixed target in DEC, so a tensor result is detached.
    """
    if isinstance(q, Tensor):
        q = q.detach()
        f = q.sum(dim=0) if cluster_mass is None else torch.as_tensor(cluster_mass, dtype=q.dtype, device=q.device)
        _check_mass(f.shape, q.shape)
        # An all-zero column (an empty cluster) has q_ij = 0 everywhere, so any positive floor gives p_ij = 0.
        weight = q.pow(2) / f.clamp_min(torch.finfo(q.dtype).tiny)
        return weight / weight.sum(dim=1, keepdim=True)
    q = np.asarray(q)
    if not np.issubdtype(q.dtype, np.floating):
        raise TypeError(f"q must be a floating-point array, got dtype {q.dtype}")
    f = q.sum(axis=0) if cluster_mass is None else np.asarray(cluster_mass, dtype=q.dtype)
    _check_mass(f.shape, q.shape)
    weight = q ** 2 / np.maximum(f, np.finfo(q.dtype).tiny)
    return weight / weight.sum(axis=1, keepdims=True)


def _check_mass(mass_shape: tuple[int, ...], q_shape: tuple[int, ...]) -> None:
    if len(q_shape) != 2 or tuple(mass_shape) != (q_shape[1],):
        raise ValueError(f"cluster_mass must have shape (k,) = ({q_shape[-1]},) for q of shape {tuple(q_shape)}; "
                         f"got {tuple(mass_shape)}")


def kl_loss(q: Tensor, p: Tensor) -> Tensor:
    """KL(P || Q) = sum_ij p_ij log(p_ij / q_ij), averaged over the N rows of the batch.

    Averaging per row (not per element) keeps the gradient scale independent of k. Terms with p_ij = 0
    contribute 0 (kl_div uses xlogy); q is floored at the smallest positive float so an underflowed q_ij
    gives a large finite loss, not inf.
    """
    if q.shape != p.shape:
        raise ValueError(f"q and p must have the same shape; got {tuple(q.shape)} and {tuple(p.shape)}")
    log_q = q.clamp_min(torch.finfo(q.dtype).tiny).log()
    return F.kl_div(log_q, p, reduction="batchmean")


def label_change_fraction(prev: np.ndarray | None, new: np.ndarray) -> float:
    """Fraction of hard labels that differ from the previous target update; 1.0 on the first update."""
    new = np.asarray(new)
    if new.size == 0:
        raise ValueError("label_change_fraction needs at least one label")
    if prev is None:
        return 1.0
    prev = np.asarray(prev)
    if prev.shape != new.shape:
        raise ValueError(f"prev and new labels differ in shape: {prev.shape} vs {new.shape}")
    return float(np.count_nonzero(prev != new)) / new.size


def should_stop(change_fraction: float, tol: float) -> bool:
    """DEC's convergence test: stop when strictly fewer than `tol` of the labels changed (paper: tol = 0.001).

    Strict, as in the reference Caffe code (`< 0.001 * N`), so tol = 0 never stops on a change count.
    """
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    return change_fraction < tol


class ClusteringLayer(nn.Module):
    """The centres mu_j as a parameter, so the optimiser moves them jointly with the encoder (DEC Sec. 3.1.2).

    Centres start Glorot-uniform (as DEC-keras and pt-dec do) only so that the module is usable before
    `init_from`; DEC always overwrites them with k-means centroids of the pretrained embedding.
    """

    def __init__(self, n_clusters: int, embedding_dim: int, alpha: float = 1.0):
        super().__init__()
        if n_clusters < 1 or embedding_dim < 1:
            raise ValueError(f"n_clusters and embedding_dim must be >= 1; got {n_clusters}, {embedding_dim}")
        if alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)
        self.centers = nn.Parameter(torch.empty(n_clusters, embedding_dim))
        nn.init.xavier_uniform_(self.centers)

    @property
    def n_clusters(self) -> int:
        return self.centers.shape[0]

    def forward(self, z: Tensor) -> Tensor:
        return soft_assignment(z, self.centers, self.alpha)

    @torch.no_grad()
    def init_from(self, centers: np.ndarray | Tensor) -> None:
        """Copy k-means centroids (k, d) in place, keeping the parameter object the optimiser may already hold."""
        c = torch.as_tensor(np.asarray(centers) if not isinstance(centers, Tensor) else centers)
        if tuple(c.shape) != tuple(self.centers.shape):
            raise ValueError(f"centers must have shape {tuple(self.centers.shape)}, got {tuple(c.shape)}")
        if not torch.isfinite(c).all():
            raise ValueError("centers contain NaN or Inf")
        self.centers.copy_(c.to(dtype=self.centers.dtype, device=self.centers.device))

    def extra_repr(self) -> str:
        return f"n_clusters={self.centers.shape[0]}, embedding_dim={self.centers.shape[1]}, alpha={self.alpha}"


class DECNet(nn.Module):
    """The stacked autoencoder and the DEC centres in one module: one state_dict checkpoints both, and the
    feature pool can call `embed` (z) or `soft_assign` (q) on it by name.

    Inputs are the engine's normalised NCHW floats, (x/255 - MEAN)/STD; DEC's autoencoder works on pixels in
    [0, 1], flattened. `inputs` undoes the normalisation, and every path into the autoencoder goes through it.

    With `backbone` (`torchvision:<name>`, `timm:<name>`), the autoencoder's input is that published network's
    pooled features instead of the pixels: the backbone is frozen (no gradient, always in eval mode, so its
    batch-norm statistics stay the published ones), and the autoencoder reconstructs its features. Its weights
    come from `model.weights` like any backbone's.
    """

    def __init__(self, input_dim: int, dims: list[int], corruption: float, k: int, alpha: float, seed: int,
                 backbone: str | None = None, in_channels: int = 1):
        from raydc.core.autoencoder import StackedAutoencoder

        super().__init__()
        self.front = None
        if backbone is not None:
            from raydc.core.backbones import build_backbone

            self.front = build_backbone(backbone, in_channels)
            self.front.requires_grad_(False)
            self.front.eval()
        self.ae = StackedAutoencoder(input_dim, dims, corruption, seed=seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the centres' placeholder init; k-means overwrites them anyway
            self.cluster = ClusteringLayer(k, dims[-1], alpha)

    def train(self, mode: bool = True) -> "DECNet":
        super().train(mode)
        if self.front is not None:
            self.front.eval()
        return self

    def inputs(self, x: Tensor) -> Tensor:
        """What the autoencoder sees: the pixels in [0, 1], flattened, or the frozen backbone's features."""
        from raydc.core.augment import MEAN, STD

        x = x * STD + MEAN
        if self.front is None:
            return x.flatten(1)
        with torch.no_grad():
            return self.front.embed(x).float()

    def embed(self, x: Tensor) -> Tensor:
        return self.ae.encode(self.inputs(x))

    def soft_assign(self, x: Tensor) -> Tensor:
        return self.cluster(self.embed(x))

    def forward(self, x: Tensor, task: str = "soft_assign", layer: int = 0) -> Tensor:
        """One entry point for every phase: DDP synchronises gradients only through `forward`."""
        if task == "soft_assign":
            return self.soft_assign(x)
        if task == "layerwise":
            return self.ae.layerwise_loss(self.inputs(x), layer)
        if task == "finetune":
            return self.ae.finetune_loss(self.inputs(x))
        raise ValueError(f"unknown task {task!r}")

    def dec_parameters(self) -> list[nn.Parameter]:
        """What DEC's KL stage trains: the encoder and the centres (the decoder is dropped, as in the paper)."""
        return [*self.ae.encoder_layers.parameters(), *self.cluster.parameters()]


def build_dec_net(spec: dict) -> DECNet:
    """Module-level so a `functools.partial` of it pickles by reference into the feature pool's actors."""
    return DECNet(**spec)


# ---- per-shard functions, run where the shard's rows live (arrays in, small results out) ------------------
def _shard_q(x: np.ndarray | None, centres: np.ndarray | None, alpha: float) -> np.ndarray | None:
    """This shard's q: x already is q when `centres` is None, else x is z and q is computed here."""
    if x is None or len(x) == 0:
        return None
    if centres is None:
        return np.asarray(x, np.float32)
    with torch.no_grad():
        return soft_assignment(torch.tensor(x, dtype=torch.float32), torch.tensor(centres), alpha).numpy()


def shard_mass(view, centres, alpha, k):
    """The partial f_j = sum_i q_ij of this shard, in float64 so the sum over shards does not depend on order.
    `view` has the shard's features `x` (z, or q itself when `centres` is None)."""
    q = _shard_q(view.x, centres, alpha)
    return np.zeros(k, np.float64) if q is None else q.astype(np.float64).sum(axis=0)


def shard_targets(view, centres, alpha, mass) -> bool:
    """This shard's rows of P (with the global mass) into `view.cols["p"]`, the hard labels argmax q into
    `cols["pred"]` and 1 - max q into `cols["pred_distance"]`. Returns whether P is finite."""
    q = _shard_q(view.x, centres, alpha)
    if q is None:
        view.cols["p"] = np.zeros((0, len(mass)), np.float32)
        view.cols["pred"], view.cols["pred_distance"] = np.zeros(0, np.int64), np.zeros(0, np.float32)
        return True
    p = target_distribution(q.astype(np.float64), cluster_mass=mass).astype(np.float32)
    view.cols["p"] = p
    view.cols["pred"] = q.argmax(axis=1).astype(np.int64)
    view.cols["pred_distance"] = (1.0 - q.max(axis=1)).astype(np.float32)
    return bool(np.isfinite(p).all())
