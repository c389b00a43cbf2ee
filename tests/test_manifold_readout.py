"""benchmarks.manifold_readout's placement and its RESULTS section (the UMAP fit itself is umap-learn's)."""
from __future__ import annotations

import numpy as np

from benchmarks.manifold_readout import place_by_vote
from benchmarks.render import _sec_manifold_readout


def test_every_image_takes_the_cluster_most_of_its_nearest_sample_images_hold():
    rng = np.random.default_rng(0)
    centres = np.eye(4, 8, dtype=np.float32)
    x = centres[rng.integers(0, 4, 400)] + 0.05 * rng.standard_normal((400, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    truth = np.argmax(x @ centres.T, axis=1)
    sample = rng.choice(400, 80, replace=False)
    labels = (truth[sample] + 1) % 4  # any naming of the sample's clusters carries over
    labels[:3] = (labels[:3] + 1) % 4  # three wrong sample labels are outvoted by their neighbours
    placed = place_by_vote(x, x[sample], labels, 4, n_neighbors=10)
    assert np.array_equal(placed, (truth + 1) % 4)
    # one neighbour: each image copies its nearest sample image, wrong labels included
    nearest = place_by_vote(x[sample], x[sample], labels, 4, n_neighbors=1)
    assert np.array_equal(nearest, labels)


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
