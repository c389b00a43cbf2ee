"""Mixed precision: what `auto` resolves to, that autocast really lowers the network's matmuls while the pair
similarities stay float32, and that the engine's SGD pass runs the method's loss under it."""
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
