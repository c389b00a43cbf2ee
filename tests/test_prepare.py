"""Sources -> Parquet shards + manifest: formats, filters, crash safety and the errors users see."""
from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from raydc.data import prepare as prepare_mod
from raydc.data.commands import add_prepare_arguments, run_prepare
from raydc.data.manifest import MANIFEST_NAME, load_manifest, verify_shards
from raydc.data.prepare import prepare, prepare_from_config
from raydc.data.sources import SOURCE_NAMES, Item, Source
from raydc.errors import DataError, UserError
from tests.helpers import image_bytes, make_folder

MNIST_TEST_COUNTS = {0: 980, 1: 1135, 2: 1032, 3: 1010, 4: 982, 5: 892, 6: 958, 7: 1028, 8: 974, 9: 1009}


def read_table(shard_dir: Path):
    m = load_manifest(shard_dir)
    return pq.ParquetDataset(m.shard_paths(shard_dir)).read().sort_by("row")


# --- torchvision ------------------------------------------------------------------------------------------

def test_mnist_test_split(mnist_root, tmp_path):
    import torchvision

    out = tmp_path / "mnist"
    m = prepare("mnist", out, root=mnist_root, split="test", rows_per_shard=4000, progress=False)
    assert m.count == 10_000 and m.name == "mnist" and m.encoding == "raw"
    assert m.image_shape == [28, 28, 1] and m.mode == "L" and m.has_labels
    assert m.label_counts == MNIST_TEST_COUNTS
    assert len(m.class_names) == 10 and m.split == "test" and m.skipped == []
    assert [(s.rows, s.id_min, s.id_max) for s in m.shards] == [(4000, 0, 3999), (4000, 4000, 7999),
                                                                  (2000, 8000, 9999)]
    assert load_manifest(out) == m
    verify_shards(m, out)

    meta = pq.read_schema(out / m.shards[0].file).metadata
    assert meta[b"raydc.encoding"] == b"raw" and json.loads(meta[b"raydc.shape"]) == [28, 28, 1]
    assert meta[b"raydc.mode"] == b"L"

    t = read_table(out)
    ids = t["id"].to_numpy()
    assert np.array_equal(ids, np.arange(10_000))
    ref = torchvision.datasets.MNIST(str(mnist_root), train=False, download=False)
    assert np.array_equal(t["label"].to_numpy(), ref.targets.numpy())
    for i in (0, 4321, 9999):
        assert t["image"][i].as_py() == ref.data[i].numpy().tobytes()


def test_missing_root_names_the_fixes(tmp_path, monkeypatch):
    monkeypatch.delenv("RAYDC_DATA_ROOT", raising=False)
    with pytest.raises(DataError) as e:
        prepare("mnist", tmp_path / "out", progress=False)
    assert "RAYDC_DATA_ROOT" in str(e.value) and "--root" in str(e.value) and "--download" in str(e.value)
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="RAYDC_DATA_ROOT") as e:
        prepare("fashionmnist", tmp_path / "out", root=missing, progress=False)
    assert str(missing) in str(e.value) and "--root" in str(e.value)
    # The root exists but holds no MNIST: say exactly where we looked.
    with pytest.raises(DataError) as e:
        prepare("mnist", tmp_path / "out", root=tmp_path, progress=False)
    assert str(tmp_path / "MNIST" / "raw") in str(e.value) and "--root" in str(e.value)
    assert not (tmp_path / "out").exists(), "a bad root must fail before the output directory is touched"


def test_empty_data_root_is_an_error_not_the_current_directory(tmp_path, monkeypatch):
    # Path("") is the current directory: with RAYDC_DATA_ROOT="" and the shell sitting in a datasets folder,
    # prepare used to read whatever lay there without a word.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAYDC_DATA_ROOT", "")
    for root in (None, ""):
        with pytest.raises(DataError, match="RAYDC_DATA_ROOT is set but empty"):
            prepare("mnist", tmp_path / "out", root=root, progress=False)
    from raydc.config import DataConfig

    with pytest.raises(DataError, match="RAYDC_DATA_ROOT is set but empty"):  # train's path: data.root unset
        prepare_from_config(DataConfig(shards=str(tmp_path / "out"), source="mnist"), progress=False)
    monkeypatch.delenv("RAYDC_DATA_ROOT")
    for source in ("mnist", "folder", "npz"):
        with pytest.raises(DataError, match="empty string"):
            prepare(source, tmp_path / "out", root="", progress=False)
    assert not (tmp_path / "out").exists()


def test_train_names_config_fields_not_prepare_flags(tmp_path, monkeypatch, capsys):
    """`raydc train` prepares missing shards from the config; it takes no --root/--download, so its error
    must name data.root / data.download (or RAYDC_DATA_ROOT)."""
    from raydc.cli import main
    from raydc.config import DataConfig

    monkeypatch.delenv("RAYDC_DATA_ROOT", raising=False)
    for root_args in ([], ["--set", f"data.root={tmp_path / 'nowhere'}"], ["--set", f"data.root={tmp_path}"]):
        code = main(["train", "--set", f"data.shards={tmp_path / 'shards'}", "--set", "data.source=mnist",
                     "--set", f"run.dir={tmp_path / 'run'}", *root_args])
        err = capsys.readouterr().err
        assert code == 2 and err.count("\n") == 1, err
        assert "data.root" in err and "data.download" in err and "RAYDC_DATA_ROOT" in err, err
        assert "--root" not in err and "--download" not in err, err
    with pytest.raises(DataError, match="set data.root in the config"):
        prepare_from_config(DataConfig(
            shards=str(tmp_path / "s"), source="folder", root=str(tmp_path / "no-folder")), progress=False)
    assert not (tmp_path / "run").exists() and not (tmp_path / "shards").exists()


def test_data_root_from_environment(mnist_root, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYDC_DATA_ROOT", str(mnist_root))
    m = prepare("mnist", tmp_path / "m", split="train", limit=50, progress=False)
    assert m.count == 50 and m.source == str(Path(mnist_root).resolve())


# --- folders ----------------------------------------------------------------------------------------------

def test_folder_source(tmp_path):
    valid, corrupt = make_folder(tmp_path / "imgs")
    out = tmp_path / "shards"
    m = prepare("folder", out, root=tmp_path / "imgs", rows_per_shard=25, progress=False)
    assert m.count == 60 and m.encoding == "encoded" and m.image_shape is None and m.mode == "RGB"
    assert sorted(s.path for s in m.skipped) == corrupt
    assert all(s.reason for s in m.skipped)
    assert m.class_names == ["cat", "dog"] and m.label_counts == {0: 30, 1: 30}
    assert [s.rows for s in m.shards] == [25, 25, 10]
    verify_shards(m, out)
    t = read_table(out)
    assert np.array_equal(t["id"].to_numpy(), np.arange(60))
    assert m.has_paths and t["path"].to_pylist() == valid  # each image's file, relative to the folder
    # Sorted relative-path order, original bytes (no re-encoding), labels from the top-level folder.
    for i, rel in enumerate(valid):
        assert t["image"][i].as_py() == (tmp_path / "imgs" / rel).read_bytes()
        assert t["label"][i].as_py() == (0 if rel.startswith("cat/") else 1)
    meta = pq.read_schema(out / m.shards[0].file).metadata
    assert meta[b"raydc.encoding"] == b"encoded" and json.loads(meta[b"raydc.shape"]) is None


def test_folder_strict_names_the_corrupt_file(tmp_path):
    make_folder(tmp_path / "imgs", n=8)
    with pytest.raises(DataError, match="--strict") as e:
        prepare("folder", tmp_path / "shards", root=tmp_path / "imgs", strict=True, progress=False)
    assert "noise.jpg" in str(e.value) or "broken.png" in str(e.value)
    assert not (tmp_path / "shards").exists(), "a failed prepare must not leave the directory it created"
    # A directory the user made beforehand stays (empty), and so does everything above a created one.
    (tmp_path / "mine").mkdir()
    for out in (tmp_path / "mine", tmp_path / "mine" / "a" / "b"):
        with pytest.raises(DataError, match="--strict"):
            prepare("folder", out, root=tmp_path / "imgs", strict=True, progress=False)
    assert (tmp_path / "mine").is_dir() and not list((tmp_path / "mine").iterdir())


def test_folder_unlabeled_and_uniform(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(5):
        (tmp_path / "flat").mkdir(exist_ok=True)
        (tmp_path / "flat" / f"{i}.png").write_bytes(image_bytes(rng, "PNG", "L", (20, 10)))
    m = prepare("folder", tmp_path / "s", root=tmp_path / "flat", progress=False)
    assert m.count == 5 and not m.has_labels and m.label_counts is None and m.class_names is None
    assert m.image_shape == [10, 20, 1] and m.mode == "L"
    assert "label" not in pq.read_schema(tmp_path / "s" / m.shards[0].file).names
    with pytest.raises(DataError, match="no labels"):
        prepare("folder", tmp_path / "s2", root=tmp_path / "flat", classes=[0], progress=False)


def test_folder_same_size_mixed_modes_decodes_to_one_shape(tmp_path):
    rng = np.random.default_rng(4)
    (tmp_path / "imgs").mkdir()
    for i, mode in enumerate(["L", "RGB", "L"]):
        (tmp_path / "imgs" / f"{i}.png").write_bytes(image_bytes(rng, "PNG", mode, (9, 7)))
    m = prepare("folder", tmp_path / "s", root=tmp_path / "imgs", progress=False)
    assert m.image_shape == [7, 9, 3] and m.mode == "RGB"


def test_folder_labels_with_loose_files_is_an_error(tmp_path):
    rng = np.random.default_rng(2)
    (tmp_path / "imgs" / "a").mkdir(parents=True)
    (tmp_path / "imgs" / "a" / "x.png").write_bytes(image_bytes(rng, "PNG", "L", (8, 8)))
    (tmp_path / "imgs" / "loose.png").write_bytes(image_bytes(rng, "PNG", "L", (8, 8)))
    with pytest.raises(DataError, match="loose.png"):
        prepare("folder", tmp_path / "s", root=tmp_path / "imgs", progress=False)
    m = prepare("folder", tmp_path / "s", root=tmp_path / "imgs", labels_from_folders=False, progress=False)
    assert m.count == 2 and not m.has_labels


# --- npz and filters --------------------------------------------------------------------------------------

def make_npz(path: Path, n: int = 500, shape: tuple[int, ...] = (12, 10), compressed: bool = False,
             seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
    labels = rng.integers(0, 5, n)
    (np.savez_compressed if compressed else np.savez)(path, images=images, labels=labels)
    return images, labels


@pytest.mark.parametrize("compressed", [False, True])
def test_npz_source_with_filters(tmp_path, compressed):
    images, labels = make_npz(tmp_path / "d.npz", compressed=compressed)
    m = prepare("npz", tmp_path / "s", root=tmp_path / "d.npz", classes=[3, 1], limit=70, rows_per_shard=32,
                progress=False)
    keep = np.flatnonzero(np.isin(labels, [1, 3]))[:70]
    assert m.count == 70 and m.classes == [1, 3] and m.limit == 70
    assert m.image_shape == [12, 10, 1] and m.mode == "L"
    assert m.label_counts == {1: int((labels[keep] == 1).sum()), 3: int((labels[keep] == 3).sum())}
    t = read_table(tmp_path / "s")
    assert not m.has_paths and "path" not in t.column_names  # array sources have no files to point at
    assert np.array_equal(t["id"].to_numpy(), np.arange(70))
    assert np.array_equal(t["row"].to_numpy(), np.arange(70))
    assert [s.row_start for s in m.shards] == [0, 32, 64]
    assert np.array_equal(t["label"].to_numpy(), labels[keep])
    got = np.frombuffer(b"".join(t["image"].to_pylist()), np.uint8).reshape(70, 12, 10)
    assert np.array_equal(got, images[keep])


def test_npz_float_rgb_without_labels(tmp_path):
    rng = np.random.default_rng(3)
    images = rng.random((40, 6, 5, 3), dtype=np.float32)
    np.savez(tmp_path / "f.npz", images=images)
    m = prepare("npz", tmp_path / "s", root=tmp_path / "f.npz", progress=False)
    assert m.count == 40 and not m.has_labels and m.image_shape == [6, 5, 3] and m.mode == "RGB"
    t = read_table(tmp_path / "s")
    got = np.frombuffer(b"".join(t["image"].to_pylist()), np.uint8).reshape(40, 6, 5, 3)
    assert np.array_equal(got, np.rint(images * 255).astype(np.uint8))
    np.savez(tmp_path / "bad.npz", images=images * 3)
    with pytest.raises(DataError, match=r"\[0, 1\]"):
        prepare("npz", tmp_path / "s2", root=tmp_path / "bad.npz", progress=False)
    with pytest.raises(DataError, match="does not exist"):
        prepare("npz", tmp_path / "s3", root=tmp_path / "missing.npz", progress=False)


def test_npz_ids_are_any_int64_and_rows_stay_dense(tmp_path):
    """Hashed ids (negatives, the int64 extremes, no order) are kept as given; every per-image array of a run
    is keyed by the dense `row` instead."""
    rng = np.random.default_rng(7)
    images = rng.integers(0, 256, (50, 4, 4), dtype=np.uint8)
    ids = rng.permutation(np.concatenate([[np.iinfo(np.int64).min, np.iinfo(np.int64).max, -1, 0],
                                          rng.integers(-(1 << 62), 1 << 62, 46)]))
    np.savez(tmp_path / "d.npz", images=images, labels=np.arange(50) % 3, ids=ids)
    m = prepare("npz", tmp_path / "s", root=tmp_path / "d.npz", classes=[0, 2], rows_per_shard=16, progress=False)
    keep = np.flatnonzero(np.arange(50) % 3 != 1)
    t = read_table(tmp_path / "s")
    assert np.array_equal(t["id"].to_numpy(), ids[keep])
    assert np.array_equal(t["row"].to_numpy(), np.arange(len(keep)))
    assert [(s.id_min, s.id_max) for s in m.shards] == [
        (int(ids[keep][a:a + 16].min()), int(ids[keep][a:a + 16].max())) for a in range(0, len(keep), 16)]


def test_duplicate_ids_name_the_first_ones(tmp_path):
    images = np.zeros((30, 4, 4), np.uint8)
    ids = np.arange(30) * 1000 - 5000
    ids[[7, 21]] = ids[3]      # -2000 three times
    ids[29] = ids[11]          # 6000 twice
    np.savez(tmp_path / "d.npz", images=images, ids=ids)
    with pytest.raises(DataError, match=r"duplicate ids \(2 repeated, first \[-2000, 6000\]\)"):
        prepare("npz", tmp_path / "s", root=tmp_path / "d.npz", rows_per_shard=8, progress=False)
    assert not (tmp_path / "s" / MANIFEST_NAME).exists()  # nothing half-made is left to train on
    np.savez(tmp_path / "f.npz", images=images, ids=np.linspace(0, 1, 30))
    with pytest.raises(DataError, match="'ids' must be integers"):
        prepare("npz", tmp_path / "s2", root=tmp_path / "f.npz", progress=False)


def test_shards_of_an_older_raydc_are_refused_with_the_fix(tmp_path):
    make_npz(tmp_path / "d.npz", n=20)
    prepare("npz", tmp_path / "s", root=tmp_path / "d.npz", progress=False)
    path = tmp_path / "s" / MANIFEST_NAME
    raw = json.loads(path.read_text())
    raw["format_version"] = 1
    path.write_text(json.dumps(raw))
    with pytest.raises(DataError, match=r"older raydc.*no row index.*--overwrite"):
        load_manifest(tmp_path / "s")


# --- streaming, crash safety, overwrite -------------------------------------------------------------------

class CountingSource(Source):
    """Yields n fixed-shape images; records how many shards were on disk when each item was pulled."""

    def __init__(self, out: Path, n: int, fail_at: int | None = None):
        self.name, self.location, self.encoding = "counting", "memory", "raw"
        self.has_labels, self.class_names, self.skipped = True, ["even", "odd"], []
        self.out, self.n, self.fail_at = out, n, fail_at
        self.shards_seen: list[int] = []

    def items(self, classes: Sequence[int] | None = None) -> Iterator[Item]:
        for i in range(self.n):
            if i == self.fail_at:
                raise RuntimeError("source failed mid-way")
            self.shards_seen.append(len(list(self.out.glob("shard-*.parquet"))))
            yield Item(np.full((4, 4, 1), i % 256, np.uint8), i % 2, (4, 4, 1))


def test_prepare_streams_one_shard_at_a_time(tmp_path, monkeypatch):
    buffered = []
    original_add = prepare_mod.ShardWriter.add

    def add(self, item):
        original_add(self, item)
        buffered.append(len(self._images))

    monkeypatch.setattr(prepare_mod.ShardWriter, "add", add)
    src = CountingSource(tmp_path / "s", 1050)
    m = prepare(src, tmp_path / "s", rows_per_shard=100, progress=False)
    assert m.count == 1050 and len(m.shards) == 11
    assert max(buffered) <= 100
    # Item i is pulled only after every earlier full shard is on disk: the source is consumed lazily.
    assert src.shards_seen == [i // 100 for i in range(1050)]


def test_interrupted_prepare_leaves_no_manifest(tmp_path):
    out = tmp_path / "s"
    with pytest.raises(RuntimeError, match="mid-way"):
        prepare(CountingSource(out, 500, fail_at=250), out, rows_per_shard=100, progress=False)
    assert not (out / MANIFEST_NAME).exists()
    assert list(out.glob("shard-*")) == [], "a failed prepare removes the shards it wrote"
    with pytest.raises(DataError, match="raydc prepare"):
        load_manifest(out)
    m = prepare(CountingSource(out, 500), out, rows_per_shard=100, progress=False)  # no --overwrite needed
    assert m.count == 500


def test_killed_prepare_leftovers_need_overwrite(tmp_path):
    out = tmp_path / "s"
    out.mkdir()
    (out / "shard-00000.parquet.tmp").write_bytes(b"half a shard")
    with pytest.raises(DataError, match="interrupted") as e:
        prepare(CountingSource(out, 10), out, progress=False)
    assert "--overwrite" in str(e.value)
    prepare(CountingSource(out, 10), out, overwrite=True, progress=False)
    assert not (out / "shard-00000.parquet.tmp").exists()


def test_existing_dataset_refused_without_overwrite(tmp_path):
    out = tmp_path / "s"
    prepare(CountingSource(out, 300), out, rows_per_shard=100, progress=False)
    (out / "README.txt").write_text("user file")
    with pytest.raises(DataError, match="--overwrite"):
        prepare(CountingSource(out, 50), out, progress=False)
    assert load_manifest(out).count == 300
    m = prepare(CountingSource(out, 50), out, rows_per_shard=100, overwrite=True, progress=False)
    assert m.count == 50 and sorted(p.name for p in out.glob("shard-*")) == ["shard-00000.parquet"]
    assert (out / "README.txt").exists(), "overwrite removes only raydc's own files"


def test_verify_detects_damaged_shard(tmp_path):
    out = tmp_path / "s"
    m = prepare(CountingSource(out, 200), out, rows_per_shard=100, progress=False)
    path = out / m.shards[1].file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(DataError, match="shard-00001.parquet"):
        verify_shards(m, out)


def test_bad_arguments(tmp_path):
    with pytest.raises(UserError, match="rows_per_shard"):
        prepare(CountingSource(tmp_path, 5), tmp_path / "s", rows_per_shard=0, progress=False)
    with pytest.raises(UserError, match="limit"):
        prepare(CountingSource(tmp_path, 5), tmp_path / "s", limit=0, progress=False)
    with pytest.raises(DataError, match="unknown source"):
        prepare("imagenet21k", tmp_path / "s", progress=False)
    with pytest.raises(DataError, match="no images"):
        prepare(CountingSource(tmp_path / "e", 0), tmp_path / "e", progress=False)


def test_source_names_match_config():
    from raydc.config import SOURCES

    assert tuple(SOURCE_NAMES) == tuple(SOURCES)


# --- config and CLI ---------------------------------------------------------------------------------------

def test_prepare_from_config(tmp_path):
    from raydc.config import DataConfig

    make_npz(tmp_path / "d.npz", n=120)
    cfg = DataConfig(shards=str(tmp_path / "s"), source="npz", root=str(tmp_path / "d.npz"), limit=100,
                     rows_per_shard=40)
    m = prepare_from_config(cfg, progress=False)
    assert m.count == 100 and [s.rows for s in m.shards] == [40, 40, 20]
    with pytest.raises(UserError, match="data.source"):
        prepare_from_config(DataConfig(shards=str(tmp_path / "x")))


def test_cli_run_prepare(tmp_path, capsys):
    make_npz(tmp_path / "d.npz", n=90)
    parser = argparse.ArgumentParser()
    add_prepare_arguments(parser)
    args = parser.parse_args(["--source", "npz", "--root", str(tmp_path / "d.npz"), "--out", str(tmp_path / "s"),
                              "--classes", "0,2", "--rows-per-shard", "10", "--verify", "--no-progress"])
    assert run_prepare(args) == 0
    out = capsys.readouterr().out.splitlines()
    m = load_manifest(tmp_path / "s")
    assert out[0].startswith(f"prepared {m.count:,} images into {len(m.shards)} shard(s)")
    assert "images/s" in out[0] and "0 skipped" in out[0]
    assert out[1].startswith("labels: 0: ") and "2: " in out[1]
    with pytest.raises(SystemExit):
        parser.parse_args(["--source", "npz", "--out", "x", "--classes", "a,b"])
    capsys.readouterr()
