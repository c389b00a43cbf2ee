"""Experiment tracking: each metrics row also goes to TensorBoard and/or MLflow (`run.trackers`).

Why not Ray's logger callbacks: Ray Train V2 refuses Tune's (ray-project/ray#64179), and Train's own reports
carry only what the workers report, not the final row. So the writer is the one process that writes
`metrics.jsonl`, rank 0 of the fit: `TrackedRun` stands in for its RunDir and passes every appended row on,
one step per row (`row["round"]`; the final row is the step after the last round). Every process but rank 0
never opens a tracker. The driver adds what exists only after the fit, the report's pictures (`log_report`).

What a tracker gets: the numeric fields of the row (nested mappings of numbers flattened as `memory/shard_rss`;
lists, strings and booleans stay in metrics.jsonl only), the resolved config as parameters (`cluster.k`), and
the report PNGs as artefacts. A resumed run continues the same MLflow run (its id is kept in the run directory's
`tracking.json`) and appends to the same TensorBoard directory.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any, Protocol

from raydc import storage
from raydc.errors import ConfigError

TRACKERS = ("tensorboard", "mlflow")
TENSORBOARD_DIR = "tensorboard"      # in the run directory: `tensorboard --logdir <run.dir or sweep>/...`
STATE_FILE = "tracking.json"         # in the run directory: the MLflow run id, so a resume continues that run
DEFAULT_EXPERIMENT = "raydc"


class Tracker(Protocol):
    def log_params(self, params: dict[str, Any]) -> None: ...

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def log_artifacts(self, paths: list[str]) -> None: ...

    def close(self) -> None: ...


def numeric_metrics(row: dict, prefix: str = "") -> dict[str, float]:
    """The row's finite numbers, nested mappings flattened with '/' (TensorBoard groups by it)."""
    out: dict[str, float] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(numeric_metrics(value, name + "/"))
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[name] = float(value)
    return out


def flat_params(config: dict, prefix: str = "") -> dict[str, str]:
    """The resolved config as `section.field: value` strings (MLflow's parameters are strings)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            out.update(flat_params(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = json.dumps(value) if isinstance(value, (list, tuple, type(None))) else str(value)
    return out


def mlflow_uri(run_cfg, run_location: str) -> str:
    """run.mlflow_uri, else $MLFLOW_TRACKING_URI, else a file store beside the run (`<run.dir>/mlruns`)."""
    uri = run_cfg.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    if storage.is_uri(run_location):
        raise ConfigError("run.mlflow_uri", f"is needed when run.dir is on object storage ({run_location}): set it "
                                            f"or MLFLOW_TRACKING_URI to an MLflow server")
    return Path(run_location, "mlruns").absolute().as_uri()


def check(run_cfg) -> None:
    """At config load (`RunConfig.validate`): a tracker that cannot work fails now, naming the field, rather
    than on rank 0 after the first round."""
    for name in run_cfg.trackers:
        if name == "mlflow":
            try:
                import mlflow  # noqa: F401
            except ImportError:
                raise ConfigError("run.trackers", "mlflow is not installed: pip install 'raydc[mlflow]'") from None
            mlflow_uri(run_cfg, run_cfg.dir)
        if name == "tensorboard":
            try:
                import tensorboardX  # noqa: F401
            except ImportError:
                raise ConfigError("run.trackers", "tensorboardX is not installed: pip install tensorboardX") from None


class TensorBoardTracker:
    """Event files in `<run.dir>/tensorboard`, written and flushed with each row: tensorboardX's SummaryWriter
    writes from a thread of its own and its flush() does not wait for it, so a worker killed after a round's
    checkpoint would lose that round's events for good. A run on object storage writes them locally and
    copies them there after each row (an event file is small and only grows)."""

    def __init__(self, run_location: str):
        from tensorboardX.event_file_writer import EventsWriter

        self._remote = storage.join(run_location, TENSORBOARD_DIR) if storage.is_uri(run_location) else None
        self._local = tempfile.mkdtemp(prefix="raydc-tb-") if self._remote else os.path.join(run_location,
                                                                                             TENSORBOARD_DIR)
        os.makedirs(self._local, exist_ok=True)
        # A resumed run, and the driver's report, add event files beside the first: names must not collide
        # (tensorboardX's are unique only to the second).
        self._writer = EventsWriter(os.path.join(self._local, "events"), f".{uuid.uuid4().hex[:8]}")

    def _write(self, step: int, summaries: list) -> None:
        import time

        from tensorboardX.proto.event_pb2 import Event
        from tensorboardX.proto.summary_pb2 import Summary

        values = [v for s in summaries for v in s.value]
        self._writer.write_event(Event(wall_time=time.time(), step=step, summary=Summary(value=values)))
        self._writer.flush()
        if self._remote:
            for name in os.listdir(self._local):
                storage.write_bytes_atomic(storage.join(self._remote, name), Path(self._local, name).read_bytes())

    def log_params(self, params: dict[str, Any]) -> None:
        from tensorboardX.summary import text

        table = "\n".join(f"| {k} | {v} |" for k, v in params.items())
        self._write(0, [text("config", "| field | value |\n|---|---|\n" + table)])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        from tensorboardX.summary import scalar

        self._write(step, [scalar(k, v) for k, v in metrics.items()])

    def log_artifacts(self, paths: list[str]) -> None:
        import numpy as np
        from PIL import Image
        from tensorboardX.summary import image

        pictures = []
        for p in paths:
            if p.endswith(".png"):
                with storage.open_input_file(p) as f, Image.open(f) as im:
                    pictures.append(image(f"report/{p.rsplit('/', 1)[-1][:-4]}", np.asarray(im.convert("RGB")),
                                          dataformats="HWC"))
        if pictures:
            self._write(0, pictures)

    def close(self) -> None:
        self._writer.close()


class MLflowTracker:
    """One MLflow run per raydc run (its id in `tracking.json`, so a resume continues it), in the experiment
    `run.experiment` (a sweep's trials: the sweep's). Through MlflowClient, not the fluent API: no process-wide
    active run is set, so a notebook's own MLflow runs are left as they are."""

    def __init__(self, run_cfg, run_location: str, method: str):
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses its file store otherwise
        from mlflow import MlflowClient

        self.uri = mlflow_uri(run_cfg, run_location)
        self._client = MlflowClient(tracking_uri=self.uri)
        state = _read_state(run_location)
        run_id = state.get("mlflow_run_id") if state.get("mlflow_uri") == self.uri else None
        if run_id is None:
            name = run_cfg.experiment or DEFAULT_EXPERIMENT
            exp = self._client.get_experiment_by_name(name)
            exp_id = exp.experiment_id if exp is not None else self._client.create_experiment(name)
            tags = {"raydc.run_dir": run_location, "raydc.method": method}
            run_id = self._client.create_run(exp_id, run_name=run_location.rstrip("/").rsplit("/", 1)[-1],
                                             tags=tags).info.run_id
            _write_state(run_location, {**state, "mlflow_uri": self.uri, "mlflow_run_id": run_id})
        self.run_id = run_id
        self._params_logged = bool(state.get("mlflow_run_id") == run_id)

    def log_params(self, params: dict[str, Any]) -> None:
        if self._params_logged:  # MLflow refuses to change a logged parameter; a resume's budget may differ
            return
        from mlflow.entities import Param

        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow's limit per batch
            self._client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        items = [Metric(k, v, now, step) for k, v in metrics.items()]
        for i in range(0, len(items), 1000):
            self._client.log_batch(self.run_id, metrics=items[i:i + 1000])

    def log_artifacts(self, paths: list[str]) -> None:
        for p in paths:
            if storage.is_uri(p):
                with tempfile.TemporaryDirectory() as tmp:
                    local = os.path.join(tmp, p.rsplit("/", 1)[-1])
                    Path(local).write_bytes(storage.read_bytes(p))
                    self._client.log_artifact(self.run_id, local, "report")
            else:
                self._client.log_artifact(self.run_id, p, "report")

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


def _read_state(run_location: str) -> dict:
    loc = storage.join(run_location, STATE_FILE)
    return json.loads(storage.read_text(loc)) if storage.is_file(loc) else {}


def _write_state(run_location: str, state: dict) -> None:
    storage.write_text_atomic(storage.join(run_location, STATE_FILE), json.dumps(state))


def open_trackers(cfg, run_location: str) -> list[Tracker]:
    out: list[Tracker] = []
    for name in dict.fromkeys(cfg.run.trackers):
        if name == "tensorboard":
            out.append(TensorBoardTracker(run_location))
        elif name == "mlflow":
            out.append(MLflowTracker(cfg.run, run_location, cfg.method))
    return out


class TrackedRun:
    """Rank 0's RunDir, with every appended metrics row also sent to the trackers. The trackers open on the
    first row (so a run that fails before its first round leaves no empty tracker run) and close on the final
    row; anything but `append_metrics` is the RunDir's."""

    def __init__(self, run, cfg):
        self._run, self._cfg = run, cfg
        self._trackers: list[Tracker] | None = None

    def __getattr__(self, name: str):
        return getattr(self._run, name)

    def append_metrics(self, row: dict) -> None:
        self._run.append_metrics(row)
        if self._trackers is None:
            from raydc.config_loader import to_dict

            self._trackers = open_trackers(self._cfg, self._run.location)
            params = flat_params(to_dict(self._cfg))
            for t in self._trackers:
                t.log_params(params)
        metrics = numeric_metrics(row)
        for t in self._trackers:
            t.log_metrics(int(row.get("round", 0)), metrics)
        if row.get("final"):
            for t in self._trackers:
                t.close()
            self._trackers = None


def rank_zero_run(run, cfg, rank: int):
    """What the training loop writes its rows through: the RunDir itself, or on rank 0 with trackers configured
    a TrackedRun around it."""
    return TrackedRun(run, cfg) if rank == 0 and cfg.run.trackers else run


def for_trial(cfg, sweep_dir: str):
    """A sweep trial's config: its MLflow run in the sweep's experiment and store (one store for all trials,
    not one per trial directory), unless the config names them. TensorBoard needs nothing: each trial's
    `runs/<trial>/tensorboard` is under `tensorboard --logdir <sweep>/runs`."""
    if cfg.run.trackers:
        cfg.run.experiment = cfg.run.experiment or Path(sweep_dir).name
        if "mlflow" in cfg.run.trackers and not (cfg.run.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")):
            cfg.run.mlflow_uri = Path(sweep_dir, "mlruns").as_uri()
    return cfg


def log_report(cfg, run_location: str, paths: list) -> None:
    """The driver, after the report is drawn: its pictures into each tracker (the MLflow run the fit wrote)."""
    if not cfg.run.trackers:
        return
    pictures = [str(p) for p in paths if str(p).endswith(".png")]
    for t in open_trackers(cfg, run_location):
        t.log_artifacts(pictures)
        t.close()
