"""The round's line: the engine formats the shared figures, each method names its own."""
from __future__ import annotations

from raydc.engine.summary import summary_line
from raydc.methods.dac import DAC
from raydc.methods.dec import DEC
from raydc.methods.deepcluster import DeepCluster


def test_each_method_brings_its_own_figures_to_the_line():
    row = {"epoch": 3, "phase": "dec", "loss": 0.5, "upper": 0.88, "lower": 0.88, "selected_pairs": 1.0,
           "kmeans_objective": 12.5, "delta_label": 0.002, "acc": 0.9, "time_train": 4.0, "time_round": 9.0}
    assert summary_line(row) == "epoch 3 | loss 0.5000 | ACC 0.900 | [train 4.0s]"  # the engine alone
    assert summary_line(row, DAC.summary_fields).startswith("epoch 3 | u 0.880 | l 0.880 | pairs 100.0% | loss")
    assert summary_line(row, DEC.summary_fields).startswith("epoch 3 | dec | obj 12.5 | changed 0.20% | loss")
    assert summary_line(row, DeepCluster.summary_fields).startswith("epoch 3 | obj 12.5 | loss")
    assert summary_line({**row, "final": True, "phase": "final"}, DEC.summary_fields).startswith("final | obj")


def test_an_over_clustered_round_shows_its_majority_acc_not_the_hungarian_one():
    """100 clusters of 10 classes: the Hungarian ACC (0.13 here) says nothing, so only the majority ACC is shown;
    with as many clusters as classes both are."""
    row = {"epoch": 2, "acc": 0.13, "acc_majority": 0.87, "n_clusters": 100, "n_classes": 10}
    assert summary_line(row) == "epoch 2 | majority ACC 0.870"
    assert summary_line({**row, "n_clusters": 10}) == "epoch 2 | ACC 0.130 | majority ACC 0.870"
    assert summary_line({"epoch": 2, "acc": 0.13, "n_clusters": 100, "n_classes": 10}) == "epoch 2 | ACC 0.130"
    # the final row of a readout without a k-means objective (NaN) does not print "obj nan"
    final = {"final": True, "kmeans_objective": float("nan"), "acc": 0.91, "n_clusters": 10, "n_classes": 10}
    assert summary_line(final, DeepCluster.summary_fields) == "final | ACC 0.910"
    assert summary_line({"epoch": 4, "loss": float("nan")}) == "epoch 4 | loss nan"  # a diverged loss still shows
