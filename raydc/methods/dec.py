"""DEC (Xie, Girshick, Farhadi, ICML 2016) as a strategy for the engine's loop.

A DEC run has three stages, all inside the one training fit, each round a unit of work worth a checkpoint:

1. Autoencoder pretraining: greedy layer-wise denoising pairs (`dec.pretrain_epochs` each), then end-to-end
   fine-tuning (`dec.finetune_epochs`). A round is up to `ROUND_EPOCHS` full passes over the data, so Ray's
   per-round cost (~2-3 s: broadcast, report barrier, checkpoint) stays small next to the work.
2. k-means initialisation (the first DEC round): the pool extracts the embedding z of every image, the shard
   actors run k-means on it (no PCA, no L2: DEC clusters the raw embedding). Scored against the labels, this is
   the "AE + k-means" baseline, kept in the state so the final row repeats it.
3. DEC iterations: a round is one target update plus `dec.update_interval` SGD iterations. Rank 0 extracts q for
   every image, gets the global soft cluster mass f with one reduction over the shard actors, has each shard
   build its rows of P with that f, and gathers P into an N x k array indexed by image id (the streaming split
   moves rows between workers, so targets must be addressable by id). Workers draw rows with Poisson repeats so
   that a round is `update_interval` batches in expectation, and minimise KL(P || Q) over the encoder and
   the centres. Training stops when fewer than `dec.tol` of the hard labels changed between two updates (never
   on the first, which compares with k-means' own labels) or after `dec.max_iterations` iterations.

Randomness: one seed (`train.seed`) drives the weight init, k-means, the shuffles and Poisson draws (hashed per
image id and pass), and dropout (torch is re-seeded each round from (seed, round, rank)), so a resumed run
replays a round exactly.
"""
from __future__ import annotations

import functools
import time
from typing import Any

import numpy as np
import ray
import torch
import torch.nn as nn

from raydc.core import metrics as M
from raydc.core.augment import MEAN, STD
from raydc.core.autoencoder import StackedAutoencoder
from raydc.core.dec import ClusteringLayer, kl_loss, label_change_fraction, should_stop, soft_assignment, \
    target_distribution
from raydc.core.sampler import poisson_repeats
from raydc.engine.clustering import ClusterOutcome
from raydc.engine.features import ExtractorSpec
from raydc.engine.stream import to_model_input
from raydc.errors import ConfigError, NumericalError
from raydc.methods.base import Method, Targets

ROUND_EPOCHS = 5   # at most this many autoencoder epochs per round (one checkpoint, one metrics row)

PRETRAIN, FINETUNE, DEC_PHASE = "pretrain", "finetune", "dec"


# ---- the model ------------------------------------------------------------------------------------------
class DECNet(nn.Module):
    """The stacked autoencoder and the DEC centres in one module: one state_dict checkpoints both, and the
    feature pool can call `embed` (z) or `soft_assign` (q) on it by name.

    Inputs are the engine's normalised NCHW floats, (x/255 - MEAN)/STD; DEC's autoencoder works on pixels in
    [0, 1], flattened. `pixels` undoes the normalisation, and every path into the autoencoder goes through it.
    """

    def __init__(self, input_dim: int, dims: list[int], corruption: float, k: int, alpha: float, seed: int):
        super().__init__()
        self.ae = StackedAutoencoder(input_dim, dims, corruption, seed=seed)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)  # the centres' placeholder init; k-means overwrites them anyway
            self.cluster = ClusteringLayer(k, dims[-1], alpha)

    @staticmethod
    def pixels(x: torch.Tensor) -> torch.Tensor:
        return (x * STD + MEAN).flatten(1)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.ae.encode(self.pixels(x))

    def soft_assign(self, x: torch.Tensor) -> torch.Tensor:
        return self.cluster(self.embed(x))

    def forward(self, x: torch.Tensor, task: str = "soft_assign", layer: int = 0) -> torch.Tensor:
        """One entry point for every phase: DDP synchronises gradients only through `forward`."""
        if task == "soft_assign":
            return self.soft_assign(x)
        if task == "layerwise":
            return self.ae.layerwise_loss(self.pixels(x), layer)
        if task == "finetune":
            return self.ae.finetune_loss(self.pixels(x))
        raise ValueError(f"unknown task {task!r}")

    def dec_parameters(self) -> list[nn.Parameter]:
        """What DEC's KL stage trains: the encoder and the centres (the decoder is dropped, as in the paper)."""
        return [*self.ae.encoder_layers.parameters(), *self.cluster.parameters()]


def _build(spec: dict) -> DECNet:
    return DECNet(**spec)


def _seed(seed: int, *keys: int) -> int:
    return int(np.random.default_rng([seed, *keys]).integers(1 << 31))


# ---- per-shard functions run by the shard actors (pure: arrays in, small results out) --------------------
def _shard_q(x: np.ndarray | None, centres: np.ndarray | None, alpha: float) -> np.ndarray | None:
    """This shard's q: x already is q when `centres` is None, else x is z and q is computed here."""
    if x is None or len(x) == 0:
        return None
    if centres is None:
        return np.asarray(x, np.float32)
    with torch.no_grad():
        return soft_assignment(torch.tensor(x, dtype=torch.float32), torch.tensor(centres), alpha).numpy()


def shard_mass(ids, x, labels, centres, alpha, k):
    """The partial f_j = sum_i q_ij of this shard, in float64 so the sum over shards does not depend on order."""
    q = _shard_q(x, centres, alpha)
    return np.zeros(k, np.float64) if q is None else q.astype(np.float64).sum(axis=0)


def shard_targets(ids, x, labels, centres, alpha, mass):
    """This shard's rows of P (with the global mass), hard labels argmax q, and max q, by id."""
    q = _shard_q(x, centres, alpha)
    if q is None:
        return None
    p = target_distribution(q.astype(np.float64), cluster_mass=mass).astype(np.float32)
    return ids, p, q.argmax(axis=1).astype(np.int64), q.max(axis=1).astype(np.float32), labels


def _gather(parts: list) -> dict[str, Any]:
    parts = [p for p in parts if p is not None]
    out = {"ids": np.concatenate([p[0] for p in parts]), "p": np.concatenate([p[1] for p in parts]),
           "pred": np.concatenate([p[2] for p in parts]), "maxq": np.concatenate([p[3] for p in parts])}
    out["true"] = np.concatenate([p[4] for p in parts]) if parts[0][4] is not None else None
    return out


def _by_id(ids: np.ndarray, values: np.ndarray, fill) -> np.ndarray:
    """A global array indexed by image id (ids are stable, not necessarily 0..N-1)."""
    out = np.full((int(ids.max()) + 1, *values.shape[1:]), fill, values.dtype)
    out[ids] = values
    return out


# ---- the method -----------------------------------------------------------------------------------------
class DEC(Method):
    name = "dec"

    def __init__(self, cfg, manifest):
        super().__init__(cfg, manifest)
        if cfg.cluster.pca_dim:
            raise ConfigError("cluster.pca_dim", f"must be 0 for DEC (it clusters its own embedding), "
                                                 f"got {cfg.cluster.pca_dim}")
        self.input_dim = cfg.model.input_size ** 2 * self.in_channels
        self._last_update: dict | None = None  # rank 0: the update that said stop, reused by finalize

    # ---- model and state ------------------------------------------------------------------------
    def _factory(self):
        d = self.cfg.dec
        return functools.partial(_build, {"input_dim": self.input_dim, "dims": list(self.cfg.model.ae_dims),
                                          "corruption": d.corruption, "k": self.cfg.cluster.k, "alpha": d.alpha,
                                          "seed": self.cfg.train.seed})

    def build_model(self) -> nn.Module:
        return self._factory()()

    def stages(self) -> list[tuple[str, int, int]]:
        """The autoencoder schedule: (phase, layer, epochs) for each greedy pair, then fine-tuning."""
        d = self.cfg.dec
        out = [(PRETRAIN, i, d.pretrain_epochs) for i in range(len(self.cfg.model.ae_dims))]
        out.append((FINETUNE, -1, d.finetune_epochs))
        return [s for s in out if s[2] > 0]

    def init_state(self) -> dict:
        return {"stage": 0, "stage_epoch": 0, "ae_epochs": 0, "dec_iter": 0, "n_updates": 0,
                "initialised": False, "prev_pred": None, "ae_kmeans": None, "delta_label": None,
                "stop_reason": None}

    def is_done(self, state: dict, round_idx: int) -> bool:
        return state.get("stop_reason") is not None

    def epoch_of(self, state: dict, round_idx: int) -> int:
        """Autoencoder epochs completed plus DEC target updates made: strictly increasing, one unit per unit of
        work, so rows never share an x position in the report's curves."""
        return int(state["ae_epochs"] + state["n_updates"])

    def extractor(self, model: nn.Module, call: str) -> ExtractorSpec:
        sd = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        return ExtractorSpec(build=self._factory(), state=sd, call=call, input_size=self.cfg.model.input_size,
                             channels=self.in_channels, flatten=False)

    # ---- rank 0 ---------------------------------------------------------------------------------
    def make_targets(self, ctx, model: nn.Module, state: dict, round_idx: int) -> tuple[Targets, dict]:
        stages = self.stages()
        if state["stage"] < len(stages):
            return self._plan_autoencoder(stages, state)
        if not state["initialised"]:
            return self._kmeans_init(ctx, model, state, round_idx)
        return self._update(ctx, model, state, round_idx)

    def _plan_autoencoder(self, stages: list, state: dict) -> tuple[Targets, dict]:
        """The next chunk of at most ROUND_EPOCHS epochs of one stage; the state advances past it (the round's
        checkpoint commits it, so a failed round is redone from the previous state)."""
        phase, layer, total = stages[state["stage"]]
        start = state["stage_epoch"]
        n = min(ROUND_EPOCHS, total - start)
        chunk = {"phase": phase, "layer": layer, "start": start, "epochs": n, "total": total}
        state["ae_epochs"] += n
        if start + n >= total:
            state["stage"], state["stage_epoch"] = state["stage"] + 1, 0
        else:
            state["stage_epoch"] = start + n
        row = {"phase": phase, "stage_epochs": f"{start + n}/{total}"}
        if phase == PRETRAIN:
            row["layer"] = layer
        return Targets(values={"chunk": chunk}, state=self._small(state)), row

    def _kmeans_init(self, ctx, model: nn.Module, state: dict, round_idx: int) -> tuple[Targets, dict]:
        """Embed every image, k-means the embedding (the AE + k-means baseline), then the first target P from
        the same embedding with the k-means centres: no second pass over the images."""
        cc = self.cfg.cluster
        row: dict[str, Any] = {"phase": DEC_PHASE}
        t = time.perf_counter()
        info = ctx.extract(self.extractor(model, "embed"))
        if not info["finite"] or not ctx.service.project(None, False):
            raise NumericalError(self.epoch_of(state, round_idx), "features", "the autoencoder embedding")
        row["time_features"] = time.perf_counter() - t
        t = time.perf_counter()
        out = ctx.service.kmeans(cc.k, niter=cc.niter, seed=_seed(self.cfg.train.seed, 11), n_init=cc.n_init,
                                 mode="single")
        row["time_kmeans"] = time.perf_counter() - t
        centres = np.ascontiguousarray(out.centroids, np.float32)
        baseline = {"ae_kmeans_objective": float(out.objective[-1]) if out.objective else None,
                    "ae_kmeans_n_init": cc.n_init}
        if out.true_labels is not None:
            scores = M.evaluate(out.true_labels, out.labels)
            baseline.update({f"ae_kmeans_{m}": scores[m] for m in ("acc", "nmi", "ari")})
        state["ae_kmeans"] = baseline
        state["prev_pred"] = _by_id(out.ids, out.labels.astype(np.int64), -1)
        state["initialised"] = True
        row.update(baseline)
        targets = self._targets(ctx, state, round_idx, centres, n=info["n"], row=row)
        targets.values["centres"] = centres
        return targets, row

    def _update(self, ctx, model: nn.Module, state: dict, round_idx: int) -> tuple[Targets, dict]:
        t = time.perf_counter()
        info = ctx.extract(self.extractor(model, "soft_assign"))
        if not info["finite"] or not ctx.service.project(None, False):
            raise NumericalError(self.epoch_of(state, round_idx), "features", "the soft assignments q")
        row: dict[str, Any] = {"phase": DEC_PHASE, "time_features": time.perf_counter() - t}
        return self._targets(ctx, state, round_idx, None, n=info["n"], row=row), row

    def _targets(self, ctx, state: dict, round_idx: int, centres: np.ndarray | None, n: int, row: dict
                 ) -> Targets:
        """P from the q held by the shard actors (or from z and `centres`): one reduction for the global mass f,
        then each shard's rows of P; the stopping rule on the change of hard labels since the last update.
        Fills `row` with the update's diagnostics."""
        d, k = self.cfg.dec, self.cfg.cluster.k
        t = time.perf_counter()
        mass = np.sum(ctx.service.apply(shard_mass, centres, d.alpha, k), axis=0)
        g = _gather(ctx.service.apply(shard_targets, centres, d.alpha, mass))
        ctx.service.release()
        if not np.isfinite(g["p"]).all():
            raise NumericalError(self.epoch_of(state, round_idx), "targets", "the target distribution P")
        delta = label_change_fraction(state["prev_pred"][g["ids"]], g["pred"])
        first = state["n_updates"] == 0
        state["n_updates"] += 1
        state["delta_label"] = delta
        state["prev_pred"] = _by_id(g["ids"], g["pred"], -1)
        sizes = np.bincount(g["pred"], minlength=k)
        row.update({"dec_update": state["n_updates"], "delta_label": delta, "dec_iterations": state["dec_iter"],
                    "n_empty": int((sizes == 0).sum()), "size_histogram": sizes.tolist(),
                    "time_targets": time.perf_counter() - t})
        if g["true"] is not None:
            row.update({m: v for m, v in M.evaluate(g["true"], g["pred"]).items()})
        if not first and should_stop(delta, d.tol):
            state["stop_reason"] = f"converged: {delta:.5f} of labels changed (< tol {d.tol})"
        elif state["dec_iter"] >= d.max_iterations:
            state["stop_reason"] = f"max_iterations: {state['dec_iter']} >= {d.max_iterations}"
        if state["stop_reason"] is not None:
            self._last_update = {**g, "row": row}
            return Targets(stop=True, values={"stop_reason": state["stop_reason"]}, state=self._small(state))
        p_by_id = _by_id(g["ids"], g["p"], 0.0)
        return Targets(refs={"p": ray.put(p_by_id)}, values={"n": int(n)}, state=self._small(state))

    @staticmethod
    def _small(state: dict) -> dict:
        """The counters every rank may read; the big per-image arrays stay on rank 0 (and in its checkpoint)."""
        return {k: v for k, v in state.items() if k != "prev_pred"}

    def finalize(self, ctx, model: nn.Module, state: dict, round_idx: int):
        """Hard labels argmax q of the final model. The update that decided to stop already computed them from
        this very model (no training since), so they are reused rather than extracted again."""
        g, row = self._last_update, {}
        if g is None:  # not reached through a stop decision in this process: extract once more
            t = time.perf_counter()
            info = ctx.extract(self.extractor(model, "soft_assign"))
            if not info["finite"] or not ctx.service.project(None, False):
                raise NumericalError(self.epoch_of(state, round_idx), "features", "the soft assignments q")
            mass = np.sum(ctx.service.apply(shard_mass, None, self.cfg.dec.alpha, self.cfg.cluster.k), axis=0)
            g = _gather(ctx.service.apply(shard_targets, None, self.cfg.dec.alpha, mass))
            ctx.service.release()
            row["time_features"] = time.perf_counter() - t
        else:
            row.update({key: v for key, v in g["row"].items() if key.startswith("time_")})
        centres = model.cluster.centers.detach().cpu().numpy().copy()
        out = ClusterOutcome(g["ids"], g["pred"], (1.0 - g["maxq"]).astype(np.float32), centres, [], 0,
                             "dec (argmax of the Student-t soft assignment)", "dec", g["true"])
        k = self.cfg.cluster.k
        sizes = np.bincount(out.labels, minlength=k)
        row.update({"phase": "final", "stop_reason": state["stop_reason"], "delta_label": state["delta_label"],
                    "dec_iterations": state["dec_iter"], "dec_updates": state["n_updates"],
                    "n_empty": int((sizes == 0).sum()), "size_min": int(sizes.min()), "size_max": int(sizes.max()),
                    "size_histogram": sizes.tolist()})
        row.update(state["ae_kmeans"] or {})
        if out.true_labels is not None:
            row.update(M.evaluate(out.true_labels, out.labels))
        return out, row

    # ---- all workers ----------------------------------------------------------------------------
    def optimizers(self, model: nn.Module, state: dict) -> dict:
        """Every phase's optimizer, made once (the loop calls this at start-up and restores their state from the
        checkpoint); `train_round` picks the one for the round's phase."""
        d = self.cfg.dec

        def pretrain_opt(params):
            if d.pretrain_optimizer == "adam":
                return torch.optim.Adam(params, lr=d.pretrain_lr)
            return torch.optim.SGD(params, lr=d.pretrain_lr, momentum=d.pretrain_momentum)

        opts = {f"layer{i}": pretrain_opt(model.ae.layer_parameters(i)) for i in range(model.ae.n_layers)}
        opts["finetune"] = pretrain_opt(list(model.ae.parameters()))
        opts["dec"] = torch.optim.SGD(model.dec_parameters(), lr=d.lr, momentum=d.momentum)
        return opts

    def train_round(self, wctx, model: nn.Module, targets: Targets, state: dict, round_idx: int) -> dict:
        torch.manual_seed(_seed(self.cfg.train.seed, round_idx, wctx.rank, 17))  # dropout
        if "chunk" in targets.values:
            return self._train_autoencoder(wctx, model, targets.values["chunk"], state, round_idx)
        return self._train_dec(wctx, model, targets, state, round_idx)

    def _use_optimizer(self, wctx, name: str):
        """The phase's optimizer; finished phases' optimizer state is dropped (it is never used again and would
        only fatten every checkpoint)."""
        for other, opt in wctx.optimizers.items():
            if other != name and opt.state:
                opt.state.clear()
        return wctx.optimizers[name]

    def _sgd_pass(self, wctx, opt, batches, round_idx: int, loss_of, numerical_error) -> tuple[float, int, int]:
        """One pass of SGD steps over `batches`, shared by the autoencoder and the DEC stage: `loss_of(x, ids)`
        is the stage's loss, `numerical_error()` the error to raise on a non-finite one. Returns this worker's
        (loss summed over images, images, steps)."""
        loss_sum, n_seen, steps = 0.0, 0, 0
        for ids, rep, imgs in batches:
            x = to_model_input(ids, rep, imgs, seed=self.cfg.train.seed, epoch=round_idx, augment=None,
                               size=self.cfg.model.input_size).to(wctx.device)
            loss = loss_of(x, ids)
            if not torch.isfinite(loss):
                raise numerical_error()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            loss_sum += float(loss.detach()) * len(ids)
            n_seen += len(ids)
            steps += 1
            wctx.progress(steps, n_seen, loss_sum / max(n_seen, 1))
        return loss_sum, n_seen, steps

    def _train_autoencoder(self, wctx, model: nn.Module, chunk: dict, state: dict, round_idx: int) -> dict:
        d = self.cfg.dec
        pretrain = chunk["phase"] == PRETRAIN
        opt = self._use_optimizer(wctx, f"layer{chunk['layer']}" if pretrain else "finetune")
        task = "layerwise" if pretrain else "finetune"
        model.train()
        losses, n_images = [], 0
        t0 = time.perf_counter()
        for e in range(chunk["epochs"]):
            epoch_in_stage = chunk["start"] + e
            lr = d.pretrain_lr * (0.1 ** (epoch_in_stage // d.lr_step_epochs) if d.lr_step_epochs else 1.0)
            for group in opt.param_groups:
                group["lr"] = lr
            batches = wctx.batches(_pass_id(round_idx, e), batch_size=d.pretrain_batch_size)
            loss_sum, n_seen, _ = self._sgd_pass(
                wctx, opt, batches, round_idx, lambda x, ids: model(x, task=task, layer=chunk["layer"]),
                lambda: NumericalError(self.epoch_of(state, round_idx), chunk["phase"], "the reconstruction loss"))
            totals = wctx.all_reduce_sum([loss_sum, n_seen])
            losses.append(totals[0] / max(totals[1], 1))
            n_images += int(totals[1])
        seconds = time.perf_counter() - t0
        return {"loss": losses[-1], "loss_epochs": losses, "lr": lr, "train_images": n_images,
                f"time_{chunk['phase']}": seconds, "images_per_s_train": n_images / max(seconds, 1e-9)}

    def _train_dec(self, wctx, model: nn.Module, targets: Targets, state: dict, round_idx: int) -> dict:
        d = self.cfg.dec
        net = wctx.unwrap(model)
        if "centres" in targets.values:  # the k-means round: every rank starts from the same centres
            net.cluster.init_from(np.array(targets.values["centres"]))  # a writable copy of the shared array
        p_by_id = ray.get(targets.refs["p"])
        n = targets.values["n"]
        # Poisson(lam) copies of each row, all rows in one pseudo-cluster: update_interval batches per worker
        # in expectation, decided per image id so it does not matter which worker streams a row.
        n_total = d.update_interval * d.batch_size * wctx.world

        def repeats(ids, u):
            return poisson_repeats(np.zeros(len(ids), np.int64), np.array([n]), n_total, u)

        opt = self._use_optimizer(wctx, "dec")
        model.train()
        t0 = time.perf_counter()
        batches = wctx.batches(_pass_id(round_idx, 0), repeats=repeats, batch_size=d.batch_size)
        loss_sum, n_seen, steps = self._sgd_pass(
            wctx, opt, batches, round_idx,
            lambda x, ids: kl_loss(model(x), torch.from_numpy(p_by_id[ids]).to(wctx.device)),
            lambda: NumericalError(self.epoch_of(state, round_idx), DEC_PHASE, "the KL loss"))
        seconds = time.perf_counter() - t0
        state["dec_iter"] += steps  # equal on every rank: all workers stop at the same step
        totals = wctx.all_reduce_sum([loss_sum, n_seen])
        return {"loss": totals[0] / max(totals[1], 1), "train_images": int(totals[1]), "dec_steps": steps,
                "dec_iterations": state["dec_iter"], "time_train": seconds,
                "images_per_s_train": totals[1] / max(seconds, 1e-9)}


def _pass_id(round_idx: int, epoch: int) -> int:
    """A distinct number per pass over the data (several per round while pretraining), which seeds the shuffle
    and the Poisson draws: reusing the round number would give every epoch of a round the same order."""
    return round_idx * ROUND_EPOCHS + epoch
