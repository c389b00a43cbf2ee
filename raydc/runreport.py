"""The pictures of a finished run: montage of the images nearest each centroid, metric curves, sizes.

Runs on the driver after training, from files alone (metrics.jsonl, assignments.parquet, the shards), so
`raydc report --run DIR` can redraw it at any time. Images are fetched by id with a pyarrow filter pushed
down to the Parquet row groups: only the few hundred montage images are read, not the dataset.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from raydc.core import metrics as M
from raydc.engine.rundir import RunDir


def images_by_id(shard_dir: str, manifest, ids: np.ndarray, size: int | None = None) -> dict[int, np.ndarray]:
    import pyarrow.dataset as pads

    from raydc.data.decode import decode_batch

    files = manifest.shard_paths(shard_dir)
    table = pads.dataset(files, format="parquet").to_table(
        columns=["id", "image"], filter=pads.field("id").isin(list(map(int, ids))))
    if table.num_rows == 0:
        return {}
    batch = {"id": table.column("id").to_numpy(), "image": np.array(table.column("image").to_pylist(), dtype=object)}
    d = decode_batch(batch, manifest, size=size if manifest.image_shape is None else None)
    return {int(i): img for i, img in zip(d["id"], d["image"])}


def write_run_report(run_dir: str | Path, shard_dir: str, manifest, *, per_cluster: int = 16,
                     max_clusters: int = 100, thumb: int = 64) -> list[Path]:
    from raydc import report

    run = RunDir(run_dir)
    rows = run.read_metrics()
    warnings = [r["quality_warning"] for r in rows if r.get("quality_warning")]
    warnings_path = run.report_dir / "WARNINGS.txt"
    if warnings:  # beside the pictures, where the person reading them looks
        run.report_dir.mkdir(parents=True, exist_ok=True)
        warnings_path.write_text("".join(f"warning: {w}\n" for w in warnings))
    elif warnings_path.exists():  # a resumed run's new final round is what counts
        warnings_path.unlink()
    montage = sizes = purity = None
    if (run.path / "assignments.parquet").exists():
        a = run.read_assignments()
        ids, clusters, dist = a["id"], a["cluster"], a["distance"]
        k = int(clusters.max()) + 1 if len(clusters) else 0
        counts = np.bincount(clusters, minlength=k)
        sizes = counts
        order = np.lexsort((dist, clusters))
        starts = np.concatenate([[0], np.cumsum(counts)])
        top = np.argsort(-counts)[:max_clusters]
        chosen = {int(c): ids[order[starts[c]:starts[c] + min(per_cluster, counts[c])]] for c in top if counts[c]}
        wanted = np.concatenate(list(chosen.values())) if chosen else np.zeros(0, np.int64)
        imgs = images_by_id(shard_dir, manifest, wanted, size=thumb)
        montage = {c: np.stack([imgs[int(i)] for i in members if int(i) in imgs])
                   for c, members in chosen.items() if any(int(i) in imgs for i in members)}
        labels = _labels_for(shard_dir, manifest, ids) if manifest.has_labels else None
        if labels is not None:
            names = manifest.class_names
            purity = {}
            for r in M.cluster_table(labels, clusters):
                lab = r["majority_label"]
                name = names[lab] if names and 0 <= lab < len(names) else str(lab)
                purity[int(r["cluster"])] = f"{name} {100 * r['purity']:.0f}%"
        paths = report.write_report(run.path, rows, sizes=sizes)
        if montage:
            path = run.report_dir / "montage.png"
            report.cluster_montage(montage, path, title=f"{len(montage)} largest clusters: images nearest the centroid",
                                   sizes={c: int(counts[c]) for c in montage}, labels_purity=purity,
                                   max_clusters=max_clusters)
            paths.append(path)
        return paths
    return report.write_report(run.path, rows)


def _labels_for(shard_dir: str, manifest, ids: np.ndarray) -> np.ndarray:
    import pyarrow.dataset as pads

    files = manifest.shard_paths(shard_dir)
    t = pads.dataset(files, format="parquet").to_table(columns=["id", "label"])
    lookup = np.full(int(t.column("id").to_numpy().max()) + 1, -1, np.int64)
    lookup[t.column("id").to_numpy()] = t.column("label").to_numpy()
    return lookup[ids]
