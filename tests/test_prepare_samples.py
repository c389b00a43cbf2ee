"""`raydc prepare --source webdataset|parquet --distributed`: collections kept as img2dataset writes them
(tar shards with .jpg/.json members, Parquet with a jpg column and key/url) become shards through Ray Data;
each sample's key is its path; samples that are not images are skipped and listed, as corrupt files are."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raydc.data.manifest import load_manifest, verify_shards
from raydc.errors import DataError
from tests.conftest import REPO
from tests.helpers import plan_operators, shard_rows

pytestmark = pytest.mark.ray


def _jpeg(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((10 + i % 3, 12, 3), (i * 37) % 256, np.uint8)).save(buf, format="JPEG")
    return buf.getvalue()


def make_tars(root: Path, n: int = 14, per_tar: int = 5) -> tuple[dict[str, bytes], list[str]]:
    """img2dataset's layout: NNNNN.tar of <key>.jpg + <key>.json. Returns (good key -> bytes, bad keys): one
    member is not an image, one sample has no image member at all."""
    root.mkdir(parents=True, exist_ok=True)
    good, bad = {}, []
    for t in range(-(-n // per_tar)):
        with tarfile.open(root / f"{t:05d}.tar", "w") as tar:
            for i in range(t * per_tar, min(n, (t + 1) * per_tar)):
                key = f"{t:05d}{i:04d}"
                members = {"json": json.dumps({"url": f"https://example.com/{i}.jpg"}).encode()}
                if i == 3:
                    members["jpg"] = b"<html>403 Forbidden</html>"
                    bad.append(key)
                elif i == 8:
                    bad.append(key)  # only the json: the download failed
                else:
                    members["jpg"] = good[key] = _jpeg(i)
                for ext, data in members.items():
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    return good, bad


def make_parquet(root: Path, n: int = 12) -> tuple[dict[str, bytes], list[str]]:
    root.mkdir(parents=True, exist_ok=True)
    good, bad, rows = {}, [], []
    for i in range(n):
        key = f"{i:09d}"
        data = b"\x89PNG truncated" if i == 5 else _jpeg(i)
        (bad.append(key) if i == 5 else good.__setitem__(key, data))
        rows.append((key, f"https://example.com/{i}.jpg", data))
    for part, chunk in enumerate((rows[:7], rows[7:])):
        pq.write_table(pa.table({"key": [r[0] for r in chunk], "url": [r[1] for r in chunk],
                                 "jpg": pa.array([r[2] for r in chunk], pa.binary()),
                                 "caption": ["a photo"] * len(chunk)}), root / f"{part:05d}.parquet")
    return good, bad


@pytest.mark.parametrize("kind", ["webdataset", "parquet"])
def test_samples_become_shards_keyed_by_their_key(ray_local, tmp_path, kind):
    from raydc.data.ray_prepare import prepare_samples

    good, bad = (make_tars if kind == "webdataset" else make_parquet)(tmp_path / "src")
    m = prepare_samples(kind, str(tmp_path / "src"), str(tmp_path / "out"), rows_per_shard=4, progress=False)
    verify_shards(m, tmp_path / "out")
    assert m.name == kind and m.count == len(good) and m.has_paths and not m.has_labels
    assert sorted(s.path for s in m.skipped) == sorted(bad) and all(s.reason for s in m.skipped)
    t = shard_rows(tmp_path / "out")
    assert t.column("row").to_pylist() == list(range(len(good)))
    assert sorted(t.column("path").to_pylist()) == sorted(good)  # every good sample once, under its key
    for key, data in zip(t.column("path").to_pylist(), t.column("image").to_pylist()):
        assert data == good[key]  # the original bytes, never re-encoded
    assert load_manifest(tmp_path / "out").source == str(tmp_path / "src")


def test_parquet_samples_are_read_without_footer_actors(ray_local, tmp_path):
    """Ray 2.60's V2 Parquet reader plans a ListFiles op that starts 32 footer-reading actors per execution; the
    samples are read by the V1 reader (a Read op) and the caller's DataContext flag is put back."""
    from ray.data import DataContext

    from raydc.data.sample_sources import open_samples

    make_parquet(tmp_path / "src")
    before = DataContext.get_current().use_datasource_v2
    names = [type(op).__name__ for op in plan_operators(open_samples("parquet", str(tmp_path / "src")).dataset())]
    assert "ListFiles" not in names and any(n.startswith("Read") for n in names), names
    assert DataContext.get_current().use_datasource_v2 == before


def test_bad_sample_sources_name_the_fix(ray_local, tmp_path):
    from raydc.data.ray_prepare import prepare_samples

    make_parquet(tmp_path / "src")
    with pytest.raises(DataError, match=r"no the column 'image'|has no the column|--image-column") as e:
        prepare_samples("parquet", str(tmp_path / "src"), str(tmp_path / "out"), image_column="image",
                        progress=False)
    assert "jpg" in str(e.value) and not (tmp_path / "out").exists()  # it lists the columns there are
    with pytest.raises(DataError, match="--key-column"):
        prepare_samples("parquet", str(tmp_path / "src"), str(tmp_path / "out"), key_column="uid", progress=False)
    with pytest.raises(DataError, match=r"no \.tar files"):
        prepare_samples("webdataset", str(tmp_path / "src"), str(tmp_path / "out"), progress=False)


@pytest.mark.slow  # a Ray of its own, started by the CLI
@pytest.mark.parametrize("kind", ["webdataset", "parquet"])
def test_cli_samples_on_s3(s3_server, tmp_path, kind):
    """The command a user runs, tar shards or Parquet tables in the bucket and shards written there (its own
    local Ray)."""
    import os

    env = dict(os.environ, PYTHONPATH=str(REPO), RAY_USAGE_STATS_ENABLED="0", **s3_server.env)
    env.pop("RAY_ADDRESS", None)
    src = tmp_path / kind
    good, bad = make_tars(src, n=8, per_tar=4) if kind == "webdataset" else make_parquet(src)
    client = s3_server.client()
    for p in sorted(src.iterdir()):
        client.put_object(Bucket=s3_server.bucket, Key=f"{kind}-src/{p.name}", Body=p.read_bytes())
    out = s3_server.uri(f"shards/{kind}")
    cmd = [sys.executable, "-m", "raydc.cli", "prepare", "--source", kind, "--root", s3_server.uri(f"{kind}-src"),
           "--out", out, "--distributed", "--no-progress"]
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"prepared {len(good)} images" in p.stdout and f"{len(bad)} skipped" in p.stdout, p.stdout
    assert sorted(shard_rows(out).column("path").to_pylist()) == sorted(good)
    p = subprocess.run(cmd[:-2] + ["--no-progress"], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 2 and "--distributed" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
