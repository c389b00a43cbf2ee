"""The contract between a method and the engine: what a method may call, and the values that pass between them.

A method (one file in this package) never imports the engine package: it is handed a `RoundContext` on rank 0 (the
feature pass, the shard actors' columns, saved columns) and a `TrainContext` on every Train worker (its batches,
the one SGD loop, collectives), and it builds plain values (`raydc.core.extractor.ExtractorSpec`,
`raydc.core.rowblocks.RowBlocks`) that the engine knows how to run or move. The Protocols below are the
whole surface: a call a method makes that is not here is a call the engine does not promise. No Ray here, and
nothing a method would need Ray to test: a method's unit tests can hand it an in-process context (as
`tests/inprocess.py` does).
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Protocol

import numpy as np

if TYPE_CHECKING:
    import torch
    import torch.nn as nn

    from raydc.core.extractor import ExtractorSpec
    from raydc.core.metrics import PairCounts
    from raydc.core.pca import PCAProjection
    from raydc.core.rowblocks import RowBlocks
    from raydc.core.stream import Batch

TRUE = "true"  # in `ShardService.counts`: the evaluation labels, as a column name


@dataclass
class ClusterOutcome:
    """One k-means of every image. The images' clusters stay on the shards as column `col` (and the squared
    distances as `col`_distance); this holds only what is O(k)."""

    centroids: np.ndarray
    sizes: np.ndarray
    objective: list[float]
    n_split: int
    backend: str
    mode: str
    col: str = "cluster"
    projection: "PCAProjection | None" = None
    groups: np.ndarray | None = None  # a merged clustering: the group of each centroid (the column holds groups)
    bytes_per_iteration: dict | None = None  # distributed Lloyd: payload bytes out to and back from the shards

    @property
    def n(self) -> int:
        return int(self.sizes.sum())


@dataclass
class ExtractInfo:
    """What one feature pass over every image reports (the features themselves stay on the shards)."""

    n: int
    dim: int
    finite: bool
    projection: "PCAProjection | None" = None
    pca_rows: int = 0                  # images the PCA was fitted on
    pca_seconds: float = 0.0           # the sample pass and the fit (N <= pca_sample: the fit and projection)
    # Where the feature passes' time went, in seconds: `pool` (the driver waiting for the pool's pieces), `load`
    # (the shard actors fetching and checking the blocks), and the pool actors' own read/decode/embed/busy
    # seconds summed over actors (persistent pool only). The profile behind the epoch benchmark's features share.
    clock: Counter = field(default_factory=Counter)


@dataclass
class ShardView:
    """What a method's function run on a shard (`ShardService.apply`) sees. It may add per-row columns to
    `cols` (they stay on the shard) and should return something small."""

    rows: np.ndarray
    ids: np.ndarray
    x: np.ndarray | None
    true: np.ndarray | None
    cols: dict[str, np.ndarray]


@dataclass
class PassStats:
    """One SGD pass, summed over every worker."""

    loss: float      # mean loss per image
    images: int
    steps: int       # this worker's steps: the same on every worker
    seconds: float   # this worker's wall time
    step_means: dict[str, float] = field(default_factory=dict)  # this worker's mean of each figure `loss_of` gave


class ShardService(Protocol):
    """The shard actors, as one service: every image's features and per-image columns live there, and only
    O(k)-sized results come back."""

    def apply(self, fn: Callable, *args) -> list:
        """`fn(view, *args)` on every shard (a module-level function: it travels by reference); the results."""

    def publish(self, col: str, dtype: str | None = None, fill: Any = -1) -> "RowBlocks":
        """Column `col` of every shard into the object store, indexed by row: what `TrainContext.batches` joins."""

    def kmeans(self, k: int, *, niter: int, seed: int, n_init: int = 1, mode: str = "single",
               init_centroids: np.ndarray | None = None, col: str = "cluster", reduction: str = "auto",
               star_max_bytes: int = 64 << 20, hierarchical: str = "never", hierarchical_min_k: int = 50_000,
               super_k: int = 0) -> ClusterOutcome:
        """k-means of every held row; each shard keeps its rows' clusters as column `col`."""

    def counts(self, a, b) -> "PairCounts | None":
        """Pair counts of two labellings (column names, TRUE, or RowBlocks) summed over the shards."""

    def sample_features(self, n: int, seed: int, cols: tuple[str, ...] = ()) -> tuple[np.ndarray, np.ndarray, dict]:
        """(ids, features, {col: values}) of at most n rows drawn uniformly from what the shards hold."""

    def choose_mode(self, mode: str, single_max_bytes: int) -> str:
        """`auto` -> `single` (one process) or `distributed` (Lloyd over the shards) for the features held."""

    def label_nearest(self, centroids: np.ndarray, col: str = "cluster") -> np.ndarray:
        """Every held row's nearest centroid as column `col`; the cluster sizes."""


class RoundContext(Protocol):
    """What a method's `plan`, `finalize` and `place_new_images` get on rank 0."""

    @property
    def service(self) -> ShardService: ...

    @property
    def labelled(self) -> bool:
        """Whether the shards carry evaluation labels (scored against, never trained on)."""

    def extract(self, spec: "ExtractorSpec", **reduction) -> ExtractInfo:
        """Every image's features onto the shards, reduced as `reduction` says (pca_dim, whiten, l2_normalize,
        seed, projection)."""

    def save_column(self, col: str, name: str, round_idx: int) -> str:
        """The shards' column `col` as Parquet parts under the run directory; the directory (a state field)."""

    def column_blocks(self, path: str | None) -> "RowBlocks | None":
        """The RowBlocks of a column saved at `path` (read back after a resume); None for None."""

    def remember(self, path: str, blocks: "RowBlocks") -> None:
        """`blocks` are what `path` holds: the next round need not read the parts back."""

    def release(self) -> None:
        """The feature pool's actors may go (a long training phase follows)."""

    def prepare_manifold(self, dims: int, n_neighbors: int, metric: str, sample: int, *,
                         graph: str = "nndescent") -> None:
        """The run will end in a manifold readout with these UMAP settings on a sample of at most `sample` rows
        (`graph`: how its neighbours are found): the engine may get its fit ready (compile its JIT code) while
        training goes on. Idempotent: ask every round."""

    def manifold_consensus(self, sample: np.ndarray, k: int, **kwargs) -> tuple[np.ndarray, np.ndarray, dict]:
        """`raydc.core.merge.manifold_consensus(sample, k, **kwargs)`, wherever the engine fits it, and what the
        final row records about that (e.g. the warm-up's seconds)."""


class TrainContext(Protocol):
    """What a method's `train_round` gets on every Train worker."""

    rank: int
    world: int
    device: "torch.device"
    precision: str                     # the autocast dtype the loss runs in (raydc.core.precision)
    optimizers: dict                   # the method's `optimizers()`, restored on resume
    log: Callable[[str], None]         # a line on the driver's console

    @staticmethod
    def unwrap(model: "nn.Module") -> "nn.Module":
        """The module inside DDP's wrapper."""

    def batches(self, pass_id: int, *, targets: "RowBlocks | None" = None, repeats: np.ndarray | None = None,
                batch_size: int | None = None, shuffle: bool = True,
                max_steps: int | None = None) -> Iterator["Batch"]:
        """One pass of this worker's batches (each row's value in `targets` joined), the same count on every
        worker, shuffled by (seed, `pass_id`): the round, or a number of the method's own per pass when it makes
        several a round."""

    def sgd_pass(self, batches: Iterable, optimizers: list, loss_of: Callable[..., Any], *, epoch: int,
                 phase: str, what: str) -> PassStats:
        """The engine's one SGD loop over `batches` with the method's `loss_of(batch)`: a loss tensor, or
        `(loss, {name: value})` whose figures come back averaged over the steps in `PassStats.step_means`."""

    def all_gather(self, t: "torch.Tensor") -> "torch.Tensor":
        """Every worker's `t` along dim 0 in rank order, gradients flowing back to each worker's part."""
