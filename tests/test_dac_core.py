"""DAC's science against hand-computed values: selection, both losses, the schedules, the BatchNorm freeze,
the augmentation, and the global-batch gather across two DDP workers."""
from __future__ import annotations

import math
import os
import socket

import numpy as np
import pytest
import torch

from raydc.core.augment import brightness_shift, random_affine
from raydc.core.dac import (SCHEDULE_PRESETS, LabelFeatureNet, SingleThreshold, ThresholdSchedule, chunk_targets,
                            dac_convnet, frozen_bn_stats, label_features, pair_loss, readout_groups, select_pairs,
                            similarity_matrix)

S = torch.tensor([[1.00, 0.95, 0.30, 0.85],
                  [0.95, 1.00, 0.20, 0.50],
                  [0.30, 0.20, 1.00, 0.90],
                  [0.85, 0.50, 0.90, 1.00]])


def test_selection_on_a_4x4_matrix():
    same, different = select_pairs(S, upper=0.9, lower=0.4)
    expect_same = torch.eye(4, dtype=torch.bool)
    for i, j in ((0, 1), (1, 0), (2, 3), (3, 2)):  # 0.95 and 0.90: at or above u
        expect_same[i, j] = True
    expect_diff = torch.zeros(4, 4, dtype=torch.bool)
    for i, j in ((0, 2), (2, 0), (1, 2), (2, 1)):  # 0.30 and 0.20: below l
        expect_diff[i, j] = True
    assert torch.equal(same, expect_same) and torch.equal(different, expect_diff)  # 0.85, 0.50: left out


def test_bce_is_over_the_selected_pairs_only_normalised_by_their_number():
    s = S.clone().requires_grad_(True)
    same, different = select_pairs(s.detach(), 0.9, 0.4)
    loss = pair_loss(s, same, different, "bce")
    by_hand = (2 * -math.log(0.95) + 2 * -math.log(0.90) + 2 * -math.log(0.7) + 2 * -math.log(0.8)) / 12
    assert loss.item() == pytest.approx(by_hand, abs=1e-6)  # the diagonal's -log(1) terms count as pairs
    loss.backward()
    assert s.grad[0, 1].item() == pytest.approx(-1 / (0.95 * 12), rel=1e-5)   # "same": pull up
    assert s.grad[0, 2].item() == pytest.approx(1 / (0.7 * 12), rel=1e-5)     # "different": push down
    assert s.grad[0, 3].item() == 0 and s.grad[1, 3].item() == 0              # left out: no gradient


def test_mse_binarises_every_pair_at_the_upper_threshold():
    same, different = select_pairs(S, 0.9, 0.4)
    loss = pair_loss(S, same, different, "mse")
    by_hand = (2 * 0.05 ** 2 + 2 * 0.1 ** 2 + 2 * 0.3 ** 2 + 2 * 0.85 ** 2 + 2 * 0.2 ** 2 + 2 * 0.5 ** 2) / 16
    assert loss.item() == pytest.approx(by_hand, rel=1e-6)


def test_mnist_schedule_single_threshold_targets_and_mse_on_a_4x4_matrix():
    """The official MNIST script: th 0.9 - 0.02 r with a floor at 0.5; every pair is "same" (above th) or
    "different" (the rest), the diagonal included; MSE against the 0/1 target averaged over all 16 pairs."""
    sched = SingleThreshold(start=0.9, step=0.02, floor=0.5)
    assert sched.at(0) == (0.9, 0.9) and sched.at(19) == pytest.approx((0.52, 0.52))
    assert sched.at(30) == (0.5, 0.5) and not sched.finished(1000)  # the floor holds; the run ends by epochs
    th = sched.at(2)[0]  # 0.86
    same, different = select_pairs(S, *sched.at(2))
    assert torch.equal(same | different, torch.ones(4, 4, dtype=torch.bool)) and not (same & different).any()
    expect_same = torch.eye(4, dtype=torch.bool)  # the diagonal: s = 1 > th
    for i, j in ((0, 1), (1, 0), (2, 3), (3, 2)):  # 0.95, 0.90 > 0.86; 0.85 is just below
        expect_same[i, j] = True
    assert torch.equal(same, expect_same)
    s = S.clone().requires_grad_(True)
    loss = pair_loss(s, same, different, "mse")
    by_hand = (2 * 0.05 ** 2 + 2 * 0.1 ** 2 + 2 * 0.3 ** 2 + 2 * 0.85 ** 2 + 2 * 0.2 ** 2 + 2 * 0.5 ** 2) / 16
    assert th == pytest.approx(0.86) and loss.item() == pytest.approx(by_hand, rel=1e-6)
    loss.backward()
    assert s.grad[0, 3].item() == pytest.approx(2 * 0.85 / 16)  # below th: pushed down, not left out
    assert s.grad[0, 0].item() == 0  # the diagonal is a pair, already at its target
    # at the floor th = 0.5: pair 1-3 (0.50, at th) turns "same" as select_pairs' u does; 0.30 stays "different"
    same_floor, different_floor = select_pairs(S, *sched.at(40))
    assert same_floor[0, 3] and same_floor[1, 3] and different_floor[0, 2] and not same_floor[0, 2]


def test_chunk_targets_are_the_selection_of_the_chunk_features():
    f = label_features(torch.randn(6, 3, generator=torch.Generator().manual_seed(1)))
    same, different = chunk_targets(f, 0.8, 0.8)
    assert torch.equal(same, similarity_matrix(f) >= 0.8) and torch.equal(different, ~same)


def test_readout_groups_fixed_size_and_a_small_tail_joins_the_last():
    assert readout_groups(0, 4) == []
    assert readout_groups(3, 4) == [(0, 3)]
    assert readout_groups(8, 4) == [(0, 4), (4, 8)]
    assert readout_groups(9, 4) == [(0, 4), (4, 9)]       # a tail of 1 < 2 joins
    assert readout_groups(10, 4) == [(0, 4), (4, 8), (8, 10)]  # a tail of 2 = size / 2 stands


def test_batch_readout_uses_group_statistics_and_leaves_running_stats_and_mode():
    torch.manual_seed(0)
    net = LabelFeatureNet(torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.BatchNorm1d(3)), readout_batch=4)
    net.scores[1].running_mean.fill_(3.0)  # far from the data: eval mode and batch statistics disagree
    net.eval()
    x = torch.randn(8, 5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    out = net.batch_readout(x)
    assert not net.training and all(torch.equal(v, net.state_dict()[k]) for k, v in before.items())
    net.train()
    with frozen_bn_stats(net):
        by_group = torch.cat([net(x[:4]), net(x[4:])])
    net.eval()
    assert torch.allclose(out, by_group) and not torch.allclose(out, net(x), atol=1e-3)
    # the same rows in the same groups give the same features, whatever else is read out with them
    assert torch.allclose(net.batch_readout(x[:4]), out[:4])


def test_selection_groups_are_their_own_and_the_reference_net_takes_its_bn_eps():
    """The chunk's targets may be selected with smaller BatchNorm groups than the readout's (the reference predicts
    in batches of 32 and reads out in 128); the groups change the features, and the net's epsilon is settable."""
    torch.manual_seed(0)
    net = LabelFeatureNet(torch.nn.Sequential(torch.nn.Linear(5, 3), torch.nn.BatchNorm1d(3)), readout_batch=8)
    x = torch.randn(8, 5)
    net.train()
    with frozen_bn_stats(net):
        by_four = torch.cat([net(x[:4]), net(x[4:])])
    assert torch.allclose(net.batch_readout(x, 4), by_four)
    assert not torch.allclose(net.batch_readout(x), by_four, atol=1e-3)  # the default group is readout_batch
    bns = [m for m in dac_convnet(1, 10, variant="mnist", bn_eps=1e-3).modules()
           if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert len(bns) == 12 and all(m.eps == 1e-3 for m in bns)  # the 12 of the reference MNIST net


def test_no_selected_pair_gives_a_zero_loss_with_a_graph():
    s = torch.full((3, 3), 0.6, requires_grad=True)
    same, different = select_pairs(s.detach(), 0.99, 0.1)
    loss = pair_loss(s, same, different, "bce")
    loss.backward()
    assert loss.item() == 0 and torch.count_nonzero(s.grad) == 0


def test_label_features_are_unit_norm_and_non_negative():
    f = label_features(torch.randn(5, 7) * 3)
    assert torch.allclose(f.norm(dim=1), torch.ones(5)) and (f >= 0).all()
    sim = similarity_matrix(f)
    assert torch.allclose(sim.diagonal(), torch.ones(5)) and (sim >= 0).all() and (sim <= 1 + 1e-6).all()


def test_official_schedule_meets_after_the_round_budget_and_the_paper_after_46_rounds():
    epochs = 20
    p = SCHEDULE_PRESETS["official"]
    official = ThresholdSchedule(p["upper"], p["lower"], 1.0, 1.0, (p["upper"] - p["lower"]) / 2 / epochs)
    u, l = official.at(1)
    assert (u, l) == pytest.approx((0.99 - 0.19 / 40, 0.8 + 0.19 / 40))
    assert not official.finished(epochs - 1) and official.finished(epochs)
    paper = ThresholdSchedule(**{k: v for k, v in SCHEDULE_PRESETS["paper"].items()})
    assert paper.at(0) == (0.95, 0.455)
    assert paper.at(10) == pytest.approx((0.95 - 0.099, 0.455 + 0.0099))
    assert not paper.finished(45) and paper.finished(46)


def test_frozen_bn_stats_normalise_by_the_batch_without_updating_running_stats():
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4)).train()
    before = (net[1].running_mean.clone(), net[1].running_var.clone(), net[1].num_batches_tracked.clone())
    x = torch.randn(16, 3) + 5
    with torch.no_grad(), frozen_bn_stats(net):
        y = net(x)
    assert y.mean(0).abs().max() < 1e-4  # batch statistics were used
    assert torch.equal(net[1].running_mean, before[0]) and torch.equal(net[1].running_var, before[1])
    assert torch.equal(net[1].num_batches_tracked, before[2]) and net[1].momentum == 0.1
    net(x)
    assert not torch.equal(net[1].running_mean, before[0])  # outside the block, training updates them again


def test_random_affine_centre_draws_are_the_identity_and_others_move_pixels():
    x = torch.rand(3, 1, 12, 12)
    centre = np.full((3, 5), 0.5)  # angle 0, shifts 0, zoom midpoint 1, no flip
    torch.testing.assert_close(random_affine(x, centre, zoom=(1.0, 1.0)), x, atol=1e-5, rtol=0)
    moved = random_affine(x, np.array([[0.9, 0.1, 0.8, 0.2, 0.5]] * 3), rotation_deg=10, shift=0.1)
    assert (moved - x).abs().mean() > 0.05
    flipped = random_affine(x, np.array([[0.5, 0.5, 0.5, 0.5, 0.0]] * 3), zoom=(1.0, 1.0), flip=True)
    torch.testing.assert_close(flipped, x.flip(-1), atol=1e-5, rtol=0)


def test_the_reference_augmentation_in_full_nearest_per_axis_zoom_and_brightness():
    x = torch.zeros(2, 1, 12, 12)
    x[:, :, 4:8, 3:9] = 1.0
    # the y zoom drawn apart: zoom in on y only leaves the horizontal extent of the bar, not its height
    u = np.array([[0.5, 0.5, 0.5, 0.0, 0.5, 1.0 - 1e-9]] * 2)  # x zoom 1 (range bottom), y zoom 1.6 (magnify)
    z = random_affine(x, u, zoom=(1.0, 1.6), mode="nearest", zoom_per_axis=True)
    rows, cols = (z[0, 0] > 0.5).any(1).sum().item(), (z[0, 0] > 0.5).any(0).sum().item()
    assert cols == 6 and rows > 4, (rows, cols)
    assert set(z.unique().tolist()) <= {0.0, 1.0}  # order-0 sampling makes no new values
    assert not torch.equal(random_affine(x, u, zoom=(1.0, 1.6)), z)  # bilinear blends at the edges
    # per-image brightness, clipped to each image's own range
    b = brightness_shift(x + 0.5, np.array([0.0, 1.0 - 1e-9]), 0.05)
    assert torch.allclose(b[0].min(), torch.tensor(0.5)) and torch.allclose(b[0].max(), torch.tensor(1.45))
    assert torch.allclose(b[1].min(), torch.tensor(0.55)) and torch.allclose(b[1].max(), torch.tensor(1.5))


@pytest.mark.parametrize("variant,size", [("mnist", 28), ("cifar", 32)])
def test_reference_nets_give_k_scores(variant, size):
    net = LabelFeatureNet(dac_convnet(1 if variant == "mnist" else 3, 10, variant=variant)).eval()
    with torch.no_grad():
        f = net(torch.randn(2, 1 if variant == "mnist" else 3, size, size))
    assert f.shape == (2, 10) and torch.allclose(f.norm(dim=1), torch.ones(2))


# ---- the global batch across DDP workers ------------------------------------------------------------------
def _pair_step(rank: int, world: int, port: int, x: torch.Tensor, out: dict) -> None:
    """One DAC step on rank's half of x through DDP and the engine's WorkerContext.all_gather."""
    import torch.distributed as dist

    from raydc.config import load_config
    from raydc.engine.contexts import WorkerContext

    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = LabelFeatureNet(torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 4)))
    ddp = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    cfg = load_config(None, ["data.shards=unused"])
    wctx = WorkerContext(cfg, None, None, rank, world, torch.device("cpu"), {}, 1, lambda m: None)
    part = x.chunk(world)[rank]
    feats = wctx.all_gather(ddp(part))
    sim = similarity_matrix(feats)
    same, different = select_pairs(sim.detach(), 0.7, 0.3)
    loss = pair_loss(sim, same, different, "bce")
    loss.backward()
    out[rank] = (loss.item(), [p.grad.clone() for p in model.parameters()])
    if world > 1:
        dist.destroy_process_group()


def _worker(rank, world, port, x, queue):
    out: dict = {}
    _pair_step(rank, world, port, x, out)
    queue.put((rank, out[rank][0], [g.numpy() for g in out[rank][1]]))


def test_two_ddp_workers_with_the_gather_equal_one_worker_with_the_doubled_batch():
    import torch.multiprocessing as mp

    x = torch.randn(16, 6, generator=torch.Generator().manual_seed(3))
    single: dict = {}
    _pair_step(0, 1, 0, x, single)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(r, 2, port, x, queue)) for r in range(2)]
    for p in procs:
        p.start()
    results = [queue.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    loss1, grads1 = single[0]
    for rank, loss2, grads2 in results:
        assert loss2 == pytest.approx(loss1, rel=1e-5), rank
        for g1, g2 in zip(grads1, grads2):
            np.testing.assert_allclose(g2, g1.numpy(), rtol=1e-4, atol=1e-6)
    # the selection really spans both halves: without the gather each worker would see an 8 x 8 block only
    assert any(np.abs(g).sum() > 0 for g in results[0][2])


def test_fixed_bn_affine_stays_at_one_and_zero_through_a_step_while_the_convs_learn():
    """`dac.bn_affine: false` (the TensorFlow port's BatchNorm): scale and shift never move, the rest does."""
    torch.manual_seed(0)
    for affine in (False, True):
        net = LabelFeatureNet(dac_convnet(1, 10, variant="mnist", bn_affine=affine))
        before = {n: p.detach().clone() for n, p in net.named_parameters()}
        opt = torch.optim.RMSprop(net.parameters(), lr=1e-2)
        feats = net(torch.randn(16, 1, 28, 28))
        loss = pair_loss(similarity_matrix(feats), *select_pairs(similarity_matrix(feats).detach(), 0.9, 0.9), "mse")
        loss.backward()
        opt.step()
        moved = {n for n, p in net.named_parameters() if not torch.equal(p, before[n])}
        bn_names = {f"scores.{i}.{w}" for i, m in enumerate(net.scores)
                    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for w in ("weight", "bias")}
        assert len(bn_names) == 24 and "scores.0.weight" in moved
        assert (bn_names & moved == set()) if not affine else bn_names <= moved
