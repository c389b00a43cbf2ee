"""A hand-damaged metrics.jsonl: `raydc report` and `raydc evaluate` read the whole rows before a torn last line
and say so; damage inside the file is one error line naming the line, never a traceback."""
from __future__ import annotations

import json

import numpy as np
import pytest

from raydc.cli import main
from raydc.engine.rundir import RunDir
from raydc.errors import DataError
from tests.helpers import blobs

ROWS = [{"round": r, "loss": 1.0 / (r + 1), "acc": 0.5 + 0.1 * r, "time_train": 1.0} for r in range(3)]


def _write(path, rows, tail: str = "") -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path):
    run = RunDir(tmp_path / "run")
    (tmp_path / "run").mkdir()
    _write(tmp_path / "run" / "metrics.jsonl", ROWS, '{"round": 3, "loss": 0.2')
    with pytest.warns(UserWarning, match=r"metrics\.jsonl: ignoring its last line \(4\).*3 rows before it"):
        assert run.read_metrics() == ROWS
    _write(tmp_path / "run" / "metrics.jsonl", ROWS, "\n\n")  # blank lines are not damage
    assert run.read_metrics() == ROWS


@pytest.mark.parametrize("bad", ['{"round": 1, "lo', "[1, 2]", "not json"])
def test_damage_inside_the_file_names_the_line(tmp_path, bad):
    (tmp_path / "run").mkdir()
    _write(tmp_path / "run" / "metrics.jsonl", ROWS[:1], bad + "\n" + json.dumps(ROWS[2]) + "\n")
    with pytest.raises(DataError, match=r"metrics\.jsonl line 2 is not a metrics row"):
        RunDir(tmp_path / "run").read_metrics()


@pytest.fixture
def finished_run(tmp_path):
    """A run directory as a finished run leaves it (config, metrics, assignment parts), over real shards,
    written without training: these commands read only files."""
    from raydc.config import load_config
    from raydc.data.prepare import prepare
    from raydc.engine.shard_store import ShardStore

    images, labels = blobs()
    np.savez(tmp_path / "src.npz", images=images, labels=labels)
    prepare("npz", tmp_path / "shards", root=tmp_path / "src.npz", rows_per_shard=400, progress=False)
    run_dir = tmp_path / "run"
    cfg = load_config(None, [f"data.shards={tmp_path / 'shards'}", f"run.dir={run_dir}", "cluster.k=4"])
    run = RunDir(run_dir)
    run.create(cfg.to_yaml(), resume=False, overwrite=False)
    run.write_metrics(ROWS)
    store = ShardStore(in_ray=False)
    n = len(labels)
    store.rows, store.ids = np.arange(n, dtype=np.int64), np.arange(n, dtype=np.int64)
    store.cols = {"c": labels.astype(np.int64), "d": np.zeros(n, np.float32)}
    (run_dir / "assignments").mkdir()
    store.write_part(str(run_dir / "assignments" / "part-00000.parquet"), {"cluster": "c", "distance": "d"})
    return run_dir


def test_report_and_evaluate_on_a_torn_metrics_file(finished_run, capsys):
    metrics = finished_run / "metrics.jsonl"
    metrics.write_text(metrics.read_text() + '{"round": 3, "lo')
    with pytest.warns(UserWarning, match="ignoring its last line"):
        assert main(["report", "--run", str(finished_run)]) == 0
    assert (finished_run / "report" / "curves.png").is_file()
    assert main(["evaluate", "--run", str(finished_run)]) == 0  # it scores the assignments, not the rows
    assert "acc: 1.0" in capsys.readouterr().out  # the parts hold the labels themselves

    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    assert main(["report", "--run", str(finished_run)]) == 2
    err = capsys.readouterr().err
    assert "metrics.jsonl line 2 is not a metrics row" in err and "Traceback" not in err
