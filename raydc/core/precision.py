"""Mixed precision for the training step and the feature pass: which dtype autocast runs in, and where.

Why a module of its own: the choice depends on the process's device (a CUDA worker and a CPU feature actor of
the same run may differ), `auto` must resolve the same way everywhere it is asked, and the engine, the benchmarks
and `gpu_check.py` all need the same answer. What stays float32 is the method's business: its loss, similarity
matrices and Student-t kernels cast their inputs up (`.float()`) so that only the network's convolutions and
matmuls run in the low precision; k-means and PCA never run under autocast.
"""
from __future__ import annotations

import contextlib
import functools
from typing import Literal

import torch

Precision = Literal["fp32", "bf16", "fp16", "auto"]
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16", "auto")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@functools.lru_cache(maxsize=1)
def cpu_bf16_supported() -> bool:
    """Whether this CPU has bf16 arithmetic (AVX512-BF16 or AMX-BF16). Without it torch emulates bf16 and
    autocast is slower than float32, so `auto` must not pick it there."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_precision(requested: str, device_type: str) -> str:
    """The precision a process on `device_type` ("cpu", "cuda") runs for the configured value: `auto` is bf16
    on CUDA and on CPUs with bf16 instructions, fp32 elsewhere; fp16 needs CUDA (CPU fp16 autocast exists but is
    slower than fp32 and has no gradient scaler), so it falls back to bf16 where the CPU has it, else fp32."""
    if requested not in PRECISIONS:
        raise ValueError(f"unknown precision {requested!r} (expected one of {', '.join(PRECISIONS)})")
    if requested == "auto":
        return "bf16" if device_type == "cuda" or cpu_bf16_supported() else "fp32"
    if requested == "fp16" and device_type != "cuda":
        return "bf16" if cpu_bf16_supported() else "fp32"
    return requested


def autocast(precision: str, device_type: str):
    """The context a forward pass runs in: torch.autocast for bf16/fp16, nothing for fp32."""
    if precision in ("fp32", None):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=_DTYPES[precision])


def grad_scaler(precision: str, device_type: str):
    """fp16's gradient scaler (its small exponent range underflows gradients); None for every other case."""
    if precision == "fp16" and device_type == "cuda":
        return torch.amp.GradScaler("cuda")
    return None


def full_precision(device_type: str):
    """Inside an autocast region, a block that runs in float32 (a similarity matrix compared with thresholds,
    a loss): `.float()` on the inputs is not enough, autocast would cast a matmul's inputs back down."""
    return torch.autocast(device_type=device_type, enabled=False)


MEMORY_FORMATS: tuple[str, ...] = ("auto", "channels_last", "contiguous")


def resolve_memory_format(requested: str, model: torch.nn.Module, device_type: str = "cpu") -> str:
    """The layout a network's 4-d weights live in: `auto` is channels_last for a network with 2-d convolutions on
    CUDA (cuDNN's fast path), contiguous on the CPU and for the rest (an MLP has nothing to lay out). The weights'
    layout is enough: a convolution whose weight is channels_last computes in it whatever the input's layout, so
    the inputs stay as they are.

    Why not channels_last on the CPU, where oneDNN's NHWC training step is faster (benchmarks/RESULTS.md, "What a
    step costs"): DeepCluster's 70k runs ended lower with it on every seed compared, MNIST five of five and
    Fashion-MNIST three of three (RESULTS, the seeds70k rows `_cl`/`_retain` against the contiguous ones). oneDNN's
    NHWC kernels are a different computation, not only another order of the same additions, but how far one step's
    gradients lie from float64 does not explain it alone (bench_precision's `grad_error_vs_float64`: closer for one
    network, further for another). Asked for explicitly it is still used."""
    if requested not in MEMORY_FORMATS:
        raise ValueError(f"unknown memory format {requested!r} (expected one of {', '.join(MEMORY_FORMATS)})")
    if requested == "auto":
        has_conv = any(isinstance(m, torch.nn.Conv2d) for m in model.modules())
        return "channels_last" if has_conv and device_type == "cuda" else "contiguous"
    return requested


def in_memory_format(model: torch.nn.Module, memory_format: str) -> torch.nn.Module:
    """`model` with its 4-d parameters and buffers in `memory_format` (resolved), in place."""
    fmt = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    return model.to(memory_format=fmt)
