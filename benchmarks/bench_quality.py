"""Clustering quality of the latest runs next to the published numbers.

Reads `runs/<name>/metrics.jsonl` (last row: `acc`, `nmi`, `ari`; DEC rows also `ae_kmeans_*`, the k-means
on the pretrained autoencoder's embedding) for the runs below, and, where the run finished
(`assignments.parquet` present), recomputes NMI with both normalisations from the assignments and the
shards' labels: raydc reports sklearn's default, the arithmetic mean of the entropies; the 2016-2018 papers
(DEC, DAC, DeepCluster) used the geometric mean. ACC is the Hungarian-matched accuracy everywhere.

Nothing is launched unless `--full --run-quality` is given, and then only the runs that are missing and
have a config in `jobs/configs/<name>.yaml` (they take hours on this machine).
"""
from __future__ import annotations

import json
from pathlib import Path

from benchmarks.common import REPO, Context

NAME = "quality"
NEEDS_RAY = False

RUNS = {
    "fmnist3": {"method": "DeepCluster", "data": "Fashion-MNIST classes 0-2, first 5,000 train images, k=3"},
    "mnist": {"method": "DeepCluster", "data": "MNIST, 70,000 images, k=10"},
    "dec_mnist": {"method": "DEC", "data": "MNIST, 70,000 images, k=10"},
    "dec_fmnist": {"method": "DEC", "data": "Fashion-MNIST, 70,000 images, k=10"},
    # dec_*.yaml with `dec.finetune_epochs` cut to 110 on --resume, both runs sharing the 2 cores; each was stopped
    # in its DEC stage before the 0.1 % label-change stop (MNIST at 0.13 %, Fashion-MNIST at 1.76 %).
    "dec_mnist_ft110": {"method": "DEC", "data": "MNIST, 70,000 images, k=10, 110 end-to-end epochs, stopped"},
    "dec_fmnist_ft110": {"method": "DEC", "data": "Fashion-MNIST, 70,000 images, k=10, 110 end-to-end epochs, "
                                                 "stopped"},
    # Optimizer ablation of DEC's autoencoder pretraining on MNIST test (10,000 images), 50 end-to-end epochs, seed
    # 31: dec_mnist.yaml's Adam (lr 1e-3, after 2 greedy epochs per layer) against DEC-keras's SGD (lr 1, momentum
    # 0.9, end-to-end only: `dec.pretrain_optimizer=sgd dec.pretrain_lr=1.0 dec.pretrain_epochs=0`).
    "dec_mnist10k_adam50": {"method": "DEC", "data": "MNIST test, 10,000 images, k=10, Adam 1e-3, 2+50 epochs"},
    "dec_mnist10k_sgd50": {"method": "DEC", "data": "MNIST test, 10,000 images, k=10, SGD lr 1 m 0.9, 0+50 epochs "
                                                   "(DEC-keras's optimizer)"},
    # The shipped DAC configs run 20 rounds; these two ran 6 (`--set train.epochs=6 --set dac.eval_every=3`).
    "dac_mnist_e6": {"method": "DAC", "data": "MNIST, 70,000 images, k=10, 6 rounds"},
    "dac_fmnist_e6": {"method": "DAC", "data": "Fashion-MNIST, 70,000 images, k=10, 6 rounds"},
}

# DESIGN.md, "Published numbers to compare with".
PUBLISHED = [
    {"method": "DEC", "data": "MNIST", "acc": 0.843, "nmi": None, "source": "DEC paper (Xie et al., ICML 2016)",
     "nmi_norm": "geometric", "compare_with": "dec_mnist"},
    {"method": "DAC", "data": "MNIST", "acc": 0.9775, "nmi": 0.935, "source": "DAC paper (Chang et al., ICCV 2017)",
     "nmi_norm": "geometric", "compare_with": "dac_mnist_e6"},
    {"method": "DAC", "data": "CIFAR-10", "acc": 0.522, "nmi": 0.396, "source": "DAC paper (Chang et al., ICCV 2017)",
     "nmi_norm": "geometric", "compare_with": None},
    {"method": "DAC (third-party run)", "data": "Fashion-MNIST", "acc": 0.705, "nmi": 0.654,
     "source": "Hindawi Mathematical Problems in Engineering 2021, Table 2", "nmi_norm": "not stated",
     "compare_with": "dac_fmnist_e6"},
    {"method": "DEC (third-party run)", "data": "Fashion-MNIST", "acc": 0.653, "nmi": 0.605,
     "source": "Hindawi Mathematical Problems in Engineering 2021, Table 2", "nmi_norm": "not stated",
     "compare_with": "dec_fmnist"},
    {"method": "DeepCluster (as run by IIC's authors)", "data": "MNIST", "acc": 0.656, "nmi": None,
     "source": "IIC paper (Ji et al., ICCV 2019)", "nmi_norm": "-", "compare_with": "mnist"},
    {"method": "DeepCluster, seed write-up", "data": "Fashion-MNIST classes 0-2, 5,000 images, k=3", "acc": None,
     "nmi": 0.57, "nmi_init": 0.42, "source": "blog reproduction (NMI 0.42 untrained -> 0.57 trained)",
     "nmi_norm": "not stated", "compare_with": "fmnist3"},
]


def _read_rows(path: Path) -> list[dict]:
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a half-written last line of a run in progress
    return rows


def _nmi_both(run_dir: Path) -> dict | None:
    """NMI with both normalisations from the assignments and the shards' labels (finished runs only)."""
    if (run_dir / "assignments").is_dir():  # parts written by the shard actors, scored from pair counts
        try:
            from raydc.engine.evaluate import evaluate_run

            geo, ari_ = evaluate_run(str(run_dir), "geometric"), evaluate_run(str(run_dir), "arithmetic")
            return {"nmi_arithmetic": ari_["nmi"], "nmi_geometric": geo["nmi"], "acc": geo["acc"], "ari": geo["ari"],
                    "n": geo["images"]}
        except Exception as e:  # noqa: BLE001
            return {"error": f"{type(e).__name__}: {e}"}
    try:
        import numpy as np
        import pyarrow.parquet as pq
        import yaml

        from raydc.core import metrics as M
        from raydc.data.manifest import load_manifest

        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        shards = Path(cfg["data"]["shards"])
        if not shards.is_absolute():
            shards = REPO / shards
        manifest = load_manifest(shards)
        if not manifest.has_labels:
            return None
        a = pq.read_table(run_dir / "assignments.parquet", columns=["id", "cluster"])
        ids, cl = a.column("id").to_numpy(), a.column("cluster").to_numpy()
        lab_ids, labs = [], []
        for p in manifest.shard_paths(shards):
            t = pq.read_table(p, columns=["id", "label"])
            lab_ids.append(t.column("id").to_numpy())
            labs.append(t.column("label").to_numpy())
        lab_ids, labs = np.concatenate(lab_ids), np.concatenate(labs)
        by_id = np.full(int(max(lab_ids.max(), ids.max())) + 1, -1, np.int64)
        by_id[lab_ids] = labs
        y = by_id[ids]
        keep = y >= 0
        return {"nmi_arithmetic": M.nmi(y[keep], cl[keep], "arithmetic"),
                "nmi_geometric": M.nmi(y[keep], cl[keep], "geometric"),
                "acc": M.acc(y[keep], cl[keep]), "ari": M.ari(y[keep], cl[keep]), "n": int(keep.sum())}
    except Exception as e:  # noqa: BLE001 - a run from another version may lack a piece: report, don't fail
        return {"error": f"{type(e).__name__}: {e}"}


def read_run(run_dir: Path) -> dict:
    info: dict = {"dir": str(run_dir.relative_to(REPO) if run_dir.is_relative_to(REPO) else run_dir)}
    mpath = run_dir / "metrics.jsonl"
    if not mpath.exists():
        info["status"] = "missing"
        return info
    rows = _read_rows(mpath)
    if not rows:
        info["status"] = "empty"
        return info
    final = next((r for r in reversed(rows) if r.get("final")), None)
    info["status"] = "finished" if final is not None else "in progress"
    last = final or rows[-1]
    info["last_row"] = {k: last.get(k) for k in ("epoch", "round", "final", "acc", "nmi", "ari", "nmi_method",
                                                 "n_clusters", "n_classes") if k in last}
    info["ae_kmeans"] = {k: v for k, v in last.items() if k.startswith("ae_kmeans_")}
    if not info["ae_kmeans"]:
        first_ae = next((r for r in rows if any(k.startswith("ae_kmeans_") for k in r)), None)
        if first_ae:
            info["ae_kmeans"] = {k: v for k, v in first_ae.items() if k.startswith("ae_kmeans_")}
    info["rows"] = len(rows)
    # Wall time: the rounds' own seconds (fit start-up and resumes excluded), and per phase across the run.
    info["wall_s_rounds"] = sum(float(r.get("time_round") or 0.0) for r in rows)
    phases: dict[str, float] = {}
    for r in rows:
        for k, v in r.items():
            if k.startswith("time_") and k != "time_round" and isinstance(v, (int, float)):
                key = f"{r.get('phase', 'epoch')}:{k[5:]}" if r.get("phase") else k[5:]
                phases[key] = phases.get(key, 0.0) + float(v)
    info["phase_seconds"] = phases
    info["curve"] = [{k: r.get(k) for k in ("epoch", "round", "final", "acc", "nmi", "ari", "nmi_prev", "loss")}
                     for r in rows]
    try:
        import yaml

        cfg = yaml.safe_load((run_dir / "config.yaml").read_text())
        info["config"] = {"method": cfg.get("method"), "k": cfg.get("cluster", {}).get("k"),
                          "epochs": cfg.get("train", {}).get("epochs"), "data": cfg.get("data", {}),
                          "arch": cfg.get("model", {}).get("arch")}
    except Exception:  # noqa: BLE001
        pass
    if final is not None and ((run_dir / "assignments.parquet").exists() or (run_dir / "assignments").is_dir()):
        info["recomputed"] = _nmi_both(run_dir)
    mtime = mpath.stat().st_mtime
    info["metrics_mtime"] = mtime
    return info


def _launch(ctx: Context, name: str) -> str:
    from raydc.config import load_config
    from raydc.engine.trainer import run_training

    cfg_path = REPO / "jobs" / "configs" / f"{name}.yaml"
    if not cfg_path.exists():
        return f"not launched: no {cfg_path.relative_to(REPO)}"
    ctx.ensure_ray()
    cfg = load_config(str(cfg_path), [f"run.dir={ctx.runs / name}"])
    run_training(cfg, overwrite=False, log=ctx.log)
    return "launched by the benchmark"


def _earlier_results(ctx: Context) -> dict:
    """The last full results' runs: run directories are scratch (git-ignored, often deleted), the numbers are not."""
    path = ctx.out / f"{NAME}.json"
    if ctx.quick or not path.exists():
        return {}
    try:
        return json.loads(path.read_text()).get("runs", {})
    except (OSError, ValueError):
        return {}


def run(ctx: Context) -> dict:
    runs = {}
    earlier = _earlier_results(ctx)
    for name, meta in RUNS.items():
        run_dir = ctx.runs / name
        launched = None
        if not (run_dir / "metrics.jsonl").exists() and ctx.run_quality and not ctx.quick:
            ctx.log(f"  launching {name} (--run-quality)")
            try:
                launched = _launch(ctx, name)
            except Exception as e:  # noqa: BLE001
                launched = f"failed: {type(e).__name__}: {e}"
        info = {**meta, **read_run(run_dir)}
        if info["status"] == "missing" and earlier.get(name, {}).get("status") in ("finished", "in progress"):
            info = {**earlier[name], **meta, "kept_from_earlier_results": True}
        if launched:
            info["launched"] = launched
        runs[name] = info
        ctx.log(f"  {name}: {info['status']}" + (f", last row ACC {info['last_row'].get('acc')} NMI "
                                                  f"{info['last_row'].get('nmi')}" if "last_row" in info else ""))
    return {
        "config": {"run_quality": ctx.run_quality, "runs_dir": str(ctx.runs)},
        "nmi_normalisation": {"raydc": "arithmetic (sklearn default: I / ((H(y) + H(c)) / 2))",
                              "papers_2016_2018": "geometric (I / sqrt(H(y) H(c))), as in DEC, DAC, DeepCluster"},
        "runs": runs,
        "published": PUBLISHED,
    }
