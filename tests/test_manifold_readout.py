"""benchmarks.manifold_readout's RESULTS section (the readout itself: tests/test_umap_readout.py)."""
from __future__ import annotations


from benchmarks.render import _sec_manifold_readout


def test_the_section_gives_each_data_sets_mean_and_minimum():
    runs = [{"label": f"MNIST 70k, seed {s}", "commit": "abc", "shipped": {"acc": a, "train_k_acc_majority": 0.96},
             "readouts": {"umap_gmm": {"acc": u}, "kmeans": {"acc": 0.8}}}
            for s, a, u in ((31, 0.95, 0.97), (32, 0.96, 0.99))]
    runs.append({"label": "Fashion-MNIST 70k, seed 31", "commit": "abc", "shipped": {"acc": 0.6},
                 "readouts": {"umap_gmm": {"acc": 0.65}, "kmeans": {"acc": 0.55}}})
    text = _sec_manifold_readout({"sample": 20000, "runs": runs})
    mnist = next(line for line in text.splitlines() if line.startswith("| **MNIST 70k, 2 runs**"))
    assert "0.955 ± 0.007 (min 0.950)" in mnist and "0.980 ± 0.014 (min 0.970)" in mnist
    assert "| **Fashion-MNIST 70k, 1 run** | 0.600 ± 0.000 (min 0.600) | — |" in text
