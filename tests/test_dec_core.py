"""DEC's math against values worked out by hand, and the sharded target against the single-process one."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from raydc.core.dec import (ClusteringLayer, cluster_mass, kl_loss, label_change_fraction, should_stop,
                            soft_assignment, target_distribution)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors


# Two points on a line, two centres, alpha = 1 so the kernel is 1 / (1 + d^2):
#   z1 = (0, 0): d^2 = (0, 1) -> kernel (1, 1/2)   -> q1 = (2/3, 1/3)
#   z2 = (2, 0): d^2 = (4, 1) -> kernel (1/5, 1/2) -> q2 = (2/7, 5/7)
# f = column sums = (2/3 + 2/7, 1/3 + 5/7) = (20/21, 22/21)
#   row 1: q^2/f = (4/9 * 21/20, 1/9 * 21/22) = (7/15, 7/66); sum 63/110 -> p1 = (22/27, 5/27)
#   row 2: q^2/f = (4/49 * 21/20, 25/49 * 21/22) = (3/35, 75/154); sum 441/770 -> p2 = (22/147, 125/147)
Z = torch.tensor([[0.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
MU = torch.tensor([[0.0, 0.0], [1.0, 0.0]], dtype=torch.float64)
Q_HAND = torch.tensor([[2 / 3, 1 / 3], [2 / 7, 5 / 7]], dtype=torch.float64)
P_HAND = torch.tensor([[22 / 27, 5 / 27], [22 / 147, 125 / 147]], dtype=torch.float64)


def test_soft_assignment_by_hand():
    torch.testing.assert_close(soft_assignment(Z, MU), Q_HAND)


def test_soft_assignment_alpha_by_hand():
    # alpha = 2: kernel (1 + d^2/2)^(-3/2). z1: (1, 1.5^-1.5); z2: (3^-1.5, 1.5^-1.5).
    k = torch.tensor([[1.0, 1.5 ** -1.5], [3.0 ** -1.5, 1.5 ** -1.5]], dtype=torch.float64)
    torch.testing.assert_close(soft_assignment(Z, MU, alpha=2.0), k / k.sum(1, keepdim=True))


def test_target_distribution_by_hand_tensor_and_numpy():
    torch.testing.assert_close(target_distribution(Q_HAND), P_HAND)
    p_np = target_distribution(Q_HAND.numpy())
    assert isinstance(p_np, np.ndarray)
    np.testing.assert_allclose(p_np, P_HAND.numpy(), rtol=1e-12)


def _random_q(n=50, k=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=g, dtype=torch.float64)
    mu = torch.randn(k, 3, generator=g, dtype=torch.float64)
    return soft_assignment(z, mu)


def test_rows_sum_to_one_and_p_sharpens():
    q = _random_q()
    p = target_distribution(q)
    torch.testing.assert_close(q.sum(1), torch.ones(len(q), dtype=q.dtype))
    torch.testing.assert_close(p.sum(1), torch.ones(len(q), dtype=q.dtype))
    assert (q > 0).all() and (p > 0).all()
    # With balanced f the squaring sharpens every row; hand case shows it too (2/3 -> 22/27, 5/7 -> 125/147).
    assert (P_HAND.max(1).values >= Q_HAND.max(1).values).all()
    q_bal = torch.tensor([[0.6, 0.3, 0.1], [0.1, 0.6, 0.3], [0.3, 0.1, 0.6]], dtype=torch.float64)
    assert (target_distribution(q_bal).max(1).values >= q_bal.max(1).values).all()


def test_far_points_do_not_produce_nan():
    z = torch.tensor([[1e6, -1e6], [0.0, 0.0]])
    q = soft_assignment(z, torch.tensor([[0.0, 0.0], [1.0, 1.0]]), alpha=0.1)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(2))


def test_sharded_target_equals_single_process():
    q = _random_q(n=50)
    shards = [q[:17], q[17:33], q[33:]]
    f = sum(cluster_mass(s) for s in shards)
    torch.testing.assert_close(f, q.sum(0))
    p_sharded = torch.cat([target_distribution(s, cluster_mass=f) for s in shards])
    torch.testing.assert_close(p_sharded, target_distribution(q))
    # Without the global mass each shard normalises by its own columns: a different (wrong) target.
    p_local = torch.cat([target_distribution(s) for s in shards])
    assert not torch.allclose(p_local, target_distribution(q))
    # Same with numpy shards.
    qn = q.numpy()
    fn = sum(cluster_mass(s) for s in np.array_split(qn, 3))
    pn = np.concatenate([target_distribution(s, cluster_mass=fn) for s in np.array_split(qn, 3)])
    np.testing.assert_allclose(pn, target_distribution(qn), rtol=1e-12)


def test_target_rejects_wrong_mass_shape():
    with pytest.raises(ValueError, match="cluster_mass"):
        target_distribution(Q_HAND, cluster_mass=torch.ones(3, dtype=torch.float64))


def test_target_is_detached():
    q = soft_assignment(Z.clone().requires_grad_(True), MU)
    assert not target_distribution(q).requires_grad


def test_kl_loss_equals_manual_sum():
    # sum_i sum_j p log(p/q) / N with the hand values.
    manual = sum(P_HAND[i, j] * torch.log(P_HAND[i, j] / Q_HAND[i, j]) for i in range(2) for j in range(2)) / 2
    torch.testing.assert_close(kl_loss(Q_HAND, P_HAND), manual)
    # 0 * log 0 = 0, and q = 0 under p > 0 gives a finite (large) value rather than inf.
    p0 = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    q0 = torch.tensor([[0.5, 0.5]], dtype=torch.float64)
    torch.testing.assert_close(kl_loss(q0, p0), torch.tensor(np.log(2.0), dtype=torch.float64))
    assert torch.isfinite(kl_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])))


def test_gradients_reach_embeddings_and_centers():
    layer = ClusteringLayer(n_clusters=2, embedding_dim=2).double()
    layer.init_from(MU.numpy())
    z = Z.clone().requires_grad_(True)
    q = layer(z)
    loss = kl_loss(q, target_distribution(q))
    loss.backward()
    assert z.grad is not None and torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    assert layer.centers.grad is not None and layer.centers.grad.abs().sum() > 0


def test_gradient_finite_when_point_sits_on_a_center():
    centers = MU.clone().requires_grad_(True)
    z = MU.clone().requires_grad_(True)  # zero distance to one centre each
    soft_assignment(z, centers).log().sum().backward()
    assert torch.isfinite(z.grad).all() and torch.isfinite(centers.grad).all()


def test_clustering_layer_init_from_keeps_parameter():
    layer = ClusteringLayer(3, 2, alpha=1.0)
    param = layer.centers
    layer.init_from(np.arange(6, dtype=np.float64).reshape(3, 2))
    assert layer.centers is param and layer.centers.dtype == torch.float32
    torch.testing.assert_close(layer.centers.detach(), torch.arange(6.0).reshape(3, 2))
    assert "centers" in dict(layer.named_parameters())
    with pytest.raises(ValueError, match="shape"):
        layer.init_from(np.zeros((2, 2)))


def test_label_change_fraction_and_stopping_rule():
    assert label_change_fraction(None, np.array([0, 1])) == 1.0
    prev = np.zeros(1000, dtype=np.int64)
    new = prev.copy()
    new[:1] = 1  # exactly 0.1 % changed
    frac = label_change_fraction(prev, new)
    assert frac == pytest.approx(0.001)
    assert not should_stop(frac, tol=0.001)        # exactly tol: keep going
    assert should_stop(label_change_fraction(prev, prev), tol=0.001)  # just below (0 %): stop
    assert should_stop(0.000999, tol=0.001)
    assert not should_stop(label_change_fraction(None, new), tol=0.001)
    with pytest.raises(ValueError, match="shape"):
        label_change_fraction(prev, new[:10])


def test_core_modules_do_not_import_ray():
    # Static, so it holds whatever else the test session has imported; raydc/core must run without Ray.
    import ast
    from pathlib import Path

    import raydc.core.autoencoder
    import raydc.core.dec

    for mod in (raydc.core.dec, raydc.core.autoencoder):
        tree = ast.parse(Path(mod.__file__).read_text())
        for node in ast.walk(tree):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "ray" or n.startswith("ray.") for n in names), (mod.__name__, names)
