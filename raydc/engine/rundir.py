"""The run directory: the one place a run's state lives, so that any interruption resumes from it.

Layout: `config.yaml` (resolved), `metrics.jsonl` (one JSON object per epoch), `checkpoints/` (Ray Train's
storage: `fit-NNN/checkpoint_<timestamp>/{state.pt,round.json}` and its own bookkeeping, one fit-NNN per start), `clustering.pt` (the final model and what `raydc assign` needs), `assignments/part-NNNNN.parquet` (`row, id,
cluster, distance`, one part per shard actor, each written by that actor: no process ever holds them all),
`labels/round=R/` (the same per round, for the next round's comparison and a resume), `report/` (PNGs).

A run directory is something people share, so loading one must not run code: checkpoints and clustering.pt
hold only tensors and plain Python values (numpy arrays are stored as tensors, dataclasses as dicts) and are
read with `torch.load(weights_only=True)`, whose unpickler refuses everything else.

The directory may be a local path or an object-store URI. Every write goes to a temporary file in the same
directory and is renamed into place (object stores: an upload that appears whole), so a kill at any instant
leaves either the old or the new file, never half of one. A checkpoint is the commit point of a round: metrics rows past the last checkpoint are
dropped on resume, because the resumed run will write them again.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import numpy as np

from raydc import storage
from raydc.errors import UserError

CHECKPOINT_DIR = "checkpoints"       # Ray Train's storage: <run>/checkpoints/fit-NNN/checkpoint_<timestamp>/
CHECKPOINT_STATE = "state.pt"        # in each checkpoint directory: the round's model, method state, optimizers
CHECKPOINT_INFO = "round.json"       # and which round it closes, readable without loading the state
CLUSTERING_FILE = "clustering.pt"
ASSIGNMENTS_DIR = "assignments"
FORMAT = 2  # 1: pickled numpy arrays and dataclasses (before safe loading); 2: tensors and plain values only


def atomic_write_bytes(path: Path | str, data: bytes) -> None:
    """`raydc.storage.write_bytes_atomic` for a local Path: the temporary is removed if the write fails (a full
    disk), and the error names the path."""
    storage.write_bytes_atomic(str(path), data)


def atomic_write_text(path: Path | str, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# Rows per Parquet row group in the parts shard actors write (assignments, a round's labels), and so per batch
# of the tools that read them back (the report, `raydc evaluate`): a reader decodes a whole row group at once,
# so this, not N, bounds the driver's memory there. At 2^20 the driver's peak grew until N / shards reached it
# (the 5M-image point of the scaling benchmark); 2^16 rows are ~2 MB a column.
PART_ROW_GROUP = 1 << 16


class RunDir:
    """A run directory at a local path or an object-store URI (`s3://bucket/runs/x`): every read and write goes
    through `raydc.storage`, so the same run can live on a laptop's disk or in a bucket every node reaches."""

    def __init__(self, location: str | os.PathLike):
        location = str(location)
        self.location = location.rstrip("/") if storage.is_uri(location) else os.path.abspath(
            os.path.expanduser(location))

    @property
    def is_local(self) -> bool:
        return not storage.is_uri(self.location)

    @property
    def path(self) -> Path:
        """The local directory (tools that only make sense on a local run: sweeps, tests)."""
        if not self.is_local:
            raise UserError(f"{self.location} is not a local directory")
        return Path(self.location)

    @property
    def name(self) -> str:
        return self.location.rstrip("/").rsplit("/", 1)[-1]

    def join(self, *parts: str) -> str:
        return storage.join(self.location, *parts)

    def __str__(self) -> str:
        return self.location

    # ---- creation -------------------------------------------------------------------------------
    def exists(self) -> bool:
        return storage.exists(self.location) and bool(storage.list_entries(self.location))

    def create(self, config_yaml: str, *, resume: bool, overwrite: bool) -> bool:
        """Make the directory ready. Returns True when there is a checkpoint to resume from."""
        exists = self.exists()
        if exists and not (resume or overwrite):
            raise UserError(f"run directory {self.location} already exists: pass --resume to continue it, "
                            f"--overwrite to start again, or choose another run.dir")
        if exists and overwrite and not resume:
            storage.delete_dir(self.location)
        if resume and exists and self._legacy_checkpoints() and self.latest_checkpoint() is None:
            raise UserError(f"{self.location} holds checkpoints of an older raydc (checkpoints/round-*.pt), which "
                            f"this one does not read: start the run again with --overwrite")
        storage.makedirs(self.location)
        # On resume too: the saved config is the resolved one, which may carry a changed budget.
        storage.write_text_atomic(self.join("config.yaml"), config_yaml)
        return bool(resume and self.latest_checkpoint() is not None)

    def _legacy_checkpoints(self) -> bool:
        base = self.join(CHECKPOINT_DIR)
        return storage.exists(base) and any(p.rsplit("/", 1)[-1].startswith("round-")
                                            for p in storage.list_files(base, suffix=".pt"))

    def read_config_text(self) -> str | None:
        loc = self.join("config.yaml")
        return storage.read_text(loc) if storage.is_file(loc) else None

    # ---- metrics --------------------------------------------------------------------------------
    @property
    def metrics_path(self) -> str:
        return self.join("metrics.jsonl")

    def read_metrics(self) -> list[dict]:
        if not storage.is_file(self.metrics_path):
            return []
        return [json.loads(line) for line in storage.read_text(self.metrics_path).splitlines() if line.strip()]

    def write_metrics(self, rows: list[dict]) -> None:
        storage.write_text_atomic(self.metrics_path, "".join(json.dumps(_jsonable(r)) + "\n" for r in rows))

    def append_metrics(self, row: dict) -> None:
        rows = [r for r in self.read_metrics() if r.get("round") != row.get("round")]
        rows.append(row)
        self.write_metrics(rows)

    def truncate_metrics(self, upto_round: int) -> None:
        """Keep rows of rounds < upto_round: the resumed run writes the rest again."""
        self.write_metrics([r for r in self.read_metrics() if r.get("round", -1) < upto_round])

    # ---- checkpoints ----------------------------------------------------------------------------
    # Checkpoints are Ray Train's: the loop reports each round's state with `ray.train.report(checkpoint=...)`,
    # and Ray Train writes it under `<run>/checkpoints/fit-NNN/checkpoint_<timestamp>/` on whatever storage the
    # run directory is, and hands the newest back to a restarted worker group (`ray.train.get_checkpoint()`).
    # Each `fit` (a first start or a --resume) is its own Ray Train run, NNN counting them, and is told where to
    # start from (`resume_from`), chosen here by the round each checkpoint records. Ray Train's own restore of
    # an earlier fit would refuse a run directory copied after a checkpoint was deleted, or resumed under
    # another Ray version; this choice reads only raydc's files.
    def next_fit_storage(self) -> tuple[str, Any, str]:
        """(storage_path, storage_filesystem, name) for the `ray.train.RunConfig` of the next fit. A URI's
        filesystem comes from `raydc.storage` (endpoint and region from the AWS variables)."""
        base = self.join(CHECKPOINT_DIR)
        name = f"fit-{len(storage.list_dirs(base, prefix='fit-')):03d}"
        if self.is_local:
            return base, None, name
        fs, path = storage.resolve(base)
        return path, fs, name

    def checkpoints(self) -> list[str]:
        """Committed checkpoint directories (those whose state and round record are both there), oldest first:
        by round, then by fit and Ray Train's timestamped name."""
        found = []
        for fit in storage.list_dirs(self.join(CHECKPOINT_DIR), prefix="fit-"):
            for d in storage.list_dirs(fit, prefix="checkpoint_"):
                info = storage.join(d, CHECKPOINT_INFO)
                if storage.is_file(info) and storage.is_file(storage.join(d, CHECKPOINT_STATE)):
                    found.append((int(json.loads(storage.read_text(info))["round"]), fit, d))
        return [d for _, _, d in sorted(found)]

    def latest_checkpoint(self) -> str | None:
        cps = self.checkpoints()
        return cps[-1] if cps else None

    def checkpoint_round(self, checkpoint: str | None = None) -> int | None:
        checkpoint = checkpoint or self.latest_checkpoint()
        if checkpoint is None:
            return None
        return int(json.loads(storage.read_text(storage.join(checkpoint, CHECKPOINT_INFO)))["round"])

    def prune_checkpoints(self, keep: int) -> None:
        """Earlier fits' checkpoints beyond the newest `keep` (Ray Train prunes within a fit only)."""
        for d in self.checkpoints()[:-max(1, keep)]:
            storage.delete_dir(d)

    @property
    def clustering_path(self) -> str:
        return self.join(CLUSTERING_FILE)

    def save_clustering(self, contents: dict) -> str:
        save_safe(self.clustering_path, contents)
        return self.clustering_path

    def load_clustering(self) -> dict:
        if not storage.is_file(self.clustering_path):
            raise UserError(f"{self.location} has no {CLUSTERING_FILE}: it is not a finished run (resume it first)")
        return load_safe(self.clustering_path)

    # ---- assignments ----------------------------------------------------------------------------
    @property
    def assignments_dir(self) -> str:
        return self.join(ASSIGNMENTS_DIR)

    def assignment_parts(self, name: str = ASSIGNMENTS_DIR) -> list[str]:
        d = self.join(name)
        if not storage.exists(d):
            return []
        return [p for p in storage.list_files(d, suffix=".parquet") if p.rsplit("/", 1)[-1].startswith("part-")]

    def has_assignments(self, name: str = ASSIGNMENTS_DIR) -> bool:
        return bool(self.assignment_parts(name))

    def clear_assignments(self, name: str = ASSIGNMENTS_DIR) -> None:
        """Remove an earlier run's parts (a re-finished run may have fewer shards)."""
        d = self.join(name)
        if storage.exists(d):
            storage.delete_dir(d)

    def assignment_batches(self, columns: list[str] | None = None, batch_rows: int = PART_ROW_GROUP):
        """Every part's rows, at most `batch_rows` at a time (parts are written in row groups of that size), as
        {column: array}: what tools read instead of a whole part, whatever N / shards is."""
        import pyarrow.parquet as pq

        for part in self.assignment_parts():
            with storage.open_input_file(part) as f:
                for b in pq.ParquetFile(f).iter_batches(batch_size=batch_rows, columns=columns):
                    yield {c: b.column(c).to_numpy() for c in b.schema.names}

    def read_assignments(self, name: str = ASSIGNMENTS_DIR, columns: list[str] | None = None
                         ) -> dict[str, np.ndarray]:
        """Every part, concatenated (a tool's view for small runs: `raydc evaluate` and the report stream the
        parts instead)."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        parts = []
        for p in self.assignment_parts(name):
            with storage.open_input_file(p) as f:
                parts.append(pq.read_table(f, columns=columns))
        if not parts:
            raise UserError(f"{self.join(name)} holds no assignment parts: the run has not finished")
        t = pa.concat_tables(parts)
        return {c: t.column(c).to_numpy() for c in t.column_names}

    @property
    def report_dir(self) -> str:
        return self.join("report")


def save_safe(location: str | os.PathLike, contents: dict) -> None:
    """torch.save of tensors and plain values only (see the module docstring), atomically."""
    import torch

    buf = io.BytesIO()
    torch.save({**contents, "format": FORMAT}, buf)
    storage.write_bytes_atomic(str(location), buf.getvalue())


def load_safe(path: str | os.PathLike) -> dict:
    """torch.load with weights_only=True: a file holding anything but tensors and plain values (code, or a
    checkpoint of an older raydc with pickled numpy arrays) is refused with a UserError, never executed."""
    import torch

    try:
        out = torch.load(io.BytesIO(storage.read_bytes(str(path))), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} holds pickled Python objects, which raydc does not load because unpickling can "
                        f"run code (a file written by raydc before run-file format {FORMAT}, or not by raydc at "
                        f"all); start the run again with --overwrite, or load it yourself only if you trust "
                        f"its source. ({first})") from None
    except (RuntimeError, EOFError, OSError) as e:
        raise UserError(f"{path} is not a readable raydc run file ({type(e).__name__}: {e})") from None
    if not isinstance(out, dict) or out.get("format") != FORMAT:
        raise UserError(f"{path} is not a raydc run file of format {FORMAT}")
    return out


def to_plain(obj: Any) -> Any:
    """A method state (a dataclass of plain values and numpy arrays) as what `load_safe` accepts: dicts,
    lists, plain values and tensors."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_plain(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        import torch

        return torch.from_numpy(np.ascontiguousarray(obj).copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def from_plain(cls: type, data: dict) -> Any:
    """The inverse of `to_plain` for a state dataclass `cls`: tensors become numpy arrays again."""
    def back(v: Any) -> Any:
        import torch

        if isinstance(v, torch.Tensor):
            return v.numpy()
        if isinstance(v, dict):
            return {k: back(x) for k, x in v.items()}
        if isinstance(v, list):
            return [back(x) for x in v]
        return v

    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: back(v) for k, v in data.items() if k in names})


def _jsonable(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x
