"""benchmarks.sweep_table: a sweep directory written by the sweep's own writers becomes the result file and the
RESULTS.md section, with the label-free pick marked on its own row (not ACC's)."""
from __future__ import annotations

import json

from benchmarks.render import _sec_sweep_table
from benchmarks.sweep_table import main
from raydc.sweep import outputs
from raydc.sweep.config import load_sweep
from raydc.sweep.select import TrialRecord, label_agreement, select_best


def test_a_sweep_directory_becomes_a_table_that_marks_the_label_free_pick(tmp_path):
    sweep_file = tmp_path / "k.yaml"
    sweep_file.write_text("space:\n  cluster.k: {grid: [5, 10, 15]}\nselect: {metric: ae_kmeans_stability}\n")
    sweep = load_sweep(str(sweep_file))
    # the stability score prefers k = 10; ACC would prefer k = 15: the table must mark 10
    records = [TrialRecord(f"t{k}", {"cluster.k": k}, "done", wall_s=60.0 * k,
                           final={"final": True, "ae_kmeans_stability": stab, "silhouette": sil, "acc": acc})
               for k, stab, sil, acc in ((5, 0.70, 0.9, 0.50), (10, 0.95, 0.8, 0.70), (15, 0.80, 0.7, 0.75))]
    best = select_best(records, sweep.select)
    out_dir = tmp_path / "sweep"
    out_dir.mkdir()
    outputs.write_trials_csv(out_dir / "trials.csv", records, sweep, best)
    outputs.write_summary_json(out_dir / "summary.json", records, sweep, best,
                               label_agreement(records, sweep.select))

    result = tmp_path / "sweep_table.json"
    assert main(["--sweep", str(out_dir), "--label", "DEC k", "--commit", "abc1234", "--out", str(result)]) == 0
    doc = json.loads(result.read_text())
    (entry,) = doc["sweeps"]
    assert entry["best_params"] == {"cluster.k": 10}
    assert [t["params"]["cluster.k"] for t in entry["trials"]] == [5, 10, 15]
    assert [t["acc"] for t in entry["trials"]] == [0.5, 0.7, 0.75]
    assert entry["labels"]["label_best_params"] == {"cluster.k": 15}

    section = _sec_sweep_table(doc)
    picked = [line for line in section.splitlines() if "**picked**" in line]
    assert len(picked) == 1 and picked[0].startswith("| 10 |"), picked
    assert "picked cluster.k=10; ACC would pick cluster.k=15" in section
    assert "Spearman(metric, ACC) over 3 trials = +0.50" in section

    # collected again with --append under another label: both kept; the same label replaces its entry
    main(["--sweep", str(out_dir), "--label", "other", "--commit", "abc1234", "--out", str(result), "--append"])
    main(["--sweep", str(out_dir), "--label", "DEC k", "--commit", "def5678", "--out", str(result), "--append"])
    labels = [(s["label"], s["commit"]) for s in json.loads(result.read_text())["sweeps"]]
    assert labels == [("other", "abc1234"), ("DEC k", "def5678")]
