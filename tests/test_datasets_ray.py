"""Shards through Ray Data: every id exactly once with its image, streaming without collecting on the driver,
decode in actor pools, and clear errors for damaged shards."""
from __future__ import annotations

import gc

import numpy as np
import pytest

from raydc.data.manifest import load_manifest
from raydc.data.prepare import prepare
from raydc.data.sources import ArrayPart, ArraySource
from raydc.data.decode import decode_batch
from raydc.engine.datasets import read_shards
from raydc.errors import DataError
from tests.helpers import plan_operators


@pytest.fixture(scope="module")
def small_shards(tmp_path_factory):
    """1,000 random 28x28 gray images with labels, in 4 shards, plus a stray file the reader must ignore."""
    d = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (1000, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 1000)
    np.savez(d / "src.npz", images=images, labels=labels)
    prepare("npz", d / "shards", root=d / "src.npz", rows_per_shard=300, progress=False)
    (d / "shards" / "shard-99999.parquet").write_bytes(b"stray junk, not listed in the manifest")
    return d / "shards", images, labels


def collect(batches) -> dict[str, np.ndarray]:
    parts: dict[str, list[np.ndarray]] = {}
    for b in batches:
        for k, v in b.items():
            parts.setdefault(k, []).append(v)
    return {k: np.concatenate(v) for k, v in parts.items()}


def decoded_batches(data, manifest, batch_size, size=None, channels=None):
    """uint8 NHWC batches from a Dataset or a Ray Train shard (`DataIterator`), decoded here as a worker does."""
    for batch in data.iter_batches(batch_size=batch_size, batch_format="numpy"):
        yield decode_batch(batch, manifest, size=size, channels=channels)


@pytest.mark.ray
@pytest.mark.parametrize("seed", [None, 7])
def test_every_id_once_with_its_image(ray_local, small_shards, seed):
    shards, images, labels = small_shards
    m = load_manifest(shards)
    got = collect(decoded_batches(read_shards(shards, shuffle_files_seed=seed), m, batch_size=128))
    ids = got["id"]
    assert len(ids) == 1000 and np.array_equal(np.sort(ids), np.arange(1000))
    assert got["image"].shape == (1000, 28, 28, 1) and got["image"].dtype == np.uint8
    assert np.array_equal(got["image"][..., 0], images[ids])
    assert np.array_equal(got["label"], labels[ids])


def _operators(ds) -> list[str]:
    return [type(op).__name__ for op in plan_operators(ds)]


@pytest.mark.ray
def test_reads_plan_no_footer_listing_and_leave_the_global_flag(ray_local, small_shards):
    """Ray 2.60's V2 Parquet reader plans a ListFiles op that starts 32 footer actors on every execution (every
    epoch); read_shards uses the V1 reader (a Read op) and puts the caller's DataContext flag back."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    before = ctx.use_datasource_v2
    ops = _operators(read_shards(small_shards[0], shuffle_files_seed=3))
    assert "ListFiles" not in ops and any(name.startswith("Read") for name in ops), ops
    assert ctx.use_datasource_v2 == before


@pytest.mark.ray
def test_a_read_runs_at_most_one_task_per_cpu_at_once(ray_local, small_shards, tmp_path):
    """Read tasks ask a quarter CPU (so they run beside Train workers holding whole ones), but no more of them run
    at once than the cluster has CPUs: uncapped, the 32 shards of the streaming test below started 16 worker
    processes on a 4-CPU Ray, each paying the import of pyarrow and Ray Data, for reads that then queued on the
    same two cores. The cap is Ray Data's task pool on the Read operator; never above the shards' count, where Ray
    Data would warn on the console that the cap cannot be reached."""
    import warnings

    import ray
    from ray.data import TaskPoolStrategy

    shards = small_shards[0]
    op = plan_operators(read_shards(shards, columns=["id"]))[-1]
    assert type(op).__name__ == "Read" and op.ray_remote_args["num_cpus"] == 0.25
    assert op.compute == TaskPoolStrategy(size=int(ray.cluster_resources()["CPU"]))
    two = tmp_path / "two"  # fewer shards than CPUs
    prepare("npz", two, root=shards.parent / "src.npz", rows_per_shard=600, progress=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = read_shards(two, columns=["id"])
        assert plan_operators(ds)[-1].compute == TaskPoolStrategy(size=2)
        assert sum(len(b["id"]) for b in ds.iter_batches(batch_format="numpy")) == 1000
    assert not [str(w.message) for w in caught if "concurrent tasks" in str(w.message)]


def test_columns_and_data_iterator(ray_local, small_shards):
    shards, _, labels = small_shards
    ds = read_shards(shards, columns=["id", "label"])
    rows = collect(ds.iter_batches(batch_size=500, batch_format="numpy"))
    assert set(rows) == {"id", "label"} and np.array_equal(rows["label"], labels[rows["id"]])
    with pytest.raises(DataError, match="unknown column"):
        read_shards(shards, columns=["id", "pixels"])
    # A Ray Train shard is a DataIterator: decoded_batches must take it as well as a Dataset.
    (it,) = read_shards(shards).streaming_split(1)
    got = collect(decoded_batches(it, load_manifest(shards), batch_size=200, size=14, channels=3))
    assert got["image"].shape == (1000, 14, 14, 3) and np.array_equal(np.sort(got["id"]), np.arange(1000))


def _live_bytes() -> int:
    """Memory the driver is holding right now: Python objects and numpy arrays (tracemalloc) plus Arrow buffers.

    Deliberately not RSS: glibc and mimalloc keep freed batch buffers for reuse, so a streaming driver's RSS was
    measured rising ~190 MB over one 226 MB pass with only ~20 MB of it live, which would make an RSS bound
    either flaky or meaningless. Collecting the data on the driver shows up here either way."""
    import tracemalloc

    import pyarrow as pa

    return tracemalloc.get_traced_memory()[0] + pa.total_allocated_bytes()


@pytest.mark.ray
def test_iteration_streams_without_collecting_on_the_driver(ray_local, tmp_path):
    import tracemalloc

    h, w, c, n = 96, 96, 3, 8192                          # 27 KB per image, 226 MB in all
    pattern = (np.arange(h * w * c) % 256).astype(np.uint8)

    def chunks():
        for start in range(0, n, 512):
            ids = np.arange(start, min(n, start + 512))
            yield (ids.astype(np.uint8)[:, None] + pattern).reshape(-1, h, w, c)

    out = tmp_path / "big"
    m = prepare(ArraySource("synthetic", "generated", [ArrayPart(chunks, None, n)]), out, rows_per_shard=256,
                progress=False)
    total_bytes = n * h * w * c
    assert len(m.shards) == 32

    block_bytes = 8 << 20      # the driver holds about two blocks: keep them small next to the data
    gc.collect()
    tracemalloc.start()
    try:
        base = _live_bytes()
        seen, samples = np.zeros(n, bool), []
        for b in decoded_batches(read_shards(out, block_bytes=block_bytes), m, batch_size=128):
            ids = b["id"]
            assert not seen[ids].any()
            seen[ids] = True
            assert np.array_equal(b["image"], (ids.astype(np.uint8)[:, None] + pattern).reshape(-1, h, w, c))
            samples.append(_live_bytes() - base)
            del b
        peak = max(max(samples), tracemalloc.get_traced_memory()[1] - base)
    finally:
        tracemalloc.stop()
    assert seen.all()
    assert peak < total_bytes * 0.3, (f"driver held up to {peak / 1e6:.0f} MB while streaming "
                                      f"{total_bytes / 1e6:.0f} MB: {[s // 1_000_000 for s in samples]}")
    # Nothing accumulates: the second half of the pass holds no more than the first half did, give or take a block.
    half = len(samples) // 2
    assert max(samples[half:]) < max(samples[:half]) + 2 * block_bytes


def test_corrupt_or_missing_shard_is_named(tmp_path):
    out = tmp_path / "s"
    np.savez(tmp_path / "d.npz", images=np.zeros((50, 4, 4), np.uint8))
    m = prepare("npz", out, root=tmp_path / "d.npz", rows_per_shard=20, progress=False)
    victim = out / m.shards[1].file
    victim.write_bytes(victim.read_bytes()[:-40])          # footer damaged
    with pytest.raises(DataError, match="shard-00001.parquet") as e:
        read_shards(out)
    assert "raydc prepare" in str(e.value)
    victim.unlink()
    with pytest.raises(DataError, match="shard-00001.parquet.*missing"):
        read_shards(out)


def test_no_manifest_says_how_to_prepare(tmp_path):
    with pytest.raises(DataError, match="raydc prepare"):
        read_shards(tmp_path)


@pytest.fixture(scope="module")
def pool_of_two(ray_local, small_shards):
    """One persistent feature pool of two actors for the tests below: each pass sets its own spec, and an actor
    start (torch's import, the network) is the most of what a pool test costs."""
    from raydc.engine.persistent_pool import PersistentFeaturePool

    pool = PersistentFeaturePool(load_manifest(small_shards[0]), concurrency=2)
    yield pool
    pool.shutdown()


def test_persistent_pool_matches_the_ray_data_pool_and_keeps_its_order(ray_local, small_shards, pool_of_two):
    """Both feature pools give every image's features once, equal to each other; the persistent one gives the
    same block layout on every pass (what makes a resumed run cluster the same rows), reuses its actors, and folds
    BatchNorm from each pass's own weights where the spec asks."""
    import functools

    import ray
    import torch

    from raydc.core.models import small_convnet
    from raydc.data.manifest import load_manifest
    from raydc.engine.persistent_pool import plan_pieces
    from raydc.core.extractor import ExtractorSpec
    from raydc.engine.ray_data_pool import extract_features

    shard_dir, images, _ = small_shards
    manifest = load_manifest(shard_dir)
    torch.manual_seed(0)
    build = functools.partial(small_convnet, 1, sobel=True)
    spec = ExtractorSpec(build=build, state=build().state_dict(), input_size=28)

    def gather(refs):
        blocks = ray.get(refs)
        ids = np.concatenate([b["id"] for b in blocks])
        return ids, np.concatenate([b["feature"] for b in blocks])

    ids_rd, f_rd = gather(extract_features(str(shard_dir), manifest, spec, concurrency=1, num_cpus=0.5,
                                           num_gpus=0.0, batch_size=128))
    paths = manifest.shard_paths(shard_dir)
    assert len(plan_pieces(paths, 8)) >= 8
    pool = pool_of_two
    ids_p, f_p = gather(pool.extract(paths, spec, batch_size=128))
    actors = [w._actor_id for w in pool.workers]
    ids_p2, f_p2 = gather(pool.extract(paths, spec, batch_size=128))
    assert [w._actor_id for w in pool.workers] == actors
    # The second pass's profile only (set_spec restarts each actor's clock); the row groups stayed cached.
    clock = pool.pass_clock()
    assert set(clock) <= {"read_s", "decode_s", "embed_s", "busy_s"} and clock["embed_s"] > 0
    assert clock["busy_s"] >= clock["decode_s"] + clock["embed_s"]
    _check_the_pool_folds_each_passs_own_weights(pool, manifest, paths, images)
    assert sorted(ids_p.tolist()) == list(range(len(images)))
    np.testing.assert_array_equal(ids_p, ids_p2)
    np.testing.assert_array_equal(f_p, f_p2)
    o_rd, o_p = np.argsort(ids_rd), np.argsort(ids_p)
    np.testing.assert_array_equal(ids_rd[o_rd], ids_p[o_p])
    np.testing.assert_allclose(f_rd[o_rd], f_p[o_p], rtol=1e-4, atol=1e-5)


def _check_the_pool_folds_each_passs_own_weights(pool, manifest, paths, images) -> None:
    """A pass whose spec asks for the BatchNorm fold runs a folded network, refolded from every pass's weights: a
    pool that folded once and then loaded new weights into its trained copy alone would give the first weights'
    features on the second pass."""
    import functools

    import ray
    import torch

    from raydc.core.augment import to_float
    from raydc.core.extractor import ExtractorSpec
    from raydc.core.models import small_convnet

    build = functools.partial(small_convnet, 1, sobel=True)
    for seed in (0, 1):
        torch.manual_seed(seed)
        net = build()
        net.train()
        with torch.no_grad():  # running statistics away from (0, 1), so a stale fold shows
            net.embed(torch.randn(64, 1, 28, 28) * (1 + seed))
        spec = ExtractorSpec(build=build, state=net.state_dict(), input_size=28, fold_batchnorm=True)
        blocks = ray.get(pool.extract(paths, spec, batch_size=64))
        bn_layers = ray.get([w.__ray_call__.remote(
            lambda w: sum(isinstance(m, torch.nn.BatchNorm2d) for m in w.model.modules())) for w in pool.workers])
        assert bn_layers == [0] * len(pool.workers)
        ids = np.concatenate([b["id"] for b in blocks])
        got = np.concatenate([b["feature"] for b in blocks])[np.argsort(ids)]
        with torch.no_grad():
            want = net.eval().embed(to_float(images[..., None])).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_shard_footers_give_the_size_the_cache_decision_uses(small_shards):
    import pyarrow.parquet as pq

    from raydc.engine.datasets import CACHE_SHARE, check_shard_footers, should_cache

    shards, images, _ = small_shards
    m = load_manifest(shards)
    size = check_shard_footers(m, shards)
    # The uncompressed columns: at least the raw pixels, and what pyarrow says the tables take.
    assert size >= images.nbytes
    assert size == sum(pq.ParquetFile(p).metadata.row_group(g).total_byte_size
                       for p in m.shard_paths(shards) for g in range(pq.ParquetFile(p).metadata.num_row_groups))
    assert should_cache("auto", size, size / CACHE_SHARE) and not should_cache("auto", size + 1, size / CACHE_SHARE)
    assert should_cache("always", size, 0) and not should_cache("never", 0, 1e12)


@pytest.mark.ray
def test_a_cached_dataset_streams_the_same_rows_in_the_same_order(ray_local, small_shards):
    """`data.cache` must not change a run: a materialized dataset reaches a Train worker's split in the order a
    streamed one does (the bounded shuffle and so every batch depend on it), pass after pass."""
    shards = small_shards[0]

    def split_order(ds) -> list[np.ndarray]:
        ds.context.execution_options.preserve_order = True
        (it,) = ds.streaming_split(1)
        return [collect(it.iter_batches(batch_size=97, batch_format="numpy"))["id"] for _ in range(2)]

    streamed = split_order(read_shards(shards))
    lazy = read_shards(shards)
    lazy.context.execution_options.preserve_order = True
    cached = split_order(lazy.materialize())
    for a, b in zip(streamed, cached):
        assert np.array_equal(a, b)
    assert np.array_equal(np.sort(cached[1]), np.arange(1000))


@pytest.mark.ray
def test_batch_statistics_readout_is_the_same_whatever_the_pool_concurrency_and_batch(ray_local, small_shards,
                                                                                     pool_of_two):
    """DAC's batch-statistics readout: each image is normalised with its fixed group of consecutive rows, so
    its label feature does not depend on how the pool cut the work. Without the alignment it does."""
    import dataclasses
    import functools

    import ray
    import torch

    from raydc.core.dac import LabelFeatureNet, dac_convnet
    from raydc.engine.persistent_pool import PersistentFeaturePool, plan_pieces
    from raydc.core.extractor import ExtractorSpec

    shard_dir, images, _ = small_shards
    manifest = load_manifest(shard_dir)
    paths = manifest.shard_paths(shard_dir)
    pieces = plan_pieces(paths, 16, align=32)
    assert len(pieces) >= 8 and all(p.start % 32 == 0 for p in pieces)  # cuts on the groups' edges
    assert sum(p.stop - p.start for p in pieces) == len(images)

    def build():
        torch.manual_seed(0)
        return LabelFeatureNet(dac_convnet(1, 10, variant="mnist"), readout_batch=32)

    spec = ExtractorSpec(build=functools.partial(build), state=build().state_dict(), call="batch_readout",
                         input_size=28, batch_align=32)

    unaligned = dataclasses.replace(spec, batch_align=1)

    def features(pool, batch_size):
        """Both specs through one pool (a pool's actors start once, not once per pass)."""
        out = []
        for s in (spec, unaligned):
            blocks = ray.get(pool.extract(paths, s, batch_size=batch_size))
            ids = np.concatenate([b["id"] for b in blocks])
            out.append(np.concatenate([b["feature"] for b in blocks])[np.argsort(ids)])
        return out

    one = PersistentFeaturePool(manifest, concurrency=1)
    try:
        a, a_unaligned = features(one, 100)
    finally:
        one.shutdown()
    b, b_unaligned = features(pool_of_two, 256)
    np.testing.assert_allclose(a, b, atol=2e-4)  # the actors' thread counts differ: float sums, not groups
    assert np.abs(a_unaligned - b_unaligned).max() > 1e-2
