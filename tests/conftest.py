"""Shared fixtures. Ray starts once per test session (`ray.init` costs seconds, and each process it starts more):
every test that needs Ray, CLI subprocesses included (RAY_ADDRESS), joins the session's `ray_local`."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.helpers import REPO  # noqa: F401  (one definition; test files import it from here)

# The files that take longest under `make test`, collected first. xdist (`--dist loadfile`) hands whole files to its
# workers in collection order, so a long file collected near the end runs alone while the other worker idles.
SLOWEST_FIRST = ("test_object_storage.py", "test_datasets_ray.py", "test_multinode.py", "test_umap_readout.py",
                 "test_clustering_service.py", "test_dac_chunks.py", "test_coordinator_imports.py")


def pytest_collection_modifyitems(items) -> None:
    rank = {name: i for i, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FIRST)))  # stable: the rest keep their order

pytest_plugins = ["tests.s3server"]  # the S3-protocol server (moto) that object-storage tests talk to

# Ray Train starts an actor per run that watches for spot-instance preemption notices; no node of a test cluster is
# ever preempted, and the actor is one more process start per run. Subprocesses (CLI runs) inherit the setting.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


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


@pytest.fixture(scope="module")
def shards_local_and_s3(tmp_path_factory, mnist_root, s3_server):
    """300 MNIST test digits as shards twice: on local disk and in the S3 test bucket."""
    from raydc.data.prepare import prepare

    local = tmp_path_factory.mktemp("s3shards") / "mnist300"
    prepare("mnist", local, root=str(mnist_root), split="test", limit=300, rows_per_shard=100, progress=False)
    remote = s3_server.uri("shards/mnist300")
    prepare("mnist", remote, root=str(mnist_root), split="test", limit=300, rows_per_shard=100, progress=False)
    return local, remote


@pytest.fixture(scope="module")
def mixed_folder_shards(tmp_path_factory):
    """72 RGB PNGs of three colours at mixed sizes (tests.helpers.mixed_size_folder), prepared as shards: the
    manifest has no single image shape, so a run must be given `model.input_size`."""
    from raydc.data.prepare import prepare
    from tests.helpers import mixed_size_folder

    d = tmp_path_factory.mktemp("mixed")
    m = prepare("folder", d / "shards", root=mixed_size_folder(d), rows_per_shard=30, progress=False)
    assert m.image_shape is None and m.count == 72
    return d / "shards"


@pytest.fixture(scope="module")
def sweep_files(tmp_path_factory):
    """Three groups of tiny images as shards, a DeepCluster base config and the sweep files over k."""
    import numpy as np
    import yaml

    from tests.helpers import SIDE_GROUPS as SIDE
    from tests.helpers import three_groups
    from raydc.data.prepare import prepare

    d = tmp_path_factory.mktemp("sweep")
    images, labels = three_groups()
    np.savez(d / "src.npz", images=images, labels=labels)
    prepare("npz", d / "shards", root=d / "src.npz", rows_per_shard=90, progress=False)
    base = {
        "method": "deepcluster",
        "data": {"shards": str(d / "shards")},
        "model": {"input_size": SIDE, "feature_dim": 32},
        # restarts: no local minimum at k=3
        "cluster": {"k": 3, "pca_dim": 0, "niter": 20, "n_init": 5, "num_shards": 1},
        "features": {"batch_size": 180},
        # A small lr: each trial trains on its own k's pseudo-labels, and a network trained hard on k = 2 learns
        # to merge two groups; the test is about selection, not about how far training moves the features.
        "train": {"epochs": 1, "batch_size": 30, "lr": 0.01, "crop": False, "hflip": False, "torch_threads": 1,
                  "seed": 3},
        "run": {"montage_per_cluster": 2, "dir": str(d / "unused")},
    }
    (d / "base.yaml").write_text(yaml.safe_dump(base))
    (d / "k23.yaml").write_text(yaml.safe_dump({"space": {"cluster.k": {"grid": [2, 3]}}, "dir": str(d / "out")}))
    return d


@pytest.fixture
def traffic(monkeypatch) -> tuple[list, list]:
    """What a final readout moves: the size of each sample gathered to rank 0, and (function name, shape) of each
    shard's result of `apply`."""
    import numpy as np

    from raydc.engine.clustering import ClusteringService

    gathered: list = []
    returned: list = []
    sample_features, apply = ClusteringService.sample_features, ClusteringService.apply

    def recording_sample(self, *a, **kw):
        out = sample_features(self, *a, **kw)
        gathered.append(len(out[0]))
        return out

    def recording_apply(self, fn, *args):
        out = apply(self, fn, *args)
        returned.extend((fn.__name__, np.shape(r)) for r in out if r is not None)
        return out

    monkeypatch.setattr(ClusteringService, "sample_features", recording_sample)
    monkeypatch.setattr(ClusteringService, "apply", recording_apply)
    return gathered, returned
