"""Convert a source into Parquet shards plus a manifest, streaming, one shard in memory at a time.

Shard format (format_version 2): zstd-compressed Parquet, one row per image, columns
`row` int64 (0..N-1 in write order: the dense index every per-image array of a run is keyed by, so labels and
targets can be cut into contiguous row ranges and joined back without a table as large as the largest id),
`id` int64 (the source's own id, any int64 and unique, or the row number when the source has none: what users
see in the assignments), `path` string for sources made of files (the file relative to the source root, so
every result maps back to a user's file; absent for array sources and for shards written before it existed,
which the manifest's `has_paths` says), `image` binary, and `label` int64 when the source has labels (evaluation only:
training never reads it). Each file's schema metadata repeats `raydc.encoding`,
`raydc.shape` and `raydc.mode` for its own rows, so a shard read on its own is self-describing.

Two encodings:
- "raw" for fixed-shape array sources (torchvision datasets, npz): the uint8 HWC bytes of each image.
  Decoding is one `np.frombuffer` per batch, with zero per-image work on the hot path: a PNG decode would cost
  more CPU than the small conv nets that train on these images, and zstd over 28x28 digits compresses about
  as well as PNG does.
- "encoded" for image folders: the original file bytes, lossless and never re-encoded (re-encoding JPEGs
  loses quality and costs time). Sizes and modes may vary: `image_shape` is the decoded [H, W, C] (C from
  `mode`, which is "RGB" as soon as one image has colour) when all images share H and W, else null.

`out` may be an object-store URI (`s3://bucket/shards/x`): each shard is staged locally, uploaded when it is
complete and deleted here, and the manifest is uploaded last.

Crash safety: each shard is written to `*.tmp` and renamed, and the manifest is written last and atomically;
a prepare that fails removes what it wrote, and one that is killed leaves shards but no manifest, which
readers refuse. Re-running into a directory that holds shards or a manifest needs `overwrite=True`.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

import raydc
from raydc.data.manifest import (FORMAT_VERSION, MANIFEST_NAME, SHARD_PATTERN, Manifest, ShardInfo, fsync_dir,
                                 sha256_file, write_manifest)
from raydc.data.sources import (CLI_HELP, CONFIG_HELP, SPLITS, TORCHVISION_SOURCES, Item, RootHelp, Source, filtered,
                                mode_for_channels, open_source)
from raydc.errors import DataError, UserError

# A shard is flushed early when its buffered image bytes pass this, so a large rows_per_shard on big images can
# neither exhaust memory nor overflow Arrow's 2 GiB limit for a binary column chunk.
MAX_SHARD_BYTES = 1 << 30
# Row groups of about this size let readers stream a shard in pieces (Ray packs read blocks from row groups).
ROW_GROUP_BYTES = 16 << 20


class ShardWriter:
    """Buffers at most one shard of rows and writes it with a tmp-then-rename, recording what it wrote."""

    def __init__(self, out_dir: Path, encoding: str, rows_per_shard: int, has_labels: bool,
                 max_shard_bytes: int = MAX_SHARD_BYTES, remote: str | None = None):
        """`remote`: a URI the shards go to; each is then written in `out_dir` (a staging directory), uploaded
        as soon as it is complete and removed here, so local disk holds one shard at a time."""
        self.out_dir, self.encoding, self.rows_per_shard = out_dir, encoding, rows_per_shard
        self.remote = remote
        self.has_labels, self.max_shard_bytes = has_labels, max_shard_bytes
        self.shards: list[ShardInfo] = []
        self.count = 0
        self.label_counts: Counter[int] = Counter()
        self.hw: tuple[int, int] | None = None
        self.mixed_sizes = False
        self.any_color = False
        self.any_paths = False
        self._images: list[bytes] = []
        self._labels: list[int] = []
        self._ids: list[int | None] = []
        self._paths: list[str | None] = []
        self._all_ids: list[np.ndarray] = []  # every shard's ids: the duplicate check at close
        self._sizes: set[tuple[int, int]] = set()
        self._shard_color = False
        self._raw_shape: tuple[int, int, int] | None = None
        self._bytes = 0
        self._written: list[Path] = []
        self._uploaded: list[str] = []

    def add(self, item: Item) -> None:
        if self.has_labels and item.label is None:
            raise DataError("a labelled source produced an image without a label")
        if self.encoding == "raw":
            if self._raw_shape is not None and item.shape != self._raw_shape:
                raise DataError(f"raw images must all have one shape; got {item.shape} after {self._raw_shape}")
            self._raw_shape = item.shape
        data = item.image if isinstance(item.image, bytes) else np.ascontiguousarray(item.image).tobytes()
        self._images.append(data)
        self._ids.append(item.id)
        self._paths.append(item.path)
        if self.has_labels:
            self._labels.append(item.label)  # type: ignore[arg-type]
            self.label_counts[item.label] += 1  # type: ignore[index]
        hw = (item.shape[0], item.shape[1])
        self._sizes.add(hw)
        if self.hw is None:
            self.hw = hw
        elif hw != self.hw:
            self.mixed_sizes = True
        if item.shape[2] == 3:
            self.any_color = self._shard_color = True
        self._bytes += len(data)
        if len(self._images) >= self.rows_per_shard or self._bytes >= self.max_shard_bytes:
            self.flush()

    def flush(self) -> None:
        n = len(self._images)
        if n == 0:
            return
        start = self.count
        channels = 3 if self._shard_color else 1
        shard_shape = [*next(iter(self._sizes)), channels] if len(self._sizes) == 1 else None
        rows = np.arange(start, start + n, dtype=np.int64)
        given = [i is not None for i in self._ids]
        if any(given) and not all(given):
            raise DataError("the source gave ids for some images and not for others")
        ids = np.asarray(self._ids, dtype=np.int64) if all(given) else rows
        self._all_ids.append(ids)
        name = SHARD_PATTERN.format(len(self.shards))
        self._written += [self.out_dir / (name + ".tmp"), self.out_dir / name]
        if self.remote is not None:
            from raydc import storage

            self._uploaded.append(storage.join(self.remote, name))
        has_paths = [p is not None for p in self._paths]
        if any(has_paths) and not all(has_paths):
            raise DataError("the source gave paths for some images and not for others")
        self.shards.append(write_shard(
            self.out_dir, name, rows, ids, pa.array(self._images, type=pa.binary()),
            np.asarray(self._labels, dtype=np.int64) if self.has_labels else None,
            encoding=self.encoding, shape=shard_shape, channels=channels, image_bytes=self._bytes,
            remote=self.remote, paths=pa.array(self._paths, type=pa.string()) if all(has_paths) else None))
        self.any_paths = self.any_paths or all(has_paths)
        self.count += n
        self._images, self._labels, self._ids, self._paths = [], [], [], []
        self._sizes, self._bytes, self._shard_color = set(), 0, False

    def close(self) -> None:
        self.flush()
        self.check_unique_ids()
        if self.remote is None:
            fsync_dir(self.out_dir)

    def check_unique_ids(self) -> None:
        """Ids must be unique: assignments and labels are joined back to images by id. (8 bytes per image on
        this process; a prepare too large for that is a job for a distributed prepare.)"""
        if not self._all_ids:
            return
        ids = np.sort(np.concatenate(self._all_ids))
        dup = ids[1:][ids[1:] == ids[:-1]]
        if dup.size:
            repeated = np.unique(dup)
            raise DataError(f"the source has duplicate ids ({repeated.size} repeated, first {repeated[:5].tolist()}); "
                            f"ids must be unique so that assignments can be joined back to images")

    def abort(self) -> None:
        """Remove every file this writer created, so a failed prepare can be re-run without --overwrite."""
        for path in self._written:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        if self._uploaded:
            from raydc import storage

            fs, _ = storage.resolve(self._uploaded[0])
            for target in self._uploaded:
                try:
                    fs.delete_file(storage.resolve(target)[1])
                except (OSError, FileNotFoundError):
                    pass
        self._images, self._labels, self._ids, self._paths = [], [], [], []


def write_shard(out_dir: Path, name: str, rows: np.ndarray, ids: np.ndarray, images: pa.Array,
                labels: np.ndarray | None, *, encoding: str, shape: list[int] | None, channels: int,
                image_bytes: int, remote: str | None = None, paths: pa.Array | None = None) -> ShardInfo:
    """Write one shard as `out_dir/name` (tmp, fsync, rename) and return its manifest entry; with `remote` the
    finished file is uploaded there and removed from `out_dir`. Shared by the one-process writer above and the
    Ray tasks of `raydc.data.ray_prepare`, so both produce byte-identical shards from the same rows."""
    columns = {"row": pa.array(rows), "id": pa.array(ids)}
    if paths is not None:
        columns["path"] = paths
    columns["image"] = images
    if labels is not None:
        columns["label"] = pa.array(labels)
    table = pa.table(columns).replace_schema_metadata({
        "raydc.encoding": encoding,
        "raydc.shape": json.dumps(shape),
        "raydc.mode": mode_for_channels(channels),
        "raydc.format_version": str(FORMAT_VERSION),
    })
    n = len(rows)
    final = out_dir / name
    tmp = final.with_name(name + ".tmp")
    row_group = max(1, min(n, ROW_GROUP_BYTES * n // max(image_bytes, 1)))
    pq.write_table(table, tmp, compression="zstd", row_group_size=row_group)
    _fsync_file(tmp)
    os.replace(tmp, final)
    info = ShardInfo(file=name, rows=n, sha256=sha256_file(final), id_min=int(ids.min()), id_max=int(ids.max()),
                     row_start=int(rows[0]))
    if remote is not None:
        from raydc import storage

        storage.write_bytes_atomic(storage.join(remote, name), final.read_bytes())
        final.unlink()
    return info


def check_cut(rows_per_shard: int, limit: int | None, classes: Sequence[int] | None) -> list[int] | None:
    """The arguments that say how a source is cut, checked before anything is read; returns `classes` sorted
    and deduplicated. Shared by the one-process and the distributed prepare, which must refuse alike."""
    if rows_per_shard < 1:
        raise UserError(f"rows_per_shard must be >= 1, got {rows_per_shard}")
    if limit is not None and limit < 1:
        raise UserError(f"limit must be >= 1, got {limit}")
    if classes is not None:
        classes = sorted({int(c) for c in classes})
        if not classes:
            raise UserError("classes is an empty list; leave it unset to keep every class")
    return classes


def prepare(source: str | Source, out: str | os.PathLike, *, root: str | os.PathLike | None = None,
            split: str = "all", classes: Sequence[int] | None = None, limit: int | None = None,
            rows_per_shard: int = 10_000, overwrite: bool = False, strict: bool = False, download: bool = False,
            labels_from_folders: bool = True, progress: bool = True, root_help: RootHelp = CLI_HELP) -> Manifest:
    """Write `source` as shards under `out` and return the manifest. `source` is a name (see
    `raydc.data.sources.SOURCE_NAMES`) or an opened `Source`; for `folder` `root` is the image folder, for `npz`
    the file, for torchvision datasets the data root (default $RAYDC_DATA_ROOT). `root_help` says how the
    user sets that root in error messages (prepare's flags, or a config's fields when training prepares)."""
    classes = check_cut(rows_per_shard, limit, classes)
    if split not in SPLITS + ("unlabeled",):
        raise UserError(f"unknown split {split!r}; use one of {', '.join(SPLITS)}")
    # Open the source first: a wrong --root must fail before an existing shard directory is touched.
    src = source if isinstance(source, Source) else open_source(
        source, root, split=split, download=download, labels_from_folders=labels_from_folders, strict=strict,
        root_help=root_help)
    from raydc import storage

    remote = str(out).rstrip("/") if storage.is_uri(str(out)) else None
    if remote is not None:  # shards are staged here one at a time and uploaded; the manifest goes up last
        _claim_remote_dir(remote, overwrite)
        out_dir = created = Path(tempfile.mkdtemp(prefix="raydc-prepare-"))
    else:
        out_dir = Path(out).expanduser().resolve()
        created = _claim_out_dir(out_dir, overwrite)

    writer = ShardWriter(out_dir, src.encoding, rows_per_shard, src.has_labels, remote=remote)
    total = src.size_hint(classes)
    if limit is not None and total is not None:
        total = min(total, limit)
    try:
        with _progress(progress, total, f"prepare {src.name}") as bar:
            pending = 0
            for item in filtered(src.items(classes), limit):
                writer.add(item)
                pending += 1
                if pending == 256:
                    bar.update(pending)
                    pending = 0
            bar.update(pending)
        writer.close()
        if writer.count == 0:
            raise DataError(f"no images to write from {src.name} at {src.location}"
                            + (f" with classes {classes}" if classes is not None else "")
                            + (f" ({len(src.skipped)} unreadable files skipped)" if src.skipped else ""))
        channels = 3 if writer.any_color else 1
        shape = None if writer.mixed_sizes or writer.hw is None else [*writer.hw, channels]
        manifest = Manifest(
            name=src.name, source=src.location, count=writer.count, encoding=src.encoding, image_shape=shape,
            mode=mode_for_channels(channels), has_labels=src.has_labels,
            class_names=src.class_names,
            label_counts=dict(sorted(writer.label_counts.items())) if src.has_labels else None,
            shards=writer.shards, skipped=list(src.skipped), created_by=f"raydc {raydc.__version__}",
            format_version=FORMAT_VERSION, split=split if src.name in TORCHVISION_SOURCES else None,
            classes=classes, limit=limit, has_paths=writer.any_paths)
        path = write_manifest(manifest, out_dir)
        if remote is not None:
            storage.write_bytes_atomic(storage.join(remote, MANIFEST_NAME), path.read_bytes())
    except BaseException:
        writer.abort()
        if created:  # a failed prepare (--strict on a corrupt file, no images) leaves nothing it made behind
            _remove_empty_dirs(out_dir, created)
        raise
    finally:
        if remote is not None:
            shutil.rmtree(out_dir, ignore_errors=True)
    return manifest


def prepare_from_config(data_cfg, overwrite: bool = False, progress: bool = True) -> Manifest:
    """Prepare `data_cfg.shards` from `data_cfg.source` (a `raydc.config.DataConfig`)."""
    if not data_cfg.source:
        raise UserError(f"data.shards {data_cfg.shards!r} has no manifest and data.source is not set; set "
                        f"data.source (and data.root) so the shards can be prepared, or run `raydc prepare`")
    return prepare(data_cfg.source, data_cfg.shards, root=data_cfg.resolved_root(), split=data_cfg.split,
                   classes=data_cfg.classes, limit=data_cfg.limit, rows_per_shard=data_cfg.rows_per_shard,
                   download=data_cfg.download, overwrite=overwrite, progress=progress, root_help=CONFIG_HELP)


def _claim_out_dir(out_dir: Path, overwrite: bool) -> Path | None:
    """Make `out_dir` ours; returns the outermost directory this call created (None if it existed)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"output {out_dir} exists and is not a directory; choose another --out")
    created = next((p for p in reversed([out_dir, *out_dir.parents]) if not p.exists()), None)
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / MANIFEST_NAME
    ours = sorted(p for p in out_dir.iterdir()
                  if p.name.startswith(MANIFEST_NAME) or (p.name.startswith("shard-") and ".parquet" in p.name))
    if not ours:
        return created
    if not overwrite:
        what = "a prepared dataset" if manifest.exists() else \
            f"{len(ours)} shard file(s) without a manifest (an interrupted prepare?)"
        raise DataError(f"{out_dir} already holds {what}; pass --overwrite to replace it, or choose another --out")
    # The manifest goes first: if removing the shards is interrupted, no manifest points at missing files.
    if manifest.exists():
        manifest.unlink()
        fsync_dir(out_dir)
    for p in ours:
        if p.exists():
            p.unlink()
    return created


def _claim_remote_dir(remote: str, overwrite: bool) -> None:
    """`_claim_out_dir` for a URI prefix: the same refusal without --overwrite, and the manifest removed
    before the shards."""
    from raydc import storage

    ours = [p for p in (storage.list_files(remote) if storage.exists(remote) else [])
            if p.rsplit("/", 1)[-1].startswith(MANIFEST_NAME) or p.rsplit("/", 1)[-1].startswith("shard-")]
    if not ours:
        return
    manifest = storage.join(remote, MANIFEST_NAME)
    has_manifest = manifest in ours
    if not overwrite:
        what = "a prepared dataset" if has_manifest else \
            f"{len(ours)} shard file(s) without a manifest (an interrupted prepare?)"
        raise DataError(f"{remote} already holds {what}; pass --overwrite to replace it, or choose another --out")
    fs, _ = storage.resolve(remote)
    for p in sorted(ours, key=lambda p: p != manifest):
        fs.delete_file(storage.resolve(p)[1])


def _remove_empty_dirs(out_dir: Path, top: Path) -> None:
    """Remove `out_dir` and its parents up to `top` while they are empty (never a file a user put there)."""
    for d in [out_dir, *out_dir.parents]:
        try:
            d.rmdir()
        except OSError:
            return
        if d == top:
            return


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _NullBar:
    def update(self, n: int) -> None:
        pass

    def __enter__(self) -> "_NullBar":
        return self

    def __exit__(self, *exc: object) -> None:
        pass


def _progress(enabled: bool, total: int | None, desc: str):
    if not enabled:
        return _NullBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", unit_scale=True, smoothing=0.1, dynamic_ncols=True)

