"""benchmarks.confusion names what a run's clusters get wrong; the numbers must match a hand count."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks.confusion import confusion, summarise


def test_confusion_matches_clusters_to_classes_and_names_the_misplaced_group(tmp_path):
    # class 0: 6 images, all in cluster 2; class 1: 4 in cluster 0 and 3 in cluster 2 (so cluster 2 is class 0's,
    # the 3 are "1 in 0's"); class 2: 5 in cluster 1. Ids are shuffled between the two files on purpose.
    y = np.array([0] * 6 + [1] * 7 + [2] * 5)
    cl = np.array([2] * 6 + [0] * 4 + [2] * 3 + [1] * 5)
    ids = np.arange(100, 100 + len(y))
    perm = np.random.default_rng(0).permutation(len(y))
    (tmp_path / "run" / "assignments").mkdir(parents=True)
    (tmp_path / "shards").mkdir()
    pq.write_table(pa.table({"id": ids[perm], "cluster": cl[perm]}), tmp_path / "run/assignments/part-0.parquet")
    pq.write_table(pa.table({"id": ids, "label": y}), tmp_path / "shards/shard-0.parquet")
    counts, matched = confusion(tmp_path / "run", tmp_path / "shards")
    assert matched.tolist() == [2, 0, 1]
    s = summarise(counts, matched, ["a", "b", "c"])
    assert s["acc"] == (6 + 4 + 5) / 18
    assert s["largest_misplaced"] == [{"class": "b", "in_cluster_of": "a", "images": 3, "share_of_all": 3 / 18}]
    assert s["class_share_in_own_cluster"] == {"a": 1.0, "b": 4 / 7, "c": 1.0}
    assert s["cluster_sizes"] == [4, 5, 9]


def test_a_shipped_configs_run_reaches_the_time_to_quality_table(tmp_path):
    """`--config` adds the run's minutes in rounds (the sum of time_round) and its final scores, and the
    rendered time-to-quality table lists it; a row without it stays out of that table."""
    import json

    from benchmarks.confusion import main
    from benchmarks.render import _sec_time_to_quality

    run, shards = tmp_path / "run", tmp_path / "shards"
    (run / "assignments").mkdir(parents=True)
    shards.mkdir()
    pq.write_table(pa.table({"id": np.arange(4), "cluster": np.array([1, 1, 0, 0])}), run / "assignments/p.parquet")
    pq.write_table(pa.table({"id": np.arange(4), "label": np.array([0, 0, 1, 1])}), shards / "s.parquet")
    (run / "config.yaml").write_text("method: dec\ndata: {source: mnist}\n")
    rows = [{"round": 0, "time_round": 90.0}, {"round": 1, "time_round": 30.0},
            {"final": True, "acc": 1.0, "nmi": 1.0, "ari": 1.0, "stop_reason": "converged"}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "confusion.json"
    main(["--out", str(out), "--config", "dec_x.yaml", "--run", f"shipped:{run}:{shards}:abc1234"])
    main(["--out", str(out), "--append", "--run", f"unmarked:{run}:{shards}:abc1234"])
    doc = json.loads(out.read_text())
    shipped = next(r for r in doc["runs"] if r["label"] == "shipped")
    assert shipped["wall_s_rounds"] == 120.0 and shipped["method"] == "dec" and shipped["final"]["acc"] == 1.0
    table = _sec_time_to_quality({"confusion": doc})
    assert "| `dec_x.yaml` | DEC | shipped | 1 | 2 | 1 |" in table and "unmarked" not in table
