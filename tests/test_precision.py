"""Mixed precision: what `auto` resolves to, that autocast really lowers the network's matmuls while the pair
similarities stay float32, and that the engine's SGD pass runs the method's loss under it; the weights' memory
format: what `auto` picks, that the layout changes no result beyond float rounding, and that a resumed run or
a pass over new images keeps the run's layout."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from raydc.core import precision as P
from raydc.core.dac import LabelFeatureNet, similarity_matrix


def test_auto_follows_the_device_and_the_cpu_flags(monkeypatch):
    monkeypatch.setattr(P, "cpu_bf16_supported", lambda: False)
    assert P.resolve_precision("auto", "cpu") == "fp32" and P.resolve_precision("auto", "cuda") == "bf16"
    assert P.resolve_precision("fp16", "cpu") == "fp32" and P.resolve_precision("fp16", "cuda") == "fp16"
    monkeypatch.setattr(P, "cpu_bf16_supported", lambda: True)
    assert P.resolve_precision("auto", "cpu") == "bf16" and P.resolve_precision("fp16", "cpu") == "bf16"
    assert P.resolve_precision("fp32", "cuda") == "fp32" and P.resolve_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        P.resolve_precision("int8", "cpu")


def test_cpu_flag_detection_reads_proc_cpuinfo():
    flags = open("/proc/cpuinfo").read()
    P.cpu_bf16_supported.cache_clear()
    assert P.cpu_bf16_supported() == ("avx512_bf16" in flags or "amx_bf16" in flags)


def test_bf16_autocast_lowers_the_network_but_not_the_label_features_or_similarities():
    torch.manual_seed(0)
    net = LabelFeatureNet(torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)))
    x = torch.randn(32, 16)
    with P.autocast("bf16", "cpu"):
        scores = net.scores(x)
        feats = net(x)
        with P.full_precision("cpu"):
            sim = similarity_matrix(feats)
        lowered = similarity_matrix(feats)
    assert scores.dtype == torch.bfloat16 and feats.dtype == torch.float32
    assert sim.dtype == torch.float32 and lowered.dtype == torch.bfloat16  # what full_precision prevents
    with P.autocast("fp32", "cpu"):
        assert net.scores(x).dtype == torch.float32
    assert P.grad_scaler("fp16", "cpu") is None and P.grad_scaler("bf16", "cuda") is None


def test_the_engine_sgd_pass_runs_the_loss_under_the_workers_precision():
    from raydc.config import load_config
    from raydc.engine.contexts import WorkerContext

    cfg = load_config(None, ["data.shards=unused"])
    seen = {}
    model = torch.nn.Linear(4, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)

    def loss_of(batch):
        out = model(batch)
        seen.setdefault("dtypes", []).append(out.dtype)
        return out.float().pow(2).mean()

    batches = [torch.randn(3, 4) for _ in range(2)]
    for precision, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        seen.clear()
        w = WorkerContext(cfg, None, None, 0, 1, torch.device("cpu"), {}, 1, lambda m: None, precision=precision)
        before = model.weight.detach().clone()
        stats = w.sgd_pass(batches, [opt], loss_of, epoch=0, phase="train", what="test")
        assert seen["dtypes"] == [dtype, dtype] and stats.steps == 2 and np.isfinite(stats.loss)
        assert not torch.equal(before, model.weight) and model.weight.dtype == torch.float32  # master weights


def test_auto_lays_conv_nets_out_channels_last_on_cuda_only_and_leaves_an_mlp_alone():
    from raydc.core.autoencoder import StackedAutoencoder
    from raydc.core.models import small_convnet

    torch.manual_seed(0)
    conv, mlp = small_convnet(1, sobel=True), StackedAutoencoder(784, [32, 8], corruption=0.0, seed=0)
    assert P.resolve_memory_format("auto", conv, "cuda") == "channels_last"
    assert P.resolve_memory_format("auto", conv, "cpu") == "contiguous"  # 70k runs ended lower with it
    assert P.resolve_memory_format("auto", conv) == "contiguous"
    assert P.resolve_memory_format("auto", mlp, "cuda") == "contiguous"
    assert P.resolve_memory_format("channels_last", conv) == "channels_last"
    assert P.resolve_memory_format("contiguous", conv) == "contiguous"
    with pytest.raises(ValueError, match="memory format"):
        P.resolve_memory_format("nhwc", conv)
    x = torch.rand(8, 1, 28, 28)
    with torch.no_grad():
        before = conv.eval().embed(x)
        laid_out = P.in_memory_format(conv, "channels_last")
        assert _channels_last(laid_out)
        torch.testing.assert_close(laid_out.embed(x), before, rtol=1e-4, atol=1e-5)  # the same function


def test_a_resumed_run_keeps_its_layout_and_a_pass_over_new_images_takes_the_runs():
    from raydc.config import load_config
    from raydc.core.extractor import ExtractorSpec, as_computed_by, build_network
    from raydc.core.models import small_convnet
    from raydc.engine.loop import run_arithmetic

    cfg = load_config(None, ["data.shards=unused"])
    net = small_convnet(1, sobel=True)
    assert run_arithmetic(cfg, None, net, "cpu") == ("fp32", "contiguous")  # a new run resolves auto here
    assert run_arithmetic(cfg, None, net, "cuda")[1] == "channels_last"
    # a run begun channels_last (asked for, or auto before the CPU's default changed) resumes channels_last
    assert run_arithmetic(cfg, {"precision": "fp32", "memory_format": "channels_last"}, net, "cpu")[1] == \
        "channels_last"
    # a checkpoint from before the layout was chosen was computed contiguous: its resume stays so
    assert run_arithmetic(cfg, {"precision": "fp32"}, net, "cpu") == ("fp32", "contiguous")

    spec = ExtractorSpec(build=lambda: small_convnet(1, sobel=True), state=net.state_dict())
    assert _channels_last(build_network(spec)) == torch.cuda.is_available()  # no layout named: auto for here
    old_run = as_computed_by(spec, {"model": {}})  # clustering.pt of a run from before: contiguous, float32
    assert (old_run.precision, old_run.memory_format) == ("fp32", "contiguous")
    assert not _channels_last(build_network(old_run))
    new_run = as_computed_by(spec, {"precision": "fp32", "memory_format": "channels_last"})
    assert new_run.memory_format == "channels_last" and _channels_last(build_network(new_run))


def _channels_last(model) -> bool:
    weights = [p for p in model.parameters() if p.dim() == 4]
    return bool(weights) and all(p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
                                 for p in weights)
