"""The `raydc prepare` subcommand: arguments and the run function; `raydc/cli.py` wires it in.

Errors are raised as `UserError`/`DataError` for the top-level CLI to print without a traceback.
"""
from __future__ import annotations

import argparse
import time

from raydc.data.manifest import Manifest, verify_shards
from raydc.data.prepare import prepare
from raydc.data.sample_sources import SAMPLE_SOURCES
from raydc.data.sources import SOURCE_NAMES
from raydc.errors import UserError


def _classes(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integer labels like 0,1,2; got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one label, like 0,1,2")
    return values


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True, choices=SOURCE_NAMES + SAMPLE_SOURCES,
                        help="torchvision dataset name, 'folder' (an image folder), 'npz' (images/labels arrays), "
                             "or with --distributed 'webdataset' (tar shards) or 'parquet' (tables of image bytes)")
    parser.add_argument("--root", default=None,
                        help="data root for torchvision datasets (default $RAYDC_DATA_ROOT), the image folder for "
                             "'folder', the .npz file for 'npz', or the folder, prefix or file of the tar shards or "
                             "Parquet tables for 'webdataset'/'parquet'")
    parser.add_argument("--out", required=True, help="shard directory to create (Parquet shards + manifest.json)")
    parser.add_argument("--split", default="all", choices=("train", "test", "all", "unlabeled"),
                        help="torchvision split; 'all' is train then test ('unlabeled': stl10 only)")
    parser.add_argument("--classes", type=_classes, default=None, metavar="0,1,2",
                        help="keep only these labels")
    parser.add_argument("--limit", type=_positive_int, default=None, metavar="N",
                        help="keep only the first N images (after --classes)")
    parser.add_argument("--rows-per-shard", type=_positive_int, default=10_000, metavar="N")
    parser.add_argument("--overwrite", action="store_true", help="replace the shards and manifest already in --out")
    parser.add_argument("--strict", action="store_true",
                        help="fail on the first unreadable image instead of skipping and listing it")
    parser.add_argument("--download", action="store_true", help="let torchvision download a missing dataset")
    parser.add_argument("--no-folder-labels", dest="labels_from_folders", action="store_false",
                        help="'folder': do not derive labels from the top-level sub-folder names")
    parser.add_argument("--distributed", action="store_true",
                        help="'folder': read, validate and write in parallel as a Ray Data job on the Ray cluster "
                             "(RAY_ADDRESS or --ray-address; a local Ray otherwise); --root may be a URI")
    parser.add_argument("--image-column", default=None, metavar="NAME",
                        help="webdataset/parquet: the member or column holding the image (default: the first of "
                             "jpg, jpeg, png, webp, ...)")
    parser.add_argument("--key-column", default=None, metavar="NAME",
                        help="parquet: the column naming each image, kept as its path (default: key, else url)")
    parser.add_argument("--ray-address", default=None, metavar="ADDR",
                        help="with --distributed: the Ray cluster to run on (default: RAY_ADDRESS, else local)")
    parser.add_argument("--verify", action="store_true", help="re-read every shard and check its sha256 after writing")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="hide the progress bar")


def run_prepare(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    if getattr(args, "distributed", False):
        manifest = _prepare_distributed(args)
    elif args.source in SAMPLE_SOURCES:
        raise UserError(f"--source {args.source} is read by Ray Data across the cluster: add --distributed")
    else:
        manifest = prepare(args.source, args.out, root=args.root, split=args.split, classes=args.classes,
                           limit=args.limit, rows_per_shard=args.rows_per_shard, overwrite=args.overwrite,
                           strict=args.strict, download=args.download, labels_from_folders=args.labels_from_folders,
                           progress=args.progress)
    seconds = time.perf_counter() - t0
    if getattr(args, "verify", False):
        verify_shards(manifest, args.out)
    print(summary_line(manifest, seconds, args.out))
    if manifest.label_counts:
        print(label_line(manifest))
    for skipped in manifest.skipped[:10]:
        print(f"  skipped {skipped.path}: {skipped.reason}")
    if len(manifest.skipped) > 10:
        print(f"  ... and {len(manifest.skipped) - 10} more (listed in manifest.json)")
    return 0


def _prepare_distributed(args: argparse.Namespace) -> Manifest:
    if args.source in SAMPLE_SOURCES:
        return _prepare_samples(args)
    if args.source != "folder":
        raise UserError(f"--distributed prepares image folders (--source folder); {args.source!r} is read by one "
                        f"process: drop --distributed")
    if args.root is None:
        raise UserError("source 'folder' needs the image folder: pass --root PATH (or a URI) to it")
    if args.download:
        raise UserError("--download applies to torchvision datasets, not to --source folder --distributed")
    from raydc.config import RayConfig
    from raydc.data.ray_prepare import prepare_distributed
    from raydc.engine.runtime import init_ray

    init_ray(RayConfig(address=args.ray_address), train_cpus=0.0, include_dashboard=False)
    return prepare_distributed(args.root, args.out, classes=args.classes, limit=args.limit,
                               rows_per_shard=args.rows_per_shard, overwrite=args.overwrite, strict=args.strict,
                               labels_from_folders=args.labels_from_folders, progress=args.progress)


def _prepare_samples(args: argparse.Namespace) -> Manifest:
    if args.root is None:
        raise UserError(f"source {args.source!r} needs --root: the folder, prefix or file of its "
                        f"{'tar shards' if args.source == 'webdataset' else 'Parquet tables'}")
    if args.classes is not None:
        raise UserError(f"--classes filters by folder labels; {args.source} samples carry none: drop --classes")
    from raydc.config import RayConfig
    from raydc.data.ray_prepare import prepare_samples
    from raydc.engine.runtime import init_ray

    init_ray(RayConfig(address=args.ray_address), train_cpus=0.0, include_dashboard=False)
    return prepare_samples(args.source, args.root, args.out, image_column=args.image_column,
                           key_column=args.key_column, limit=args.limit, rows_per_shard=args.rows_per_shard,
                           overwrite=args.overwrite, strict=args.strict, progress=args.progress)


def summary_line(manifest: Manifest, seconds: float, out: str) -> str:
    rate = manifest.count / seconds if seconds > 0 else float("inf")
    return (f"prepared {manifest.count:,} images into {len(manifest.shards)} shard(s) in {out}: "
            f"{len(manifest.skipped)} skipped, {seconds:.1f} s, {rate:,.0f} images/s")


def label_line(manifest: Manifest) -> str:
    names = manifest.class_names or []
    parts = []
    for label, n in sorted((manifest.label_counts or {}).items()):
        name = names[label] if 0 <= label < len(names) else None
        parts.append(f"{label}{f' ({name})' if name and name != str(label) else ''}: {n:,}")
    return "labels: " + ", ".join(parts)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry (`python -m raydc.data.commands ...`) with the same error handling as `raydc prepare`."""
    import sys

    parser = argparse.ArgumentParser(prog="raydc prepare", description="Convert images to raydc Parquet shards")
    add_prepare_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run_prepare(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
