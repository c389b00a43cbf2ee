"""`raydc export` on a run directory made here (assignment parts and a folder of files, no training): the fast
checks of the table and folder formats and of every refusal. tests/test_export.py does it after a real run."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from raydc.cli import main


@pytest.fixture()
def finished(tmp_path):
    """A finished run over a folder of 30 files (nested, names repeated), its parts in two row groups each."""
    from raydc.config import load_config
    from raydc.config_loader import dump_yaml, to_dict
    from raydc.data.manifest import Manifest, SkippedFile, write_manifest
    from raydc.engine.rundir import save_safe

    photos, shards, run = tmp_path / "photos", tmp_path / "shards", tmp_path / "run"
    paths = [f"{d}/img_{i}.jpg" for d in ("a", "b", "b/c") for i in range(10)]
    for p in paths:
        (photos / p).parent.mkdir(parents=True, exist_ok=True)
        (photos / p).write_bytes(p.encode())
    shards.mkdir()
    write_manifest(Manifest("folder", str(photos), 30, "encoded", None, "RGB", False, has_paths=True,
                            skipped=[SkippedFile("b/broken.jpg", "truncated")]), shards)
    cfg = load_config(None, [f"data.shards={shards}", f"run.dir={run}"])
    (run / "assignments").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(to_dict(cfg)))
    save_safe(run / "clustering.pt", {"config": to_dict(cfg)})
    rng = np.random.default_rng(0)
    clusters = rng.integers(0, 4, 30)
    for part, rows in enumerate((np.arange(0, 30, 2), np.arange(1, 30, 2))):  # two shard actors' rows
        pq.write_table(pa.table({"row": rows, "id": rows + 100, "path": [paths[r] for r in rows],
                                 "cluster": clusters[rows], "distance": rng.random(len(rows), dtype=np.float32)}),
                       run / "assignments" / f"part-{part:05d}.parquet", row_group_size=8)
    truth = {paths[r]: (r + 100, int(clusters[r])) for r in range(30)}
    return run, photos, truth, np.bincount(clusters)


@pytest.mark.parametrize("fmt", ["parquet", "csv"])
def test_table_has_every_row_once_with_its_cluster_size(finished, tmp_path, capsys, fmt):
    run, _, truth, sizes = finished
    out = tmp_path / f"out.{fmt}"
    assert main(["export", "--run", str(run), "--out", str(out), "--format", fmt]) == 0
    said = capsys.readouterr().out
    assert "exported 30 images in 4 clusters" in said and "1 unreadable source file" in said, said
    t = pq.read_table(out) if fmt == "parquet" else pcsv.read_csv(out)
    assert t.column_names == ["path", "id", "cluster", "distance", "cluster_size"]
    got = {p: (i, c, s) for p, i, c, s in zip(*(t.column(x).to_pylist() for x in
                                                  ("path", "id", "cluster", "cluster_size")))}
    assert len(got) == t.num_rows == 30
    assert got == {p: (i, c, int(sizes[c])) for p, (i, c) in truth.items()}
    assert [p for p in os.listdir(tmp_path) if p.startswith(".")] == []


def test_folders_hold_each_file_once_in_its_cluster(finished, tmp_path):
    run, photos, truth, _ = finished
    out = tmp_path / "by-cluster"
    assert main(["export", "--run", str(run), "--out", str(out), "--format", "folders"]) == 0
    found = sorted(str(p.relative_to(out)) for p in out.rglob("*.jpg"))
    assert found == sorted(f"cluster-{c:05d}/{p}" for p, (_, c) in truth.items())
    link = out / f"cluster-{truth['b/c/img_3.jpg'][1]:05d}" / "b/c/img_3.jpg"
    assert link.is_symlink() and Path(os.readlink(link)) == photos / "b/c/img_3.jpg"
    copied = tmp_path / "copies"
    assert main(["export", "--run", str(run), "--out", str(copied), "--format", "folders", "--copy"]) == 0
    dest = copied / f"cluster-{truth['a/img_0.jpg'][1]:05d}" / "a/img_0.jpg"
    assert not dest.is_symlink() and dest.read_bytes() == b"a/img_0.jpg"


def test_refusals_are_one_line_exit_2_and_leave_nothing(finished, tmp_path, capsys):
    run, photos, _, _ = finished

    def refused(*argv: str, match: str) -> None:
        assert main(["export", "--run", str(run), *argv]) == 2
        err = capsys.readouterr().err
        assert match in err and len(err.strip().splitlines()) == 1, err

    (tmp_path / "taken").mkdir()
    refused("--out", str(tmp_path / "taken"), match="already exists")
    refused("--out", str(tmp_path / "x.csv"), "--format", "csv", "--copy", match="--copy applies to")
    refused("--out", "s3://bucket/by-cluster", "--format", "folders", match="is a URI")
    # A source path escaping the folder is refused before any link is made, and the half-built folder goes.
    bad = run / "assignments" / "part-00001.parquet"
    t = pq.read_table(bad)
    pq.write_table(t.set_column(2, "path", pa.array(["../../etc/passwd"] * t.num_rows)), bad)
    refused("--out", str(tmp_path / "f"), "--format", "folders", match="points outside")
    # Parts without paths (a run over shards prepared before paths were kept).
    for part in (run / "assignments").glob("part-*.parquet"):
        pq.write_table(pq.read_table(part).drop_columns(["path"]), part)
    refused("--out", str(tmp_path / "f"), "--format", "folders", match="source path")
    assert main(["export", "--run", str(run), "--out", str(tmp_path / "old.csv"), "--format", "csv"]) == 0
    assert capsys.readouterr().out.count("no source paths") == 1  # said once
    assert pcsv.read_csv(tmp_path / "old.csv").column("path").null_count == 30
    photos.rename(tmp_path / "moved")  # folders need the source folder where the manifest says it is
    for part in (run / "assignments").glob("part-*.parquet"):
        pq.write_table(pq.read_table(part).append_column("path", pa.array(["a/img_0.jpg"] * 15)), part)
    refused("--out", str(tmp_path / "f"), "--format", "folders", match="does not exist here")
    (run / "clustering.pt").unlink()
    refused("--out", str(tmp_path / "u.csv"), "--format", "csv", match="has not finished")
    assert sorted(os.listdir(tmp_path)) == ["moved", "old.csv", "run", "shards", "taken"]
