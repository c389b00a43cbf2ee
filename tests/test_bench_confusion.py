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
