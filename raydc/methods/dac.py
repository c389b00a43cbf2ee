"""DAC, Deep Adaptive Image Clustering (Chang et al., ICCV 2017), as a strategy for the engine's loop.

A round is one pass over the images in batches. For each batch every worker computes label features (softmax,
then L2 normalisation: `raydc.core.dac`), gathers them from all workers so that pairs span the *global* batch
(B = `dac.batch_size` x workers, gradients flowing back through the gather), and trains binary "same /
different" classification on the B x B cosine similarities: pairs at or above u(lambda) are "same", pairs below
l(lambda) "different", the rest are left out. The selection comes from a pass with the weights fixed and the
augmentation off (`dac.selection: stopgrad`, the paper's alternating step and the reference code's `predict`),
or from the training pass itself with its gradient stopped (`same_batch`). The thresholds follow a schedule in
rounds (`dac.schedule`: the official MNIST script's single threshold, the official CIFAR script's two, or the
paper's; every constant a field Tune can search); the run ends when l >= u, when every pair would be selected,
or at `train.epochs` rounds.

Chunked selection (`dac.chunk_size` > 0, the official MNIST script): the targets of a whole chunk of images
(1,000, global over the DDP workers) are computed once from its label features, then the network trains
`dac.local_epochs` passes over the chunk in shuffled batches, each on a fresh augmentation, against the fixed
sub-blocks of those targets: about 40 steps per selection instead of one, which is what keeps the clusters the
first rounds find (with one step per selection the loss drifts them apart round after round).

The clusters are read out with batch-statistics BatchNorm (`dac.bn_readout: batch`, the reference's Keras
mode 2) over fixed groups of consecutive rows (`ExtractorSpec.batch_align`), or with the running averages.

What the diagnostics showed (MNIST test 10k, this preset, seeds 31 and 32, rounds 0-15; per-round rows in the
runs' metrics.jsonl, both readouts of their checkpoints in benchmarks/results/dac_readout.json): the two
readouts agree within 0.025 ACC from round 2 on (batch statistics 0.07 ahead at round 1), so the drift is not
BatchNorm's. The drift is merging: the clusters are best around rounds 3-6
(ACC 0.78 / 0.87), then, as th falls below ~0.74, the share of pairs trained as "same" climbs past the 1/k a
balanced k-way split allows (0.10 -> 0.13) and every later round merges: one cluster grows to ~1,900-2,000
images while another shrinks to a few hundred (`merges_prev`, `size_histogram`). On 10k images a round is 400
steps, a seventh of the reference's 70k epoch, so the threshold falls seven times faster per step taken.

Those runs selected their targets with BatchNorm groups of 128. The reference selects with `model.predict(chunk)`
at Keras' default batch of 32. Single runs favour it: ACC after one round at th 0.9 on those 10k images (seed 31)
was 0.687 with groups of 128 and 0.824 with 32 (0.754 against 0.895 on all 70k), while fp32 instead of bf16
(0.593) and no augmentation (0.567) did not help (benchmarks/results/dac_ab.json). But the spread between runs
is of the same size: the same seed and config with 1 torch thread instead of 2 gave 0.685, so these are leads,
not proof. Hence `dac.selection_batch` (null: 32 for official_mnist, as the reference), separate from the
readout's groups of 128.

What stopped the drift (same 10k images, results/dac_ab.json): BatchNorm's scale and shift fixed at 1 and 0
(`dac.bn_affine: false`, as the TensorFlow port HongtaoYang/DAC-tensorflow, whose author reports that training them
costs a lot of accuracy), with the reference's augmentation in full. Over seeds 31-33 in 4 rounds the final ACC
went from 0.829 +- 0.091 (min 0.767) with the augmentation alone (0.796 +- 0.115, min 0.667, with neither) to 0.881
+- 0.019 (min 0.866) with both, each run climbing round after round, and through the full 20-round schedule the
three seeds ended at 0.969 / 0.946 / 0.873, each within 0.008 of its best round (seed 32 had drifted to ~0.64 under
the old preset; seed 33 ends with two clusters that each hold half the 8s and half the 9s: a split along another
axis than the digit, which fixing BatchNorm does not prevent). Those runs were bf16; in fp32 the same preset ended
seeds 31, 32 and 33 at 0.977 / 0.978 / 0.977 (dac_ab.json), so the bf16 network forward, whose scores feed the
thresholded similarities, is the likely cause of seed 33's split (not yet rerun in bf16 to prove it). The
mechanism: after the last dense layer the scores go through BatchNorm, ReLU and the softmax; with a trainable shift
and scale a cluster's score can be moved up or off for every image at once, which is how one cluster swallows
another's images; with them fixed, every score has mean 0 and variance 1 over each batch, a standing balance
constraint. The shipped presets use both; the field
defaults stay the reference's.

No k-means: the cluster of an image is the argmax of its label feature. Between rounds the engine's feature
pool computes every image's label feature (every `dac.eval_every` rounds) for the diagnostics: cluster sizes,
NMI with the previous round, ACC/NMI/ARI when labels exist. The network and the pair maths are in
`raydc.core.dac`; this file is the schedule and the training step around them.
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
import torch.nn as nn

from raydc.core.augment import brightness_shift, random_affine, resize_center, to_float
from raydc.core.dac import (DAC_NET_MIN_SIZE, SCHEDULE_PRESETS, SINGLE_THRESHOLD_PRESETS, LabelFeatureNet,
                            SingleThreshold, ThresholdSchedule, chunk_targets, dac_convnet, pair_loss,
                            select_pairs, similarity_matrix)
from raydc.core.precision import autocast, full_precision
from raydc.core.models import build_convnet
from raydc.core.sampler import hash_uniform_columns
from raydc.core.seeding import derive_seed
from raydc.core.extractor import ExtractorSpec
from raydc.errors import ConfigError, NumericalError
from raydc.methods.api import RoundContext, TrainContext
from raydc.methods.base import FinalClustering, Method, RoundPlan, clustering_row, rank0_field, shard_argmax

STREAM_DAC_AUGMENT = 40  # hash_uniforms streams 40.. : DAC's augmentation draws, apart from the engine's


@dataclass
class DACConfig:
    """DAC's own fields. Fields left null take the schedule preset's value (`raydc.core.dac`)."""

    # official_mnist: one threshold, MSE over all pairs, chunked selection (vector-1127/DAC MNIST/mnist.py);
    # official_cifar (alias official): u/l band, BCE on the selected pairs (CIFAR10/cifar10_2.py); paper: the ICCV
    # paper's u/l schedule.
    schedule: Literal["official_mnist", "official_cifar", "official", "paper"] = "official_mnist"
    threshold: float | None = None         # official_mnist: th at round 0 (0.9)
    threshold_step: float | None = None    # th falls by this after every round (null: (th - floor) / train.epochs)
    threshold_floor: float | None = None   # ... never below this (0.5)
    upper: float | None = None             # two-threshold schedules: u at round 0
    lower: float | None = None             # l at round 0
    upper_rate: float | None = None        # u(lambda) = upper - upper_rate * lambda
    lower_rate: float | None = None        # l(lambda) = lower + lower_rate * lambda
    lambda_step: float | None = None       # lambda after round r = r * lambda_step (official: meet at train.epochs)
    loss: Literal["bce", "mse"] | None = None  # null: the schedule's (mse for official_mnist, else bce)
    selection: Literal["stopgrad", "same_batch"] = "stopgrad"
    # Images whose targets are computed together, global over the workers (null: 1,000 for official_mnist, else
    # 0 = every batch selects its own pairs), and the passes over each chunk before the next selection.
    chunk_size: int | None = None
    local_epochs: int | None = None        # null: 5 for official_mnist, else 1
    batch_size: int = 128                  # per worker; the pairs span batch_size x workers images
    max_global_batch: int = 4096           # cap on that B: a few B x B float matrices per step (4096: 64 MiB each)
    inner_steps: int = 1                   # without chunks: SGD steps per selection, each on a fresh augmentation
    optimizer: Literal["rmsprop", "adam", "sgd"] = "rmsprop"
    lr: float = 0.001                      # RMSprop(0.001), as the reference code
    # How BatchNorm normalises when the clusters are read out (and the chunk targets selected): batch statistics
    # over fixed groups of `readout_batch` consecutive rows (the reference's Keras mode 2), or the running averages.
    bn_readout: Literal["batch", "running"] = "batch"
    readout_batch: int = 128
    # The groups of the chunk's target selection under batch statistics (null: 32 for official_mnist, the batch of
    # the reference's `model.predict(chunk)`, Keras' default; else readout_batch). Single runs favour 32 over 128
    # after one round (results/dac_ab.json), within a run-to-run spread of the same size.
    selection_batch: int | None = None
    # BatchNorm's epsilon in the reference nets (dac_mnist, dac_cifar). Keras' larger default (1e-3) was tried
    # against torch's over 4 rounds on the 10k test images and was not better (results/dac_ab.json).
    bn_eps: float = 1e-5
    # Whether BatchNorm's scale and shift train (the reference Keras nets: yes). With them fixed at 1 and 0 every
    # score stays standardised over the batch, so no cluster's output can be shifted off or scaled up: the
    # TensorFlow port HongtaoYang/DAC-tensorflow fixes them and reports (its issue 2) that training them costs a
    # lot of accuracy.
    bn_affine: bool = True
    augment: bool = True
    rotation_deg: float = 10.0
    shift: float = 0.1                     # fraction of the image size
    zoom_min: float = 0.95
    zoom_max: float = 1.05
    hflip: bool = False                    # the reference flips colour images only (CIFAR), never digits
    # The reference's augmentation in full (its myImage.py): order-0 (nearest) resampling instead of bilinear,
    # the x and y zoom drawn apart, and a per-image brightness shift in [-brightness, brightness) clipped to the
    # image's range (Keras' channel_shift_range 0.05). Off by default: over three seeds on the 10k test images
    # (4 rounds) they changed the final ACC by less than the seeds spread it (results/dac_ab.json).
    interpolation: Literal["bilinear", "nearest"] = "bilinear"
    zoom_per_axis: bool = False
    brightness: float = 0.0
    eval_every: int = 1                    # rounds between diagnostic feature passes (0: only the final one)

    def validate(self) -> None:
        for name in ("upper", "lower", "threshold", "threshold_floor"):
            v = getattr(self, name)
            if v is not None and not -1.0 <= v <= 1.0:
                raise ConfigError(f"dac.{name}", f"is a cosine similarity threshold in [-1, 1], got {v}")
        for name in ("upper_rate", "lower_rate", "lambda_step", "threshold_step"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"dac.{name}", f"must be >= 0, got {v}")
        if self.batch_size < 2:
            raise ConfigError("dac.batch_size", f"must be >= 2 (pairs need two images), got {self.batch_size}")
        if self.max_global_batch < 2:
            raise ConfigError("dac.max_global_batch", f"must be >= 2, got {self.max_global_batch}")
        if self.inner_steps < 1:
            raise ConfigError("dac.inner_steps", f"must be >= 1, got {self.inner_steps}")
        if self.chunk_size is not None and self.chunk_size < 0:
            raise ConfigError("dac.chunk_size", f"must be >= 0 (0: no chunks), got {self.chunk_size}")
        if self.local_epochs is not None and self.local_epochs < 1:
            raise ConfigError("dac.local_epochs", f"must be >= 1, got {self.local_epochs}")
        if self.readout_batch < 2:
            raise ConfigError("dac.readout_batch", f"must be >= 2 (batch statistics need rows), got "
                                                   f"{self.readout_batch}")
        if self.selection_batch is not None and self.selection_batch < 2:
            raise ConfigError("dac.selection_batch", f"must be >= 2 (batch statistics need rows), got "
                                                     f"{self.selection_batch}")
        if self.bn_eps <= 0:
            raise ConfigError("dac.bn_eps", f"must be > 0, got {self.bn_eps}")
        if self.lr <= 0:
            raise ConfigError("dac.lr", f"must be > 0, got {self.lr}")
        if not 0 <= self.brightness < 1:
            raise ConfigError("dac.brightness", f"is a shift of [0, 1] pixel values, in [0, 1); got {self.brightness}")
        if not 0 < self.zoom_min <= self.zoom_max:
            raise ConfigError("dac.zoom_min", f"needs 0 < zoom_min <= zoom_max, got {self.zoom_min}, {self.zoom_max}")
        if self.eval_every < 0:
            raise ConfigError("dac.eval_every", f"must be >= 0, got {self.eval_every}")

    @property
    def single_threshold(self) -> bool:
        return self.schedule in SINGLE_THRESHOLD_PRESETS

    @property
    def loss_kind(self) -> str:
        return self.loss or ("mse" if self.single_threshold else "bce")

    @property
    def chunk(self) -> int:
        return self.chunk_size if self.chunk_size is not None else (1000 if self.single_threshold else 0)

    @property
    def selection_group(self) -> int:
        if self.selection_batch is not None:
            return self.selection_batch
        return 32 if self.single_threshold else self.readout_batch

    @property
    def passes(self) -> int:
        return self.local_epochs if self.local_epochs is not None else (5 if self.single_threshold else 1)


@dataclass
class PairThresholds:
    """One round's training targets: only the thresholds; the pairs are chosen batch by batch."""

    upper: float
    lower: float


@dataclass
class DACState:
    labels_path: str | None = rank0_field()  # the last diagnosed clustering (saved parts), for NMI(t-1, t)


def resolve_schedule(opts: DACConfig, epochs: int) -> ThresholdSchedule | SingleThreshold:
    if opts.single_threshold:
        p = SINGLE_THRESHOLD_PRESETS[opts.schedule]
        start = opts.threshold if opts.threshold is not None else p["start"]
        floor = opts.threshold_floor if opts.threshold_floor is not None else p["floor"]
        step = opts.threshold_step if opts.threshold_step is not None else p["step"]
        if step is None:  # the MNIST script: th - (0.9 - 0.5) / epoch after each epoch
            step = (start - floor) / max(epochs, 1)  # train.epochs 0 reads out at round 0: any step will do
        return SingleThreshold(float(start), float(step), float(floor))
    preset = SCHEDULE_PRESETS[opts.schedule]
    vals = {k: getattr(opts, k) if getattr(opts, k) is not None else v for k, v in preset.items()}
    if vals["lambda_step"] is None:  # official: u and l meet after `epochs` rounds
        vals["lambda_step"] = ((vals["upper"] - vals["lower"]) / (vals["upper_rate"] + vals["lower_rate"])
                               / max(epochs, 1))
    return ThresholdSchedule(**{k: float(v) for k, v in vals.items()})


@dataclass
class PairStep:
    """One SGD step of DAC: the images, the keys of their augmentation, and which pairs of the global batch are
    "same" and "different" (None with `selection: same_batch`, which selects from the step's own pass)."""

    ids: np.ndarray
    copy: np.ndarray
    images: np.ndarray
    aug_step: int                # which augmentation draw of the round this is (fresh per local epoch)
    same: torch.Tensor | None = None
    different: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.ids)


def _build(spec: dict) -> LabelFeatureNet:
    if spec["arch"].startswith("dac_"):
        scores = dac_convnet(spec["in_channels"], spec["k"], variant=spec["arch"][4:], bn_eps=spec.get("bn_eps", 1e-5),
                             bn_affine=spec.get("bn_affine", True))
    else:
        # A k-way head, then BatchNorm as the reference nets end: scores of unit spread from the first step. With
        # the head's small N(0, 0.01) init alone the softmax starts uniform, every pair's similarity is ~1, every
        # pair is "same", and training collapses everything into one cluster.
        # A published backbone (`torchvision:<name>`, `timm:<name>`) is built the same way: its pooled features
        # feed the k-way head; `model.freeze: trunk` (or `all`: a backbone's classifier is the identity) keeps the
        # published network as it is and trains only the head, DAC on frozen features.
        net = build_convnet(spec["arch"], spec["in_channels"], spec["sobel"], spec["width"], spec["feature_dim"])
        net.reset_head(spec["k"], torch.Generator().manual_seed(0))
        net.freeze(spec.get("freeze", "none"))
        scores = nn.Sequential(net, nn.BatchNorm1d(spec["k"]))
    return LabelFeatureNet(scores, readout_batch=spec.get("readout_batch", 128))


class DAC(Method):
    name = "dac"
    summary_fields = (("upper", "u {:.3f}"), ("lower", "l {:.3f}"), ("selected_pairs", "pairs {:.1%}"))
    shared_defaults = {"cluster.pca_dim": 0}  # clusters its own label features, never a PCA of the features
    # No PCA, and DeepCluster's SGD settings: this method's batch sizes, optimizer and augmentation are its own
    ignored_fields = ("cluster.pca_dim", "train.batch_size", "train.lr", "train.momentum", "train.weight_decay",
                      "train.head_lr", "train.lr_schedule", "train.lr_final", "train.min_steps", "train.reassign",
                      "train.uniform_sampling", "train.augment", "train.crop", "train.crop_scale_min",
                      "train.hflip", "train.erase")
    section, options = "dac", DACConfig
    # train.epochs 0: the untrained network's label features read out as clusters, the baseline the probe table
    # and a trained run's first round are compared with
    frozen = True
    archs = ("dac_mnist", "dac_cifar", "smallconvnet", "alexnet", "vgg16")
    backbones = True
    min_input_size = {**Method.min_input_size, "dac_mnist": DAC_NET_MIN_SIZE, "dac_cifar": DAC_NET_MIN_SIZE}

    @classmethod
    def validate_config(cls, cfg) -> None:
        super().validate_config(cfg)
        d = cfg.dac
        if cfg.model.arch.startswith("dac_") and (cfg.model.input_size or DAC_NET_MIN_SIZE) < DAC_NET_MIN_SIZE:
            raise ConfigError("model.input_size", f"{cfg.model.arch} needs >= {DAC_NET_MIN_SIZE} px inputs, "
                                                  f"got {cfg.model.input_size}")
        s = resolve_schedule(d, cfg.train.epochs)
        if isinstance(s, ThresholdSchedule) and s.upper <= s.lower:
            raise ConfigError("dac.upper", f"u must start above l: upper {s.upper} <= lower {s.lower} "
                                           f"(schedule {d.schedule!r})")
        global_batch = d.batch_size * cfg.train.num_workers
        if global_batch > d.max_global_batch:
            raise ConfigError("dac.batch_size", f"{d.batch_size} x {cfg.train.num_workers} workers = {global_batch} "
                                                f"images per step, over dac.max_global_batch = {d.max_global_batch} "
                                                f"(each step holds a few {global_batch} x {global_batch} matrices)")
        workers = cfg.train.num_workers
        if d.chunk and (d.chunk % workers or d.chunk < global_batch):
            raise ConfigError("dac.chunk_size", f"{d.chunk} must be a multiple of the {workers} workers and at "
                                                f"least the global batch {global_batch}")

    def check_data(self) -> None:
        super().check_data()
        self.check_batch("dac.batch_size", self.opts.batch_size)
        if self.opts.chunk:
            self.check_batch("dac.chunk_size", self.opts.chunk // self.cfg.train.num_workers)

    def schedule(self) -> ThresholdSchedule | SingleThreshold:
        return resolve_schedule(self.opts, self.cfg.train.epochs)

    # ---- model and state ------------------------------------------------------------------------
    def network_factory(self):
        m = self.cfg.model
        return functools.partial(_build, {"arch": m.arch, "in_channels": self.in_channels, "sobel": m.sobel,
                                          "width": m.width, "feature_dim": m.feature_dim, "k": self.cfg.cluster.k,
                                          "readout_batch": self.opts.readout_batch, "bn_eps": self.opts.bn_eps,
                                          "bn_affine": self.opts.bn_affine, "freeze": m.freeze})

    def weights_target(self, model: nn.Module) -> nn.Module:
        """A backbone's published weights go into the convnet under the label-feature head."""
        if self.cfg.model.arch.startswith("dac_"):
            return model
        assert isinstance(model, LabelFeatureNet) and isinstance(model.scores, nn.Sequential)
        return model.scores[0]

    def init_state(self) -> DACState:
        return DACState()

    def is_done(self, state: DACState, round_idx: int) -> bool:
        return round_idx >= self.cfg.train.epochs or self.schedule().finished(round_idx)

    def extractor(self, model: nn.Module) -> ExtractorSpec:
        batch = self.opts.bn_readout == "batch"
        return self.extractor_of(model, "batch_readout" if batch else "forward",
                                 batch_align=self.opts.readout_batch if batch else 1)

    def optimizers(self, model: nn.Module, state: DACState) -> dict:
        d = self.opts
        params = model.parameters()
        if d.optimizer == "rmsprop":  # Keras' RMSprop: rho 0.9, eps 1e-8 (torch's defaults differ)
            return {"net": torch.optim.RMSprop(params, lr=d.lr, alpha=0.9, eps=1e-8)}
        if d.optimizer == "adam":
            return {"net": torch.optim.Adam(params, lr=d.lr)}
        return {"net": torch.optim.SGD(params, lr=d.lr, momentum=0.9)}

    def probe_extractor(self, model: nn.Module) -> ExtractorSpec:
        """The label features read out as the clusters are (`bn_readout`): with batch statistics, the running
        averages the base's plain forward would use are not what the run clustered by."""
        return self.extractor(model)

    # ---- rank 0 ---------------------------------------------------------------------------------
    def _diagnose(self, ctx: RoundContext, model: nn.Module, state: DACState, round_idx: int, *, release: bool):
        """Every image's label feature -> its cluster, and the round's clustering diagnostics."""
        t = time.perf_counter()
        info = ctx.extract(self.extractor(model))
        if not info.finite:
            raise NumericalError(round_idx, "features", "the label features")
        ctx.service.apply(shard_argmax, "pred")
        row = {"time_features": time.perf_counter() - t,
               **clustering_row(ctx, "pred", self.cfg.cluster.k, prev=ctx.column_blocks(state.labels_path),
                                transitions=True)}
        state.labels_path = ctx.save_column("pred", "labels", round_idx)
        if release:
            ctx.release()
        return FinalClustering("pred", "pred_distance"), row

    def plan(self, ctx: RoundContext, model: nn.Module, state: DACState, round_idx: int) -> tuple[RoundPlan, dict]:
        u, l = self.schedule().at(round_idx)
        row = {"upper": u, "lower": l}
        every = self.opts.eval_every
        if every and round_idx % every == 0:
            row.update(self._diagnose(ctx, model, state, round_idx, release=True)[1])
        return RoundPlan(targets=PairThresholds(u, l)), row

    def finalize(self, ctx: RoundContext, model: nn.Module, state: DACState, round_idx: int):
        final, row = self._diagnose(ctx, model, state, round_idx, release=False)
        u, l = self.schedule().at(round_idx)
        if self.cfg.train.epochs == 0:
            done = "train.epochs 0: the network as given, untrained"
        elif self.schedule().finished(round_idx):
            done = "l >= u: every pair selected"
        else:
            done = "train.epochs rounds"
        row.update({"upper": u, "lower": l, "stop_reason": done})
        return final, row

    def place_new_images(self, ctx: RoundContext, model: nn.Module, artifacts: dict):
        """A new image's cluster is the argmax of its label feature, its distance 1 - that entry."""
        info = ctx.extract(self.extractor(model))
        if not info.finite:
            raise NumericalError(0, "assign", "the label features of these images")
        ctx.service.apply(shard_argmax, "pred")
        return FinalClustering("pred", "pred_distance")

    # ---- all workers ----------------------------------------------------------------------------
    def _augment(self, x: torch.Tensor, ids: np.ndarray, rep: np.ndarray, round_idx: int, step: int):
        d = self.opts
        if not d.augment:
            return x
        keyed = ids.astype(np.int64) * 64 + np.minimum(rep, 63)
        stream = STREAM_DAC_AUGMENT + 8 * step
        draws = 7 if (d.zoom_per_axis or d.brightness) else 5  # the first five are the same either way
        u = hash_uniform_columns(keyed, self.cfg.train.seed, round_idx, stream, draws)
        x = random_affine(x, u, rotation_deg=d.rotation_deg, shift=d.shift, zoom=(d.zoom_min, d.zoom_max),
                          flip=d.hflip, mode=d.interpolation, zoom_per_axis=d.zoom_per_axis)
        return brightness_shift(x, u[:, 6], d.brightness) if d.brightness else x

    def _selection_features(self, wctx: TrainContext, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Label features of un-augmented images with the weights fixed, read out as the clusters are
        (`bn_readout`): the "predict" the targets come from. Never counts as a BatchNorm update."""
        net = wctx.unwrap(model)
        with torch.no_grad(), autocast(wctx.precision, wctx.device.type):
            if self.opts.bn_readout == "batch":
                return net.batch_readout(x, self.opts.selection_group).float()
            was_training = net.training
            net.eval()
            try:
                return net(x).float()
            finally:
                net.train(was_training)

    def _batch_steps(self, wctx: TrainContext, model: nn.Module, round_idx: int, upper: float, lower: float):
        """Without chunks: each global batch selects its own pairs, then `inner_steps` steps train on them."""
        d = self.opts
        for b in wctx.batches(round_idx, batch_size=d.batch_size):
            same = different = None
            if d.selection == "stopgrad":
                x = resize_center(to_float(b.images), self.input_size).to(wctx.device)
                same, different = chunk_targets(wctx.all_gather(self._selection_features(wctx, model, x)),
                                                upper, lower)
            for step in range(d.inner_steps):
                yield PairStep(b.ids, b.copy, b.images, step, same, different)

    def _chunk_steps(self, wctx: TrainContext, model: nn.Module, round_idx: int, upper: float, lower: float):
        """The MNIST script's loop: a chunk's targets once, then `local_epochs` shuffled passes over the chunk.
        Every worker holds chunk / workers of it; the step's global batch is each worker's next `batch_size`
        rows, whose pairs are the sub-block of the chunk's targets (worker w's row i is row w * n + i of the
        gathered chunk). The shuffle is a function of (seed, round, chunk, pass), the same on every worker."""
        d = self.opts
        local = d.chunk // wctx.world
        for ci, b in enumerate(wctx.batches(round_idx, batch_size=local)):
            x = resize_center(to_float(b.images), self.input_size).to(wctx.device)
            feats = wctx.all_gather(self._selection_features(wctx, model, x))
            same, different = chunk_targets(feats, upper, lower)
            n = len(b)
            for e in range(d.passes):
                order = np.random.default_rng([self.cfg.train.seed, round_idx, ci, e, 23]).permutation(n)
                for a in range(0, n, d.batch_size):
                    idx = order[a:a + d.batch_size]
                    if len(idx) < 2:
                        continue
                    g = torch.as_tensor(np.concatenate([w * n + idx for w in range(wctx.world)]), device=same.device)
                    yield PairStep(b.ids[idx], b.copy[idx], b.images[idx], e, same[g][:, g], different[g][:, g])

    def train_round(self, wctx: TrainContext, model: nn.Module, plan: RoundPlan,
                    state: DACState, round_idx: int) -> dict:
        d = self.opts
        upper, lower = plan.targets.upper, plan.targets.lower
        loss_kind, device_type = d.loss_kind, wctx.device.type

        def loss_of(step: PairStep) -> tuple[torch.Tensor, dict]:
            x = resize_center(to_float(step.images), self.input_size).to(wctx.device)
            feats = wctx.all_gather(model(self._augment(x, step.ids, step.copy, round_idx, step.aug_step)))
            with full_precision(device_type):
                sim = similarity_matrix(feats.float())
                same, different = step.same, step.different
                if same is None:  # same_batch: the training pass selects its own pairs, gradient stopped
                    same, different = select_pairs(sim.detach(), upper, lower)
                n_pairs = same.numel()
                return pair_loss(sim, same, different, loss_kind), {
                    "selected_pairs": float((same | different).sum()) / n_pairs,
                    "same_pairs": float(same.sum()) / n_pairs}

        model.train()
        torch.manual_seed(derive_seed(self.cfg.train.seed, round_idx, wctx.rank, 19))
        steps = (self._chunk_steps if d.chunk else self._batch_steps)(wctx, model, round_idx, upper, lower)
        stats = wctx.sgd_pass(steps, [wctx.optimizers["net"]], loss_of, epoch=round_idx, phase="train",
                              what="the pair loss")
        return {"loss": stats.loss, "selected_pairs": stats.step_means.get("selected_pairs", 0.0),
                "same_pairs": stats.step_means.get("same_pairs", 0.0),
                "global_batch": d.batch_size * wctx.world, "train_images": stats.images, "time_train": stats.seconds,
                "images_per_s_train": stats.images / max(stats.seconds, 1e-9)}


METHOD = DAC
