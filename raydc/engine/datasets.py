"""Prepared shards as Ray Datasets (consumers decode their bytes with `raydc.data.decode.decode_batch`).

The manifest, not a directory glob, decides which files are read: stray files and leftovers of an interrupted
prepare are never picked up. Read tasks ask for a fraction of a CPU because on a small machine a 1-CPU read
task competing with a 1-CPU actor pool can starve the pool and hang the pipeline (see DESIGN.md). Nothing is
collected on the driver: batches stream through the object store.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pyarrow.parquet as pq
import ray

from raydc.data.manifest import Manifest, load_manifest, verify_shards
from raydc.data.parquet_reader import planned_once
from raydc.errors import DataError

COLUMNS = ("row", "id", "image", "label")
BLOCK_BYTES = 32 << 20


def check_shard_footers(manifest: Manifest, shard_dir: str | os.PathLike) -> int:
    """Open every shard's Parquet footer (a few KB each) so a missing or damaged shard fails here, naming the
    file, instead of inside a read task minutes into an epoch. Threads: it is I/O bound, and shared
    filesystems make each open slow. Returns the shards' uncompressed size in bytes (what the rows take in
    Ray's object store once read), from the same footers."""
    from raydc.storage import is_file, open_input_file

    def check(item) -> int:
        shard, path = item
        fix = "re-create the shards with `raydc prepare ... --overwrite`"
        if not is_file(path):
            raise DataError(f"shard {path} listed in the manifest is missing; {fix}")
        try:
            meta = pq.ParquetFile(open_input_file(path)).metadata
        except Exception as e:  # noqa: BLE001 - pyarrow raises ArrowInvalid/OSError variants for bad files
            raise DataError(f"shard {path} is not a readable Parquet file ({type(e).__name__}: {e}); {fix}") from None
        if meta.num_rows != shard.rows:
            raise DataError(f"shard {path} has {meta.num_rows} rows but the manifest lists {shard.rows}; {fix}")
        return sum(meta.row_group(g).total_byte_size for g in range(meta.num_row_groups))

    workers = max(1, min(16, len(manifest.shards)))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return sum(pool.map(check, zip(manifest.shards, manifest.shard_paths(shard_dir))))


# `data.cache: auto` keeps the decoded-from-Parquet rows in the object store when they take at most this share
# of the cluster's object store memory: the rest is left for features, targets and Ray Data's own buffers.
CACHE_SHARE = 0.25


def should_cache(mode: str, data_bytes: int, object_store_bytes: float) -> bool:
    """Whether the training stream reads the shards once and keeps their rows in the object store for every
    later pass (`data.cache`). Streaming re-reads every shard each pass: read tasks that compete with
    training for the node's cores, and an execution to plan and start per pass. A cached dataset is iterated
    from memory, in the same row order, so a run's results do not depend on the choice."""
    if mode == "never":
        return False
    if mode == "always":
        return True
    return data_bytes <= CACHE_SHARE * object_store_bytes


def read_shards(shard_dir: str | os.PathLike, *, columns: Sequence[str] | None = None, read_cpus: float = 0.25,
                shuffle_files_seed: int | None = None, block_bytes: int | None = BLOCK_BYTES,
                verify: bool = False, footers_checked: bool = False) -> ray.data.Dataset:
    """A lazy, streaming Dataset over the manifest's shards.

    `shuffle_files_seed` shuffles the file order (cheap per-epoch variety). `block_bytes` sets this dataset's
    (and its descendants') target block size: every consumer holds about a block or two at a time, and with
    Ray's default 128 MiB a driver iterating 226 MB of images was measured holding ~250 MB, against ~50 MB at
    16 MiB; None keeps Ray's default. `verify` also checks every shard's sha256 (reads all bytes, on the
    driver)."""
    manifest = load_manifest(shard_dir)
    if columns is not None:
        available = [c for c in COLUMNS if c != "label" or manifest.has_labels]
        unknown = [c for c in columns if c not in available]
        if unknown:
            raise DataError(f"unknown column(s) {unknown} for shards in {shard_dir}; available: {available}")
    if verify:
        verify_shards(manifest, shard_dir)
    if not footers_checked:  # a caller that already checked them (run_training, before Ray) says so
        check_shard_footers(manifest, shard_dir)
    shuffle = None
    if shuffle_files_seed is not None:
        from ray.data import FileShuffleConfig

        shuffle = FileShuffleConfig(seed=shuffle_files_seed)
    from raydc.storage import is_uri, resolve

    paths = manifest.shard_paths(shard_dir)
    filesystem = None
    if is_uri(str(shard_dir)):  # Ray Data reads through the same pyarrow filesystem (credentials from the env)
        filesystem, _ = resolve(paths[0])
        paths = [resolve(p)[1] for p in paths]
    else:
        paths = [str(Path(p).resolve()) for p in paths]
    # A read task asks `read_cpus` (a quarter CPU) so that reads run beside Train workers holding whole CPUs, but
    # at most one per CPU runs at once: uncapped, Ray runs four per CPU, and each is its own worker process that
    # loads pyarrow and Ray Data (seconds of CPU apiece) for reads that then wait on the same cores. Nor more than
    # there are shards (a read task per file): a cap above its task count makes Ray Data warn on the console.
    max_tasks = None
    if ray.is_initialized():
        max_tasks = max(1, min(int(ray.cluster_resources().get("CPU", 1)), len(paths)))
    with planned_once():  # the V1 reader: no footer-reading actors on every execution (raydc.data.parquet_reader)
        ds = ray.data.read_parquet(paths, num_cpus=read_cpus, shuffle=shuffle, partitioning=None,
                                   filesystem=filesystem, concurrency=max_tasks)
    if block_bytes is not None:
        ds.context.target_max_block_size = block_bytes  # this dataset's own context copy, not the global one
    if columns is not None:
        ds = ds.select_columns(list(columns))
    return ds
