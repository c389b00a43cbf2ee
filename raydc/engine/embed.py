"""`raydc embed`: the trained network's features for any shards, as Parquet a user (or Ray Data) reads as is.

The features are the ones the run clustered: `raydc assign`'s extraction (the method's own network call and,
with `reduced`, its saved PCA projection, L2 normalisation and dtype), found by letting the method's `place_new_images`
make its first `extract` call against a context that only records it. `raw` drops the reduction. (DEC
assigns through q = soft_assign(z); its embedding is z, the features its k-means clustered, so embed asks
for `embed` there.)

They come from the same persistent feature pool a run uses; each finished block goes straight to a Ray task
that writes it as `part-NNNNN.parquet` (`row, id, path, embedding`: a fixed-size list of float32), with the
paths read from that piece's own row group. The driver holds object refs and counts, never a feature; the
object store holds the blocks in flight. Parts are numbered in piece order, so reading them in name order
gives the rows in order. A local `--out` is built in a hidden sibling and renamed when complete; on object
storage the parts are written in place and removed again if the pass fails.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raydc.errors import UserError


@dataclass
class EmbedSummary:
    out: str
    rows: int
    dim: int
    parts: int
    reduced: bool


class _Recorded(Exception):
    def __init__(self, spec, reduction: dict):
        self.spec, self.reduction = spec, reduction


class _RecordingContext:
    """What `Method.place_new_images` is handed to learn how it extracts: its first `extract` call is the answer."""

    def __init__(self, cfg, manifest):
        self.cfg, self.manifest = cfg, manifest

    def extract(self, spec, **reduction):
        raise _Recorded(spec, reduction)


def extraction(method, model, artifacts: dict, cfg, manifest, reduced: bool):
    """The ExtractorSpec the run's assign uses, its reduction set as the run's final features had it
    (`reduced`) or none (raw)."""
    from raydc.core.extractor import FeatureReduction

    try:
        method.place_new_images(_RecordingContext(cfg, manifest), model, artifacts)
    except _Recorded as r:
        spec, how = r.spec, r.reduction
    else:
        raise UserError(f"method {cfg.method!r} assigns without extracting features: nothing to embed")
    if spec.call == "soft_assign":
        spec.call = "embed"
    projection = how.get("projection")
    spec.reduction = FeatureReduction(projection=projection, l2_normalize=bool(how.get("l2_normalize")),
                                      dtype=cfg.features.dtype) if reduced else None
    return spec


def write_block(block: dict, piece, out: str, index: int, with_paths: bool) -> tuple[int, int]:
    """A Ray task: one pool block as `out/part-<index>.parquet`; returns (rows, dim)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raydc import storage

    rows = np.asarray(block["row"], np.int64)
    feats = np.ascontiguousarray(block["feature"], np.float32)
    if not len(rows):
        return 0, 0
    dim = int(feats.shape[1])
    cols = {"row": pa.array(rows), "id": pa.array(np.asarray(block["id"], np.int64))}
    if with_paths:
        with storage.open_input_file(piece.path) as f:
            t = pq.ParquetFile(f).read_row_group(piece.row_group, columns=["row", "path"])
        t = t.slice(piece.start, piece.stop - piece.start)
        src_rows = t.column("row").to_numpy()
        at = np.searchsorted(src_rows, rows)
        if len(rows) and (at.max() >= len(src_rows) or not np.array_equal(src_rows[at], rows)):
            raise AssertionError(f"rows of piece {piece} do not match its block")
        cols["path"] = t.column("path").combine_chunks().take(pa.array(at))
    else:
        cols["path"] = pa.nulls(len(rows), pa.string())
    cols["embedding"] = pa.FixedSizeListArray.from_arrays(pa.array(feats.reshape(-1)), dim)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table(cols), sink, compression="zstd")
    storage.write_bytes_atomic(storage.join(out, f"part-{index:05d}.parquet"), sink.getvalue().to_pybytes())
    return len(rows), dim


def embed_images(run_dir: str, shard_dir: str, out: str, *, reduced: bool = True, log=print) -> EmbedSummary:
    import ray

    from raydc import storage
    from raydc.config import Config
    from raydc.config_loader import from_dict
    from raydc.data.manifest import load_manifest
    from raydc.core.extractor import as_computed_by
    from raydc.engine.datasets import check_shard_footers
    from raydc.engine.persistent_pool import PersistentFeaturePool
    from raydc.engine.rundir import RunDir
    from raydc.engine.runtime import init_ray
    from raydc.methods import build_method

    out = out.rstrip("/") if storage.is_uri(out) else str(Path(out).expanduser().resolve())
    if storage.exists(out):
        raise UserError(f"--out {out} already exists; choose a new name or remove it")
    run = RunDir(run_dir)
    saved = run.load_clustering()
    cfg: Config = from_dict(Config, saved["config"])
    if not storage.is_uri(shard_dir):
        shard_dir = str(Path(shard_dir).expanduser().resolve())
    manifest = load_manifest(shard_dir)
    train_manifest = load_manifest(cfg.data.shards) if storage.exists(cfg.data.shards) else None
    method = build_method(cfg, train_manifest or manifest)
    model = method.build_model()
    model.load_state_dict(saved["model"])
    model.eval()
    spec = as_computed_by(extraction(method, model, saved["artifacts"], cfg, manifest, reduced), saved)
    if not manifest.has_paths:
        log(f"note: the shards in {shard_dir} carry no source paths (an array source, or folder shards prepared "
            f"by an older raydc); the embeddings' `path` column is empty")

    init_ray(cfg.ray, train_cpus=0)
    check_shard_footers(manifest, shard_dir)
    local = not storage.is_uri(out)
    target = str(Path(out).with_name(f".{Path(out).name}.tmp-{uuid.uuid4().hex[:12]}")) if local else out
    storage.makedirs(target)
    pool = PersistentFeaturePool(manifest, cfg.features.concurrency)
    task = ray.remote(num_cpus=0.25)(write_block)
    writes: list = []   # every write's small (rows, dim) result
    pending: list = []  # the writes not known to be done: the blocks they hold are still in the store
    window = 2 * max(1, cfg.features.concurrency)

    def sink(i, piece, ref):
        nonlocal pending
        writes.append(task.remote(ref, piece, target, i, manifest.has_paths))
        pending.append(writes[-1])
        if len(pending) > window:  # the pool outpaces the writers: wait, so the blocks in flight stay bounded
            _, pending = ray.wait(pending, num_returns=len(pending) - window, fetch_local=False)

    try:
        pool.extract(manifest.shard_paths(shard_dir), spec, cfg.features.batch_size, sink=sink)
        done = ray.get(writes)
        if local:
            Path(target).rename(out)
    except BaseException:
        storage.delete_dir(target)
        raise
    finally:
        pool.shutdown()
    rows = sum(n for n, _ in done)
    dim = max((d for _, d in done), default=0)
    return EmbedSummary(out, rows, dim, len(done), reduced)


def run_embed(args) -> int:
    s = embed_images(args.run, args.data, args.out, reduced=not args.raw)
    print(f"embedded {s.rows:,} images ({s.dim}-d, {'reduced as the run clustered them' if s.reduced else 'raw'}) "
          f"into {s.parts} part(s) in {s.out}")
    return 0


def add_embed_arguments(p) -> None:
    p.add_argument("--run", required=True, help="a finished run directory")
    p.add_argument("--data", required=True, help="shard directory of the images to embed")
    p.add_argument("--out", required=True, help="directory of Parquet parts to create (row, id, path, embedding)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--reduced", dest="raw", action="store_false", default=False,
                   help="the features after the run's PCA projection and L2 normalisation (default)")
    g.add_argument("--raw", dest="raw", action="store_true", default=False,
                   help="the network's features before any reduction")
