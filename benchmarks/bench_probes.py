"""k-NN and linear probes (`raydc evaluate --probe`) of a DeepCluster network beside the same network untrained.

The SSL libraries compare features by a probe, not by clustering ACC: train a weighted k-NN (k = 20 and 200,
T = 0.07, cosine) or a logistic regression on the frozen features of a labelled training split, score a test
split. Here DeepCluster trains on a subset of MNIST's training images (no labels), the probes fit on the same
images' labels and score MNIST test images it never saw; the untrained baseline is the same config with
`train.epochs: 0` (the frozen path: the initial network's features clustered once). Small on purpose: the
machine is shared and each run must stay within minutes. Run directories live under the scratch directory and
are read back when finished, so a stopped suite resumes.
"""
from __future__ import annotations

from pathlib import Path

from benchmarks.common import REPO, Context

NAME = "probes"
NEEDS_RAY = True
TRAIN_IMAGES = 3000
TEST_IMAGES = 2000
SETTINGS = {
    "deepcluster": {"config": "demo.yaml", "sets": ["train.epochs=2"],
                    "label": "DeepCluster-v2, 2 rounds (demo.yaml)"},
    "untrained": {"config": "demo.yaml", "sets": ["train.epochs=0"],
                  "label": "same network untrained (train.epochs 0)"},
}


def _shards(ctx: Context, split: str, limit: int) -> Path:
    from raydc.data.manifest import MANIFEST_NAME
    from raydc.data.prepare import prepare

    out = ctx.work / "probes" / f"mnist-{split}-{limit}"
    if not (out / MANIFEST_NAME).exists():
        prepare("mnist", out, split=split, limit=limit, rows_per_shard=1000, overwrite=True, progress=False)
    return out


def run(ctx: Context) -> dict:
    import json

    from raydc.config import load_config
    from raydc.engine.probe import probe_runs
    from raydc.engine.trainer import run_training

    if ctx.quick:
        return {"skipped": "full mode only: two training runs of minutes each"}
    train_dir = _shards(ctx, "train", TRAIN_IMAGES)
    test_dir = _shards(ctx, "test", TEST_IMAGES)
    out: dict = {"data": f"MNIST: runs and probe training on the first {TRAIN_IMAGES:,} training images, probes "
                         f"scored on the first {TEST_IMAGES:,} test images", "runs": {}}
    for name, s in SETTINGS.items():
        run_dir = ctx.work / "probes" / "runs" / name
        sets = [f"data.shards={train_dir}", "data.split=train", f"data.limit={TRAIN_IMAGES}",
                f"run.dir={run_dir}", *s["sets"]]
        if not (run_dir / "clustering.pt").exists():
            cfg = load_config(str(REPO / "jobs" / "configs" / s["config"]), sets)
            run_training(cfg, overwrite=True)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
        final = next(r for r in reversed(rows) if r.get("final"))
        probes = probe_runs(str(run_dir), ("knn", "linear"), str(train_dir), str(test_dir))
        out["runs"][name] = {
            "label": s["label"], "config": s["config"], "sets": sets[3:],
            "final": {k: final.get(k) for k in ("acc", "nmi", "ari")},
            "time_rounds": sum(float(r.get("time_round") or 0) for r in rows),
            "probes": {p: {k: v for k, v in r.items() if k not in ("path", "run", "train_shards", "test_shards")}
                       for p, r in probes.items()},
        }
    return out
