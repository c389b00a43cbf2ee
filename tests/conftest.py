"""Shared fixtures. Ray starts once per test session (`ray.init` costs seconds, and each process it starts more):
every test that needs Ray, CLI subprocesses included (RAY_ADDRESS), joins the session's `ray_local`."""
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
def ray_local(request):
    """The session's one Ray. Started after the S3 test server, so its workers inherit the AWS variables that
    point at it: the object-storage tests' CLI runs join this Ray (RAY_ADDRESS) rather than each starting one."""
    import ray

    try:
        request.getfixturevalue("s3_server")
    except pytest.skip.Exception:
        pass  # no moto: the S3 tests skip themselves, the rest run on a Ray without the variables
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
