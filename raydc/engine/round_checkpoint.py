"""A round's checkpoint as Ray Train carries it between rank 0 and the run directory: the safe-loading state
file (no code runs when it is read) and a small JSON naming the round it closes."""
from __future__ import annotations

import json
import os


def save_round_checkpoint(directory: str, round_idx: int, contents: dict) -> None:
    """A round's checkpoint as Ray Train carries it: a directory of the safe-loading state file and a small
    JSON saying which round it closes (what tools read without loading the state)."""
    from raydc.engine.rundir import CHECKPOINT_INFO, CHECKPOINT_STATE, save_safe

    save_safe(os.path.join(directory, CHECKPOINT_STATE), contents)
    with open(os.path.join(directory, CHECKPOINT_INFO), "w") as f:
        json.dump({"round": int(round_idx)}, f)


def load_round_checkpoint(checkpoint, fallback: str | None = None) -> dict | None:
    """The state saved by `save_round_checkpoint`: in a `ray.train.Checkpoint` (`as_directory` downloads it
    from object storage), else in the checkpoint directory `fallback` (a location), else None (a fresh run)."""
    from raydc import storage
    from raydc.engine.rundir import CHECKPOINT_STATE, load_safe

    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            return load_safe(os.path.join(d, CHECKPOINT_STATE))
    if fallback is not None:
        return load_safe(storage.join(fallback, CHECKPOINT_STATE))
    return None
