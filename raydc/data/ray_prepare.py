"""`raydc prepare --distributed`: an image folder (a local directory or an object-store prefix) to shards as a
Ray Data job, for collections one process cannot read, decode and validate in reasonable time.

Two passes, because the dense `row` index (see `raydc.data.prepare`) needs every earlier part's count of
readable images before a part can be numbered:
1. Ray Data lists the folder, reads the files (`read_binary_files`), decodes and validates each image in
   `map_batches` (the expensive step, spread over the cluster) and writes staging Parquet parts beside the
   output (`write_parquet`). A part keeps the original bytes of good images and, for unreadable ones, the
   reason, so corrupt files are counted and listed exactly as the one-process prepare does.
2. One Ray task per staging part reads only its small columns and returns its counts; the driver turns the
   counts into row offsets; then one task per part writes the final shard with `raydc.data.prepare.write_shard`
   (the same writer as the one-process path) and deletes its staging part. Images are copied, not decoded again.

The driver holds one small summary per part, never a row per image; the listing itself is Ray Data's (on the
driver, like every Ray Data file read). Parts follow the sorted path order (Ray Data reads listed files in
order and `preserve_order` keeps it through the write), so rows come out as the one-process prepare numbers
them and the two produce the same shards for the same folder.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

import raydc
from raydc import storage
from raydc.data.manifest import FORMAT_VERSION, MANIFEST_NAME, SHARD_PATTERN, Manifest, ShardInfo, SkippedFile
from raydc.data.sources import CLI_HELP, IMAGE_EXTENSIONS, RootHelp, checked_image, mode_for_channels
from raydc.errors import DataError

STAGING_PREFIX = "_staging-"
# The columns of a staging part: a good image has `image` and no `error`; an unreadable one the reverse.
STAGING_SCHEMA = pa.schema([("path", pa.string()), ("image", pa.binary()), ("label", pa.int64()),
                            ("h", pa.int32()), ("w", pa.int32()), ("c", pa.int32()), ("error", pa.string())])


@dataclass(frozen=True)
class FolderLayout:
    """What the top level of the folder says before any image is read: labels from class sub-folders."""

    root: str                     # the folder as the user gave it (a path or a URI)
    fs_root: str                  # the same in the pyarrow filesystem's own form ("bucket/prefix" on S3)
    class_names: list[str] | None

    @property
    def has_labels(self) -> bool:
        return self.class_names is not None

    @property
    def name(self) -> str:
        return "folder"


@dataclass
class PartSummary:
    """Pass 2's count of one staging part: all the driver needs to number rows and write the manifest."""

    location: str
    first_path: str
    good: int
    skipped: list[SkippedFile] = field(default_factory=list)


def open_folder(root: str, labels_from_folders: bool, root_help: RootHelp = CLI_HELP) -> FolderLayout:
    fs, fs_root = storage.resolve(root)
    import pyarrow.fs as pafs

    if fs.get_file_info(fs_root).type != pafs.FileType.Directory:
        raise DataError(f"image folder {root} does not exist; {root_help.path} to an existing folder")
    infos = fs.get_file_info(pafs.FileSelector(fs_root, recursive=False))
    top = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory and not _hidden(i.base_name))
    loose = sorted(i.base_name for i in infos if i.type == pafs.FileType.File and _is_image(i.base_name))
    if labels_from_folders and top and loose:
        raise DataError(f"{len(loose)} image(s) sit directly in {root} (e.g. {loose[0]}) while labels come from "
                        f"its sub-folders; move them into a class folder or disable folder labels "
                        f"(--no-folder-labels)")
    shown = root.rstrip("/") if storage.is_uri(root) else fs_root  # local: absolute, as the manifest records
    return FolderLayout(shown, fs_root.rstrip("/"), top if labels_from_folders and top else None)


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _is_image(name: str) -> bool:
    return not _hidden(name) and os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS


def validate_batch(batch: pa.Table, fs_root: str, class_names: list[str] | None,
                   classes: list[int] | None) -> pa.Table:
    """The map step: relative path, label, decoded shape or the reason it failed, for every image file of a
    batch of `read_binary_files` rows. Files under hidden folders and other extensions are dropped, as the
    one-process folder source does; with `classes`, files of other classes are dropped before decoding."""
    label_of = {name: i for i, name in enumerate(class_names or [])}
    wanted = None if classes is None else set(classes)
    out = {name: [] for name in STAGING_SCHEMA.names}
    prefix = fs_root + "/"
    for data, path in zip(batch.column("bytes").to_pylist(), batch.column("path").to_pylist()):
        rel = path[len(prefix):] if path.startswith(prefix) else path
        parts = rel.split("/")
        if any(_hidden(p) for p in parts) or not _is_image(parts[-1]):
            continue
        label = label_of.get(parts[0]) if class_names is not None else None
        if class_names is not None and (label is None or len(parts) < 2):
            continue
        if wanted is not None and label not in wanted:
            continue
        image, h, w, c, error = checked_image(data)
        for name, value in zip(STAGING_SCHEMA.names, (rel, image, label, h, w, c, error)):
            out[name].append(value)
    return pa.table(out, schema=STAGING_SCHEMA)


def summarize_part(location: str) -> PartSummary:
    """Pass 2a, in a Ray task: count one staging part from its small columns (the images are not read)."""
    table = pq.read_table(storage.open_input_file(location), columns=["path", "error"]).sort_by("path")
    bad = table.filter(pc.is_valid(table.column("error")))
    skipped = [SkippedFile(p, r) for p, r in zip(bad.column("path").to_pylist(), bad.column("error").to_pylist())]
    first = table.column("path")[0].as_py() if table.num_rows else ""
    return PartSummary(location, first, table.num_rows - bad.num_rows, skipped)


@dataclass
class WrittenShard:
    """What pass 2b returns per shard: its manifest entry and what the manifest sums over shards."""

    info: ShardInfo
    label_counts: dict[int, int]
    sizes: list[tuple[int, int]]   # distinct (H, W), at most two kept
    any_color: bool


def write_part(location: str, index: int, row_start: int, keep: int, out: str,
               has_labels: bool) -> WrittenShard | None:
    """Pass 2b, in a Ray task: the first `keep` good images of a staging part (in path order) as shard `index`
    with rows `row_start ...`, written in the output directory or uploaded to it; the staging part is then
    deleted."""
    from raydc.data.prepare import write_shard

    table = pq.read_table(storage.open_input_file(location)).sort_by("path")
    table = table.filter(pc.is_null(table.column("error"))).slice(0, keep)
    if table.num_rows == 0:
        return None
    rows = np.arange(row_start, row_start + table.num_rows, dtype=np.int64)
    sizes = {(int(h), int(w)) for h, w in zip(table.column("h").to_numpy(), table.column("w").to_numpy())}
    channels = 3 if pc.max(table.column("c")).as_py() == 3 else 1
    shape = [*next(iter(sizes)), channels] if len(sizes) == 1 else None
    images = table.column("image").combine_chunks()
    paths = table.column("path").combine_chunks()
    labels = table.column("label").to_numpy().astype(np.int64) if has_labels else None
    name = SHARD_PATTERN.format(index)
    if storage.is_uri(out):
        stage = Path(tempfile.mkdtemp(prefix="raydc-shard-"))
        try:
            info = write_shard(stage, name, rows, rows, images, labels, encoding="encoded", shape=shape,
                               channels=channels, image_bytes=images.nbytes, remote=out, paths=paths)
        finally:
            shutil.rmtree(stage, ignore_errors=True)
    else:
        info = write_shard(Path(out), name, rows, rows, images, labels, encoding="encoded", shape=shape,
                           channels=channels, image_bytes=images.nbytes, paths=paths)
    _delete(location)
    counts = {} if labels is None else {int(k): int(v) for k, v in zip(*np.unique(labels, return_counts=True))}
    return WrittenShard(info, counts, sorted(sizes)[:2], channels == 3)


def _delete(location: str) -> None:
    fs, path = storage.resolve(location)
    try:
        fs.delete_file(path)
    except (OSError, FileNotFoundError):
        pass


def prepare_distributed(root: str, out: str, *, classes: Sequence[int] | None = None, limit: int | None = None,
                        rows_per_shard: int = 10_000, overwrite: bool = False, strict: bool = False,
                        labels_from_folders: bool = True, progress: bool = True,
                        root_help: RootHelp = CLI_HELP, layout=None) -> Manifest:
    """Write the image folder `root` as shards under `out` (either may be a URI) on the Ray cluster this
    process is connected to, and return the manifest; the same result, rules and errors as
    `raydc.data.prepare.prepare(source="folder", ...)`. `layout`: an opened
    `raydc.data.sample_sources.SampleLayout` to read instead of a folder (`prepare_samples`)."""
    import ray

    from raydc.data.prepare import _claim_out_dir, _claim_remote_dir, _remove_empty_dirs, check_cut
    from raydc.data.manifest import write_manifest

    classes = check_cut(rows_per_shard, limit, classes)
    layout = layout or open_folder(str(root), labels_from_folders, root_help)
    if classes is not None and not layout.has_labels:
        raise DataError(f"source '{layout.name}' at {layout.root} has no labels, so it cannot be filtered by classes; "
                        f"drop --classes (data.classes)")
    remote = str(out).rstrip("/") if storage.is_uri(str(out)) else None
    created = None
    if remote is not None:
        _claim_remote_dir(remote, overwrite)
        out_loc = remote
    else:
        out_dir = Path(out).expanduser().resolve()
        created = _claim_out_dir(out_dir, overwrite)
        out_loc = str(out_dir)
    staging = storage.join(out_loc, f"{STAGING_PREFIX}{uuid.uuid4().hex[:12]}")
    written: list[str] = []
    try:
        parts = _stage(layout, staging, classes, rows_per_shard, progress)
        summaries = sorted(ray.get([ray.remote(num_cpus=0.25)(summarize_part).remote(p) for p in parts]),
                           key=lambda s: s.first_path)
        skipped = [f for s in summaries for f in s.skipped]
        if strict and skipped:
            first = min(skipped, key=lambda f: f.path)
            raise DataError(f"corrupt image {storage.join(layout.root, first.path)}: {first.reason}. Remove or "
                            f"replace it, or run without --strict to skip corrupt files")
        plan, start = [], 0
        for s in summaries:
            keep = s.good if limit is None else max(0, min(s.good, limit - start))
            if keep:
                plan.append((s, start, keep))
                start += keep
        if start == 0:
            raise DataError(f"no images to write from {layout.name} at {layout.root}"
                            + (f" with classes {classes}" if classes is not None else "")
                            + (f" ({len(skipped)} unreadable files skipped)" if skipped else ""))
        written = [storage.join(out_loc, SHARD_PATTERN.format(i)) for i in range(len(plan))]
        task = ray.remote(num_cpus=0.5)(write_part)
        done = [w for w in ray.get([task.remote(s.location, i, row_start, keep, out_loc, layout.has_labels)
                                    for i, (s, row_start, keep) in enumerate(plan)]) if w is not None]
        shards = [w.info for w in done]
        label_counts: Counter[int] = Counter()
        for w in done:
            label_counts.update(w.label_counts)
        sizes = {hw for w in done for hw in w.sizes}
        any_color = any(w.any_color for w in done)
        channels = 3 if any_color else 1
        manifest = Manifest(
            name=layout.name, source=layout.root, count=start, encoding="encoded",
            image_shape=[*next(iter(sizes)), channels] if len(sizes) == 1 else None,
            mode=mode_for_channels(channels), has_labels=layout.has_labels, class_names=layout.class_names,
            label_counts=dict(sorted(label_counts.items())) if layout.has_labels else None, shards=shards,
            skipped=skipped, created_by=f"raydc {raydc.__version__}", format_version=FORMAT_VERSION,
            split=None, classes=classes, limit=limit, has_paths=True)
        if remote is None:
            write_manifest(manifest, out_loc)
        else:
            stage = Path(tempfile.mkdtemp(prefix="raydc-manifest-"))
            try:
                storage.write_bytes_atomic(storage.join(remote, MANIFEST_NAME),
                                           write_manifest(manifest, stage).read_bytes())
            finally:
                shutil.rmtree(stage, ignore_errors=True)
    except BaseException:
        for loc in written:
            _delete(loc)
        if remote is None and created is not None:
            shutil.rmtree(storage.resolve(staging)[1], ignore_errors=True)  # before the now-empty dirs go
            _remove_empty_dirs(Path(out_loc), created)
        raise
    finally:
        try:
            storage.delete_dir(staging)
        except Exception:  # noqa: BLE001 - best effort: a leftover staging folder is never read as shards
            pass
    return manifest


def prepare_samples(kind: str, root: str, out: str, *, image_column: str | None = None,
                    key_column: str | None = None, **kwargs) -> Manifest:
    """WebDataset tars or Parquet tables of image bytes (`raydc.data.sample_sources`) as shards, by the same
    two passes as a folder; `kwargs` as for `prepare_distributed` (no classes: samples carry no labels)."""
    from raydc.data.sample_sources import open_samples

    return prepare_distributed(root, out, layout=open_samples(kind, str(root), image_column, key_column), **kwargs)


def _stage(layout, staging: str, classes: list[int] | None, rows_per_shard: int,
           progress: bool) -> list[str]:
    """Pass 1 (Ray Data): list, read, validate, write staging parts; returns the parts' locations."""
    import ray
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = progress
    if layout.name != "folder":
        from raydc.data.sample_sources import validate_samples

        ds = layout.dataset().map_batches(validate_samples, batch_format="numpy", batch_size=256, fn_kwargs=dict(
            image_columns=layout.image_columns, key_column=layout.key_column))
        return _write_staging(ds, staging, rows_per_shard)
    fs, _ = storage.resolve(layout.root)
    extensions = sorted({e.lstrip(".") for e in IMAGE_EXTENSIONS} | {e.lstrip(".").upper() for e in IMAGE_EXTENSIONS})
    ds = ray.data.read_binary_files(layout.fs_root, filesystem=fs, include_paths=True, file_extensions=extensions)
    ds = ds.map_batches(validate_batch, batch_format="pyarrow", batch_size=256, zero_copy_batch=True,
                        fn_kwargs=dict(fs_root=layout.fs_root, class_names=layout.class_names, classes=classes))
    return _write_staging(ds, staging, rows_per_shard)


def _write_staging(ds, staging: str, rows_per_shard: int) -> list[str]:
    out_fs, staging_path = storage.resolve(staging)
    storage.makedirs(staging)
    ds.write_parquet(staging_path, filesystem=out_fs, min_rows_per_file=rows_per_shard,
                     max_rows_per_file=rows_per_shard, compression="zstd")
    return storage.list_files(staging, ".parquet")
