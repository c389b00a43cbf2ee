"""Where images come from before they become shards: torchvision datasets, image folders, `.npz` files.

Every source streams `Item`s in a fixed, reproducible order, because row ids are assigned from that order and
ids are what pseudo-labels, checkpoints and assignments are keyed on. Opening a source checks that the data is
there (and says where it looked) before `prepare` touches the output directory, so a typo in `--root` never
costs an existing shard directory.

Array sources yield uint8 HWC arrays (stored as "raw"); the folder source yields the original file bytes
(stored as "encoded") after a full PIL decode has proved the file is readable.
"""
from __future__ import annotations

import io
import os
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from raydc.data.manifest import SkippedFile
from raydc.errors import DataError

TORCHVISION_SOURCES = ("mnist", "fashionmnist", "cifar10", "usps", "stl10")
SOURCE_NAMES = TORCHVISION_SOURCES + ("folder", "npz")
SPLITS = ("train", "test", "all")
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".webp", ".gif"})
# PIL modes with one intensity channel: decoding converts them to "L"; everything else becomes "RGB".
GRAY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})


class RootHelp(NamedTuple):
    """How the caller's user names the data root and the download switch: `raydc prepare` takes flags, while
    `raydc train` prepares from a config and accepts no such flags, so its errors must name config fields."""
    datasets: str      # how to point at a folder of torchvision datasets
    path: str          # how to point at an image folder or an .npz file
    download: str


CLI_HELP = RootHelp(datasets="set RAYDC_DATA_ROOT to your datasets folder or pass --root DIR",
                    path="pass --root PATH", download="--download")
CONFIG_HELP = RootHelp(datasets="set data.root in the config (or RAYDC_DATA_ROOT) to your datasets folder",
                       path="set data.root in the config", download="data.download: true")


def _root_help(h: RootHelp) -> str:
    return f"{h.datasets}, or opt in to downloading with {h.download}"


class Item(NamedTuple):
    image: np.ndarray | bytes          # uint8 HWC array (raw sources) or original file bytes (encoded sources)
    label: int | None
    shape: tuple[int, int, int]        # (H, W, C); C is 1 for gray, 3 for colour
    id: int | None = None              # the source's own id (any int64); None: the image's row number
    path: str | None = None            # the file relative to the source root (folders): how results map back


def mode_for_channels(channels: int) -> str:
    return "L" if channels == 1 else "RGB"


class Source(ABC):
    """A reproducible stream of images; subclasses set the attributes below in their constructor."""

    name: str
    location: str                      # resolved path, for the manifest and for error messages
    encoding: str                      # "raw" or "encoded"
    has_labels: bool
    class_names: list[str] | None
    skipped: list[SkippedFile]

    @abstractmethod
    def items(self, classes: Sequence[int] | None = None) -> Iterator[Item]:
        """Items in id order, keeping only `classes` when given (sources may use it to skip work early)."""

    def size_hint(self, classes: Sequence[int] | None = None) -> int | None:
        """How many items `items(classes)` will yield at most, for a progress bar; None when unknown."""
        return None

    def _check_classes(self, classes: Sequence[int] | None) -> None:
        if classes is not None and not self.has_labels:
            raise DataError(f"source {self.name!r} at {self.location} has no labels, so it cannot be filtered "
                            f"by classes; drop --classes (data.classes)")


class ArrayPart(NamedTuple):
    """One contiguous run of fixed-shape images, e.g. a torchvision split."""

    images: Any                        # indexable (n, H, W[, C]) array/tensor, or a factory of chunk iterators
    labels: np.ndarray | None
    count: int
    ids: np.ndarray | None = None      # (n,) int64 ids of the source's own, or None


class ArraySource(Source):
    """Fixed-shape arrays (in memory, or streamed in chunks from an .npz), stored raw.

    Reading `ds.data`/`ds.targets` directly instead of indexing a torchvision dataset avoids a PIL round trip
    per image, which is most of the cost of going through `__getitem__`.
    """

    def __init__(self, name: str, location: str, parts: Sequence[ArrayPart],
                 class_names: list[str] | None = None, channels_first: bool = False):
        self.name, self.location, self.encoding = name, location, "raw"
        self.parts = list(parts)
        self.has_labels = bool(self.parts) and all(p.labels is not None for p in self.parts)
        self.class_names = class_names
        self.skipped = []
        self.channels_first = channels_first

    def size_hint(self, classes: Sequence[int] | None = None) -> int | None:
        if classes is None or not self.has_labels:
            return sum(p.count for p in self.parts)
        wanted = np.asarray(list(classes), dtype=np.int64)
        return sum(int(np.isin(p.labels, wanted).sum()) for p in self.parts)

    def items(self, classes: Sequence[int] | None = None) -> Iterator[Item]:
        self._check_classes(classes)
        wanted = None if classes is None else np.asarray(sorted(set(classes)), dtype=np.int64)
        for part in self.parts:
            for chunk, chunk_labels, chunk_ids in _chunks(part):
                chunk = as_uint8_hwc(chunk, self.channels_first, self.location)
                keep = range(len(chunk)) if wanted is None else np.flatnonzero(np.isin(chunk_labels, wanted))
                shape = (int(chunk.shape[1]), int(chunk.shape[2]), int(chunk.shape[3]))
                for i in keep:
                    label = None if chunk_labels is None else int(chunk_labels[i])
                    yield Item(chunk[i], label, shape, None if chunk_ids is None else int(chunk_ids[i]))


def _chunks(part: ArrayPart, rows: int = 4096) -> Iterator[tuple[Any, np.ndarray | None, np.ndarray | None]]:
    labels, ids = part.labels, part.ids

    def cut(a, start, stop):
        return None if a is None else a[start:stop]

    if callable(part.images):  # streams: never holds more than one chunk of a large .npz
        start = 0
        for block in part.images():
            n = len(block)
            yield block, cut(labels, start, start + n), cut(ids, start, start + n)
            start += n
        return
    for start in range(0, part.count, rows):
        stop = min(start + rows, part.count)
        yield part.images[start:stop], cut(labels, start, stop), cut(ids, start, stop)


def as_uint8_hwc(images: Any, channels_first: bool, where: str) -> np.ndarray:
    """(n, H, W), (n, H, W, C) or (n, C, H, W) images of any numeric dtype as uint8 (n, H, W, C), C in {1, 3}."""
    a = np.asarray(images.numpy() if hasattr(images, "numpy") else images)
    if a.ndim == 3:
        a = a[..., None]
    elif a.ndim == 4 and channels_first:
        a = a.transpose(0, 2, 3, 1)
    if a.ndim != 4 or a.shape[-1] not in (1, 3):
        raise DataError(f"images in {where} have shape {a.shape}; expected (N, H, W) or channels-last "
                        f"(N, H, W, C) with C = 1 or 3 (transpose CHW arrays with np.transpose(a, (0, 2, 3, 1)))")
    if a.dtype == np.uint8:
        return a
    if np.issubdtype(a.dtype, np.floating):
        if a.size and (np.nanmin(a) < 0 or np.nanmax(a) > 1 or np.isnan(a).any()):
            raise DataError(f"float images in {where} must lie in [0, 1] (they are scaled by 255); "
                            f"got values in [{np.nanmin(a)}, {np.nanmax(a)}]. Store uint8 0..255 instead")
        return np.rint(a * 255.0).astype(np.uint8)
    if np.issubdtype(a.dtype, np.integer) or a.dtype == np.bool_:
        if a.size and (a.min() < 0 or a.max() > 255):
            raise DataError(f"integer images in {where} must lie in 0..255; got {a.min()}..{a.max()}")
        return a.astype(np.uint8)
    raise DataError(f"images in {where} have dtype {a.dtype}; expected uint8 (or floats in [0, 1])")


# --- torchvision -----------------------------------------------------------------------------------------

_TV_CLASSES = {"mnist": "MNIST", "fashionmnist": "FashionMNIST", "cifar10": "CIFAR10", "usps": "USPS",
               "stl10": "STL10"}


def _tv_expected_location(name: str, root: Path) -> Path:
    return {"mnist": root / "MNIST" / "raw", "fashionmnist": root / "FashionMNIST" / "raw",
            "cifar10": root / "cifar-10-batches-py", "usps": root / "usps.bz2 (and usps.t.bz2)",
            "stl10": root / "stl10_binary"}[name]


def torchvision_source(name: str, root: str | os.PathLike | None, split: str = "all",
                       download: bool = False, root_help: RootHelp = CLI_HELP) -> ArraySource:
    import torchvision.datasets as tvd

    fix = _root_help(root_help)

    if root is None:
        raise DataError(f"no data root for source {name!r}: {fix}. The root is the folder that holds "
                        f"{_tv_expected_location(name, Path('<root>')).relative_to('<root>')} in torchvision's layout")
    root_path = Path(root).expanduser().resolve()
    if not root_path.is_dir() and not download:
        raise DataError(f"data root {root_path} does not exist (looked there for {name}); {fix}")
    splits = _tv_splits(name, split)
    cls = getattr(tvd, _TV_CLASSES[name])
    parts, class_names = [], None
    for s in splits:
        kwargs = {"split": s} if name == "stl10" else {"train": s == "train"}
        try:
            ds = cls(str(root_path), download=download, **kwargs)
        except (RuntimeError, OSError) as e:
            raise DataError(f"{name} ({s} split) not found under data root {root_path}: looked in "
                            f"{_tv_expected_location(name, root_path)} ({e}); {fix}") from None
        labels = getattr(ds, "targets", None)
        if labels is None:
            labels = getattr(ds, "labels", None)
        labels = None if labels is None else np.asarray(labels, dtype=np.int64)
        if labels is not None and labels.size and labels.min() < 0:  # STL10's unlabeled split uses -1
            labels = None
        parts.append(ArrayPart(ds.data, labels, len(ds.data)))
        class_names = class_names or (list(ds.classes) if getattr(ds, "classes", None) else None)
    return ArraySource(name, str(root_path), parts, class_names=class_names, channels_first=(name == "stl10"))


def _tv_splits(name: str, split: str) -> list[str]:
    if split == "all":
        return ["train", "test"]
    if split in ("train", "test") or (split == "unlabeled" and name == "stl10"):
        return [split]
    extra = " or 'unlabeled'" if name == "stl10" else ""
    raise DataError(f"unknown split {split!r} for {name}; use 'train', 'test' or 'all'{extra}")


# --- npz -------------------------------------------------------------------------------------------------

def npz_source(path: str | os.PathLike | None, root_help: RootHelp = CLI_HELP) -> ArraySource:
    """An `.npz` with `images`, optional `labels` and optional `ids` (int64, unique: the ids the assignments are
    reported under; default the row number); uncompressed or compressed, `images` is streamed in chunks."""
    if path is None:
        raise DataError(f"source 'npz' needs the .npz file: {root_help.path} to it")
    p = Path(path).expanduser().resolve()
    if not p.is_file():
        raise DataError(f"npz file {p} does not exist; {root_help.path} to an existing .npz file")
    try:
        with zipfile.ZipFile(p) as zf:
            members = set(zf.namelist())
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{p} is not a readable .npz file ({e})") from None
    if "images.npy" not in members:
        raise DataError(f"{p} has no 'images' array (found: {sorted(m[:-4] for m in members)}); "
                        f"save it with np.savez(path, images=..., labels=...)")
    labels = None
    if "labels.npy" in members:
        with np.load(p) as z:
            labels = np.asarray(z["labels"]).astype(np.int64).reshape(-1)
    header = _npy_header(p, "images.npy")
    if header is None:  # fortran order, object dtype or unknown header: fall back to a full load
        with np.load(p) as z:
            images: Any = np.asarray(z["images"])
        n = len(images)
    else:
        n = header[0][0]
        images = lambda: _npy_chunks(p, "images.npy")  # noqa: E731 - a factory, re-iterable
    if labels is not None and len(labels) != n:
        raise DataError(f"{p}: 'labels' has {len(labels)} entries but 'images' has {n}")
    ids = None
    if "ids.npy" in members:
        with np.load(p) as z:
            raw_ids = np.asarray(z["ids"]).reshape(-1)
        if raw_ids.dtype.kind not in "iu":
            raise DataError(f"{p}: 'ids' must be integers (int64), got dtype {raw_ids.dtype}")
        if raw_ids.dtype == np.uint64 and raw_ids.size and raw_ids.max() > np.iinfo(np.int64).max:
            raise DataError(f"{p}: 'ids' holds values above the int64 range; store them as int64")
        ids = raw_ids.astype(np.int64)
        if len(ids) != n:
            raise DataError(f"{p}: 'ids' has {len(ids)} entries but 'images' has {n}")
    return ArraySource("npz", str(p), [ArrayPart(images, labels, n, ids)])


def _npy_header(path: Path, member: str) -> tuple[tuple[int, ...], np.dtype] | None:
    with zipfile.ZipFile(path) as zf, zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            return None
    if fortran or dtype.hasobject or len(shape) < 3:
        return None
    return shape, dtype


def _npy_chunks(path: Path, member: str, target_bytes: int = 32 << 20) -> Iterator[np.ndarray]:
    """Read a .npy inside a zip sequentially, so a file larger than memory still converts."""
    with zipfile.ZipFile(path) as zf, zf.open(member) as f:
        version = np.lib.format.read_magic(f)
        reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, _, dtype = reader(f)
        row_items = int(np.prod(shape[1:]))
        row_bytes = row_items * dtype.itemsize
        rows = max(1, target_bytes // max(row_bytes, 1))
        remaining = shape[0]
        while remaining:
            n = min(rows, remaining)
            buf = f.read(n * row_bytes)
            if len(buf) != n * row_bytes:
                raise DataError(f"{path}: 'images' is truncated ({remaining} rows of {shape[0]} missing)")
            yield np.frombuffer(buf, dtype=dtype).reshape((n,) + tuple(shape[1:]))
            remaining -= n


# --- folders ---------------------------------------------------------------------------------------------

class FolderSource(Source):
    """Image files under a folder at any depth, in sorted relative-path order, stored as their original bytes.

    Each file is fully decoded once here (`img.load()`), because a truncated JPEG otherwise surfaces as a
    crash in the middle of a training epoch; unreadable files are skipped and listed, or raise under `strict`.
    """

    def __init__(self, root: str | os.PathLike | None, labels_from_folders: bool = True, strict: bool = False,
                 root_help: RootHelp = CLI_HELP):
        if root is None:
            raise DataError(f"source 'folder' needs the image folder: {root_help.path} to it")
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise DataError(f"image folder {self.root} does not exist; {root_help.path} to an existing folder")
        self.name, self.location, self.encoding = "folder", str(self.root), "encoded"
        self.strict = strict
        self.skipped = []
        self.files = _list_images(self.root)
        if not self.files:
            raise DataError(f"no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}) under {self.root}")
        top = sorted({f.split("/", 1)[0] for f in self.files if "/" in f})
        self.has_labels = labels_from_folders and bool(top)
        self.class_names = top if self.has_labels else None
        if self.has_labels:
            loose = [f for f in self.files if "/" not in f]
            if loose:
                raise DataError(f"{len(loose)} image(s) sit directly in {self.root} (e.g. {loose[0]}) while labels "
                                f"come from its sub-folders; move them into a class folder or disable folder "
                                f"labels (--no-folder-labels)")
        self._label_of = {name: i for i, name in enumerate(top)}

    def _label(self, rel: str) -> int | None:
        return self._label_of[rel.split("/", 1)[0]] if self.has_labels else None

    def size_hint(self, classes: Sequence[int] | None = None) -> int | None:
        if classes is None:
            return len(self.files)
        wanted = set(classes)
        return sum(1 for f in self.files if self._label(f) in wanted)

    def items(self, classes: Sequence[int] | None = None) -> Iterator[Item]:
        self._check_classes(classes)
        wanted = None if classes is None else set(classes)
        for rel in self.files:
            label = self._label(rel)
            if wanted is not None and label not in wanted:
                continue  # filtered before reading: no decode cost for classes we drop
            path = self.root / rel
            try:
                data = path.read_bytes()
                shape = validate_image(data)
            except Exception as e:  # noqa: BLE001 - any failure means the file is unusable
                reason = _reason(e)
                if self.strict:
                    raise DataError(f"corrupt image {path}: {reason}. Remove or replace it, or run without "
                                    f"--strict to skip corrupt files") from None
                self.skipped.append(SkippedFile(rel, reason))
                continue
            yield Item(data, label, shape, path=rel)


def _reason(e: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):  # its message names an in-memory buffer, not the file
        return "UnidentifiedImageError: not an image format PIL can read"
    return f"{type(e).__name__}: {e}"


def checked_image(data: bytes) -> tuple[bytes | None, int, int, int, str | None]:
    """(bytes, H, W, C, None) for an image that decodes, (None, 0, 0, 0, reason) for one that does not: a staging
    row of a prepare pass, where a bad file is skipped and counted rather than failing the run."""
    try:
        h, w, c = validate_image(data)
    except Exception as e:  # noqa: BLE001 - any failure means the file is unusable
        return None, 0, 0, 0, _reason(e)
    return data, h, w, c, None


def validate_image(data: bytes) -> tuple[int, int, int]:
    """Decode fully (not just the header) and return (H, W, C) with C as decoding will produce it."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        img.load()
        width, height, mode = img.width, img.height, img.mode
    return height, width, 1 if mode in GRAY_MODES else 3


def _list_images(root: Path) -> list[str]:
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel_dir = Path(dirpath).relative_to(root)
        for fn in filenames:
            if not fn.startswith(".") and Path(fn).suffix.lower() in IMAGE_EXTENSIONS:
                found.append((rel_dir / fn).as_posix())
    return sorted(found)


# --- entry point -----------------------------------------------------------------------------------------

def open_source(name: str, root: str | os.PathLike | None = None, *, split: str = "all", download: bool = False,
                labels_from_folders: bool = True, strict: bool = False, root_help: RootHelp = CLI_HELP) -> Source:
    """Open a source by name. For torchvision sources `root` defaults to $RAYDC_DATA_ROOT; for `folder` it is
    the image folder and for `npz` the file, and must be given. An empty root is an error, not the current
    directory (which is what `Path("")` would silently mean)."""
    if name not in SOURCE_NAMES:
        raise DataError(f"unknown source {name!r}; expected one of {', '.join(SOURCE_NAMES)}")
    env = os.environ.get("RAYDC_DATA_ROOT")
    env_empty = env is not None and not env.strip()
    if root is not None and not str(root).strip():
        if env_empty and name in TORCHVISION_SOURCES:
            root = None  # the empty value came from (or matches) the environment: name the variable below
        else:
            raise DataError(f"the data root for source {name!r} is an empty string; "
                            f"{root_help.path if name in ('folder', 'npz') else root_help.datasets}")
    if name == "folder":
        return FolderSource(root, labels_from_folders=labels_from_folders, strict=strict, root_help=root_help)
    if name == "npz":
        return npz_source(root, root_help=root_help)
    if root is None:
        if env_empty:
            raise DataError("RAYDC_DATA_ROOT is set but empty (it would mean the current directory): set it to "
                            "the folder holding your datasets, or unset it")
        root = env or None
    return torchvision_source(name, root, split=split, download=download, root_help=root_help)


def filtered(items: Iterable[Item], limit: int | None) -> Iterator[Item]:
    """Stop after `limit` items, pulling no further (so a folder source decodes nothing it will not keep)."""
    if limit is None:
        yield from items
        return
    if limit <= 0:
        return
    for i, item in enumerate(items, 1):
        yield item
        if i >= limit:
            return
