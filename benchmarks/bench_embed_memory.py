"""`raydc embed`'s driver memory against N: the Parquet parts are written by Ray tasks as the feature pool
finishes each piece, so the driver must hold nothing O(N).

One small finished run (the scaling benchmark's DeepCluster round, `train.epochs=0`: features, PCA and k-means
on 20,000 synthetic 8x8 images, the network untrained: embed's memory does not depend on what it learned),
then `raydc embed --run RUN --data SHARDS` as a subprocess over synthetic shards of each N. The driver's peak
resident set comes from the kernel (`wait4`'s ru_maxrss) and its peak private memory (RssAnon) is sampled from
outside, as in bench_scale; the parts are read back to check every row arrived. Each embed starts its own
local Ray. Run: `python -m benchmarks.bench_embed_memory [--sizes 100000 1000000]`; the result goes to
benchmarks/results/embed_memory.json.
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

from benchmarks.bench_scale import CONFIG, make_npz
from benchmarks.common import run_measured

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "results" / "embed_memory.json"
RUN_N = 20_000


def shards(work: Path, n: int) -> Path:
    from raydc.data.prepare import prepare

    out = work / f"shards-{n}"
    npz = work / f"images-{n}.npz"
    make_npz(npz, n)
    prepare("npz", out, root=npz, rows_per_shard=250_000, overwrite=True, progress=False)
    npz.unlink()
    return out


def measured(cmd: list[str], env: dict, log: Path) -> dict:
    """Peak resident and private bytes of a subprocess's own process and its seconds."""
    with log.open("w") as f:
        p = run_measured(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if p.exit_code != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed; see {log}:\n{log.read_text()[-2000:]}")
    return {"peak_rss_bytes": p.peak_rss_bytes, "peak_anon_bytes": p.peak_anon_bytes, "seconds": round(p.seconds, 1)}


def main(argv: list[str] | None = None) -> int:
    import pyarrow.dataset as pads

    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = ap.parse_args(argv)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own
    env["PYTHONPATH"] = str(REPO)
    raydc = [sys.executable, "-m", "raydc.cli"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="raydc-embed-bench-", dir=args.work) as tmp:
        work = Path(tmp)
        config = work / "run.yaml"
        config.write_text(CONFIG)
        run = work / "run"
        trained = measured([*raydc, "train", "--config", str(config), "--set", f"data.shards={shards(work, RUN_N)}",
                            "--set", f"run.dir={run}", "--set", "train.epochs=0", "--overwrite"], env,
                           work / "train.log")
        print(json.dumps({"run": str(run), **trained}), flush=True)
        for n in args.sizes:
            data = shards(work, n)
            out = work / f"embed-{n}"
            row = {"n": n, **measured([*raydc, "embed", "--run", str(run), "--data", str(data), "--out", str(out)],
                                      env, work / f"embed-{n}.log")}
            ds = pads.dataset(out, format="parquet")
            row["rows_out"] = ds.count_rows()
            row["dim"] = len(ds.head(1).column("embedding")[0])
            if row["rows_out"] != n:
                raise RuntimeError(f"embed of {n} images wrote {row['rows_out']} rows")
            rows.append(row)
            print(json.dumps(row), flush=True)
            subprocess.run(["rm", "-rf", str(out), str(data)], check=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"benchmark": "embed_memory", "machine": platform.node(), "cpus": os.cpu_count(),
                                    "load_average": os.getloadavg(), "run_images": RUN_N, "config": CONFIG,
                                    "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
