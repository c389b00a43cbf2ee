"""DAC's two BatchNorm readouts on a run's own checkpoints: which one the drift is in.

Re-reads every checkpoint a DAC run directory holds (the last `run.keep_checkpoints` rounds and the final
clustering.pt) in this process, without Ray, with both readouts: `batch` (batch statistics over fixed groups of
`dac.readout_batch` consecutive rows in shard order, what `dac.bn_readout: batch` runs) and `running` (eval mode,
the running averages). If the running readout of a round scores far below its batch readout, the clusters were
there and the lagging statistics hid them; if both fall together, the network itself drifted.

    python -m benchmarks.dac_readout RUN_DIR [RUN_DIR ...] [--out benchmarks/results/dac_readout.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch


def _images_and_labels(shard_dir: str, manifest) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    import pyarrow.parquet as pq

    from raydc.data.decode import decode_batch

    rows, imgs, labels = [], [], []
    for path in manifest.shard_paths(shard_dir):
        t = pq.read_table(path, columns=["row", "id", "image", "label"])
        d = decode_batch({c: (t.column(c).to_pylist() if c == "image" else t.column(c).to_numpy())
                          for c in t.column_names}, manifest)
        rows.append(d["row"])
        imgs.append(d["image"])
        labels.append(d["label"])
    return np.concatenate(rows), np.concatenate(imgs), np.concatenate(labels)


def readouts(run_dir: str) -> dict:
    from raydc.config import load_config_text
    from raydc.core import metrics as M
    from raydc.core.augment import resize_center, to_float
    from raydc.data.manifest import load_manifest
    from raydc.engine.round_checkpoint import load_round_checkpoint
    from raydc.engine.rundir import RunDir, load_safe
    from raydc.methods import build_method

    run = RunDir(run_dir)
    cfg = load_config_text(run.read_config_text(), str(run.location))
    manifest = load_manifest(cfg.data.shards)
    method = build_method(cfg, manifest)
    _, images, labels = _images_and_labels(cfg.data.shards, manifest)
    x = resize_center(to_float(images), method.input_size)
    states = [(run.checkpoint_round(c), load_round_checkpoint(None, c)["model"]) for c in run.checkpoints()]
    if Path(run.clustering_path).exists():
        final = load_safe(run.clustering_path)
        states.append((f"final (round {final['round']})", final["model"]))
    out = []
    for name, state in states:
        net = method.build_model()
        net.load_state_dict(state)
        row = {"round": name}
        with torch.inference_mode():
            net.eval()
            running = torch.cat([net(x[a:a + 1024]) for a in range(0, len(x), 1024)])
            batch = net.batch_readout(x)  # shard order, groups of readout_batch: the pool's fixed groups
        for kind, feats in (("batch", batch), ("running", running)):
            pred = feats.argmax(dim=1).numpy()
            scores = M.evaluate(labels, pred)
            row[kind] = {k: round(float(v), 4) for k, v in scores.items() if isinstance(v, (int, float))}
            row[kind]["clusters_used"] = int(len(np.unique(pred)))
        out.append(row)
    return {"run": str(run.location), "config": {"schedule": cfg.dac.schedule, "epochs": cfg.train.epochs,
                                                  "seed": cfg.train.seed}, "checkpoints": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(1)
    result = {"runs": [readouts(r) for r in args.runs]}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
