"""The manifest: the one file that says a shard directory is complete and what its rows mean.

Readers trust the manifest, not a directory listing: a shard that is not listed (a stray file, a leftover
from an interrupted run) is never read, and a listed shard carries its row count and sha256 so damage is
detected rather than trained on. That only holds if the manifest is written last and atomically, which is
why `write_manifest` goes through a temporary file, fsync and `os.replace`.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raydc.errors import DataError

MANIFEST_NAME = "manifest.json"
FORMAT_VERSION = 2  # 2: shards carry the dense `row` index (see raydc.data.prepare)
SHARD_PATTERN = "shard-{:05d}.parquet"
ENCODINGS = ("raw", "encoded")


@dataclass
class ShardInfo:
    file: str          # name relative to the shard directory, so the directory can be moved or copied
    rows: int
    sha256: str
    id_min: int
    id_max: int
    row_start: int = 0  # the shard's rows are row_start .. row_start + rows - 1


@dataclass
class SkippedFile:
    path: str          # relative to the source folder
    reason: str


@dataclass
class Manifest:
    name: str                                  # the source name: mnist, folder, npz, ...
    source: str                                # where the images came from (resolved path)
    count: int
    encoding: str                              # "raw" (uint8 HWC bytes) or "encoded" (original file bytes)
    image_shape: list[int] | None              # [H, W, C]; None when the images have mixed sizes
    mode: str                                  # "L" or "RGB": what decoding converts to by default
    has_labels: bool
    class_names: list[str] | None = None
    label_counts: dict[int, int] | None = None
    shards: list[ShardInfo] = field(default_factory=list)
    skipped: list[SkippedFile] = field(default_factory=list)
    created_by: str = ""
    format_version: int = FORMAT_VERSION
    # How the source was cut, so a run can tell whether existing shards match its data config.
    split: str | None = None
    classes: list[int] | None = None
    limit: int | None = None
    # Whether the shards carry a `path` column (each image's file relative to `source`). False for array
    # sources, and for folder shards written before raydc kept paths: those still load, their outputs lack paths.
    has_paths: bool = False

    def shard_paths(self, shard_dir: str | os.PathLike) -> list[str]:
        """Each shard's location: a path, or a URI when the shards live on object storage."""
        from raydc.storage import is_uri, join

        if is_uri(str(shard_dir)):
            return [join(str(shard_dir), s.file) for s in self.shards]
        base = Path(shard_dir)
        return [str(base / s.file) for s in self.shards]

    def header(self) -> "Manifest":
        """This manifest without its per-file lists (shards, skipped files): what decoding needs, and what is
        shipped to every actor. The lists grow with the dataset (100k shards are ~15 MB of JSON) while
        decoding only reads the encoding, shape, mode and labels."""
        from dataclasses import replace

        return replace(self, shards=[], skipped=[])

    @property
    def channels(self) -> int:
        return 1 if self.mode == "L" else 3

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        if self.label_counts is not None:  # JSON keys are strings; keep them in label order
            d["label_counts"] = {str(k): v for k, v in sorted(self.label_counts.items())}
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Manifest":
        d = dict(d)
        d["shards"] = [ShardInfo(**s) for s in d.get("shards", [])]
        d["skipped"] = [SkippedFile(**s) for s in d.get("skipped", [])]
        if d.get("label_counts") is not None:
            d["label_counts"] = {int(k): int(v) for k, v in d["label_counts"].items()}
        return cls(**d)


def manifest_path(shard_dir: str | os.PathLike) -> Path:
    return Path(shard_dir) / MANIFEST_NAME


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: str | os.PathLike) -> None:
    """Make a rename durable: the directory entry must reach the disk too (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(manifest: Manifest, shard_dir: str | os.PathLike) -> Path:
    final = manifest_path(shard_dir)
    tmp = final.with_name(final.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(manifest.to_dict(), f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    fsync_dir(shard_dir)
    return final


def load_manifest(shard_dir: str | os.PathLike) -> Manifest:
    from raydc.storage import is_uri

    if is_uri(str(shard_dir)):
        return _load_manifest_uri(str(shard_dir))
    path = manifest_path(shard_dir)
    if not path.is_file():
        raise DataError(
            f"no {MANIFEST_NAME} in {Path(shard_dir).resolve()}: this is not a prepared shard directory "
            f"(or its prepare was interrupted). Create it with "
            f"`raydc prepare --source NAME --root DIR --out {shard_dir}` (add --overwrite to replace leftovers)")
    return _parse_manifest(path.read_text(encoding="utf-8"), str(path), shard_dir)


def _load_manifest_uri(shard_dir: str) -> Manifest:
    """The manifest of shards on object storage (s3://, gs://, file://): read through raydc.storage, whose errors
    name the URI and what to set (credentials, endpoint, a missing bucket)."""
    from raydc.storage import NotFound, join, read_text

    uri = join(shard_dir, MANIFEST_NAME)
    try:
        text = read_text(uri)
    except NotFound:
        raise DataError(f"no {MANIFEST_NAME} at {uri}: this is not a prepared shard directory (or its prepare "
                        f"was interrupted); prepare the shards and copy them there") from None
    return _parse_manifest(text, uri, shard_dir)


def _parse_manifest(text: str, path: str, shard_dir) -> Manifest:
    try:
        raw = json.loads(text)
        manifest = Manifest.from_dict(raw)
    except (ValueError, TypeError, KeyError) as e:
        raise DataError(f"{path} is not a valid raydc manifest ({e}); re-create the shards with "
                        f"`raydc prepare ... --out {shard_dir} --overwrite`") from None
    if manifest.format_version > FORMAT_VERSION:
        raise DataError(f"{path} has format_version {manifest.format_version}, newer than this raydc "
                        f"understands ({FORMAT_VERSION}); upgrade raydc or re-run `raydc prepare`")
    if manifest.format_version < FORMAT_VERSION:
        raise DataError(f"{path} was written by an older raydc (format_version {manifest.format_version}): its "
                        f"shards have no row index, which runs now key every per-image array by; re-create them "
                        f"with `raydc prepare ... --out {shard_dir} --overwrite`")
    if manifest.encoding not in ENCODINGS:
        raise DataError(f"{path}: unknown encoding {manifest.encoding!r}, expected one of {ENCODINGS}")
    return manifest


def verify_shards(manifest: Manifest, shard_dir: str | os.PathLike) -> None:
    """Check every listed shard exists and matches its sha256: reads all bytes, so use it for audits and tests."""
    from raydc import storage

    for shard in manifest.shards:
        path = storage.join(str(shard_dir), shard.file)
        if not storage.is_file(path):
            raise DataError(f"shard {path} listed in the manifest is missing; re-create the shards with "
                            f"`raydc prepare ... --overwrite`")
        digest = hashlib.sha256(storage.read_bytes(path)).hexdigest() if storage.is_uri(path) else sha256_file(path)
        if digest != shard.sha256:
            raise DataError(f"shard {path} is corrupt: sha256 {digest} does not match the manifest's "
                            f"{shard.sha256}; re-create the shards with `raydc prepare ... --overwrite`")
