"""Shared fixtures. Ray starts once per test session: `ray.init` costs ~7 s on this machine."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

pytest_plugins = ["tests.s3server"]  # the S3-protocol server (moto) that object-storage tests talk to


def data_root() -> Path | None:
    """The dataset root for tests: $RAYDC_DATA_ROOT, else ../shared/data beside the checkout (CI's layout)."""
    env = os.environ.get("RAYDC_DATA_ROOT")
    candidates = [Path(env)] if env else []
    candidates.append(REPO.parent / "shared" / "data")
    for c in candidates:
        if (c / "MNIST" / "raw").is_dir():
            return c
    return None


@pytest.fixture(scope="session")
def mnist_root() -> Path:
    root = data_root()
    if root is None:
        pytest.skip("MNIST not found: set RAYDC_DATA_ROOT to a folder holding MNIST/raw (torchvision layout)")
    return root


@pytest.fixture(scope="session")
def ray_local():
    import ray

    # 2 cores + 2 logical CPUs for Train workers, as raydc.engine.runtime.local_cpus gives a 2-core machine
    # running two workers: Ray Data's actor pool hangs with only 1 CPU free beside the workers.

    if not ray.is_initialized():
        ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False,
                 configure_logging=False, object_store_memory=1 << 30)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny tensors: one thread is faster, and avoids OpenMP spin-waits when other jobs load the CPUs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
