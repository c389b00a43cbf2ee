"""`raydc` command line: argument parsing only; the work lives in raydc.data and raydc.engine.

User errors (bad config field, missing data, existing run directory) print one line and exit with code 2,
without a traceback; anything else is a bug and keeps its traceback. Ctrl-C (130) and SIGTERM (143: a
scheduler's kill, `ray job stop`, `timeout`) end the same way: one line saying how to resume. So does a Ray
cluster that goes away under a command (exit 1: `ray stop`, its head or a node lost, a process killed for memory):
what was lost is named in one line, and --verbose keeps Ray's traceback.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading

from raydc.errors import UserError


class Terminated(KeyboardInterrupt):
    """SIGTERM turned into an exception, so it unwinds like Ctrl-C (finally blocks, Ray's shutdown) and ends
    with the resume hint instead of Ray's stack dumps. A KeyboardInterrupt because Ray's blocking calls
    (`ray.get` under `fit()`) check signals and pass on only KeyboardInterrupt: any other exception raised by a
    handler there is discarded and the run goes on. Ray re-raises a fresh KeyboardInterrupt, hence the flag."""


_terminated = False


def _stop_message(command: str, how: str) -> str:
    return f"raydc: {how}" + ("; resume with --resume" if command == "train" else "")


def _sigterm_handler(command: str):
    def on_sigterm(signum, frame):
        global _terminated
        _terminated = True
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM during the clean-up ends it at once
        # Said now, not after unwinding: when the whole process group got the signal (`timeout`, a batch
        # scheduler), an embedded Ray died with us and the clean-up may never get as far as printing.
        print(_stop_message(command, "terminated (SIGTERM)"), file=sys.stderr, flush=True)
        raise Terminated()

    return on_sigterm


def _common_arguments() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--verbose", action="store_true",
                   help="show Ray's own output (Train, Data, worker start-up); also RAYDC_VERBOSE=1")
    return p


def _add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (see jobs/configs/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set cluster.k=100 "
                        "(repeatable; every field: `raydc config show`)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--resume", action="store_true", help="continue the run in run.dir from its last checkpoint")
    g.add_argument("--overwrite", action="store_true", help="delete run.dir and start again")


def build_parser() -> argparse.ArgumentParser:
    from raydc.data.commands import add_prepare_arguments

    from raydc.config_doc import add_config_arguments, version_line

    parser = argparse.ArgumentParser(prog="raydc", description="Deep clustering of images on Ray")
    parser.add_argument("--version", action="version", version=version_line())
    sub = parser.add_subparsers(dest="command", required=True)
    common = [_common_arguments()]
    add_config_arguments(sub.add_parser("config", help="show every config field (default, comment) or its schema",
                                        parents=common))

    add_prepare_arguments(sub.add_parser("prepare", help="write Parquet image shards from a dataset",
                                         parents=common))

    p = sub.add_parser("train", help="train and cluster (DeepCluster, DEC or DAC, per the config's `method`)",
                       parents=common)
    _add_run_arguments(p)

    p = sub.add_parser("sweep", help="Ray Tune sweep of config fields; picks a winner without labels",
                       parents=common)
    _add_run_arguments(p)
    p.add_argument("--sweep", required=True, help="sweep file (see jobs/sweeps/)")
    p.add_argument("--dir", help="sweep directory (default: the sweep file's `dir`)")
    p.add_argument("--supervised-selection", action="store_true",
                   help="allow select.metric acc/nmi/ari (needs labels)")

    p = sub.add_parser("assign", help="assign new images to a trained run's clusters", parents=common)
    p.add_argument("--run", required=True, help="a finished run directory")
    p.add_argument("--data", required=True, help="shard directory of the images to assign")
    p.add_argument("--out", help="output Parquet (default: RUN/assign-<shards name>.parquet)")

    from raydc.engine.embed import add_embed_arguments
    from raydc.export import add_export_arguments

    add_embed_arguments(sub.add_parser("embed", help="the trained network's features of any shards, as Parquet",
                                       parents=common))

    add_export_arguments(sub.add_parser("export", help="a finished run's clusters as a table or folders of files",
                                        parents=common))

    p = sub.add_parser("report", help="redraw a run's report (montage, curves) from its files", parents=common)
    p.add_argument("--run", required=True)

    p = sub.add_parser("evaluate", help="print ACC/NMI/ARI of a run's assignments against the shards' labels",
                       parents=common)
    p.add_argument("--run", required=True)
    p.add_argument("--nmi", default="arithmetic", choices=["arithmetic", "geometric", "min", "max"])
    p.add_argument("--probe", choices=["knn", "linear", "both"], help="instead: a k-NN or linear probe of the run's "
                   "network, trained on --train-split, scored on --test-split (written to RUN/probes/)")
    p.add_argument("--train-split", default="train", help="train, test, all (of data.source) or a shard directory")
    p.add_argument("--test-split", default="test", help="as --train-split")
    return parser


def main(argv: list[str] | None = None) -> int:
    from raydc.engine.runtime import set_verbose

    parser = build_parser()
    args = parser.parse_args(argv)
    set_verbose(args.verbose)
    main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live only there
    # raydc.engine.runtime.init_ray puts this handler back after ray.init replaces it.
    previous = signal.signal(signal.SIGTERM, _sigterm_handler(args.command)) if main_thread else None
    try:
        return _dispatch(args)
    except UserError as e:
        print(f"raydc: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if isinstance(e, Terminated) or _terminated:
            return 143  # the handler has said so already
        print(_stop_message(args.command, "interrupted"), file=sys.stderr)
        return 130
    except Exception as e:
        from raydc.engine.ray_errors import killed_for_memory, ray_lost
        from raydc.engine.runtime import verbose

        lost = ray_lost(e)
        if lost is None or verbose():
            raise
        what = " ".join(str(lost).split())[:300]
        if killed_for_memory(lost):
            print(f"raydc: Ray killed part of the run for lack of memory on a node ({type(lost).__name__}: {what})",
                  file=sys.stderr)
            print("raydc: give it more memory or smaller batches (train.batch_size, features.batch_size)"
                  + (", and resume with --resume" if args.command == "train" else ""), file=sys.stderr)
        else:
            print(_stop_message(args.command, f"Ray lost part of the run ({type(lost).__name__}: {what})"),
                  file=sys.stderr)
        print("raydc: --verbose shows Ray's traceback", file=sys.stderr)
        return 1
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)


def _dispatch(args) -> int:
    if args.command == "config":
        from raydc.config_doc import run_config_show

        return run_config_show(args)
    if args.command == "prepare":
        from raydc.data.commands import run_prepare

        return run_prepare(args)
    if args.command == "train":
        from raydc.config import load_config
        from raydc.engine.trainer import run_training

        cfg = load_config(args.config, args.overrides)
        run_training(cfg, resume=args.resume, overwrite=args.overwrite)
        return 0
    if args.command == "sweep":
        from raydc.sweep.runner import run_sweep

        out = run_sweep(args.config, args.sweep, args.overrides, resume=args.resume, overwrite=args.overwrite,
                        supervised=args.supervised_selection, sweep_dir=args.dir)
        return 0 if out.best is not None else 1
    if args.command == "assign":
        from raydc.engine.assign import assign_images

        path = assign_images(args.run, args.data, args.out)
        print(f"assignments written to {path}")
        return 0
    if args.command == "embed":
        from raydc.engine.embed import run_embed

        return run_embed(args)
    if args.command == "export":
        from raydc.export import run_export

        return run_export(args)
    if args.command == "report":
        from raydc.data.manifest import load_manifest
        from raydc.engine.evaluate import open_run
        from raydc.run_report import write_run_report

        run, cfg = open_run(args.run)
        paths = write_run_report(run.location, cfg.data.shards, load_manifest(cfg.data.shards))
        print("\n".join(str(p) for p in paths))
        return 0
    if args.command == "evaluate":
        if args.probe:
            from raydc.engine.probe import probe_command

            return probe_command(args)
        from raydc.engine.evaluate import evaluate_run

        for k, v in evaluate_run(args.run, args.nmi).items():
            print(f"{k}: {v}")
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":
    sys.exit(main())
