"""What a clustering method is to the engine: a strategy the engine's one training loop drives.

The engine owns Ray: datasets, the Train workers, the feature pool, the shard actors, checkpoints, the run
directory. A method owns the science: which network, what the pool extracts, how features become targets
(pseudo-labels, a target distribution), the loss, and when to stop. The loop, per round:

    rank 0:  targets, metrics = method.make_targets(ctx, model, state, round)   # uses the clustering service
    all:     targets = broadcast(targets)                                        # by object ref
    all:     metrics += method.train_round(wctx, model, targets, state, round)
    rank 0:  checkpoint(model, optimizers, state), metrics row

`state` is a small dict the method keeps across rounds (phase, counters, the last assignment); it is
checkpointed with the model, so a resumed run continues exactly where it stopped. A fourth method should be
one new file implementing this class.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch.nn as nn

from raydc.config import Config


@dataclass
class Targets:
    """What rank 0 hands every worker for one round. Big arrays travel as object refs inside `refs`."""

    refs: dict[str, Any] = field(default_factory=dict)
    values: dict[str, Any] = field(default_factory=dict)
    state: dict[str, Any] = field(default_factory=dict)   # the method state after make_targets, for all ranks
    stop: bool = False                                     # no training this round: the method has converged


class Method:
    name = "base"

    def __init__(self, cfg: Config, manifest):
        self.cfg = cfg
        self.manifest = manifest
        shape = manifest.image_shape
        self.in_channels = int(shape[2]) if shape else (1 if manifest.mode == "L" else 3)

    # ---- model and state ------------------------------------------------------------------------
    def build_model(self) -> nn.Module:
        raise NotImplementedError

    def init_state(self) -> dict:
        return {}

    def is_done(self, state: dict, round_idx: int) -> bool:
        raise NotImplementedError

    def extractor(self, model: nn.Module):
        """The ExtractorSpec whose features the final centroids live in (used by `raydc assign`)."""
        raise NotImplementedError

    def epoch_of(self, state: dict, round_idx: int) -> int:
        """The `epoch` number written to metrics.jsonl for this round."""
        return round_idx

    # ---- rank 0 ---------------------------------------------------------------------------------
    def make_targets(self, ctx, model: nn.Module, state: dict, round_idx: int) -> tuple[Targets, dict]:
        raise NotImplementedError

    def finalize(self, ctx, model: nn.Module, state: dict, round_idx: int) -> tuple[Any, dict]:
        """After the last round: the final clustering (a ClusterOutcome) and its metrics row."""
        raise NotImplementedError

    # ---- all workers ----------------------------------------------------------------------------
    def optimizers(self, model: nn.Module, state: dict) -> dict:
        """Optimizers whose state persists across rounds (checkpointed). Per-round ones are made in train_round."""
        return {}

    def train_round(self, wctx, model: nn.Module, targets: Targets, state: dict, round_idx: int) -> dict:
        raise NotImplementedError
