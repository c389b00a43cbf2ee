"""From a user's photo folder to clusters and back: prepare a nested folder (a corrupt file, the same file name
in several folders), a tiny run, then `raydc export` as parquet, csv and folders of links or copies."""
from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from PIL import Image

from raydc.cli import main

# A real run costs minutes here: `make test-all` runs this journey; tests/test_export_files.py is the fast check.
pytestmark = [pytest.mark.ray, pytest.mark.slow]


def make_photos(root: Path, n: int = 48, seed: int = 3) -> tuple[list[str], list[str]]:
    """Photos in nested folders; `img_0.jpg` and friends recur in every folder. Returns (good, corrupt)."""
    rng = np.random.default_rng(seed)
    good = []
    for i in range(n):
        folder = ["cats", "dogs", "dogs/puppies"][i % 3]
        rel = f"{folder}/img_{i // 3}.{'png' if i % 2 else 'jpg'}"
        tone = rng.integers(0, 256, 3)
        a = np.clip(tone + rng.integers(-40, 40, (20, 20, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, format="PNG" if i % 2 else "JPEG")
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(buf.getvalue())
        good.append(rel)
    (root / "dogs" / "puppies" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return sorted(good), ["dogs/puppies/broken.jpg"]


def tiny_run_config(shards, run_dir, *extra: str):
    from raydc.config import load_config

    return load_config(None, [f"data.shards={shards}", f"run.dir={run_dir}", "cluster.k=4", "cluster.pca_dim=8",
                              "train.epochs=1", "train.batch_size=16", "features.batch_size=32",
                              "model.input_size=16", "run.montage_per_cluster=2", *extra])


@pytest.fixture(scope="module")
def photo_run(ray_local, tmp_path_factory):
    """A finished run over a prepared photo folder: (run dir, photo root, good paths, corrupt paths)."""
    from raydc.data.prepare import prepare
    from raydc.engine.trainer import run_training

    base = tmp_path_factory.mktemp("photos")
    good, corrupt = make_photos(base / "photos")
    m = prepare("folder", base / "shards", root=base / "photos", rows_per_shard=20, progress=False)
    assert m.count == len(good) and [s.path for s in m.skipped] == corrupt and m.has_paths
    run = run_training(tiny_run_config(base / "shards", base / "run"))
    return run, base / "photos", good, corrupt


def _assigned(run) -> dict[str, tuple[int, int, float]]:
    a = run.read_assignments()
    assert "path" in a, "assignments carry the source path"
    return {p: (int(i), int(c), float(d)) for p, i, c, d in zip(a["path"], a["id"], a["cluster"], a["distance"])}


def test_export_parquet_and_csv_list_every_good_file_once(photo_run, tmp_path, capsys):
    run, _, good, corrupt = photo_run
    truth = _assigned(run)
    assert sorted(truth) == good  # every good file, once, under its own path
    sizes = np.bincount([c for _, c, _ in truth.values()])
    for fmt in ("parquet", "csv"):
        out = tmp_path / f"clusters.{fmt}"
        assert main(["export", "--run", str(run.path), "--out", str(out), "--format", fmt]) == 0
        said = capsys.readouterr().out
        assert f"exported {len(good)} images" in said and "1 unreadable source file" in said, said
        t = pq.read_table(out) if fmt == "parquet" else pcsv.read_csv(out)
        assert t.column_names == ["path", "id", "cluster", "distance", "cluster_size"]
        paths = t.column("path").to_pylist()
        assert sorted(paths) == good and not set(corrupt) & set(paths)
        for p, i, c, d, s in zip(paths, *(t.column(x).to_pylist() for x in ("id", "cluster", "distance",
                                                                              "cluster_size"))):
            assert (i, c) == truth[p][:2] and d == pytest.approx(truth[p][2], rel=1e-6) and s == sizes[c]
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "no temporary file left behind"


@pytest.mark.parametrize("copy", [False, True])
def test_export_folders_links_or_copies_each_file_into_its_cluster(photo_run, tmp_path, copy):
    run, photos, good, _ = photo_run
    truth = _assigned(run)
    out = tmp_path / "by-cluster"
    assert main(["export", "--run", str(run.path), "--out", str(out), "--format", "folders",
                 *(["--copy"] if copy else [])]) == 0
    found = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() or p.is_symlink())
    assert found == sorted(f"cluster-{truth[g][1]:05d}/{g}" for g in good)  # each good file once, in its cluster
    for g in good:
        dest = out / f"cluster-{truth[g][1]:05d}" / g
        assert dest.is_symlink() != copy
        if not copy:
            assert Path(os.readlink(dest)) == photos / g
        assert dest.read_bytes() == (photos / g).read_bytes()


def test_bad_exports_are_one_line_exit_2_and_write_nothing(photo_run, tmp_path, capsys):
    run, _, _, _ = photo_run
    taken = tmp_path / "taken.parquet"
    taken.write_text("mine")
    assert main(["export", "--run", str(run.path), "--out", str(taken)]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and len(err.strip().splitlines()) == 1 and taken.read_text() == "mine"

    unfinished = tmp_path / "unfinished"
    shutil.copytree(run.path, unfinished, ignore=shutil.ignore_patterns("checkpoints"))
    (unfinished / "clustering.pt").unlink()
    assert main(["export", "--run", str(unfinished), "--out", str(tmp_path / "u.parquet")]) == 2
    assert "has not finished" in capsys.readouterr().err and not (tmp_path / "u.parquet").exists()

    # A run over shards prepared before paths were kept: its parts have no `path` column.
    old = tmp_path / "old"
    shutil.copytree(run.path, old, ignore=shutil.ignore_patterns("checkpoints"))
    for part in (old / "assignments").glob("part-*.parquet"):
        t = pq.read_table(part)
        pq.write_table(t.drop_columns(["path"]), part)
    assert main(["export", "--run", str(old), "--out", str(tmp_path / "f"), "--format", "folders"]) == 2
    err = capsys.readouterr().err
    assert "source path" in err and len(err.strip().splitlines()) == 1 and not (tmp_path / "f").exists()
    assert main(["export", "--run", str(old), "--out", str(tmp_path / "old.csv"), "--format", "csv"]) == 0
    said = capsys.readouterr().out
    assert said.count("no source paths") == 1, said  # said once, not per part or batch
    t = pcsv.read_csv(tmp_path / "old.csv")
    assert t.num_rows == len(_assigned(run)) and t.column("path").null_count == t.num_rows
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "no temporary file left behind"


def test_embed_gives_the_features_the_final_round_clustered(photo_run, tmp_path, capsys):
    """`raydc embed --reduced` on the run's own shards: each row's nearest saved centroid and its distance are
    the cluster and distance the assignments hold (the k-means ran on exactly these features), rows in order;
    `--raw` gives the network's features before the PCA, which the saved projection maps onto the reduced ones."""
    import pyarrow.dataset as pads

    from raydc.config import load_config_text
    from raydc.core.extractor import FeatureReduction, reduce_features
    from raydc.engine.rundir import load_safe
    from raydc.methods.deepcluster import _projection_from_plain

    run, _, good, _ = photo_run
    shards = load_config_text((run.path / "config.yaml").read_text(), "config.yaml").data.shards
    out = tmp_path / "emb"
    assert main(["embed", "--run", str(run.path), "--data", shards, "--out", str(out)]) == 0
    assert f"embedded {len(good)} images (8-d" in capsys.readouterr().out
    t = pads.dataset(out, format="parquet").to_table()  # as pyarrow.dataset reads it, parts in name order
    assert t.column_names == ["row", "id", "path", "embedding"]
    etype = t.schema.field("embedding").type
    assert pa.types.is_fixed_size_list(etype) and etype.list_size == 8 and etype.value_type == pa.float32()
    assert t.column("row").to_pylist() == list(range(len(good)))  # row order
    import ray

    assert ray.data.read_parquet(str(out)).count() == len(good)  # and Ray Data reads it as it is
    truth = _assigned(run)
    assert t.column("path").to_pylist() == good  # rows are the files in sorted path order
    x = np.asarray(t.column("embedding").combine_chunks().flatten()).reshape(-1, 8)
    saved = load_safe(run.clustering_path)
    centroids = saved["artifacts"]["centroids"].numpy()
    d2 = ((x[:, None, :] - centroids[None]) ** 2).sum(-1)
    clusters = [truth[p][1] for p in good]
    assert d2.argmin(1).tolist() == clusters
    assert np.allclose(d2.min(1), [truth[p][2] for p in good], rtol=1e-4, atol=1e-5)

    raw = tmp_path / "raw"
    assert main(["embed", "--run", str(run.path), "--data", shards, "--out", str(raw), "--raw"]) == 0
    r = pads.dataset(raw).to_table()
    xr = np.asarray(r.column("embedding").combine_chunks().flatten()).reshape(len(good), -1)
    assert xr.shape[1] > 8
    proj = _projection_from_plain(saved["artifacts"]["projection"])
    assert np.allclose(reduce_features(xr, FeatureReduction(proj, l2_normalize=True)), x, atol=1e-5)
    assert main(["embed", "--run", str(run.path), "--data", shards, "--out", str(raw)]) == 2  # exists
    assert "already exists" in capsys.readouterr().err


def test_the_runs_html_report_shows_every_cluster_in_a_browser(photo_run):
    """report/index.html of the run, in headless Chromium: each cluster's section with its size, its images
    decoded, the nearest images' file paths, the curves, and the config; the screenshot is kept."""
    import re

    from tests.browser import artifact_dir, body_attrs, dump_dom, screenshot, sections

    run, _, good, _ = photo_run
    index = run.path / "report" / "index.html"
    truth = _assigned(run)
    sizes = np.bincount([c for _, c, _ in truth.values()])
    dom = dump_dom(index.as_uri())
    body = body_attrs(dom)
    assert body.get("data-images-done") == "1", body
    assert int(body["data-images"]) > 0 and body["data-images-ok"] == body["data-images"], body
    assert sorted(sections(dom)) == [(c, int(n)) for c, n in enumerate(sizes) if n]
    shown = re.findall(r"<figcaption>([^<]+)</figcaption>", dom)
    assert {p for p in shown if "/" in p and not p.endswith(".png")} <= set(good) and any(p in good for p in shown)
    assert 'alt="curves"' in dom and "cluster:" in dom  # the curves picture and the config
    screenshot(index.as_uri(), artifact_dir() / "report-photos.png")


def test_assign_output_carries_the_paths(photo_run, tmp_path):
    """`raydc assign` on the run's own shards: its parts hold each image's path beside the cluster."""
    from raydc.config import load_config_text
    from raydc.engine.assign import assign_images

    run, _, good, _ = photo_run
    shards = load_config_text((run.path / "config.yaml").read_text(), "config.yaml").data.shards
    t = pq.ParquetDataset(assign_images(str(run.path), shards, str(tmp_path / "assigned"))).read().sort_by("row")
    assert t.column("path").to_pylist() == good
    truth = _assigned(run)
    agree = np.mean([truth[p][1] == c for p, c in zip(good, t.column("cluster").to_pylist())])
    assert agree > 0.9, agree


def test_the_journey_from_a_bucket_with_a_distributed_prepare(s3_server, ray_local, tmp_path, capsys):
    """The same from object storage: the photo folder in the bucket, a distributed prepare into shards there, a
    run whose directory is there, and `raydc export` of it: every good file exactly once under its own path with
    the cluster the assignments hold, the corrupt one absent and counted."""
    from raydc.data.ray_prepare import prepare_distributed
    from raydc.engine.trainer import run_training

    good, corrupt = make_photos(tmp_path / "photos")
    client = s3_server.client()
    for p in sorted((tmp_path / "photos").rglob("*")):
        if p.is_file():
            key = "journey/photos/" + p.relative_to(tmp_path / "photos").as_posix()
            client.put_object(Bucket=s3_server.bucket, Key=key, Body=p.read_bytes())
    shards, run_uri = s3_server.uri("journey/shards"), s3_server.uri("journey/run")
    m = prepare_distributed(s3_server.uri("journey/photos"), shards, rows_per_shard=20, progress=False)
    assert m.count == len(good) and [s.path for s in m.skipped] == corrupt and m.has_paths
    run = run_training(tiny_run_config(shards, run_uri))
    truth = _assigned(run)
    assert sorted(truth) == good
    out = tmp_path / "clusters.parquet"
    assert main(["export", "--run", run_uri, "--out", str(out), "--format", "parquet"]) == 0
    said = capsys.readouterr().out
    assert f"exported {len(good)} images" in said and "1 unreadable source file" in said, said
    t = pq.read_table(out)
    got = {p: (i, c) for p, i, c in zip(*(t.column(x).to_pylist() for x in ("path", "id", "cluster")))}
    assert len(got) == t.num_rows == len(good) and got == {p: v[:2] for p, v in truth.items()}
    # and the features, written into the bucket: one row per good file, under its path, as pyarrow reads them
    import pyarrow.dataset as pads

    from raydc.storage import resolve

    emb = s3_server.uri("journey/embeddings")
    assert main(["embed", "--run", run_uri, "--data", shards, "--out", emb]) == 0, capsys.readouterr().err
    fs, path = resolve(emb)
    e = pads.dataset(path, filesystem=fs, format="parquet").to_table()
    assert sorted(e.column("path").to_pylist()) == good
    assert len({len(v) for v in e.column("embedding").to_pylist()}) == 1
