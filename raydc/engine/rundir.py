"""The run directory: the one place a run's state lives, so that any interruption resumes from it.

Layout: `config.yaml` (resolved), `metrics.jsonl` (one JSON object per epoch), `checkpoints/round-NNNN.pt`,
`clustering.pt` (the final model and what `raydc assign` needs), `assignments/part-NNNNN.parquet` (`row, id,
cluster, distance`, one part per shard actor, each written by that actor: no process ever holds them all),
`labels/round=R/` (the same per round, for the next round's comparison and a resume), `report/` (PNGs).

A run directory is something people share, so loading one must not run code: checkpoints and clustering.pt
hold only tensors and plain Python values (numpy arrays are stored as tensors, dataclasses as dicts) and are
read with `torch.load(weights_only=True)`, whose unpickler refuses everything else.

Every write goes to a temporary file in the same directory and is renamed into place, so a kill at any instant leaves either the old or the new file,
never half of one. A checkpoint is the commit point of a round: metrics rows past the last checkpoint are
dropped on resume, because the resumed run will write them again.
"""
from __future__ import annotations

import dataclasses
import io
import json
import os
import pickle
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from raydc.errors import UserError

CHECKPOINT_DIR = "checkpoints"
CLUSTERING_FILE = "clustering.pt"
ASSIGNMENTS_DIR = "assignments"
FORMAT = 2  # 1: pickled numpy arrays and dataclasses (before safe loading); 2: tensors and plain values only


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path).resolve()

    # ---- creation -------------------------------------------------------------------------------
    def create(self, config_yaml: str, *, resume: bool, overwrite: bool) -> bool:
        """Make the directory ready. Returns True when there is a checkpoint to resume from."""
        exists = self.path.exists() and any(self.path.iterdir())
        if exists and not (resume or overwrite):
            raise UserError(f"run directory {self.path} already exists: pass --resume to continue it, "
                            f"--overwrite to start again, or choose another run.dir")
        if exists and overwrite and not resume:
            shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        # On resume too: the saved config is the resolved one, which may carry a changed budget.
        atomic_write_text(self.path / "config.yaml", config_yaml)
        return bool(resume and self.latest_checkpoint() is not None)

    # ---- metrics --------------------------------------------------------------------------------
    @property
    def metrics_path(self) -> Path:
        return self.path / "metrics.jsonl"

    def read_metrics(self) -> list[dict]:
        if not self.metrics_path.exists():
            return []
        rows = []
        for line in self.metrics_path.read_text().splitlines():
            line = line.strip()
            if line:
                rows.append(json.loads(line))
        return rows

    def write_metrics(self, rows: list[dict]) -> None:
        atomic_write_text(self.metrics_path, "".join(json.dumps(_jsonable(r)) + "\n" for r in rows))

    def append_metrics(self, row: dict) -> None:
        rows = [r for r in self.read_metrics() if r.get("round") != row.get("round")]
        rows.append(row)
        self.write_metrics(rows)

    def truncate_metrics(self, upto_round: int) -> None:
        """Keep rows of rounds < upto_round: the resumed run writes the rest again."""
        self.write_metrics([r for r in self.read_metrics() if r.get("round", -1) < upto_round])

    # ---- checkpoints ----------------------------------------------------------------------------
    def checkpoint_path(self, round_idx: int) -> Path:
        return self.path / CHECKPOINT_DIR / f"round-{round_idx:04d}.pt"

    def save_checkpoint(self, round_idx: int, state: dict, keep: int = 2) -> Path:
        path = self.checkpoint_path(round_idx)
        save_safe(path, state)
        for old in self.checkpoints()[:-max(1, keep)]:
            old.unlink(missing_ok=True)
        return path

    def checkpoints(self) -> list[Path]:
        d = self.path / CHECKPOINT_DIR
        if not d.is_dir():
            return []
        return sorted(p for p in d.glob("round-*.pt"))

    def latest_checkpoint(self) -> Path | None:
        cps = self.checkpoints()
        return cps[-1] if cps else None

    def load_checkpoint(self, path: Path | None = None) -> dict | None:
        path = path or self.latest_checkpoint()
        if path is None:
            return None
        return load_safe(path)

    @property
    def clustering_path(self) -> Path:
        return self.path / CLUSTERING_FILE

    def save_clustering(self, contents: dict) -> Path:
        save_safe(self.clustering_path, contents)
        return self.clustering_path

    def load_clustering(self) -> dict:
        if not self.clustering_path.exists():
            raise UserError(f"{self.path} has no {CLUSTERING_FILE}: it is not a finished run (resume it first)")
        return load_safe(self.clustering_path)

    # ---- assignments ----------------------------------------------------------------------------
    @property
    def assignments_dir(self) -> Path:
        return self.path / ASSIGNMENTS_DIR

    def has_assignments(self, name: str = ASSIGNMENTS_DIR) -> bool:
        return any((self.path / name).glob("part-*.parquet"))

    def clear_assignments(self, name: str = ASSIGNMENTS_DIR) -> None:
        """Remove an earlier run's parts (a re-finished run may have fewer shards)."""
        d = self.path / name
        if d.is_dir():
            for p in d.glob("part-*.parquet"):
                p.unlink()
        legacy = self.path / "assignments.parquet"
        if legacy.exists():
            legacy.unlink()

    def assignment_parts(self, name: str = ASSIGNMENTS_DIR) -> list[Path]:
        return sorted((self.path / name).glob("part-*.parquet"))

    def assignment_batches(self, columns: list[str] | None = None, batch_rows: int = 1 << 20):
        """Every part's rows, at most `batch_rows` at a time (parts are written in row groups of that size), as
        {column: array}: what tools read instead of a whole part, whatever N / shards is."""
        import pyarrow.parquet as pq

        for part in self.assignment_parts():
            for b in pq.ParquetFile(part).iter_batches(batch_size=batch_rows, columns=columns):
                yield {c: b.column(c).to_numpy() for c in b.schema.names}

    def read_assignments(self, name: str = ASSIGNMENTS_DIR, columns: list[str] | None = None
                         ) -> dict[str, np.ndarray]:
        """Every part, concatenated (a tool's view for small runs: `raydc evaluate` and the report stream the
        parts instead)."""
        import pyarrow.parquet as pq

        parts = [pq.read_table(p, columns=columns) for p in self.assignment_parts(name)]
        if not parts:
            raise UserError(f"{self.path / name} holds no assignment parts: the run has not finished")
        import pyarrow as pa

        t = pa.concat_tables(parts)
        return {c: t.column(c).to_numpy() for c in t.column_names}

    @property
    def report_dir(self) -> Path:
        return self.path / "report"


def save_safe(path: Path, contents: dict) -> None:
    """torch.save of tensors and plain values only (see the module docstring), atomically."""
    import torch

    buf = io.BytesIO()
    torch.save({**contents, "format": FORMAT}, buf)
    atomic_write_bytes(path, buf.getvalue())


def load_safe(path: Path) -> dict:
    """torch.load with weights_only=True: a file holding anything but tensors and plain values (code, or a
    checkpoint of an older raydc with pickled numpy arrays) is refused with a UserError, never executed."""
    import torch

    try:
        out = torch.load(path, map_location="cpu", weights_only=True)
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
