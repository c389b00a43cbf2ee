"""Run the benchmark suite: `python -m benchmarks.run --quick|--full [--only NAME[,NAME]] [--out DIR]`.

Ray is started once, before the first benchmark that needs it, and its start-up time is reported on its own
(`suite.json`, and in every result written after it). Each benchmark writes `<out>/<name>.json`; at the end
`render.py` turns whatever results are in `<out>` into RESULTS.md and PNG plots: for the default full-run
directory `benchmarks/results/` the Markdown is `benchmarks/RESULTS.md`, for any other `<out>` it is
`<out>/RESULTS.md`. A quick run writes to `<work>/results-quick` unless `--out` is given, so it never
overwrites the committed full results.
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from benchmarks.common import RESULTS_DIR, Context, _clean, load_average, machine_info, write_result  # noqa: E402

# Cheapest and Ray-free first; the Ray Train ones last.
BENCHMARKS = ["quality", "pca", "kmeans", "reduction", "precision", "allocator", "features", "train", "dac", "epoch", "ablations",
              "seeds", "seeds70k", "demo", "readout", "scale", "scale_frozen", "probes"]
# not in the quick suite (make test runs it) unless named with --only
FULL_ONLY = {"reduction", "precision", "allocator", "dac", "ablations", "seeds", "seeds70k", "demo", "readout", "scale", "scale_frozen",
             "probes"}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group(required=True)
    mode.add_argument("--quick", action="store_true", help="small sizes, the whole suite in a few minutes")
    mode.add_argument("--full", action="store_true", help="the sizes the issue asks for (tens of minutes)")
    ap.add_argument("--only", action="append", default=[],
                    help=f"run only these benchmarks (comma separated, repeatable): {', '.join(BENCHMARKS)}")
    ap.add_argument("--out", type=Path, default=None,
                    help=f"results directory (default: --full {RESULTS_DIR}, --quick <work>/results-quick)")
    ap.add_argument("--work", type=Path, default=None,
                    help="scratch directory for shards and run directories (default <repo>/tmp/bench)")
    ap.add_argument("--runs", type=Path, default=None,
                    help="where the quality benchmark reads the long runs (default <repo>/runs)")
    ap.add_argument("--run-quality", action="store_true",
                    help="(--full) launch the quality runs (runs/fmnist3, runs/mnist, ...) that are missing: hours")
    ap.add_argument("--settings", action="append", default=[],
                    help="(seeds, seeds70k) run only these settings (comma separated); the others keep the rows "
                         "their result file already holds")
    ap.add_argument("--no-render", action="store_true", help="do not write RESULTS.md and plots")
    ap.add_argument("--verbose", action="store_true", help="show Ray's worker logs")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    selected = [s.strip() for item in args.only for s in item.split(",") if s.strip()] or [
        b for b in BENCHMARKS if not (args.quick and b in FULL_ONLY)]
    unknown = [s for s in selected if s not in BENCHMARKS]
    if unknown:
        print(f"unknown benchmark(s) {unknown}; choose from {BENCHMARKS}", file=sys.stderr)
        return 2
    ctx = Context(mode="quick" if args.quick else "full", verbose=args.verbose, run_quality=args.run_quality)
    ctx.settings = [s.strip() for item in args.settings for s in item.split(",") if s.strip()]
    if args.work:
        ctx.work = args.work.resolve()
    if args.runs:
        ctx.runs = args.runs.resolve()
    # The committed results are the full run's; a quick run (a smoke test) goes to the scratch directory
    # unless --out says otherwise, so `make bench-quick` never overwrites them.
    out = (args.out or (RESULTS_DIR if not args.quick else ctx.work / "results-quick")).resolve()
    ctx.out = out
    ctx.work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)

    t_suite = time.perf_counter()
    suite_path = out / "suite.json"
    suite = json.loads(suite_path.read_text()) if suite_path.exists() else {}
    if suite.get("mode") != ctx.mode:
        suite = {}
    suite.setdefault("benchmarks", {})
    failed = []
    print(f"raydc benchmarks ({ctx.mode}): {', '.join(selected)} -> {out}", flush=True)
    for name in [b for b in BENCHMARKS if b in selected]:
        mod = importlib.import_module(f"benchmarks.bench_{name}")
        print(f"[{name}]", flush=True)
        if getattr(mod, "NEEDS_RAY", False):
            ctx.ensure_ray()  # once per suite, timed on its own
        load_before = load_average()
        t0 = time.perf_counter()
        try:
            payload = mod.run(ctx)
            path = write_result(ctx, name, payload, started=t0, load_before=load_before)
            status = "ok"
            print(f"[{name}] {time.perf_counter() - t0:.1f}s -> {path.name}", flush=True)
        except Exception:  # noqa: BLE001 - one failing benchmark must not lose the others' results
            traceback.print_exc()
            status = "failed"
            failed.append(name)
        suite["benchmarks"][name] = {"status": status, "wall_s": time.perf_counter() - t0,
                                     "load_average_before": load_before, "load_average_after": load_average()}
    ctx.shutdown_ray()
    suite.update({"mode": ctx.mode, "ray_startup_s": ctx.ray_startup_s if ctx.ray_startup_s is not None
                  else suite.get("ray_startup_s"), "ray_start_attempts": ctx.ray_start_attempts or None,
                  "last_invocation": {"selected": selected, "wall_s": time.perf_counter() - t_suite,
                                      "load_average_end": load_average()},
                  "machine": machine_info()})
    suite_path.write_text(json.dumps(_clean(suite), indent=1, allow_nan=False) + "\n")
    print(f"suite: {time.perf_counter() - t_suite:.1f}s"
          + (f" (Ray start-up {ctx.ray_startup_s:.1f}s)" if ctx.ray_startup_s else ""), flush=True)
    if not args.no_render:
        from benchmarks.render import render

        md = render(out)
        print(f"rendered {md}", flush=True)
    if failed:
        print(f"FAILED: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
