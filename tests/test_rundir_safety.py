"""Run files load without running code: checkpoints and clustering.pt hold tensors and plain values only, and
anything else (a crafted pickle, a file of the old pickled format) is refused with a clear error."""
from __future__ import annotations

import pathlib
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from raydc.engine.rundir import RunDir, from_plain, to_plain
from raydc.errors import UserError
from raydc.methods.base import rank0_field


class _TouchOnLoad:
    """Unpickling this creates a file: stands for any code a crafted checkpoint could run."""

    def __init__(self, marker: pathlib.Path):
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


@dataclass
class _State:
    counter: int = 0
    scores: dict | None = None
    last: np.ndarray | None = rank0_field()


def test_state_round_trips_through_a_safe_checkpoint(tmp_path):
    state = _State(3, {"acc": 0.5}, np.arange(5, dtype=np.int64))
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    from ray.train import Checkpoint

    from raydc.engine.round_checkpoint import load_round_checkpoint, save_round_checkpoint

    save_round_checkpoint(str(tmp_path), 0, {
        "round": 0, "model": model.state_dict(), "state": to_plain(state),
        "optimizers": {"body": opt.state_dict()}, "config": {"method": "dec", "k": [1, 2]}})
    back = load_round_checkpoint(Checkpoint.from_directory(str(tmp_path)))
    restored = from_plain(_State, back["state"])
    assert restored.counter == 3 and restored.scores == {"acc": 0.5}
    np.testing.assert_array_equal(restored.last, np.arange(5)) and restored.last.dtype == np.int64
    torch.testing.assert_close(back["model"]["weight"], model.state_dict()["weight"])
    opt.load_state_dict(back["optimizers"]["body"])  # optimizer state survives too


def test_a_checkpoint_whose_pickle_runs_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    from ray.train import Checkpoint

    from raydc.engine.round_checkpoint import load_round_checkpoint

    run = RunDir(tmp_path / "run")
    ckpt = tmp_path / "run" / "checkpoints" / "checkpoint_1"
    ckpt.mkdir(parents=True)
    torch.save({"format": 2, "round": 0, "state": _TouchOnLoad(marker)}, ckpt / "state.pt")
    with pytest.raises(UserError, match="pickled Python objects.*can run code"):
        load_round_checkpoint(Checkpoint.from_directory(str(ckpt)))
    assert not marker.exists()
    torch.save({"format": 2, "artifacts": _TouchOnLoad(marker)}, run.clustering_path)
    with pytest.raises(UserError, match="pickled Python objects"):
        run.load_clustering()
    assert not marker.exists()


def test_an_old_format_checkpoint_is_refused_naming_the_format(tmp_path):
    from raydc.engine.rundir import load_safe

    path = tmp_path / "state.pt"
    torch.save({"round": 0, "state": {"last_assign": np.arange(3)}}, path)  # what raydc wrote before
    with pytest.raises(UserError, match="run-file format 2"):
        load_safe(path)


def test_resuming_a_run_of_the_old_checkpoint_layout_says_to_start_again(tmp_path):
    run = RunDir(tmp_path)
    (tmp_path / "checkpoints").mkdir()
    torch.save({"format": 2, "round": 3}, tmp_path / "checkpoints" / "round-0003.pt")  # raydc before Ray Train's
    with pytest.raises(UserError, match="older raydc.*--overwrite"):
        run.create("method: dec\n", resume=True, overwrite=False)


def test_a_file_without_the_format_mark_is_refused(tmp_path):
    run = RunDir(tmp_path)
    torch.save({"round": 0}, run.clustering_path)
    with pytest.raises(UserError, match="not a raydc run file"):
        run.load_clustering()


def test_a_run_without_clustering_pt_says_it_is_not_finished(tmp_path):
    with pytest.raises(UserError, match="not a finished run"):
        RunDir(tmp_path).load_clustering()
