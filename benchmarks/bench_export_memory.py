"""`raydc export`'s peak memory against N: the driver must stay flat whatever the number of images.

Each N gets a synthetic finished run directory (assignment parts of N rows with paths, ids, clusters and
distances, written in the row groups shard actors write; no training: export reads only these files), and
`raydc export` runs as a subprocess per format, its peak resident set taken from the kernel (`wait4`'s
ru_maxrss). Run: `python -m benchmarks.bench_export_memory [--sizes 100000 1000000]`; the result goes to
benchmarks/results/export_memory.json.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import run_measured

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "export_memory.json"


def make_run(run: Path, n: int, parts: int = 4, k: int = 1000, seed: int = 0) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    from raydc.config import load_config
    from raydc.config_loader import dump_yaml, to_dict
    from raydc.engine.rundir import PART_ROW_GROUP, save_safe

    rng = np.random.default_rng(seed)
    cfg = load_config(None, [f"data.shards={run / 'no-shards'}", f"run.dir={run}", f"cluster.k={k}"])
    (run / "assignments").mkdir(parents=True)
    (run / "config.yaml").write_text(dump_yaml(to_dict(cfg)))
    save_safe(run / "clustering.pt", {"config": to_dict(cfg)})
    bounds = np.linspace(0, n, parts + 1).astype(np.int64)
    for p, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        rows = np.arange(a, b, dtype=np.int64)
        pq.write_table(pa.table({
            "row": rows, "id": rows * 7 + 3,
            "path": pa.array([f"photos/folder-{r % 997:03d}/img_{r:09d}.jpg" for r in rows.tolist()]),
            "cluster": rng.integers(0, k, len(rows)), "distance": rng.random(len(rows), dtype=np.float32)}),
            run / "assignments" / f"part-{p:05d}.parquet", row_group_size=PART_ROW_GROUP)


def peak_of(cmd: list[str], env: dict) -> tuple[int, float]:
    """(peak resident bytes, seconds) of a subprocess, from the kernel."""
    with tempfile.TemporaryFile() as err:
        p = run_measured(cmd, env=env, stdout=subprocess.DEVNULL, stderr=err)
        if p.exit_code != 0:
            err.seek(0)
            raise RuntimeError(f"{cmd} failed: {err.read().decode()[-2000:]}")
    return p.peak_rss_bytes, p.seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    rows = []
    with tempfile.TemporaryDirectory(prefix="raydc-export-bench-") as tmp:
        for n in args.sizes:
            run = Path(tmp) / f"run-{n}"
            make_run(run, n)
            for fmt in ("parquet", "csv"):
                out = Path(tmp) / f"out-{n}.{fmt}"
                peak, seconds = peak_of([sys.executable, "-m", "raydc.cli", "export", "--run", str(run), "--out",
                                         str(out), "--format", fmt], env)
                rows.append({"n": n, "format": fmt, "peak_rss_bytes": peak, "seconds": round(seconds, 2),
                             "out_bytes": out.stat().st_size})
                print(json.dumps(rows[-1]), flush=True)
                out.unlink()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "export_memory", "machine": platform.node(),
                                    "cpus": os.cpu_count(), "load_average": os.getloadavg(), "rows": rows},
                                   indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
