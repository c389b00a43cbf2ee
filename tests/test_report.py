"""Report pictures: each writes a real PNG atomically, and copes with the awkward inputs a run produces."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from raydc import plots
from raydc.plots import cluster_montage, metric_curves, phase_breakdown_plot, size_histogram_plot, write_report

RNG = np.random.default_rng(0)


def _png(path: Path, min_w: int = 100, min_h: int = 100) -> Image.Image:
    assert path.is_file()
    with Image.open(path) as im:
        assert im.format == "PNG"
        assert im.width >= min_w and im.height >= min_h, im.size
        im.load()
        return im.convert("RGB")


def _no_tmp(folder: Path) -> None:
    assert not [p.name for p in folder.rglob("*") if ".tmp" in p.name]


def _rows(n: int = 6) -> list[dict]:
    rows = []
    for e in range(n):
        row = {"epoch": e, "loss": 2.0 / (e + 1), "kmeans_objective": 50.0 - e, "time_features": 1.0 + 0.1 * e,
               "time_kmeans": 0.5, "time_train": 4.0}
        if e:
            row["nmi_prev"] = 0.5 + 0.05 * e
        rows.append(row)
    return rows


def test_montage_gray_uneven_counts(tmp_path):
    imgs = {0: RNG.integers(0, 255, (5, 28, 28, 1), dtype=np.uint8),
            7: RNG.integers(0, 255, (2, 28, 28, 1), dtype=np.uint8),
            3: np.zeros((0, 28, 28, 1), dtype=np.uint8)}
    out = cluster_montage(imgs, tmp_path / "m.png", title="gray", sizes={0: 900, 7: 1200, 3: 0},
                          labels_purity={0: "label 4: 91%", 7: "label 1: 55%"})
    assert out == tmp_path / "m.png"
    im = _png(out)
    # Three rows of enlarged 28-px cells (>= 48 px each) below a title band.
    assert im.height >= 3 * 48
    _no_tmp(tmp_path)


def test_montage_rows_sorted_by_size_and_images_placed(tmp_path):
    # Cluster 1 is larger, so its (white) images come first; cluster 2's (black) row is second.
    imgs = {2: np.zeros((3, 16, 16, 1), np.uint8), 1: np.full((1, 16, 16, 1), 255, np.uint8)}
    im = np.asarray(_png(cluster_montage(imgs, tmp_path / "m.png", sizes={1: 10, 2: 5}), min_w=50, min_h=50))
    # The last column of cells (right margin 8 px, cells enlarged 16 -> 48 px) holds only cluster 2's third image.
    last_col = im[:, -8 - 48:-8]
    dark_rows = np.flatnonzero((last_col.sum(axis=2) == 0).all(axis=1))
    assert len(dark_rows) == 48
    # Below the 36-px title band and the first row (48 px + an 8-px gap): cluster 1 came first.
    assert dark_rows[0] == 36 + 48 + 8
    _no_tmp(tmp_path)


def test_montage_rgb_large_and_many_clusters(tmp_path):
    imgs = {c: RNG.integers(0, 255, (int(RNG.integers(1, 4)), 120, 100, 3), dtype=np.uint8) for c in range(7)}
    im = _png(cluster_montage(imgs, tmp_path / "rgb.png", max_clusters=5))
    # Large thumbnails are shrunk to 96 px high: 5 rows, not 7, and not 120 px each.
    assert 5 * 96 <= im.height < 5 * 120 + 60
    assert im.getextrema() != ((255, 255),) * 3  # not blank
    _no_tmp(tmp_path)


def test_montage_rejects_bad_input(tmp_path):
    with pytest.raises(TypeError, match="cluster 4"):
        cluster_montage({4: np.zeros((1, 8, 8, 1), np.float32)}, tmp_path / "m.png")
    with pytest.raises(ValueError, match="empty"):
        cluster_montage({}, tmp_path / "m.png")
    assert not list(tmp_path.iterdir())


def test_metric_curves_skip_missing_keys(tmp_path, monkeypatch):
    drawn: list[str] = []
    real_series = plots._series

    def spy(rows, key):
        xs, ys = real_series(rows, key)
        if ys:
            drawn.append(key)
        return xs, ys

    monkeypatch.setattr(plots, "_series", spy)
    out = metric_curves(_rows(), tmp_path / "curves.png", title="t")
    assert drawn == ["loss", "kmeans_objective", "nmi_prev"]  # acc/nmi/ari absent: no labels in this run
    one_row = _png(out)
    # Three panels fit in one row of the grid; with a fourth key the figure grows a second row.
    rows = _rows()
    for r in rows:
        r["acc"] = 0.5
    two_rows = _png(metric_curves(rows, tmp_path / "curves2.png"))
    assert two_rows.height > one_row.height
    _no_tmp(tmp_path)


def test_metric_curves_with_nothing_to_plot(tmp_path):
    """No rows, or only non-finite values: no panel (whose axes and tick labels are black), only the gray
    "no values yet" message. A NaN drawn as a value, or a blank page, fails."""
    drawn = np.asarray(_png(metric_curves(_rows(), tmp_path / "drawn.png")).convert("L"))
    assert drawn.min() == 0  # what a panel looks like, in this matplotlib
    for rows in ([], [{"epoch": 0, "loss": float("nan")}], [{"epoch": 0, "loss": float("inf"), "acc": "n/a"}]):
        page = np.asarray(_png(metric_curves(rows, tmp_path / "nothing.png")).convert("L"))
        assert page.min() > 60, rows            # nothing black: no axes
        assert (page < 200).sum() > 500, rows   # but the message is there


def test_size_histogram(tmp_path):
    small = np.array([5, 0, 12, 3, 0])
    _png(size_histogram_plot(small, tmp_path / "s.png", title="k=5"))
    big = RNG.integers(0, 5000, 2000)
    _png(size_histogram_plot(big, tmp_path / "b.png"))
    with pytest.raises(ValueError):
        size_histogram_plot(np.array([]), tmp_path / "e.png")
    _no_tmp(tmp_path)


def test_phase_breakdown(tmp_path):
    assert plots._phases(_rows()) == ["time_features", "time_kmeans", "time_train"]
    _png(phase_breakdown_plot(_rows(), tmp_path / "p.png"))
    _png(phase_breakdown_plot([{"epoch": 0, "loss": 1.0}], tmp_path / "none.png"))
    _no_tmp(tmp_path)


def test_phase_bars_are_as_tall_as_the_round():
    # The loop writes time_round (wall time of the round) beside its parts; the parts here leave 0.5 s
    # untimed in round 0 and exactly none in round 1. Stacking time_round as a layer doubled every bar.
    rows = [{"epoch": 0, "time_features": 1.0, "time_kmeans": 0.5, "time_train": 4.0, "time_round": 6.0},
            {"epoch": 1, "time_features": 1.0, "time_kmeans": 0.5, "time_train": 4.5, "time_round": 6.0},
            {"epoch": 2, "final": True, "time_features": 2.0}]  # a final row without time_round
    layers = plots.phase_stack(rows)
    assert list(layers) == ["time_features", "time_kmeans", "time_train", "other"]
    np.testing.assert_allclose(layers["other"], [0.5, 0.0, 0.0])
    fig = plots._phase_figure(rows, "t")
    (ax,) = fig.axes
    tops = {}
    for bar in ax.patches:
        x = round(bar.get_x() + bar.get_width() / 2)
        tops[x] = max(tops.get(x, 0.0), bar.get_y() + bar.get_height())
    assert tops == pytest.approx({0: 6.0, 1: 6.0, 2: 2.0})
    assert "round" not in " ".join(ax.get_legend_handles_labels()[1])


def test_write_report(tmp_path):
    run = tmp_path / "run-1"
    paths = write_report(run, _rows())
    assert [p.name for p in paths] == ["curves.png", "phases.png"]
    montage = {c: RNG.integers(0, 255, (4, 28, 28, 1), dtype=np.uint8) for c in range(3)}
    paths = write_report(run, _rows(), montage=montage, sizes=np.array([40, 10, 25]))
    assert [p.name for p in paths] == ["curves.png", "phases.png", "sizes.png", "montage.png"]
    for p in paths:
        assert p.parent == run / "report"
        _png(p)
    _no_tmp(run)


def test_failed_write_leaves_no_tmp(tmp_path):
    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        plots._write_atomic(tmp_path / "x.png", boom)
    assert not list(tmp_path.iterdir())
