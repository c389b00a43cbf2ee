"""Choosing a sweep's winner from the trials' final metrics rows, without labels unless asked.

The scores come from each run's final row (`"final": true` in metrics.jsonl): `silhouette` and
`calinski_harabasz` on a fixed sample of the final clustered features, `nmi_prev` (agreement with the previous
round's assignment: stability), `loss`, and DEC's `ae_kmeans_stability` (how reproducible k-means at the trial's k
is on the autoencoder's embedding before DEC sharpens it, raydc.core.selection.kmeans_stability: the score for
choosing DEC's k, where silhouette on the sharpened embedding prefers the smallest k) and, where asked,
`ae_manifold_silhouette` (the silhouette of a mixture's clusters on a UMAP of that embedding,
raydc.core.selection.manifold_silhouette). A trial that did not
finish, or whose score is missing or not finite, cannot win. Ties go to the earlier trial, so a rerun of the same
sweep picks the same winner.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from raydc.sweep.config import LABEL_FREE, SUPERVISED, SelectConfig


@dataclass
class TrialRecord:
    trial_id: str
    params: dict[str, Any]
    status: str                              # done | stopped (by the scheduler) | error | unfinished
    final: dict[str, Any] | None = None      # the run's final metrics row
    wall_s: float | None = None
    run_dir: str | None = None
    attempts: int = 0                        # times Tune started this trial (resumes count)
    error: str | None = None
    rows: list[dict] = field(default_factory=list)

    def score(self, metric: str) -> float | None:
        if self.status != "done" or not self.final:
            return None
        v = self.final.get(metric)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return None
        return float(v)


def _sign(select: SelectConfig) -> float:
    """Orients the selection score so that higher is preferred."""
    return 1.0 if select.direction == "max" else -1.0


def select_best(records: list[TrialRecord], select: SelectConfig) -> TrialRecord | None:
    sign = _sign(select)
    best, best_score = None, -math.inf
    for rec in records:
        s = rec.score(select.metric)
        if s is not None and sign * s > best_score:
            best, best_score = rec, sign * s
    return best


def selection_label(select: SelectConfig) -> str:
    kind = "supervised selection" if select.metric in SUPERVISED else "label-free selection"
    return f"{kind}: {select.metric} ({select.direction})"


# a column only where some trial reports it
ONLY_WHEN_PRESENT = ("kmeans_objective", "ae_kmeans_stability", "ae_manifold_silhouette")


def metric_columns(records: list[TrialRecord], select: SelectConfig) -> list[str]:
    """The selection metric first, then every other label-free score, then the labelled ones any trial has."""
    present = {k for r in records if r.final for k in r.final}
    cols = [select.metric]
    for name in (*LABEL_FREE, *SUPERVISED):
        if name not in cols and (name in present or name in LABEL_FREE and name not in ONLY_WHEN_PRESENT):
            cols.append(name)
    return cols


@dataclass(frozen=True)
class LabelAgreement:
    """How the label-free choice compares with labels, for the summary only (evaluation, never selection)."""

    label_metric: str
    trials: int                     # finished trials that have both scores
    spearman: float | None          # rank correlation of the selection score (oriented: higher = preferred)
    label_best: TrialRecord         # the trial the labelled metric would have picked


def label_agreement(records: list[TrialRecord], select: SelectConfig, label_metric: str = "acc"
                    ) -> LabelAgreement | None:
    """None when the selection is already supervised or the shards have no labels. Spearman needs at least
    three trials and is None when either score is constant across them."""
    if select.metric in SUPERVISED:
        return None
    sign = _sign(select)
    scored = [(r.score(select.metric), r.score(label_metric), r) for r in records]
    pairs = [(sign * s, y, r) for s, y, r in scored if s is not None and y is not None]
    if not pairs:
        return None
    label_best = max(pairs, key=lambda p: p[1])[2]  # max() keeps the first of equals: the earlier trial
    rho = None
    if len(pairs) >= 3 and len({p[0] for p in pairs}) > 1 and len({p[1] for p in pairs}) > 1:
        from scipy.stats import spearmanr

        rho = float(spearmanr([p[0] for p in pairs], [p[1] for p in pairs]).statistic)
    return LabelAgreement(label_metric, len(pairs), rho, label_best)
