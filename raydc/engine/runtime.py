"""Starting or joining Ray, once per process.

`ray job submit` runs the entry point on a cluster node with RAY_ADDRESS set: we join that cluster. On a
laptop nothing is running: we start an embedded local Ray (CPU only is fine). Ray Data's `preserve_order` is
switched on so a run with the same seed reads rows in the same order (determinism on CPU, and exact resume).

Output: by default a run prints its own lines only (one per round from the Train worker, the driver's few): Ray
does not forward the workers' output (`log_to_driver=False`) and the run's lines come through
`raydc.engine.console`. Ray's chatter (Train controller and worker-start messages, Ray Data, faiss and other
actors' output, dedup notes) shows with `--verbose` or RAYDC_VERBOSE=1. Worker lines used to appear twice: Ray Train
V2 patches `print` in its workers to log to the root logger, whose console handler writes to stderr, and tees
to the original `print` as well because Ray replaced `sys.stdout` in every worker; with `log_to_driver` both
copies reach the driver. RAY_TRAIN_ENABLE_PRINT_PATCH=0 (propagated by Train to its controller and workers)
removes the copy at its source, verbose or not.

One notice is not covered by `log_to_driver`: the raylet's "N PYTHON worker processes have been started ...,
which is 6x the maximum expected startup concurrency". A run starts a dozen short-lived actors (Train's
controller, its workers, the feature pool, Ray Data's coordinators), and on a 2-core machine that crosses the
raylet's threshold every time. Ray publishes it to every driver on the error channel, whose listener prints
regardless of `log_to_driver`. Quiet mode drops that one message (`_quiet_error_printer`) and keeps every
other raylet error (a task killed for memory, a dead node). A dead raylet's report is printed once, though Ray's two
agents each send it, and without the 20 lines of the raylet's log they attach.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # the CLI imports this module for --help: no torch (raydc.config's method sections) there
    from raydc.config import RayConfig

VERBOSE_ENV = "RAYDC_VERBOSE"
# Ray Train's controller takes a worker's `ray.train.report` only when it polls the workers, every
# RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), and a worker's second report waits until the first is
# taken (a queue of one). raydc reports once per round, so every round of a small run lasted at least one poll
# interval and the run's end waited for another. A user's own setting wins; Train propagates it to its
# controller and workers. Each poll is one small call per worker.
HEALTH_CHECK_ENV, HEALTH_CHECK_INTERVAL_S = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25"
# Ray Train starts an actor per fit that polls the nodes' drain state for spot-instance preemption. A Ray that raydc
# starts itself is this one machine, which nothing drains: the watcher is one more process to start per run. Off
# there unless the user set it; a cluster that raydc joins keeps Ray Train's default.
PREEMPTION_WATCHER_ENV = "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER"


def verbose() -> bool:
    """True when the user asked for Ray's own output: `--verbose` sets RAYDC_VERBOSE, which `ray job submit`
    users can set themselves (`--runtime-env-json '{"env_vars": {"RAYDC_VERBOSE": "1"}}'`)."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() in ("1", "true", "yes", "on")


def set_verbose(on: bool) -> None:
    if on:
        os.environ[VERBOSE_ENV] = "1"


def train_run_config_kwargs(verbose_output: bool | None = None) -> dict:
    """Arguments for `ray.train.RunConfig`: Ray Train's own INFO lines (worker-group start, and a
    `Reporting training result N: TrainingReport(...)` dump of every metrics dict) only when verbose."""
    from ray.train import LoggingConfig

    on = verbose() if verbose_output is None else verbose_output
    return {"logging_config": LoggingConfig(log_level="INFO" if on else "WARNING")}


def local_cpus(cfg: RayConfig, train_cpus: float) -> int:
    """Logical CPUs for an embedded local Ray: the machine's cores *plus* what the Train workers reserve.

    Training and the feature pass alternate, they never run at once, yet Ray reserves the workers' CPUs
    for the whole fit. With the real count alone, a 2-core laptop has 1 CPU left beside one Train worker,
    and Ray Data's actor pool then never starts (measured here: it needs more than 1 free CPU, and hangs
    silently otherwise). Counting the workers' share twice is the over-commit that never materialises."""
    if cfg.num_cpus:
        return cfg.num_cpus
    return int((os.cpu_count() or 1) + max(0.0, train_cpus) + 0.999)


def ray_train_env(*, started_here: bool) -> dict[str, str]:
    """Ray Train settings raydc's runs want where the user set none (Train hands the driver's values to its
    controller and workers): no doubled lines, a short poll interval, and, on a Ray that raydc starts itself, no
    preemption watcher."""
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", HEALTH_CHECK_ENV: HEALTH_CHECK_INTERVAL_S}
    if started_here:
        env[PREEMPTION_WATCHER_ENV] = "0"
    return env


def init_ray(cfg: RayConfig, *, train_cpus: float = 1.0, quiet: bool | None = None,
             include_dashboard: bool | None = None) -> None:
    """Start or join Ray. `quiet` (default: not `verbose()`) keeps the workers' and actors' output off this
    process's console (`log_to_driver=False`): the run's own lines reach it through `raydc.engine.console`.
    `include_dashboard` only applies to a Ray started here."""
    import logging

    import ray

    quiet = not verbose() if quiet is None else quiet
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    for name, value in ray_train_env(started_here=not ray.is_initialized() and not address).items():
        os.environ.setdefault(name, value)  # a user's own setting wins
    if not ray.is_initialized():
        # The dashboard brings the state API that Ray Train's placement-group cleaner and Tune's early stopping use.
        kwargs = dict(log_to_driver=not quiet, configure_logging=not quiet)
        if quiet:
            # ray.init's own notices (token authentication, dashboard URL) go through the `ray` logger.
            logging.getLogger("ray").setLevel(logging.ERROR)
        # ray.init replaces the process's SIGTERM handler with a bare sys.exit; keep the caller's (raydc's CLI
        # turns SIGTERM into a clean exit with a resume hint).
        sigterm = signal.getsignal(signal.SIGTERM) if threading.current_thread() is threading.main_thread() else None
        if address:
            ray.init(address=address, **kwargs)
        else:
            ray.init(address="local", num_cpus=local_cpus(cfg, train_cpus), include_dashboard=include_dashboard,
                     **kwargs)
        if sigterm not in (None, signal.SIG_DFL, signal.SIG_IGN):
            signal.signal(signal.SIGTERM, sigterm)
    _quiet_raylet_notices(quiet)
    if quiet:
        for name in ("ray", "ray.data", "ray.train", "ray.tune"):
            logging.getLogger(name).setLevel(logging.WARNING)
    configure_data_context()


def configure_data_context() -> None:
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = os.environ.get("RAYDC_DATA_PROGRESS", "0") == "1"
    if not ctx.enable_progress_bars and not verbose():
        # Ray Data warns once per process that its bars are off (a driver-side `materialize`, data.cache): we
        # turned them off.
        logging.getLogger("ray.data._internal.progress").setLevel(logging.ERROR)
    ctx.print_on_execution_start = False


WORKER_POOL_NOTICE = "PYTHON worker processes have been started"
# Ray's dashboard and runtime-env agents each report a dead raylet with the tail of its log (20 lines of its INFO
# logging). Quiet mode keeps what happened and drops the tail and the second copy: the CLI's own line that follows
# says what was lost and how to resume.
RAYLET_DIED = "Raylet is terminated."
RAYLET_LOG_TAIL = re.compile(r"\s*Last \d+ lines of the Raylet logs:.*", re.S)
RAYLET_LOG_HINT = " (its log: raylet.out in Ray's session logs, or --verbose)"


def _quiet_error_printer(print_to_stdstream):
    """Wrap Ray's error-channel printer: the worker-pool size notice is dropped, a dead raylet's report printed once
    without its log tail, every other line printed as it is."""
    said: set[str] = set()

    def shorter(line: str) -> str | None:
        if WORKER_POOL_NOTICE in line:
            return None
        if RAYLET_DIED in line:
            cut = RAYLET_LOG_TAIL.sub("", line).rstrip()
            if cut in said:
                return None
            said.add(cut)
            return cut + RAYLET_LOG_HINT if cut != line.rstrip() else cut
        return line

    def printer(data, ignore_prefix: bool):
        lines = data.get("lines", [])
        if data.get("pid") == "raylet":
            lines = [short for short in map(shorter, lines) if short is not None]
        if lines:
            print_to_stdstream({**data, "lines": lines}, ignore_prefix=ignore_prefix)
    printer.raydc_original = print_to_stdstream
    return printer


def _quiet_raylet_notices(on: bool) -> None:
    """`ray._private.worker.listen_error_messages` looks `print_to_stdstream` up in its module on every message,
    so swapping the module's name filters the error channel without touching the log channel (bound at connect)."""
    from ray._private import worker

    current = worker.print_to_stdstream
    original = getattr(current, "raydc_original", current)
    worker.print_to_stdstream = _quiet_error_printer(original) if on else original


_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.data._internal.progress")
_ENV = (VERBOSE_ENV, "RAY_TRAIN_ENABLE_PRINT_PATCH", HEALTH_CHECK_ENV, PREEMPTION_WATCHER_ENV)


@contextlib.contextmanager
def ray_state_kept(verbose_output: bool = False):
    """Around one Python-API call (raydc.api): whatever `init_ray` changes for a quiet console is put back on
    the way out (the loggers' levels, the environment, Ray Data's context) and a Ray started here is shut down,
    so a notebook's Ray and its output are as they were, and the next call starts from the same state."""
    import ray
    from ray._private import worker
    from ray.data import DataContext

    started = not ray.is_initialized()
    levels = {name: logging.getLogger(name).level for name in _LOGGERS}
    env = {name: os.environ.get(name) for name in _ENV}
    ctx = DataContext.get_current()
    data = (ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start)
    printer = worker.print_to_stdstream  # quiet mode's filter on Ray's error channel, or Ray's own
    if verbose_output:
        os.environ[VERBOSE_ENV] = "1"
    try:
        yield
    finally:
        if started and ray.is_initialized():
            ray.shutdown()
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)
        for name, value in env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        ctx.execution_options.preserve_order, ctx.enable_progress_bars, ctx.print_on_execution_start = data
        worker.print_to_stdstream = printer
