"""Collections already kept as samples: WebDataset tar shards and Parquet tables of image bytes (what
img2dataset writes: `00000.tar` with `.jpg`/`.json` members, or Parquet with a `jpg` column and `key`/`url`).

At 10^8 images these cannot go through one process, so `raydc prepare --source webdataset|parquet
--distributed` reads them with Ray Data (`read_webdataset` without decoding, `read_parquet` of two columns)
and hands each batch to `validate_samples`, which produces the same staging rows as the folder prepare's
`validate_batch`: the rest (counting, numbering rows, writing shards, the manifest) is
`raydc.data.ray_prepare`'s. Each sample's key (or URL) becomes its `path`; a sample without an image, or
whose image does not decode, is skipped and listed with the reason, as a corrupt file in a folder is.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from raydc import storage
from raydc.data.sources import checked_image
from raydc.errors import DataError

SAMPLE_SOURCES = ("webdataset", "parquet")
# The members or columns an image may sit in, first found wins (img2dataset writes `jpg`).
IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "image")
KEY_COLUMNS = ("key", "url")


@dataclass(frozen=True)
class SampleLayout:
    """Where the samples are and which columns hold each one's image and its key."""

    name: str                      # "webdataset" or "parquet"
    root: str                      # as the user gave it (a path or a URI)
    fs_root: str
    image_columns: tuple[str, ...]
    key_column: str                # "__key__" for WebDataset
    class_names: None = None

    @property
    def has_labels(self) -> bool:
        return False

    def dataset(self):
        """The Ray Dataset of raw samples (undecoded bytes)."""
        import ray

        fs, _ = storage.resolve(self.root)
        if self.name == "webdataset":
            return ray.data.read_webdataset(self.fs_root, filesystem=fs, decoder=None, file_extensions=["tar"])
        from raydc.data.parquet_reader import planned_once

        with planned_once():
            return ray.data.read_parquet(self.fs_root, filesystem=fs,
                                         columns=[*self.image_columns, self.key_column], file_extensions=["parquet"])


def open_samples(kind: str, root: str, image_column: str | None = None, key_column: str | None = None,
                 root_help=None) -> SampleLayout:
    """Check the location (and, for Parquet, the first file's columns) before any work starts."""
    import pyarrow.fs as pafs

    if kind not in SAMPLE_SOURCES:
        raise DataError(f"unknown sample source {kind!r}; expected one of {', '.join(SAMPLE_SOURCES)}")
    fs, fs_root = storage.resolve(root)
    info = fs.get_file_info(fs_root)
    ext = ".tar" if kind == "webdataset" else ".parquet"
    if info.type == pafs.FileType.Directory:
        files = sorted(i.path for i in fs.get_file_info(pafs.FileSelector(fs_root, recursive=True))
                       if i.type == pafs.FileType.File and i.path.endswith(ext)
                       and not os.path.basename(i.path).startswith((".", "_")))
    elif info.type == pafs.FileType.File:
        files = [fs_root]
    else:
        raise DataError(f"{kind} source {root} does not exist; pass --root to a folder (or prefix) of {ext} files")
    if not files:
        raise DataError(f"no {ext} files under {root}; --source {kind} reads "
                        + ("WebDataset tar shards" if kind == "webdataset" else "Parquet tables of image bytes"))
    shown = root.rstrip("/") if storage.is_uri(root) else fs_root
    if kind == "webdataset":
        return SampleLayout(kind, shown, fs_root.rstrip("/"), (image_column,) if image_column else IMAGE_KEYS,
                            "__key__")
    import pyarrow.parquet as pq

    with fs.open_input_file(files[0]) as f:
        names = pq.ParquetFile(f).schema_arrow.names
    images = [image_column] if image_column else [c for c in IMAGE_KEYS if c in names][:1]
    if not images or images[0] not in names:
        want = f"the column {image_column!r}" if image_column else f"an image column ({', '.join(IMAGE_KEYS)})"
        raise DataError(f"{files[0]} has no {want}; its columns are {', '.join(names)}: name the image column "
                        f"with --image-column")
    key = key_column or next((c for c in KEY_COLUMNS if c in names), None)
    if key is None or key not in names:
        raise DataError(f"{files[0]} has no key column ({key_column or ' or '.join(KEY_COLUMNS)}) to identify each "
                        f"image by; its columns are {', '.join(names)}: name one with --key-column")
    return SampleLayout(kind, shown, fs_root.rstrip("/"), tuple(images), key)


def _as_bytes(value) -> bytes | None:
    """A member's bytes, or None where the sample lacks it (None, or the NaN a numpy batch holds there)."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        return bytes(value)
    if isinstance(value, np.ndarray) and value.dtype == np.uint8:
        return value.tobytes()
    return None


def validate_samples(batch: dict[str, np.ndarray], image_columns: tuple[str, ...], key_column: str) -> pa.Table:
    """The map step: key, image bytes and decoded shape, or the reason the sample is unusable."""
    from raydc.data.ray_prepare import STAGING_SCHEMA

    present = [c for c in image_columns if c in batch]
    keys = batch[key_column]
    out = {name: [] for name in STAGING_SCHEMA.names}
    for j in range(len(keys)):
        data = next((v for c in present if (v := _as_bytes(batch[c][j])) is not None), None)
        if data is None:
            others = sorted(k for k in batch if not k.startswith("__") and k != key_column
                            and _as_bytes(batch[k][j]) is not None)
            h = w = c = 0
            image, error = None, (f"no image in the sample (members: {', '.join(others) or 'none'}; "
                                  f"looked for {', '.join(image_columns)})")
        else:
            image, h, w, c, error = checked_image(data)
        for name, value in zip(STAGING_SCHEMA.names, (str(keys[j]), image, None, h, w, c, error)):
            out[name].append(value)
    return pa.table(out, schema=STAGING_SCHEMA)

