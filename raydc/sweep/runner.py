"""`raydc sweep`: check everything, start (or join) Ray, run the trials with Ray Tune, write the outputs.

The sweep directory holds the sweep's inputs as it ran them (`base.yaml`, `sweep.yaml`), Tune's experiment
(`tune/`), one run directory per trial (`runs/<trial id>/`), and the outputs (`trials.csv`, `best.yaml`,
`report/`). `--resume` restores Tune's experiment from `tune/`: finished trials stay finished, unfinished and
errored ones start again and continue their run directories from their last checkpoint.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from ray.tune import Callback

from raydc import storage
from raydc.config import Config, load_config
from raydc.config_loader import config_diff, dump_yaml, from_dict, parse_yaml, resumable_keys, to_dict
from raydc.errors import ConfigError, UserError
from raydc.sweep.config import SweepConfig, load_sweep
from raydc.sweep.select import TrialRecord, label_agreement, select_best, selection_label
from raydc.sweep.trial import run_trial, under


@dataclass
class SweepOutcome:
    sweep_dir: Path | str  # a Path on local disk, a URI string on object storage (`dir: s3://...`)
    records: list[TrialRecord]
    best: TrialRecord | None
    paths: list[Path | str]


def prepare_inputs(config: str | None, sweep_path: str | None, overrides: list[str], *, supervised: bool,
                   resume: bool, overwrite: bool, sweep_dir: str | None = None, log=print
                   ) -> tuple[Config, SweepConfig, Path | str]:
    """Load and check the base config and the sweep; on resume, the saved copies win (placement aside)."""
    sweep = load_sweep(sweep_path, {"select.supervised": True} if supervised else {})
    if sweep_dir:
        sweep.dir = sweep_dir
    cfg = load_config(config, overrides)
    for name, value in sweep.resources.overrides().items():
        section, field = name.split(".")
        setattr(getattr(cfg, section), field, value)
    if not storage.is_uri(cfg.data.shards):
        cfg.data.shards = str(Path(cfg.data.shards).expanduser().resolve())
    cfg = from_dict(Config, to_dict(cfg))  # the resources overrides pass the run config's checks too
    out = sweep.dir.rstrip("/") if storage.is_uri(sweep.dir) else Path(sweep.dir).expanduser().resolve()
    sweep.dir = str(out)
    saved = str(under(out, "sweep.yaml")), str(under(out, "base.yaml"))
    if resume and storage.is_file(saved[0]):
        old_sweep = from_dict(SweepConfig, parse_yaml(storage.read_text(saved[0]), saved[0]))
        old_cfg = from_dict(Config, parse_yaml(storage.read_text(saved[1]), saved[1]))
        _compare(to_dict(old_sweep), to_dict(sweep), resumable_keys(SweepConfig), "")
        # of the base config only where Ray runs: every other field, budgets too, is part of what each trial is
        placement = frozenset(k for k in resumable_keys(Config) if k.startswith("ray."))
        _compare(to_dict(old_cfg), to_dict(cfg), placement, "base config ")
        old_sweep.resources.max_concurrent_trials = sweep.resources.max_concurrent_trials
        old_sweep.select = sweep.select
        old_cfg.ray = cfg.ray
        return old_cfg, old_sweep, out
    if storage.list_entries(str(out)) and not resume:
        if not overwrite:
            raise UserError(f"sweep directory {out} already exists: pass --resume to continue it, --overwrite to "
                            f"start again, or set dir in the sweep file")
        storage.delete_dir(str(out))
    return cfg, sweep, out


def _compare(saved: dict, given: dict, allowed: frozenset[str], what: str) -> None:
    """A resumed sweep may take from the new files only their `resumable` fields (where and how many trials run
    at once, how the winner is picked: selection reads finished rows and changes no trial)."""
    for key, old, new in config_diff(saved, given, opaque=("space",)):
        if key not in allowed:
            raise ConfigError(key, f"{what}is {new!r} but the sweep being resumed has {old!r}; only "
                                   f"{', '.join(sorted(allowed))} may change on --resume")


def start_ray(cfg: Config, sweep: SweepConfig) -> bool:
    """Join a running cluster (RAY_ADDRESS under `ray job submit`) or start an embedded one. Returns True when
    the sweep started a local Ray itself. ASHA needs the dashboard's state API (without it a stopped Train
    trial's placement group is never freed); without ASHA the dashboard is left off, so parallel local Rays on
    one machine do not fight over its fixed agent port."""
    import ray

    from raydc.engine.runtime import init_ray

    train_cpus = cfg.train.num_workers * cfg.train.cpus_per_worker
    joined = ray.is_initialized() or cfg.ray.address or os.environ.get("RAY_ADDRESS")
    # The console gets the sweep's own lines (Tune's table, one line per trial) and each trial's "[trial ...]"
    # lines (raydc.engine.console); Ray Train's, Ray Data's and faiss's output from the trials' actors only with
    # --verbose.
    init_ray(cfg.ray, train_cpus=train_cpus, include_dashboard=sweep.scheduler.name == "asha")
    return not joined


def trial_cpus(cfg: Config) -> float:
    """What one trial keeps busy: its Train workers, its feature pool, one CPU for reads and k-means."""
    return cfg.train.num_workers * cfg.train.cpus_per_worker + cfg.features.concurrency * cfg.features.num_cpus + 1


def concurrency(cfg: Config, sweep: SweepConfig) -> int:
    """Trials at once. A single node of a few cores runs one: each trial's feature pass and k-means already use
    every core. On a cluster: as many as the CPUs (and GPUs, when trials use them) hold."""
    import ray

    if sweep.resources.max_concurrent_trials:
        return sweep.resources.max_concurrent_trials
    res = ray.cluster_resources()
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    cpus = res.get("CPU", 1.0)
    if len(nodes) <= 1 and cpus <= 8:
        return 1
    n = int(cpus // trial_cpus(cfg))
    gpus = res.get("GPU", 0.0)
    if gpus and cfg.train.use_gpu != "never":
        n = min(n, int(gpus // cfg.train.num_workers))
    return max(1, n)


def _trainable(base: dict, sweep_dir: Path | str, lines=None):
    from ray import tune

    # The trial actor only drives its TorchTrainer (whose workers reserve their own CPUs); Tune needs a
    # non-zero request, and a whole CPU here would be a CPU taken from a 2-core machine for nothing.
    return tune.with_resources(tune.with_parameters(run_trial, base=base, sweep_dir=str(sweep_dir),
                                                         lines=lines), {"CPU": 0.01})


def _tune_config(sweep: SweepConfig, max_concurrent: int):
    from ray import tune
    from ray.tune.search.basic_variant import BasicVariantGenerator

    s = sweep.search
    if s.algorithm == "optuna":
        try:
            from ray.tune.search.optuna import OptunaSearch

            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("search.algorithm", "optuna is not installed: pip install 'raydc[tune]'") from None
        search_alg, limit = OptunaSearch(metric=sweep.select.metric, mode=sweep.select.direction, seed=s.seed), \
            max_concurrent
    else:  # Tune ignores max_concurrent_trials for a generator it did not build: give it the limit itself
        search_alg, limit = BasicVariantGenerator(random_state=s.seed, max_concurrent=max_concurrent), None
    scheduler = None
    if sweep.scheduler.name == "asha":
        from ray.tune.schedulers import ASHAScheduler

        sc = sweep.scheduler
        scheduler = ASHAScheduler(time_attr="training_iteration", metric=sc.metric, mode=sc.mode, max_t=sc.max_t,
                                  grace_period=sc.grace_period, reduction_factor=sc.reduction_factor)
    return tune.TuneConfig(search_alg=search_alg, scheduler=scheduler, num_samples=s.num_samples,
                           max_concurrent_trials=limit)


class TrialLines(Callback):
    """One line per finished trial on the driver's console, beside Tune's table."""

    def __init__(self, sweep: SweepConfig, total: int, log):
        # Tune creates trials as slots free up, so `trials` holds only those started so far: count the plan.
        self.sweep, self.total, self.log = sweep, total, log

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._line(trials, trial, "done" if (trial.last_result or {}).get("final") else "stopped early")

    def on_trial_error(self, iteration, trials, trial, **info):
        self._line(trials, trial, "error")

    def _line(self, trials, trial, status):
        r = trial.last_result or {}
        finished = sum(t.status in ("TERMINATED", "ERROR") for t in trials if t is not trial) + 1
        parts = [f"trial {trial.trial_id} {status} ({finished}/{max(self.total, len(trials))})",
                 " ".join(f"{p.name}={trial.config.get(p.name)}" for p in self.sweep.params())]
        m = self.sweep.select.metric
        if isinstance(r.get(m), (int, float)):
            parts.append(f"{m} {r[m]:.4g}")
        if isinstance(r.get("acc"), (int, float)) and m != "acc":
            parts.append(f"ACC {r['acc']:.3f}")
        if "time_total_s" in r:
            parts.append(f"{r['time_total_s']:.0f} s")
        self.log(" | ".join(parts))


def run_sweep(config: str | None, sweep_path: str | None, overrides: list[str] = (), *, resume: bool = False,
              overwrite: bool = False, supervised: bool = False, sweep_dir: str | None = None,
              log=print) -> SweepOutcome:
    from ray import tune

    from raydc.engine.console import open_console
    from raydc.engine.runtime import verbose
    from raydc.engine.trainer import ensure_shards
    from raydc.sweep import outputs
    from raydc.sweep.space import check_space, grid_size, tune_space

    cfg, sweep, out = prepare_inputs(config, sweep_path, list(overrides), supervised=supervised, resume=resume,
                                     overwrite=overwrite, sweep_dir=sweep_dir, log=log)
    manifest = ensure_shards(cfg, log)  # once, here: parallel trials must not all prepare the same shards
    base = to_dict(cfg)
    n_probe = check_space(sweep, base, manifest)
    storage.makedirs(str(out))
    storage.write_text_atomic(str(under(out, "sweep.yaml")), dump_yaml(sweep))
    storage.write_text_atomic(str(under(out, "base.yaml")), cfg.to_yaml())
    n_trials = grid_size(sweep) * sweep.search.num_samples
    log(f"sweep {out}: {n_trials} trial(s) over {', '.join(sweep.space)}; {n_probe} config(s) checked; "
        f"{selection_label(sweep.select)}")

    started_local = start_ray(cfg, sweep)
    console = open_console(log, quiet=not verbose())  # each trial's lines, to `log`
    # Per-round rows lack the final-only scores (the search metric) and round 0 lacks nmi_prev; Tune would
    # otherwise refuse those results. ASHA skips a result without its metric; the searcher reads the last one.
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    # Tune's experiment state is what --resume restores; by default it is saved at an adaptive period of tens of
    # seconds. A trial is minutes: saving every few seconds costs nothing and loses less on a kill.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    trainable = _trainable(base, out, console.sink if console else None)
    tune_dir = under(out, "tune")
    # Tune's experiment on the sweep directory's own storage: on object storage through raydc's filesystem
    # (endpoint and region from the AWS variables, retries), handed to Tune with the path inside it.
    tune_fs, tune_root = (None, str(out)) if isinstance(out, Path) else storage.resolve(out)
    tune_path = str(tune_dir) if tune_fs is None else storage.resolve(tune_dir)[1]
    t0 = time.perf_counter()
    try:
        if resume and tune.Tuner.can_restore(tune_path, storage_filesystem=tune_fs):
            log(f"resuming the sweep from {tune_dir}")
            tuner = tune.Tuner.restore(tune_path, trainable=trainable, resume_unfinished=True,
                                       resume_errored=True, storage_filesystem=tune_fs)
        else:
            parallel = concurrency(cfg, sweep)
            log(f"{parallel} trial(s) at a time; each: {cfg.train.num_workers} worker(s) x "
                f"{cfg.train.cpus_per_worker:g} CPU, GPU {cfg.train.use_gpu}")
            tuner = tune.Tuner(trainable, param_space=tune_space(sweep),
                               tune_config=_tune_config(sweep, parallel),
                               run_config=tune.RunConfig(name="tune", storage_path=tune_root,
                                                         storage_filesystem=tune_fs,
                                                         callbacks=[TrialLines(sweep, n_trials, log)], verbose=1))
        grid = tuner.fit()
        params = sweep.params()
        records = sorted((outputs.record_from_result(r, out, params, sweep.scheduler.name != "none") for r in grid),
                         key=lambda r: r.trial_id)
    finally:
        if console is not None:
            console.close()
        if started_local:
            import ray

            ray.shutdown()
    best = select_best(records, sweep.select)
    agreement = label_agreement(records, sweep.select)
    paths = [outputs.write_trials_csv(under(out, "trials.csv"), records, sweep, best),
             outputs.write_summary_json(under(out, "summary.json"), records, sweep, best, agreement)]
    if best is not None:
        paths.append(outputs.write_best_yaml(under(out, "best.yaml"), best, sweep))
    plot = outputs.plot_selection(under(out, "report"), records, sweep, best)
    if plot:
        paths.append(plot)
    counts = {s: sum(r.status == s for r in records) for s in ("done", "stopped", "error", "unfinished")}
    log(f"sweep finished in {time.perf_counter() - t0:.0f}s: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    if best is None:
        log(f"no trial has a finite {sweep.select.metric}: no winner ({selection_label(sweep.select)})")
    else:
        shown = ", ".join(f"{k}={v}" for k, v in best.params.items())
        log(f"best: {shown} | {sweep.select.metric} {best.score(sweep.select.metric):.4g} "
            f"({selection_label(sweep.select)}) | trial {best.trial_id}")
    if agreement is not None:
        rho = "n/a" if agreement.spearman is None else f"{agreement.spearman:+.2f}"
        shown = ", ".join(f"{k}={v}" for k, v in agreement.label_best.params.items())
        log(f"labels (evaluation only): {agreement.label_metric} would pick {shown}; Spearman rank correlation of "
            f"{sweep.select.metric} with {agreement.label_metric} over {agreement.trials} trial(s): {rho}")
    log("wrote " + ", ".join(str(p) for p in paths))
    return SweepOutcome(out, records, best, paths)
