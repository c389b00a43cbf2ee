"""The pictures of a finished run: montage of the images nearest each centroid, metric curves, sizes.

Runs on the driver after training, from files alone (metrics.jsonl, the assignment parts, the shards), so
`raydc report --run DIR` can redraw it at any time. Images are fetched by id with a pyarrow filter pushed
down to the Parquet row groups: only the few hundred montage images are read, not the dataset.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from raydc.core import metrics as M
from raydc.engine.rundir import RunDir
from raydc.htmlreport import ClusterEntry, image_uri, thumbs_per_cluster, write_index


def images_by_id(shard_dir: str, manifest, ids: np.ndarray, size: int | None = None) -> dict[int, np.ndarray]:
    return fetch_by_id(shard_dir, manifest, ids, size)[0]


def fetch_by_id(shard_dir: str, manifest, ids: np.ndarray, size: int | None = None
                ) -> tuple[dict[int, np.ndarray], dict[int, str]]:
    """The decoded images of `ids`, and their source paths where the shards keep them."""
    import pyarrow.dataset as pads

    from raydc.data.decode import decode_batch

    from raydc.storage import is_uri, resolve

    files = manifest.shard_paths(shard_dir)
    fs = None
    if is_uri(str(shard_dir)):
        fs = resolve(files[0])[0]
        files = [resolve(f)[1] for f in files]
    columns = ["id", "image"] + (["path"] if manifest.has_paths else [])
    # One fragment and a couple of 2^16-row batches in flight: the scan reads every shard to find a few hundred
    # ids, and pyarrow's default read-ahead (4 files, 16 batches) held ~4 shard files at once on the driver.
    table = pads.dataset(files, format="parquet", filesystem=fs).to_table(
        columns=columns, filter=pads.field("id").isin(list(map(int, ids))), batch_size=1 << 16,
        fragment_readahead=1, batch_readahead=2)
    if table.num_rows == 0:
        return {}, {}
    batch = {"id": table.column("id").to_numpy(), "image": np.array(table.column("image").to_pylist(), dtype=object)}
    d = decode_batch(batch, manifest, size=size if manifest.image_shape is None else None)
    paths = dict(zip(table.column("id").to_pylist(), table.column("path").to_pylist())) if "path" in columns else {}
    return {int(i): img for i, img in zip(d["id"], d["image"])}, paths


def write_run_report(run_dir: str | Path, shard_dir: str, manifest, *, per_cluster: int = 16,
                     max_clusters: int = 100, thumb: int = 64) -> list[str]:
    """Draw the report into `<run>/report/`. A run on object storage is drawn in a local temporary directory
    and its files uploaded (matplotlib writes local files); returns the report's locations."""
    import shutil
    import tempfile

    from raydc import storage

    run = RunDir(run_dir)
    if run.is_local:
        return [str(p) for p in _draw_report(run, Path(run.location), shard_dir, manifest, per_cluster,
                                             max_clusters, thumb)]
    tmp = tempfile.mkdtemp(prefix="raydc-report-")
    try:
        local = Path(tmp) / run.name
        drawn = _draw_report(run, local, shard_dir, manifest, per_cluster, max_clusters, thumb)
        if not (local / "report" / WARNINGS_FILE).exists() and storage.is_file(run.join("report", WARNINGS_FILE)):
            storage.write_text_atomic(run.join("report", WARNINGS_FILE), "")  # object stores: no stale warning
        out = []
        for p in sorted((local / "report").iterdir()):
            storage.write_bytes_atomic(run.join("report", p.name), p.read_bytes())
            if p in drawn:
                out.append(run.join("report", p.name))
        return out
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


WARNINGS_FILE = "WARNINGS.txt"


def _draw_report(run: RunDir, local: Path, shard_dir: str, manifest, per_cluster: int, max_clusters: int,
                 thumb: int) -> list[Path]:
    """The report of `run` drawn under the local directory `local` (the run's own, or a staging copy)."""
    from raydc import plots

    rows = run.read_metrics()
    report_dir = local / "report"
    warnings = [r["quality_warning"] for r in rows if r.get("quality_warning")]
    warnings_path = report_dir / WARNINGS_FILE
    if warnings:  # beside the pictures, where the person reading them looks
        report_dir.mkdir(parents=True, exist_ok=True)
        warnings_path.write_text("".join(f"warning: {w}\n" for w in warnings))
    elif warnings_path.exists():  # a resumed run's new final round is what counts
        warnings_path.unlink()
    montage = sizes = purity = None
    if run.has_assignments():
        sizes, chosen, pairs = _scan_assignments(run, manifest, shard_dir, per_cluster)
        counts = sizes
        top = [int(c) for c in np.argsort(-counts)[:max_clusters] if counts[c]]
        nonempty = [int(c) for c in np.flatnonzero(counts)]
        per_page = thumbs_per_cluster(len(nonempty), per_cluster)
        wanted = np.unique(np.concatenate([chosen[c] for c in top if c in chosen]
                                          + [chosen[c][:per_page] for c in nonempty if c in chosen]
                                          + [np.zeros(0, np.int64)]))
        imgs, paths = fetch_by_id(shard_dir, manifest, wanted, size=thumb)
        montage = {c: np.stack([imgs[int(i)] for i in chosen[c] if int(i) in imgs])
                   for c in top if c in chosen and any(int(i) in imgs for i in chosen[c])}
        if pairs is not None:
            names = manifest.class_names
            purity = {}
            for c, (lab, share) in _majorities(pairs).items():
                name = names[lab] if names and 0 <= lab < len(names) else str(lab)
                purity[c] = f"{name} {100 * share:.0f}%"
        drawn = plots.write_report(local, rows, sizes=sizes)
        if montage:
            path = report_dir / "montage.png"
            plots.cluster_montage(montage, path, title=f"{len(montage)} largest clusters: images nearest the centroid",
                                   sizes={c: int(counts[c]) for c in montage}, labels_purity=purity,
                                   max_clusters=max_clusters)
            drawn.append(path)
        entries = []
        for c in nonempty:
            near = [int(i) for i in chosen.get(c, [])[:per_page] if int(i) in imgs]
            entries.append(ClusterEntry(c, int(counts[c]), [image_uri(imgs[i]) for i in near],
                                        [paths.get(i) for i in near], near, (purity or {}).get(c)))
        no_paths = ("These shards carry no source paths (an array source, or folder shards prepared by an older "
                    "raydc): images are shown by id.")
        notes = [] if manifest.has_paths else [no_paths]
        notes += [f"warning: {w}" for w in warnings]
        drawn.append(write_index(report_dir, title=f"raydc run {run.name}", config_text=run.read_config_text(),
                                 pictures=[p for p in drawn if p.suffix == ".png"], clusters=entries, notes=notes))
        return drawn
    return plots.write_report(local, rows)


def _scan_assignments(run: RunDir, manifest, shard_dir: str, per_cluster: int):
    """One pass over the assignment parts, a batch of rows at a time: cluster sizes, the `per_cluster` ids
    nearest each centroid, and (labelled shards) the (label, cluster) pair counts."""
    sizes = np.zeros(0, np.int64)
    best: dict[int, tuple[np.ndarray, np.ndarray]] = {}  # cluster -> (distances, ids), at most per_cluster
    pair_parts = []
    labels = RowLabels(shard_dir, manifest) if manifest.has_labels else None
    for b in run.assignment_batches(["row", "id", "cluster", "distance"]):
        row, ids, clusters, dist = b["row"], b["id"], b["cluster"], b["distance"]
        k = int(clusters.max()) + 1 if len(clusters) else 0
        if k > len(sizes):
            sizes = np.concatenate([sizes, np.zeros(k - len(sizes), np.int64)])
        sizes[:k] += np.bincount(clusters, minlength=k)
        order = np.lexsort((dist, clusters))
        bounds = np.flatnonzero(np.diff(clusters[order])) + 1
        for seg in np.split(order, bounds):
            if not len(seg):
                continue
            c = int(clusters[seg[0]])
            d, i = dist[seg[:per_cluster]], ids[seg[:per_cluster]]
            if c in best:
                d, i = np.concatenate([best[c][0], d]), np.concatenate([best[c][1], i])
                keep = np.argsort(d, kind="stable")[:per_cluster]
                d, i = d[keep], i[keep]
            best[c] = (d, i)
        if labels is not None:
            pair_parts.append(M.PairCounts.of(labels(row), clusters))
            if len(pair_parts) > 16:  # keep the running sum small
                pair_parts = [M.PairCounts.merge(pair_parts)]
    chosen = {c: v[1] for c, v in best.items()}
    return sizes, chosen, (M.PairCounts.merge(pair_parts) if labels is not None else None)


def _majorities(pairs) -> dict[int, tuple[int, float]]:
    """cluster -> (its majority label, that label's share), ties to the lowest label."""
    out: dict[int, tuple[int, float]] = {}
    order = np.lexsort((pairs.a, -pairs.count, pairs.b))
    totals = np.bincount(pairs.b, weights=pairs.count)
    for j in order:
        c = int(pairs.b[j])
        if c not in out:
            out[c] = (int(pairs.a[j]), float(pairs.count[j] / totals[c]))
    return out


class RowLabels:
    """Evaluation labels by row, read from the shards one file at a time as rows ask for them, the last
    `cache` files kept (a tool for reports and `raydc evaluate`; runs score themselves on the shard actors)."""

    def __init__(self, shard_dir: str, manifest, cache: int = 8):
        from collections import OrderedDict

        self.paths = manifest.shard_paths(shard_dir)
        self.starts = np.array([s.row_start for s in manifest.shards], np.int64)
        self.cache = cache
        self._read: OrderedDict[int, np.ndarray] = OrderedDict()

    def __call__(self, rows: np.ndarray) -> np.ndarray:
        import pyarrow.parquet as pq

        rows = np.asarray(rows, np.int64)
        out = np.full(len(rows), -1, np.int64)
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for f in np.unique(which):
            f = int(f)
            if f not in self._read:
                from raydc.storage import open_input_file

                self._read[f] = pq.read_table(open_input_file(self.paths[f]), columns=["label"]).column(
                    "label").to_numpy()
                while len(self._read) > self.cache:
                    self._read.popitem(last=False)
            self._read.move_to_end(f)
            sel = which == f
            out[sel] = self._read[f][rows[sel] - self.starts[f]]
        return out


