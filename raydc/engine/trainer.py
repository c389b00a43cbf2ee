"""The driver: check the config against the data, prepare the run directory, run one TorchTrainer.fit(),
then draw the report. Everything here runs before any worker starts, so a bad field fails in seconds."""
from __future__ import annotations

import time
from pathlib import Path

from raydc import tracking
from raydc.config import Config
from raydc.config_loader import config_diff, dump_yaml, from_dict, parse_yaml, resumable_keys, to_dict
from raydc.errors import ConfigError, UserError
from raydc.engine.lease import RunLease
from raydc.engine.rundir import RunDir


def ensure_shards(cfg: Config, log=print):
    """Load the manifest, preparing the shards first when the config names a source and they are missing."""
    from raydc.data.manifest import load_manifest
    from raydc.data.prepare import prepare_from_config

    from raydc.storage import is_uri

    if not is_uri(cfg.data.shards) and not (Path(cfg.data.shards) / "manifest.json").exists():
        if cfg.data.source is None:
            raise UserError(f"no shards at {cfg.data.shards}: run `raydc prepare --source ... --out "
                            f"{cfg.data.shards}` or set data.source so raydc prepares them")
        log(f"preparing {cfg.data.source} shards into {cfg.data.shards}")
        prepare_from_config(cfg.data)
    return load_manifest(cfg.data.shards)


def check_against_data(cfg: Config, manifest, log=None) -> None:
    """The checks that need the data, run before any work starts; each names its field. They are the method's:
    only it knows which batch sizes, input sizes and feature dimensions it uses."""
    from raydc.methods import build_method

    method = build_method(cfg, manifest)
    method.check_data()
    if log is not None:
        log(method.describe_input())
        ignored = method.ignored_settings()
        if ignored:
            log(f"note: {', '.join(ignored)} {'does' if len(ignored) == 1 else 'do'} not apply to "
                f"{cfg.method} and {'is' if len(ignored) == 1 else 'are'} ignored (its own settings are under "
                f"`{method.section}:`)")


def _abs(p: str) -> str:
    return str(Path(p).expanduser().resolve())


def resumable_for(method_name: str) -> frozenset[str]:
    """The fields a resumed run of `method_name` may change: the engine's resumable fields and its own section's,
    not another method's (on a DeepCluster run, `dec.max_iterations` is no budget of anything)."""
    from raydc.methods import methods

    others = {c.section for name, c in methods().items() if name != method_name and c.section}
    return frozenset(k for k in resumable_keys(Config) if k.split(".", 1)[0] not in others)


def resolve_config(cfg: Config, *, resume: bool, log=print) -> Config:
    """On --resume the run's saved config wins: the same run must continue. The given config may change only
    the fields declared `resumable` (raydc.config_loader: budgets, and where and how to run, which change
    nothing the finished rounds computed); any other difference is an error naming the field, rather than a
    silently ignored --set."""
    if not resume:
        return cfg
    run = RunDir(cfg.run.dir)
    saved_text = run.read_config_text()
    if saved_text is None:
        return cfg
    saved_path = run.join("config.yaml")
    saved = from_dict(Config, parse_yaml(saved_text, saved_path))
    a, b = to_dict(saved), to_dict(cfg)
    a["data"]["shards"], b["data"]["shards"] = _abs(a["data"]["shards"]), _abs(b["data"]["shards"])
    a["run"]["dir"] = b["run"]["dir"]  # a run directory may have been moved or copied: it is where it is now
    saved.run.dir = cfg.run.dir
    allowed = resumable_for(saved.method)
    for key, old, new in config_diff(a, b):
        if key not in allowed:
            raise ConfigError(key, f"is {new!r} but the run being resumed has {old!r} ({saved_path}); only "
                                   f"{', '.join(sorted(allowed))} may change on --resume")
        log(f"resume: {key} {old!r} -> {new!r}")
        section, field = key.split(".", 1)
        setattr(getattr(saved, section), field, getattr(getattr(cfg, section), field))
    return saved


def place_on_cluster(cfg: Config, gpus: int) -> tuple[Config, bool]:
    """The decisions that need the cluster, made once, before the config is saved: whether the Train workers
    use GPUs, and how many GPUs each feature actor takes when `features.num_gpus` is left at 0 (one, under
    features.use_gpu always or when there are more GPUs than Train workers). Returns (the config to save and
    hand to the workers, use_gpu); `cfg` itself is left as given."""
    import copy

    if cfg.train.use_gpu == "always" and gpus == 0:
        raise ConfigError("train.use_gpu", "is 'always' but the Ray cluster has no GPUs")
    use_gpu = cfg.train.use_gpu == "always" or (cfg.train.use_gpu == "auto" and gpus > 0)
    if gpus and cfg.features.use_gpu != "never" and cfg.features.num_gpus == 0:
        cfg = copy.deepcopy(cfg)
        cfg.features.num_gpus = 1.0 if cfg.features.use_gpu == "always" or gpus > cfg.train.num_workers else 0.0
    return cfg, use_gpu


def gpus_available() -> int:
    import ray

    return int(ray.cluster_resources().get("GPU", 0))


def ray_object_store_bytes() -> float:
    import ray

    return float(ray.cluster_resources().get("object_store_memory", 0))


def training_dataset(cfg: Config, data_bytes: int, log=print):
    """The Dataset the Train workers split: the shards streamed, or read once into the object store when
    `data.cache` says so (`raydc.engine.datasets.should_cache`). `data_bytes`: the shards' uncompressed size."""
    from raydc.engine.datasets import read_shards, should_cache

    data = read_shards(cfg.data.shards, footers_checked=True)
    store = ray_object_store_bytes()
    if not should_cache(cfg.data.cache, data_bytes, store):
        return data
    t0 = time.perf_counter()
    # preserve_order: the blocks keep the shards' row order, the order a streamed pass reads them in.
    data.context.execution_options.preserve_order = True
    data = data.materialize()
    log(f"training data cached in the object store: {data_bytes / 2**20:,.0f} MiB of {store / 2**20:,.0f} MiB, "
        f"read in {time.perf_counter() - t0:.1f}s (data.cache: {cfg.data.cache})")
    return data


def run_training(cfg: Config, *, resume: bool = False, overwrite: bool = False, log=print,
                 callbacks: list | None = None, lines=None) -> RunDir:
    """One run, start to report. `callbacks` go to the TorchTrainer's RunConfig (Ray Tune's report callback
    when a sweep drives the run). The workers' lines go to `lines` (a `raydc.engine.console.LineSink`, what a
    sweep's trial hands on), else through a console of this process's own to `log`."""
    from raydc.engine.datasets import check_shard_footers
    from raydc.engine.paths import absolute_paths

    # Workers run in their own directories: hand them absolute paths (on a cluster: shared storage). Before
    # resolve_config, so --resume looks in the run.dir meant; again after, as the saved config may be relative.
    absolute_paths(cfg)
    cfg = resolve_config(cfg, resume=resume, log=log)
    absolute_paths(cfg)
    manifest = ensure_shards(cfg, log)
    check_against_data(cfg, manifest, log)
    data_bytes = check_shard_footers(manifest, cfg.data.shards)  # a damaged shard fails here, before Ray starts
    # One writer per run directory, from before --overwrite deletes it until the report is drawn.
    with RunLease(RunDir(cfg.run.dir).location, cfg.run.lease_timeout_s, log=log).held():
        return _train_holding_lease(cfg, manifest, data_bytes, resume=resume, overwrite=overwrite, log=log,
                                    callbacks=callbacks, lines=lines)


def _train_holding_lease(cfg: Config, manifest, data_bytes: int, *, resume: bool, overwrite: bool,
                         log, callbacks: list | None, lines=None) -> RunDir:
    from ray.data import ExecutionOptions
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from raydc.engine.console import open_console
    from raydc.engine.loop import train_loop_per_worker
    from raydc.engine.runtime import init_ray, train_run_config_kwargs, verbose
    from raydc.run_report import write_run_report

    t0 = time.perf_counter()
    init_ray(cfg.ray, train_cpus=cfg.train.num_workers * cfg.train.cpus_per_worker)
    t_ray = time.perf_counter() - t0
    gpus = gpus_available()
    cfg, use_gpu = place_on_cluster(cfg, gpus)
    log(f"Ray ready in {t_ray:.1f}s: {gpus} GPUs; training on {cfg.train.num_workers} worker(s), "
        f"{'GPU' if use_gpu else 'CPU'}; {manifest.count} images")
    # The config is complete now: config.yaml and every worker (and so clustering.pt) get this one, unchanged.
    resolved = to_dict(cfg)
    run = RunDir(cfg.run.dir)
    resuming = run.create(dump_yaml(resolved), resume=resume, overwrite=overwrite)
    log(f"run directory {run.location}" + (" (resuming)" if resuming else ""))

    train_data = training_dataset(cfg, data_bytes, log)
    resources = {"CPU": cfg.train.cpus_per_worker, **({cfg.train.worker_resource: 1} if cfg.train.worker_resource
                                                      else {})}
    resume_from = run.latest_checkpoint() if resuming else None
    run.prune_checkpoints(keep=cfg.run.keep_checkpoints)
    storage_path, storage_fs, fit_name = run.next_fit_storage()
    console = None if lines is not None else open_console(log, quiet=not verbose())  # the round lines, to `log`
    sink = lines if lines is not None else console.sink if console is not None else None
    try:
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config={"config": resolved, "run_dir": run.location, "resume_from": resume_from,
                               "log": sink},
            scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=use_gpu,
                                         resources_per_worker=resources),
            datasets={"train": train_data},
            dataset_config=DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
            # Ray Train keeps the round checkpoints (and hands the newest to a restarted worker group) in
            # <run.dir>/checkpoints/fit-NNN, on whatever storage the run directory is.
            run_config=RunConfig(name=fit_name, storage_path=storage_path, storage_filesystem=storage_fs,
                                 callbacks=callbacks, checkpoint_config=CheckpointConfig(
                                     num_to_keep=max(1, cfg.run.keep_checkpoints)),
                                 failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                                 **train_run_config_kwargs()),
        )
        t1 = time.perf_counter()
        try:
            run.result = trainer.fit()  # Ray Train's Result, for the Python API (raydc.api.Run.result)
        except Exception as e:
            cause = _user_cause(e, run.location)
            if cause is not None:
                raise UserError(str(cause)) from None
            raise
    finally:
        if console is not None:
            console.close()  # every line the workers put is handed to `log` before the report's lines
    log(f"training finished in {time.perf_counter() - t1:.1f}s")
    paths = write_run_report(run.location, cfg.data.shards, manifest, per_cluster=cfg.run.montage_per_cluster)
    log("report: " + ", ".join(str(p) for p in paths))
    tracking.log_report(cfg, run.location, paths)
    return run


def _user_cause(e: BaseException, run_location: str = ".") -> BaseException | None:
    """A worker's UserError or NumericalError comes back wrapped in Ray's WorkerGroupError: unwrap it so
    the CLI prints one clear line rather than three stack traces. The same for a full disk or an unreachable
    store met by Ray Train's own writes under the run directory (a worker's checkpoint upload, the controller's
    state: a ControllerError)."""
    from raydc.engine.ray_errors import train_failures
    from raydc.errors import NumericalError
    from raydc.storage import as_data_error

    for failure in train_failures(e):
        seen = failure
        while seen is not None:
            if isinstance(seen, (UserError, NumericalError)):
                return seen
            storage_error = as_data_error(run_location, seen)
            if storage_error is not None:
                return storage_error
            seen = getattr(seen, "cause", None) or seen.__cause__
    return None
