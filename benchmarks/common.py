"""Shared benchmark plumbing: timing (warm-up, median and IQR over repeats), machine description, one Ray start
per suite, prepared MNIST shards, and writing `results/<name>.json`.

Timings on a small shared machine are noisy: every benchmark compares implementations *in the same run*,
interleaves their repeats (round robin, so a burst of load from a neighbour hits all of them alike), and
reports medians with the interquartile range. Ratios are what to read; absolute numbers are for this box.
"""
from __future__ import annotations

import raydc  # noqa: F401  (first: sets OPENBLAS_CORETYPE before numpy, scipy or faiss load their OpenBLAS)

import datetime as _dt
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"

# Ray with 4 logical CPUs on this 2-core box: Ray Data's actor pool needs CPUs left beside a Train worker
# (raydc.engine.runtime.local_cpus gives the same number for one 1-CPU worker).
RAY_CPUS = 4


# ----------------------------------------------------------------------------------------------------------
# a subprocess's peak memory


@dataclass(frozen=True)
class ProcessPeaks:
    exit_code: int
    peak_rss_bytes: int    # the kernel's ru_maxrss of the process itself
    peak_anon_bytes: int   # its private memory (RssAnon), sampled from outside
    seconds: float


def run_measured(cmd: list[str], *, env: dict | None = None, stdout=None, stderr=None,
                 sample_s: float = 0.2) -> ProcessPeaks:
    """Run a command to its end and return its peak memory: the resident set from the kernel (`wait4`), the
    private memory sampled every `sample_s` from /proc (the kernel keeps no peak of it). The memory benchmarks
    measure the driver this way, each in a process of its own so the peaks do not mix."""
    import subprocess
    import threading

    from raydc.engine.memory import read_status

    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=stdout, stderr=stderr)
    anon = [0]

    def watch():
        while proc.poll() is None:
            anon[0] = max(anon[0], read_status(proc.pid)["anon"])
            time.sleep(sample_s)

    threading.Thread(target=watch, daemon=True).start()
    _, status, usage = os.wait4(proc.pid, 0)
    return ProcessPeaks(os.waitstatus_to_exitcode(status), int(usage.ru_maxrss) * 1024, anon[0],
                        time.perf_counter() - t0)


# ----------------------------------------------------------------------------------------------------------
# statistics and timing


def summarize(samples: list[float]) -> dict:
    """median, quartiles, IQR, min, max of a list of seconds (or any positive numbers)."""
    xs = sorted(float(s) for s in samples)
    if not xs:
        raise ValueError("no samples")
    if len(xs) >= 2:
        q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive")
    else:
        q1 = q3 = xs[0]
    return {"median": statistics.median(xs), "q1": q1, "q3": q3, "iqr": q3 - q1, "min": xs[0], "max": xs[-1],
            "n": len(xs), "samples": [float(s) for s in samples]}


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def interleaved(fns: dict[str, Callable[[], Any]], *, repeats: int, warmup: int = 1,
                warmup_fns: dict[str, Callable[[], Any]] | None = None,
                log: Callable[[str], None] | None = None) -> tuple[dict[str, dict], dict[str, Any]]:
    """Time each callable `repeats` times, round robin, after `warmup` untimed calls of each.

    `warmup_fns` replaces a callable by a cheaper one for the warm-up (same code path, fewer iterations).
    Returns ({name: summarize(seconds)}, {name: result of its last timed call})."""
    warmup_fns = warmup_fns or {}
    for _ in range(warmup):
        for name, fn in fns.items():
            warmup_fns.get(name, fn)()
    samples: dict[str, list[float]] = {n: [] for n in fns}
    last: dict[str, Any] = {}
    for r in range(repeats):
        for name, fn in fns.items():
            dt, last[name] = timed(fn)
            samples[name].append(dt)
            if log:
                log(f"    {name}: repeat {r + 1}/{repeats} {dt:.3f}s")
    return {n: summarize(s) for n, s in samples.items()}, last


def ratio(numerator: dict | float, denominator: dict | float) -> float:
    """Ratio of two medians (summaries or plain numbers)."""
    a = numerator["median"] if isinstance(numerator, dict) else float(numerator)
    b = denominator["median"] if isinstance(denominator, dict) else float(denominator)
    return a / b if b else float("nan")


# ----------------------------------------------------------------------------------------------------------
# machine description


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # noqa: BLE001 - an optional library may fail to import in odd ways
        return None
    return str(getattr(mod, "__version__", "unknown"))


def load_average() -> list[float]:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return []


def machine_info() -> dict:
    import torch

    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    mem = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    mem = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        from raydc.core.faiss_backend import describe_faiss

        faiss_desc = describe_faiss(0)
    except Exception:  # noqa: BLE001
        faiss_desc = None
    return {
        "cpu_model": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": affinity,
        "memory_gib": mem,
        "gpu": bool(torch.cuda.is_available()),
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "versions": {m: _version(m) for m in ("torch", "ray", "faiss", "numpy", "scipy", "sklearn", "raydc")},
        "faiss_backend": faiss_desc,
        "torch_threads": torch.get_num_threads(),
        "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }


# ----------------------------------------------------------------------------------------------------------
# suite context


def data_root() -> Path:
    env = os.environ.get("RAYDC_DATA_ROOT")
    return Path(env) if env else REPO.parent / "shared" / "data"


@dataclass
class Context:
    """What every benchmark gets: the mode, where to write, a scratch directory, the one Ray runtime."""

    mode: str                                   # "quick" or "full"
    out: Path = RESULTS_DIR
    work: Path = REPO / "tmp" / "bench"         # git-ignored scratch: shards, run directories
    runs: Path = REPO / "runs"                  # where the quality benchmark looks for the long runs
    verbose: bool = False
    run_quality: bool = False
    ray_startup_s: float | None = None
    ray_started_here: bool = False
    ray_start_attempts: int = 0
    notes: list[str] = field(default_factory=list)
    settings: list[str] = field(default_factory=list)  # seeds benchmarks: only these settings (empty: all)

    @property
    def quick(self) -> bool:
        return self.mode == "quick"

    def log(self, msg: str) -> None:
        print(msg, flush=True)

    def ensure_ray(self) -> float:
        """Start Ray once for the suite (local, 4 logical CPUs, no dashboard); returns its start-up seconds."""
        import ray

        from raydc.engine.runtime import configure_data_context

        address = os.environ.get("RAY_ADDRESS")
        if not ray.is_initialized() and address:
            # Join a running Ray (the test session's, or a cluster's) instead of paying for a start of our own.
            t0 = time.perf_counter()
            ray.init(address=address, log_to_driver=self.verbose, configure_logging=False)
            self.ray_startup_s, self.ray_start_attempts = time.perf_counter() - t0, 1
            self.log(f"  joined Ray at {address} in {self.ray_startup_s:.1f}s")
        if not ray.is_initialized():
            # On a heavily loaded machine the raylet can miss Ray's start-up deadline: try again, twice.
            for attempt in range(1, 4):
                t0 = time.perf_counter()
                try:
                    ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False,
                             log_to_driver=self.verbose, configure_logging=False, object_store_memory=2 << 30)
                    break
                except Exception as e:  # noqa: BLE001 - Ray raises a bare Exception on a start-up timeout
                    self.log(f"  ray.init attempt {attempt} failed after {time.perf_counter() - t0:.0f}s: {e}")
                    ray.shutdown()
                    if attempt == 3:
                        raise
                    time.sleep(10)
            self.ray_startup_s = time.perf_counter() - t0
            self.ray_start_attempts = attempt
            self.ray_started_here = True
            self.log(f"  Ray started in {self.ray_startup_s:.1f}s ({RAY_CPUS} logical CPUs)")
        elif self.ray_startup_s is None:
            self.ray_startup_s = 0.0
        configure_data_context()
        return self.ray_startup_s

    def shutdown_ray(self) -> None:
        import ray

        if self.ray_started_here and ray.is_initialized():
            ray.shutdown()

    def mnist_shards(self, split: str = "test", limit: int | None = None, rows_per_shard: int = 10_000,
                     source: str = "mnist") -> tuple[Path, Any]:
        """Prepared shards of MNIST (cached in the scratch directory); returns (directory, manifest)."""
        from raydc.data.manifest import load_manifest
        from raydc.data.prepare import prepare

        from raydc.errors import DataError

        out = self.work / "shards" / f"{source}-{split}-{limit or 'all'}-r{rows_per_shard}"
        if (out / "manifest.json").exists():
            try:
                return out, load_manifest(out)
            except DataError:  # written by an older raydc (format_version): prepared again below
                pass
        root = data_root()
        if not (root / ("MNIST" if source == "mnist" else "FashionMNIST") / "raw").is_dir():
            raise FileNotFoundError(f"{source} not found under {root}: set RAYDC_DATA_ROOT")
        out.parent.mkdir(parents=True, exist_ok=True)
        manifest = prepare(source, out, root=root, split=split, limit=limit, rows_per_shard=rows_per_shard,
                           overwrite=True, progress=False)
        return out, manifest


def decoded_images(shard_dir: Path, manifest) -> tuple[np.ndarray, np.ndarray]:
    """All (ids, uint8 NHWC images) of a shard directory, read with pyarrow (no Ray)."""
    import pyarrow.parquet as pq

    from raydc.data.decode import decode_batch

    ids, imgs = [], []
    for path in manifest.shard_paths(shard_dir):
        t = pq.read_table(path, columns=["id", "image"])
        d = decode_batch({"id": t.column("id").to_numpy(), "image": t.column("image").to_pylist()}, manifest)
        ids.append(d["id"])
        imgs.append(d["image"])
    return np.concatenate(ids), np.concatenate(imgs)


# ----------------------------------------------------------------------------------------------------------
# results


def _clean(obj: Any) -> Any:
    """JSON-safe: numpy scalars/arrays to Python, NaN/Inf to None (strict JSON has neither)."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _clean(obj.tolist())
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        f = float(obj)
        return f if math.isfinite(f) else None
    if isinstance(obj, (np.bool_,)):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_result(ctx: Context, name: str, payload: dict, *, started: float, load_before: list[float]) -> Path:
    """results/<name>.json: the benchmark's payload plus machine, mode, load average and wall time."""
    doc = {
        "benchmark": name,
        "mode": ctx.mode,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "wall_s": time.perf_counter() - started,
        "load_average": {"before": load_before, "after": load_average()},
        "ray_startup_s": ctx.ray_startup_s,
        "machine": machine_info(),
        **payload,
    }
    ctx.out.mkdir(parents=True, exist_ok=True)
    path = ctx.out / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(doc), indent=1, allow_nan=False) + "\n")
    os.replace(tmp, path)
    return path


def read_result(out: Path, name: str) -> dict | None:
    path = Path(out) / f"{name}.json"
    if not path.exists():
        return None
    return json.loads(path.read_text())
