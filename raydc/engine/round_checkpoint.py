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


def checkpoint_contents(round_idx: int, model, state, optimizers: dict, **extra) -> dict:
    """What a round's checkpoint holds: the weights, the method's state as plain data (`to_plain`: no pickled
    objects), each optimizer's state, and what the caller adds (the config, the resolved precision)."""
    from raydc.engine.rundir import to_plain

    return {"round": round_idx, "model": model.state_dict(), "state": to_plain(state),
            "optimizers": {n: o.state_dict() for n, o in optimizers.items()}, **extra}


def restore_model_and_state(ckpt: dict, model, state_type: type):
    """The weights loaded into `model`, and (the method's state, the round to run next) from a checkpoint."""
    from raydc.engine.rundir import from_plain

    model.load_state_dict(ckpt["model"])
    return from_plain(state_type, ckpt["state"]), ckpt["round"] + 1


def restore_optimizers(ckpt: dict, optimizers: dict) -> None:
    """Each optimizer's saved state (momentum, RMSprop's averages, step counts) back into the new optimizers,
    built over the restored weights: without it a resumed run's next step differs from the uninterrupted one."""
    for name, opt in optimizers.items():
        if name in ckpt.get("optimizers", {}):
            opt.load_state_dict(ckpt["optimizers"][name])
