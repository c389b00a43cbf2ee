"""The one line a round prints, and the warning a run that ended worse than it started gets. The engine's
fields (loss, scores, speed, phase times) are shared; each method names its own (`Method.summary_fields`)."""
from __future__ import annotations

import math
from typing import Sequence

SHARED_FIELDS: tuple[tuple[str, str], ...] = (
    ("loss", "loss {:.4f}"), ("nmi_prev", "NMI(t-1,t) {:.3f}"), ("acc", "ACC {:.3f}"),
    ("acc_majority", "majority ACC {:.3f}"), ("nmi", "NMI {:.3f}"), ("ari", "ARI {:.3f}"), ("n_empty", "empty {}"),
    ("silhouette", "silhouette {:.3f}"), ("images_per_s_train", "{:.0f} img/s train"))


def summary_line(row: dict, method_fields: Sequence[tuple[str, str]] = ()) -> str:
    """The one line a round prints: what it achieved (the method's own figures first), then where its time
    went."""
    parts = ["final" if row.get("final") else f"epoch {row.get('epoch')}"]
    # More clusters than classes: the Hungarian ACC matches only as many clusters as there are classes, so it
    # sits near chance whatever the features (0.13 for 100 clusters of MNIST); the majority ACC is the score.
    # The row keeps both.
    over = (row.get("n_clusters") or 0) > (row.get("n_classes") or 0) > 0 and row.get("acc_majority") is not None
    for key, fmt in (*method_fields, *SHARED_FIELDS):
        if over and key == "acc":
            continue
        value = row.get(key)
        if value is None:
            continue
        # a method's own figure that does not apply to this row is NaN (DeepCluster's k-means objective after a
        # readout that runs no k-means); the shared ones always show, a NaN loss above all
        if (key, fmt) in method_fields and isinstance(value, float) and math.isnan(value):
            continue
        if not (key == "phase" and value == "final"):
            parts.append(fmt.format(row[key]))
    phases = [f"{k[5:]} {v:.1f}s" for k, v in row.items() if k.startswith("time_") and k != "time_round"
              and isinstance(v, (int, float))]
    if phases:
        parts.append("[" + ", ".join(phases) + "]")
    return " | ".join(parts)


def quality_regression(rows: list[dict], final_acc: float | None, tolerance: float = 0.005,
                       key: str = "acc") -> str | None:
    """A sentence when the final clustering scores below the first clustering the run made (round 0's, or
    DEC's AE + k-means start): training made things worse, which a user must hear rather than find later.
    Evaluation only (the labels' ACC, when the shards have labels), and it never changes the result.
    `final_acc` and `key` are the method's like-with-like figure and the first row's column it compares with
    (`Method.comparable_final`)."""
    first = next((r for r in rows if r.get(key) is not None and not r.get("final")), None)
    if first is None or final_acc is None:
        return None
    if final_acc >= first[key] - tolerance:
        return None
    what = "majority ACC" if key == "acc_majority" else "ACC"
    return (f"the final clustering ({what} {final_acc:.3f}) is worse than the run's first one at epoch "
            f"{first.get('epoch')} ({what} {first[key]:.3f}): training lowered the quality")
