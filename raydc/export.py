"""`raydc export`: a finished run's clustering as the user's own files, not row numbers.

`--format parquet|csv` writes one table (path, id, cluster, distance, cluster_size); `--format folders` makes
one folder per cluster holding a symbolic link (or, with `--copy`, a copy) to each source file, laid out as
the source tree is, so two files with the same name in different folders stay two entries.

Both read the assignment parts one row group at a time, twice: the first pass counts the clusters (k
integers), the second writes. Whatever N is, this process holds one row group and the k counts.

Nothing half-written is left at `--out`: a table is streamed to a hidden sibling and renamed into place (an
object store: copied, which is atomic), and folders are built in a hidden sibling directory renamed at the
end. Wrong input (an unfinished run, an `--out` that exists, folders from shards without paths or from a
source that is not a local folder) is a `UserError`: one line, exit 2, before anything is written.
"""
from __future__ import annotations

import argparse
import os
import shutil
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa

from raydc.errors import UserError

FORMATS = ("parquet", "csv", "folders")
COLUMNS = ("path", "id", "cluster", "distance", "cluster_size")
NO_PATHS = ("note: this run's assignments carry no source paths (its shards come from an array source, or were "
            "prepared by a raydc that did not keep them; re-run `raydc prepare` and train again to get them): "
            "`path` is empty")


@dataclass
class ExportSummary:
    out: str
    images: int
    clusters: int          # non-empty clusters
    skipped_at_prepare: int | None  # unreadable source files the prepare left out (None: manifest not found)
    has_paths: bool


def add_export_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", required=True, help="a finished run directory")
    p.add_argument("--out", required=True,
                   help="the file (parquet, csv) or folder (folders) to create; it must not exist")
    p.add_argument("--format", default="parquet", choices=FORMATS,
                   help="a table of path, id, cluster, distance, cluster_size; or one folder per cluster")
    p.add_argument("--copy", action="store_true", help="folders: copy the files instead of linking to them")


def run_export(args: argparse.Namespace, log: Callable[[str], None] = print) -> int:
    s = export_run(args.run, args.out, fmt=args.format, copy=args.copy, log=log)
    skipped = "" if s.skipped_at_prepare is None else (
        f"; {s.skipped_at_prepare} unreadable source file(s) were left out at prepare (listed in manifest.json)")
    log(f"exported {s.images:,} images in {s.clusters:,} clusters to {s.out}{skipped}")
    return 0


def export_run(run_dir: str, out: str, *, fmt: str = "parquet", copy: bool = False,
               log: Callable[[str], None] = print) -> ExportSummary:
    from raydc import storage
    from raydc.engine.evaluate import open_run
    from raydc.engine.rundir import CLUSTERING_FILE

    if fmt not in FORMATS:
        raise UserError(f"unknown --format {fmt!r}; use one of {', '.join(FORMATS)}")
    if copy and fmt != "folders":
        raise UserError("--copy applies to --format folders")
    if fmt == "folders" and storage.is_uri(out):
        raise UserError(f"--format folders makes links on a local disk; --out {out} is a URI: give a local "
                        f"folder, or export --format parquet|csv there")
    run, cfg = open_run(run_dir)
    parts = run.assignment_parts()
    if not parts or not storage.is_file(run.clustering_path):
        raise UserError(f"{run.location} has not finished (no {CLUSTERING_FILE} or no assignments/ parts): "
                        f"finish it with `raydc train --resume` first")
    out = out if storage.is_uri(out) else str(Path(out).expanduser().resolve())
    if storage.exists(out):
        raise UserError(f"--out {out} already exists; choose a new name or remove it")
    manifest = _manifest(cfg.data.shards)
    has_paths = _parts_have_paths(parts)
    if fmt == "folders":
        root = _local_source_root(manifest, has_paths, cfg.data.shards)
    elif not has_paths:
        log(NO_PATHS)
    sizes = _cluster_sizes(run)
    if fmt == "folders":
        n = _write_folders(run, Path(out), root, copy)
    else:
        n = _write_table(run, out, fmt, sizes)
    return ExportSummary(out, n, int((sizes > 0).sum()), len(manifest.skipped) if manifest else None, has_paths)


def _manifest(shards: str):
    from raydc.data.manifest import load_manifest
    from raydc.errors import DataError

    try:
        return load_manifest(shards)
    except DataError:  # the shards moved since training: paths still come from the parts
        return None


def _parts_have_paths(parts: list[str]) -> bool:
    """Whether the parts hold any path: a part of a run before paths has no `path` column, one of an array
    source has it all null. One footer, and one column of one part, read."""
    import pyarrow.parquet as pq

    from raydc import storage

    with storage.open_input_file(parts[0]) as f:
        pf = pq.ParquetFile(f)
        if "path" not in pf.schema_arrow.names:
            return False
        return pf.read_row_group(0, columns=["path"]).column("path").null_count < pf.metadata.row_group(0).num_rows


def _local_source_root(manifest, has_paths: bool, shards: str) -> Path:
    from raydc import storage

    if not has_paths:
        raise UserError("--format folders needs each image's source path, and this run's assignments have none "
                        "(an array source, or shards prepared by an older raydc): re-run `raydc prepare --source "
                        "folder` and train again, or export --format parquet|csv")
    if manifest is None:
        raise UserError(f"--format folders needs the shards' manifest to find the source folder, and {shards} "
                        f"has none now; export --format parquet|csv instead")
    if storage.is_uri(manifest.source) or not Path(manifest.source).is_dir():
        where = "is on object storage" if storage.is_uri(manifest.source) else "does not exist here"
        raise UserError(f"--format folders links to local files, and the source folder {manifest.source} {where}; "
                        f"export --format parquet|csv instead and fetch the files by their paths")
    return Path(manifest.source)


def _cluster_sizes(run) -> np.ndarray:
    sizes = np.zeros(0, np.int64)
    for b in run.assignment_batches(columns=["cluster"]):
        c = np.asarray(b["cluster"], np.int64)
        if c.size:
            counts = np.bincount(c, minlength=len(sizes))
            if len(counts) > len(sizes):
                sizes = np.concatenate([sizes, np.zeros(len(counts) - len(sizes), np.int64)])
            sizes += counts
    return sizes


def _batches(run, sizes: np.ndarray) -> Iterator[pa.RecordBatch]:
    """The parts' rows, one row group at a time, as the export's columns."""
    import pyarrow.parquet as pq

    from raydc import storage
    from raydc.engine.rundir import PART_ROW_GROUP

    schema = export_schema()
    for part in run.assignment_parts():
        with storage.open_input_file(part) as f:
            pf = pq.ParquetFile(f)
            cols = [c for c in ("path", "id", "cluster", "distance") if c in pf.schema_arrow.names]
            for b in pf.iter_batches(batch_size=PART_ROW_GROUP, columns=cols):
                cluster = b.column("cluster").to_numpy().astype(np.int64)
                path = b.column("path") if "path" in cols else pa.nulls(b.num_rows, pa.string())
                yield pa.record_batch([path.cast(pa.string()), b.column("id"), pa.array(cluster),
                                       b.column("distance").cast(pa.float32()), pa.array(sizes[cluster])],
                                      schema=schema)


def export_schema() -> pa.Schema:
    return pa.schema([("path", pa.string()), ("id", pa.int64()), ("cluster", pa.int64()),
                      ("distance", pa.float32()), ("cluster_size", pa.int64())])


def _write_table(run, out: str, fmt: str, sizes: np.ndarray) -> int:
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    from raydc import storage

    n = 0
    with storage.open_output_stream(out) as sink:
        writer = (pq.ParquetWriter(sink, export_schema(), compression="zstd") if fmt == "parquet"
                  else pcsv.CSVWriter(sink, export_schema()))
        try:
            for b in _batches(run, sizes):
                if fmt == "csv":
                    writer.write_batch(b)
                else:
                    writer.write_batch(b, row_group_size=b.num_rows)
                n += b.num_rows
        finally:
            writer.close()
    return n


def _write_folders(run, out: Path, root: Path, copy: bool) -> int:
    """cluster-NNNNN/<the file's path under the source root>, built in a hidden sibling and renamed."""
    import pyarrow.parquet as pq

    from raydc import storage

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()
    n = 0
    width = 5
    try:
        for part in run.assignment_parts():
            with storage.open_input_file(part) as f:
                for b in pq.ParquetFile(f).iter_batches(columns=["path", "cluster"]):
                    for rel, c in zip(b.column("path").to_pylist(), b.column("cluster").to_pylist()):
                        if rel is None:
                            raise UserError(f"{part} has a row without a source path; export --format "
                                            f"parquet|csv instead")
                        if Path(rel).is_absolute() or ".." in Path(rel).parts:
                            raise UserError(f"source path {rel!r} in {part} points outside {root}")
                        src = root / rel
                        dest = tmp / f"cluster-{c:0{width}d}" / rel
                        dest.parent.mkdir(parents=True, exist_ok=True)
                        if copy:
                            shutil.copy2(src, dest)
                        else:
                            os.symlink(src, dest)
                        n += 1
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return n
