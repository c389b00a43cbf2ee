"""Pictures of a run that a person would rather look at than metrics.jsonl: montages, curves, sizes, timings.

Every function draws on its own `matplotlib.figure.Figure` with the Agg canvas, never through pyplot, so it
neither changes nor depends on the caller's backend (a notebook's inline backend, a headless Ray worker) and no
figure outlives the call. Files are written atomically (a temporary file in the same folder, then os.replace),
so a reader polling `report/` never sees half a PNG, and a failed draw leaves no temporary file behind.
"""
from __future__ import annotations

import math
import os
import uuid
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator
from PIL import Image

DPI = 100
# A tuple is one panel with one line per key (DAC's thresholds u and l share an axis, where they meet).
CURVE_KEYS: tuple = ("loss", "kmeans_objective", ("upper", "lower"), "selected_pairs", "nmi_prev", "acc", "nmi",
                     "ari")
_PX_PER_PT = DPI / 72.0


def _write_atomic(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # A unique name per writer (not mkstemp, whose 0600 mode would survive the rename and ignore the umask).
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "xb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def _save_atomic(fig: Figure, path: str | os.PathLike) -> Path:
    FigureCanvasAgg(fig)
    return _write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=DPI))


def _as_rgb(images: np.ndarray, cluster: int) -> np.ndarray:
    a = np.asarray(images)
    if a.dtype != np.uint8:
        raise TypeError(f"cluster {cluster}: images must be uint8 (n, H, W, C), got dtype {a.dtype}")
    if a.ndim == 3:  # (n, H, W) gray without a channel axis
        a = a[..., None]
    if a.ndim != 4 or a.shape[-1] not in (1, 3, 4):
        raise ValueError(f"cluster {cluster}: images must have shape (n, H, W, C) with C in 1, 3, 4; "
                         f"got {a.shape}")
    if a.shape[-1] == 1:
        a = np.repeat(a, 3, axis=-1)
    return a[..., :3]


def _cell_size(h: int, w: int) -> tuple[int, int]:
    """Display size of one thumbnail: small images are enlarged by an integer factor so a two-line caption fits
    beside them and pixels stay crisp; large ones are shrunk so a row of 20 stays a reasonable width."""
    if h < 48:
        f = math.ceil(48 / h)
        return h * f, w * f
    if h > 96:
        return 96, max(1, round(w * 96 / h))
    return h, w


def _resize(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    h, w = size
    if img.shape[:2] == (h, w):
        return img
    enlarge = h >= img.shape[0]
    resample = Image.Resampling.NEAREST if enlarge else Image.Resampling.LANCZOS
    return np.asarray(Image.fromarray(img).resize((w, h), resample))


def cluster_montage(images_by_cluster: Mapping[int, np.ndarray], path: str | os.PathLike, *,
                    title: str | None = None, sizes: Mapping[int, int] | None = None,
                    labels_purity: Mapping[int, str] | None = None, max_clusters: int = 100,
                    max_per_row: int = 20) -> Path:
    """One row per cluster, largest first: its images nearest the centroid, left to right, and a caption.

    `images_by_cluster[c]` is (n, H, W, C) uint8, C = 1 or 3 (n may differ per cluster, even be 0). `sizes[c]` is
    the cluster's full size (default: the number of images given); `labels_purity[c]` is a short string such as
    "7: 83%" for the majority label and its share, shown under the size when labels exist.
    """
    if max_clusters < 1 or max_per_row < 1:
        raise ValueError("max_clusters and max_per_row must be >= 1")
    if not images_by_cluster:
        raise ValueError("images_by_cluster is empty: there is no cluster to draw")
    rgb = {int(c): _as_rgb(v, int(c))[:max_per_row] for c, v in images_by_cluster.items()}
    size_of = {c: int(sizes[c]) if sizes is not None and c in sizes else len(v) for c, v in rgb.items()}
    order = sorted(rgb, key=lambda c: (-size_of[c], c))
    shown = order[:max_clusters]
    shapes = [rgb[c].shape[1:3] for c in shown if len(rgb[c])]
    src_h, src_w = shapes[0] if shapes else (28, 28)
    cell_h, cell_w = _cell_size(src_h, src_w)
    gap, row_gap = 2, 8  # a wider gap between rows than within one, so each cluster reads as a strip
    n_cols = max([len(rgb[c]) for c in shown] + [1])

    grid_w = n_cols * cell_w + (n_cols - 1) * gap
    row_h = cell_h + row_gap
    grid_h = len(shown) * row_h - row_gap
    grid = np.full((grid_h, grid_w, 3), 255, dtype=np.uint8)
    for r, c in enumerate(shown):
        for j, img in enumerate(rgb[c]):
            y, x = r * row_h, j * (cell_w + gap)
            grid[y:y + cell_h, x:x + cell_w] = _resize(img, (cell_h, cell_w))

    captions = []
    for c in shown:
        lines = [f"cluster {c}", f"n = {size_of[c]:,}"]
        if labels_purity is not None and c in labels_purity:
            lines.append(str(labels_purity[c]))
        captions.append("\n".join(lines))
    n_lines = max(s.count("\n") + 1 for s in captions) if captions else 1
    # Font size so every caption fits in its row's height (line height ~1.25 em), capped for readability.
    font_pt = min(10.0, cell_h / (n_lines * 1.25 * _PX_PER_PT))
    longest = max((len(line) for s in captions for line in s.split("\n")), default=8)
    caption_w = int(12 + longest * font_pt * 0.62 * _PX_PER_PT)

    total = len(order)
    heading = title or "clusters"
    if total > len(shown):
        heading += f"  (largest {len(shown)} of {total} clusters)"
    title_h, margin, title_pt = 36, 8, 12.0
    title_w = int(2 * margin + len(heading) * title_pt * 0.68 * _PX_PER_PT)
    fig_w = max(margin + caption_w + grid_w + margin, title_w)
    fig_h = title_h + grid_h + margin

    # matplotlib draws only the text; the thumbnails are pasted into its pixel buffer with numpy. Drawing them
    # through imshow/figimage resampled the whole grid even at 1:1 and took seconds for a 100-row montage.
    fig = Figure(figsize=(fig_w / DPI, fig_h / DPI), dpi=DPI, facecolor="white")
    fig.text(0.5, 1 - (title_h / 2) / fig_h, heading, ha="center", va="center", fontsize=title_pt,
             fontweight="bold")
    for r, text in enumerate(captions):
        y_from_top = title_h + r * row_h + cell_h / 2
        fig.text(margin / fig_w, 1 - y_from_top / fig_h, text, ha="left", va="center", fontsize=font_pt,
                 linespacing=1.1)
    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    drawn = np.asarray(canvas.buffer_rgba())[..., :3]
    page = np.full((fig_h, fig_w, 3), 255, dtype=np.uint8)  # exact size even if Agg rounded a pixel away
    h, w = min(fig_h, drawn.shape[0]), min(fig_w, drawn.shape[1])
    page[:h, :w] = drawn[:h, :w]
    x0 = margin + caption_w
    page[title_h:title_h + grid_h, x0:x0 + grid_w] = grid
    return _write_atomic(path, lambda f: Image.fromarray(page).save(f, format="PNG"))


def _numeric(v) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    v = float(v)
    return v if math.isfinite(v) else None


def _series(rows: Sequence[Mapping], key: str) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for pos, row in enumerate(rows):
        y = _numeric(row.get(key))
        if y is None:
            continue
        x = _numeric(row.get("epoch"))
        xs.append(float(pos) if x is None else x)
        ys.append(y)
    return xs, ys


def _placeholder(fig: Figure, message: str) -> None:
    fig.text(0.5, 0.5, message, ha="center", va="center", fontsize=11, color="0.35", wrap=True)


def metric_curves(rows: Sequence[Mapping], path: str | os.PathLike, *, keys: Iterable[str] = CURVE_KEYS,
                  title: str | None = None) -> Path:
    """One panel per metric against epoch; keys with no finite value in any row get no panel.

    Each panel's title carries the last value, which is usually the number the reader came for.
    """
    panels = [k if isinstance(k, tuple) else (k,) for k in keys]
    series = {k: _series(rows, k) for panel in panels for k in panel}
    present = [panel for panel in panels if any(series[k][1] for k in panel)]
    n_cols = min(3, max(1, len(present)))
    n_rows = max(1, math.ceil(len(present) / n_cols))
    fig = Figure(figsize=(4.2 * n_cols, 3.0 * n_rows + 0.6), dpi=DPI, facecolor="white", layout="constrained")
    if title:
        fig.suptitle(title, fontsize=12, fontweight="bold")
    if not present:
        _placeholder(fig, f"no values yet for {', '.join(k for panel in panels for k in panel)}")
        return _save_atomic(fig, path)
    axes = fig.subplots(n_rows, n_cols, squeeze=False).ravel()
    # One x range for all panels, so epoch e sits at the same place in each (nmi_prev starts an epoch late).
    x_lo = min(min(series[k][0]) for panel in present for k in panel if series[k][0])
    x_hi = max(max(series[k][0]) for panel in present for k in panel if series[k][0])
    pad = max(1.0 if x_hi == x_lo else 0.5, 0.03 * (x_hi - x_lo))
    for ax, panel in zip(axes, present):
        lasts = []
        for key, color in zip(panel, ("tab:blue", "tab:orange", "tab:green")):
            xs, ys = series[key]
            if not ys:
                continue
            ax.plot(xs, ys, marker="o" if len(xs) <= 30 else None, markersize=3.5, linewidth=1.5, color=color,
                    label=key)
            lasts.append(f"{key} {ys[-1]:.4g}" if len(panel) > 1 else f"{key}  (last {ys[-1]:.4g})")
        ax.set_title(", ".join(lasts) if len(panel) == 1 else "  ".join(lasts), fontsize=10)
        if len(panel) > 1:
            ax.legend(fontsize=8)
        ax.set_xlabel("epoch", fontsize=9)
        ax.set_xlim(x_lo - pad, x_hi + pad)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.tick_params(labelsize=8)
        ax.grid(True, alpha=0.3)
    for ax in axes[len(present):]:
        ax.set_axis_off()
    return _save_atomic(fig, path)


def size_histogram_plot(sizes: np.ndarray, path: str | os.PathLike, title: str | None = None) -> Path:
    """Cluster sizes sorted largest first, with the count of empty clusters and the uniform size N/k marked.

    A log axis is used when sizes span more than two orders of magnitude, as DeepCluster's often do, so the
    small clusters are still visible.
    """
    sizes = np.asarray(sizes).ravel()
    if sizes.size == 0:
        raise ValueError("sizes is empty")
    if (sizes < 0).any():
        raise ValueError("cluster sizes must be >= 0")
    s = np.sort(sizes)[::-1].astype(np.float64)
    k, n_empty, total = len(s), int((s == 0).sum()), float(s.sum())
    fig = Figure(figsize=(8, 3.6), dpi=DPI, facecolor="white", layout="constrained")
    ax = fig.add_subplot()
    x = np.arange(k)
    if k <= 200:
        ax.bar(x, s, width=0.85, color="tab:blue")
    else:  # one patch instead of thousands of bars: fast, and at this density it looks the same
        ax.stairs(s, np.arange(k + 1) - 0.5, fill=True, color="tab:blue")
    ax.axhline(total / k, color="tab:red", linestyle="--", linewidth=1, label=f"uniform N/k = {total / k:,.1f}")
    nonzero = s[s > 0]
    if nonzero.size and nonzero.max() / nonzero.min() > 100:
        ax.set_yscale("log")
    ax.set_xlim(-0.5, k - 0.5)
    ax.set_xlabel("cluster rank (largest first)", fontsize=9)
    ax.set_ylabel("size", fontsize=9)
    ax.tick_params(labelsize=8)
    ax.legend(fontsize=8, loc="upper right")
    stats = f"k = {k:,}, N = {int(total):,}, empty: {n_empty:,}, largest: {int(s[0]):,}"
    ax.set_title(f"{title}\n{stats}" if title else f"cluster sizes — {stats}", fontsize=10)
    return _save_atomic(fig, path)


TOTAL_KEY = "time_round"  # a round's wall time: the sum of its phases plus what no phase timed


def _phases(rows: Sequence[Mapping]) -> list[str]:
    seen: dict[str, None] = {}
    for row in rows:
        for k in row:
            if k.startswith("time_") and k != TOTAL_KEY and _numeric(row[k]) is not None:
                seen.setdefault(k, None)
    return list(seen)


def phase_stack(rows: Sequence[Mapping]) -> dict[str, np.ndarray]:
    """The layers of the phases picture, bottom first: each timed phase, then `other` (the round's time that no
    phase accounts for). `time_round` is the whole bar, never a layer: stacking it on its own parts would draw
    every round twice as long as it took."""
    layers = {p: np.array([_numeric(r.get(p)) or 0.0 for r in rows]) for p in _phases(rows)}
    totals = np.array([_numeric(r.get(TOTAL_KEY)) for r in rows], dtype=float)  # None -> nan
    if np.isfinite(totals).any():
        parts = sum(layers.values()) if layers else np.zeros(len(rows))
        layers["other"] = np.where(np.isfinite(totals), np.maximum(totals - parts, 0.0), 0.0)
    return layers


def _phase_figure(rows: Sequence[Mapping], title: str | None) -> Figure:
    layers = phase_stack(rows)
    fig = Figure(figsize=(8, 3.8), dpi=DPI, facecolor="white", layout="constrained")
    fig.suptitle(title or "seconds per phase per epoch", fontsize=11, fontweight="bold")
    if not layers or not rows:
        _placeholder(fig, "no time_* keys in the metrics yet")
        return fig
    ax = fig.add_subplot()
    epochs = [(_numeric(r.get("epoch")) if _numeric(r.get("epoch")) is not None else float(i))
              for i, r in enumerate(rows)]
    bottom = np.zeros(len(rows))
    width = 0.8 * (min(np.diff(sorted(set(epochs)))) if len(set(epochs)) > 1 else 1.0)
    for i, (phase, v) in enumerate(layers.items()):
        color = "0.8" if phase == "other" else f"C{i % 10}"
        ax.bar(epochs, v, width=width, bottom=bottom, color=color,
               label=f"{phase.removeprefix('time_')}  (mean {v.mean():.3g} s)")
        bottom += v
    ax.set_xlabel("epoch", fontsize=9)
    ax.set_ylabel("seconds", fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    ax.tick_params(labelsize=8)
    ax.grid(True, axis="y", alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()  # reversed: the legend then reads like the stack
    ax.legend(handles[::-1], labels[::-1], fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    return fig


def phase_breakdown_plot(rows: Sequence[Mapping], path: str | os.PathLike, title: str | None = None) -> Path:
    """Seconds per phase per epoch as stacked bars (`phase_stack`): a bar is as tall as its round took."""
    return _save_atomic(_phase_figure(rows, title), path)


def write_report(run_dir: str | os.PathLike, rows: Sequence[Mapping], *,
                 montage: Mapping[int, np.ndarray] | None = None, sizes: np.ndarray | None = None,
                 labels_purity: Mapping[int, str] | None = None) -> list[Path]:
    """Write `run_dir/report/{curves,phases}.png`, plus `sizes.png` and `montage.png` when their data is given.

    `sizes` is the per-cluster size array indexed by cluster id (from the last assignment); it also supplies the
    montage captions, since the montage itself only holds the few images nearest each centroid.
    """
    out = Path(run_dir) / "report"
    name = Path(run_dir).name
    last = rows[-1].get("epoch") if rows else None
    suffix = f" — epoch {last}" if last is not None else ""
    warn = " — WARNING: final below its first clustering" if any(r.get("quality_warning") for r in rows) else ""
    paths = [metric_curves(rows, out / "curves.png", title=f"{name}{suffix}{warn}"),
             phase_breakdown_plot(rows, out / "phases.png", title=f"{name}: seconds per phase per epoch")]
    if sizes is not None:
        paths.append(size_histogram_plot(sizes, out / "sizes.png", title=f"{name}: cluster sizes{suffix}"))
    if montage is not None:
        size_map = {int(c): int(n) for c, n in enumerate(np.asarray(sizes).ravel())} if sizes is not None else None
        paths.append(cluster_montage(montage, out / "montage.png", title=f"{name}{suffix}", sizes=size_map,
                                     labels_purity=labels_purity))
    return paths
