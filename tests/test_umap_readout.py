"""The manifold readout (UMAP + mixture on a sample, every image voted onto it): its pure parts in
raydc.core.merge, then DeepCluster's `final_merge: umap` and DEC's `readout: umap` through the engine's own control
flow in process (tests/inprocess.py).

Every test that fits a UMAP lives in this one file: numba compiles UMAP's kernels once per process (most are not
cached on disk), and `make test` gives a whole file to one xdist worker, so the suite pays that compile once."""
from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from raydc.config import load_config
from raydc.core.merge import manifold_clusters, manifold_consensus, vote_labels
from raydc.core.selection import kmeans_stability
from raydc.engine.contexts import RankZeroContext
from tests.helpers import K, blobs
from tests.inprocess import assign_in_process
from tests.test_dec_method import run_in_process as run_dec, tiny_config as dec_config
from tests.test_deepcluster_method import N, config as deepcluster_config, run as run_deepcluster

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tiny tensors


def _blobs(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = np.eye(4, 8, dtype=np.float32)
    truth = rng.integers(0, 4, n)
    x = centres[truth] + 0.05 * rng.standard_normal((n, 8)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True), truth


def test_each_image_takes_the_cluster_most_of_its_nearest_sample_images_hold():
    x, truth = _blobs(400)
    sample = np.random.default_rng(1).choice(400, 80, replace=False)
    labels = (truth[sample] + 1) % 4          # any naming of the sample's clusters carries over
    labels[:3] = (labels[:3] + 1) % 4         # three wrong sample labels are outvoted by their neighbours
    placed, distance = vote_labels(x, x[sample], labels, 4, n_neighbors=10, batch=64)
    assert np.array_equal(placed, (truth + 1) % 4)
    assert distance.dtype == np.float32 and distance.min() >= 0 and np.median(distance) == 0
    nearest, d1 = vote_labels(x[sample], x[sample], labels, 4, n_neighbors=1)  # one neighbour: itself
    assert np.array_equal(nearest, labels) and not d1.any()


def test_a_tie_goes_to_the_nearer_neighbours():
    sample = np.array([[0.0, 0.0], [3.0, 0.0], [0.0, 3.5], [3.0, 3.5]], np.float32)
    labels = np.array([1, 0, 1, 0])
    placed, distance = vote_labels(np.array([[0.1, 0.0]], np.float32), sample, labels, 2, n_neighbors=4)
    assert placed.tolist() == [1] and distance.tolist() == [0.5]


def test_arcs_that_come_close_near_the_pole_are_found_and_the_seed_fixes_the_result():
    """Three thin arcs on a sphere that come close near the pole (curved, as a trained network's classes are): the
    readout recovers each arc, and the seed fixes the result."""
    rng = np.random.default_rng(0)
    t = rng.uniform(0, 1.3, 600)
    arc = rng.integers(0, 3, 600)
    angle = arc * (2 * np.pi / 3)
    x = np.stack([np.cos(t) * np.cos(angle), np.cos(t) * np.sin(angle), np.sin(t) * np.ones_like(t)], axis=1)
    x = np.concatenate([x, 0.01 * rng.standard_normal((600, 5))], axis=1).astype(np.float32)
    got = manifold_clusters(x, 3, dims=4, n_neighbors=15, seed=5)
    table = np.zeros((3, 3), int)
    np.add.at(table, (arc, got), 1)
    assert table.max(axis=1).sum() >= 0.98 * 600, table  # each arc is (almost) one cluster
    assert np.array_equal(manifold_clusters(x, 3, dims=4, n_neighbors=15, seed=5), got)


def test_the_restart_most_in_agreement_with_the_others_is_kept():
    """Three restarts give one partition (two of them under other cluster ids) and a fourth splits a cluster: the
    kept one is from the three, and the odd one has the lowest agreement."""
    from raydc.core.merge import consensus_partition

    base = np.repeat(np.arange(4), 25)
    relabelled = (base + 1) % 4  # the same partition, other ids
    odd = base.copy()
    odd[:50] = np.tile([0, 1], 25)  # clusters 0 and 1 mixed
    best, agreement = consensus_partition([odd, base, relabelled, base.copy()])
    assert best in (1, 2, 3) and agreement.argmin() == 0
    assert agreement[1] == agreement[2] == agreement[3] > agreement[0]
    best, agreement = consensus_partition([odd])
    assert best == 0 and list(agreement) == [1.0]


def test_one_restart_is_the_plain_readout_and_more_keep_one_of_theirs():
    from raydc.core.merge import manifold_consensus

    x, _ = _blobs(150)
    one, agreement = manifold_consensus(x, 4, restarts=1, dims=2, n_neighbors=10, seed=5)
    assert np.array_equal(one, manifold_clusters(x, 4, dims=2, n_neighbors=10, seed=5)) and list(agreement) == [1.0]
    kept, agreement = manifold_consensus(x, 4, restarts=3, dims=2, n_neighbors=10, seed=5)
    assert len(agreement) == 3
    assert any(np.array_equal(kept, manifold_clusters(x, 4, dims=2, n_neighbors=10, seed=5 + r)) for r in range(3))
    combined, agreement = manifold_consensus(x, 4, restarts=3, dims=2, n_neighbors=10, seed=5, combine="consensus")
    assert combined.shape == one.shape and set(combined.tolist()) == set(range(4)) and len(agreement) == 3
    with pytest.raises(ValueError, match="combine"):
        manifold_consensus(x, 4, restarts=2, combine="vote")
    exact, agreement = manifold_consensus(x, 4, restarts=2, dims=2, n_neighbors=10, seed=5, combine="consensus",
                                          graph="exact")
    assert exact.shape == one.shape and len(agreement) == 2
    with pytest.raises(ValueError, match="graph"):
        manifold_consensus(x, 4, restarts=1, graph="approximate")


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_the_exact_graph_is_every_rows_nearest_rows_itself_first(metric):
    from raydc.core.merge import exact_neighbors

    rng = np.random.default_rng(3)
    x = rng.standard_normal((120, 6)).astype(np.float32)
    x[7] = x[3]  # a duplicate row: each of the two still comes first in its own list, the other next
    idx, dist = exact_neighbors(x, 5, metric)
    if metric == "cosine":
        u = x / np.linalg.norm(x, axis=1, keepdims=True)
        full = 1.0 - u.astype(np.float64) @ u.T.astype(np.float64)
    else:
        full = np.sqrt(((x[:, None, :].astype(np.float64) - x[None, :, :]) ** 2).sum(-1))
    assert idx.shape == dist.shape == (120, 5) and np.array_equal(idx[:, 0], np.arange(120))
    assert idx[3, 1] == 7 and idx[7, 1] == 3
    assert np.allclose(dist, np.maximum(np.take_along_axis(full, idx, axis=1), 0.0) * (idx != np.arange(120)[:, None]),
                       atol=1e-5)
    want = np.sort(np.maximum(full, 0.0), axis=1)[:, :5]
    assert np.allclose(np.sort(dist, axis=1), want, atol=1e-5)  # the 5 nearest, whatever the order of ties


def test_umap_reads_the_sample_through_the_graph_it_is_given():
    """Four blobs: UMAP on their exact graph finds them; the same rows given a graph of random neighbours do not
    (so the graph handed over is the one UMAP used, not one it searched itself)."""
    from sklearn.metrics import adjusted_rand_score

    from raydc.core.merge import exact_neighbors

    x, truth = _blobs(200)
    graph = exact_neighbors(x, 11, "cosine")
    found = manifold_clusters(x, 4, dims=2, n_neighbors=10, seed=5, neighbors=graph)
    assert adjusted_rand_score(truth, found) > 0.95
    rng = np.random.default_rng(0)
    noise = np.concatenate([np.arange(200)[:, None], rng.integers(0, 200, (200, 10))], axis=1)
    scrambled = manifold_clusters(x, 4, dims=2, n_neighbors=10, seed=5, neighbors=(noise, graph[1]))
    assert adjusted_rand_score(truth, scrambled) < 0.5


def test_combined_restarts_recover_the_partition_each_restart_gets_partly_wrong():
    """Four classes of 30 rows; each of five restarts gets a different third of one class wrong (into the next
    class), and one also joins two classes. No restart is the truth, so keeping the most agreed one (`pick`)
    keeps someone's errors; combining them returns the classes, since for every row most restarts are right."""
    from sklearn.metrics import adjusted_rand_score

    from raydc.core.merge import combine_partitions, consensus_partition

    truth = np.repeat(np.arange(4), 30)
    parts = []
    for r in range(5):
        p = truth.copy()
        cls, third = r % 4, r % 3
        rows = np.flatnonzero(truth == cls)[10 * third:10 * third + 10]
        p[rows] = (cls + 1) % 4
        parts.append((p + r) % 4)  # each restart numbers its clusters its own way
    parts[4][parts[4] == parts[4][truth == 3][0]] = parts[4][truth == 2][0]  # classes 2 and 3 joined
    best, _ = consensus_partition(parts)
    assert adjusted_rand_score(truth, parts[best]) < 0.9
    combined, agreement = combine_partitions(parts, 4, seed=3)
    assert adjusted_rand_score(truth, combined) == 1.0
    assert np.array_equal(combine_partitions(parts, 4, seed=3)[0], combined)  # a seed fixes it
    assert np.allclose(agreement, [adjusted_rand_score(combined, p) for p in parts])
    one, agreement = combine_partitions(parts[:1], 4)
    assert np.array_equal(one, parts[0]) and list(agreement) == [1.0]


# ---- through the methods ---------------------------------------------------------------------------------
def test_over_clustering_with_the_umap_readout_votes_from_its_sample_alone(traffic):
    """The manifold readout gathers only its sample to rank 0; each shard sends back its k cluster sizes; the
    sample and its clusters are the artifacts `raydc assign` votes with."""
    gathered, returned = traffic
    sets = ("cluster.k=9", "deepcluster.final_k=3", "deepcluster.final_merge=umap", "deepcluster.final_sample=60",
            "deepcluster.final_vote=5", "deepcluster.final_umap_neighbors=10", "deepcluster.final_umap_dims=4",
            "deepcluster.final_umap_restarts=2", "deepcluster.final_umap_combine=consensus")
    _, _, rows, final = run_deepcluster(deepcluster_config(*sets))
    last = rows[-1]
    assert 0.0 <= last["readout_agreement"] <= 1.0  # two restarts: their agreement with the combined one
    assert gathered[0] == 60 and last["merge_sample"] == 60 and last["kmeans_backend"] == "umap+gmm", gathered
    assert {shape for name, shape in returned if name == "shard_vote"} == {(3,)}, returned
    assert final.artifacts["vote_sample"].shape == (60, 32) and final.artifacts["vote_labels"].shape == (60,)
    assert final.labels.max() < 3 and last["final_k"] == 3 and sum(last["size_histogram"]) == N
    assert last["acc"] > 0.9, last["acc"]  # three well-separated template classes
    assert "manifold_warm_up_s" not in last  # the in-process harness fits here, Ray running or not
    # (that a seed fixes the readout's result: the arcs test above)


def test_a_readout_over_several_samples_combines_them_on_the_first(traffic):
    """final_umap_samples 2: two samples gathered one after the other, each fitted, the second's partition voted
    onto the first; the first sample and the combined clusters are what `raydc assign` votes with."""
    gathered, _ = traffic
    sets = ("cluster.k=9", "deepcluster.final_k=3", "deepcluster.final_merge=umap", "deepcluster.final_sample=60",
            "deepcluster.final_vote=5", "deepcluster.final_umap_neighbors=10", "deepcluster.final_umap_dims=4",
            "deepcluster.final_umap_samples=2")
    _, _, rows, final = run_deepcluster(deepcluster_config(*sets))
    last = rows[-1]
    assert gathered[:2] == [60, 60] and last["merge_sample"] == 60, gathered
    assert 0.0 <= last["readout_sample_agreement"] <= 1.0 and "readout_agreement" not in last  # one fit per sample
    assert final.artifacts["vote_sample"].shape == (60, 32) and final.artifacts["vote_labels"].shape == (60,)
    assert last["acc"] > 0.9, last["acc"]


def test_decs_umap_readout_clusters_the_embedding_and_assign_places_images_by_the_same_vote(traffic):
    """`dec.readout: umap`: the delivered clusters come from UMAP + mixture on a sample of z, with argmax q's
    scores kept beside them; only the sample reaches rank 0; and putting the run's own images through
    `place_new_images` (what `raydc assign` runs) gives each the cluster the run gave it."""
    gathered, returned = traffic
    data = blobs()
    cfg = dec_config("unused", "unused", readout="umap", readout_sample=150, readout_neighbors=10, readout_dims=4,
                     readout_vote=5, max_iterations=8, stability_sample=0, manifold_score_sample=120)
    method, _, rows, final = run_dec(cfg, data)
    last = rows[-1]
    # the k-means start's sample for the label-free score of k, then the readout's (then the engine's label-free
    # scores draw theirs)
    assert gathered[:2] == [120, 150] and {shape for name, shape in returned if name == "shard_vote"} == {(K,)}, \
        returned
    assert 0.5 < last["ae_manifold_silhouette"] <= 1.0, last  # K separated blobs, scored at k = K
    assert last["readout"] == "umap" and last["merge_sample"] == 150
    assert {"dec_acc", "dec_nmi", "dec_ari", "acc", "nmi"} <= set(last), sorted(last)
    assert final.final.col == "final" and final.artifacts["vote_sample"].shape == (150, 4)
    assert final.artifacts["centres"].shape == (K, 4)  # argmax q stays available to the user
    assert sum(last["size_histogram"]) == len(data[1]) and final.labels.max() < K
    assert last["acc"] > 0.9, last  # four well-separated template classes
    ids, labels = assign_in_process(method, final.model, final.artifacts, data)
    assert np.array_equal(ids, final.ids) and np.array_equal(labels, final.labels)


# ---- choosing DEC's k by the silhouette on a UMAP (raydc.core.selection.manifold_silhouette); here, where this
# worker has compiled UMAP already ------------------------------------------------------------------------------
def _five_pairs(n: int = 900, seed: int = 0) -> np.ndarray:
    """Ten tight clusters in five close pairs: the pairs lie far apart, the two halves of a pair less so."""
    rng = np.random.default_rng(seed)
    middle, offset = rng.normal(0, 3.0, (5, 10)), rng.normal(0, 0.5, (5, 10))
    centres = np.concatenate([middle + offset, middle - offset])
    return centres[rng.integers(0, 10, n)] + rng.normal(0, 0.3, (n, 10))


def test_manifold_silhouette_ranks_the_planted_k_where_stability_and_silhouette_prefer_the_pairs():
    """Joining each pair is as reproducible as separating it, so k-means' stability scores k = 5 as high as the
    planted 10, and the silhouette of the same mixture on the points themselves prefers the five pairs; the
    silhouette on the UMAP ranks 10 above 5 and 15 (and is a function of its seed)."""
    from raydc.core.merge import mixture_clusters
    from raydc.core.selection import label_free_scores, manifold_silhouette

    x = _five_pairs()
    assert kmeans_stability(x, 5, seed=0, pairs=2) >= kmeans_stability(x, 10, seed=0, pairs=2) - 1e-9
    plain = {k: label_free_scores(x, mixture_clusters(x, k, n_init=3))["silhouette"] for k in (5, 10)}
    assert plain[5] > plain[10], plain
    s = {k: manifold_silhouette(x, k, seed=0) for k in (5, 10, 15)}
    assert s[10] > s[5] + 0.2 and s[10] > s[15] + 0.2, s
    assert manifold_silhouette(x, 10, seed=0) == s[10]


# ---- the fit in its own actor (raydc.engine.manifold_fitter), as the engine's rank 0 asks for it ------------------
# One actor however often asked, gone at shutdown; the fit on rank 0 where none was asked for or the actor died; and
# (slow: a fresh process compiles UMAP) the actor's clusters equal the in-process fit's, warmed up or not.
def _fitter_sample(n: int = 150) -> np.ndarray:
    rng = np.random.default_rng(3)
    centres = np.eye(4, 8, dtype=np.float32)
    x = centres[rng.integers(0, 4, n)] + 0.05 * rng.standard_normal((n, 8)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _rank0_context() -> RankZeroContext:
    cfg = load_config(None, ["data.shards=unused"])
    return RankZeroContext(cfg, None, "unused", lambda: None, lambda m: None)


FIT = {"restarts": 2, "dims": 2, "n_neighbors": 10, "seed": 5, "metric": "cosine"}


def _fit_and_compare(ctx: RankZeroContext) -> dict:
    x = _fitter_sample()
    labels, agreement, where = ctx.manifold_consensus(x, 4, **FIT)
    want, want_agreement = manifold_consensus(x, 4, **FIT)
    assert np.array_equal(labels, want)
    np.testing.assert_array_equal(agreement, want_agreement)
    return where


def test_every_round_asks_for_the_one_actor_and_it_goes_at_shutdown(ray_local):
    import ray

    ctx = _rank0_context()
    ctx.prepare_manifold(2, 10, "cosine", 150, warm_up=False)
    actor = ctx._fitter
    ctx.prepare_manifold(2, 10, "cosine", 150, warm_up=False)  # every round asks: still the one actor
    assert actor is not None and ctx._fitter is actor
    assert ray.get(actor.__ray_call__.remote(lambda a: a.warm_up_s)) is None  # nothing compiled unasked
    ctx.shutdown()
    assert ctx._fitter is None
    with pytest.raises(ray.exceptions.RayActorError):
        ray.get(actor.fit.remote(_fitter_sample(), 4, FIT))


@pytest.mark.slow  # a fresh process compiles UMAP for its first fit
def test_the_actors_fit_is_the_in_process_fit(ray_local):
    ctx = _rank0_context()
    ctx.prepare_manifold(2, 10, "cosine", 150, warm_up=False)
    try:
        assert _fit_and_compare(ctx) == {}  # no warm-up ran, so none is reported
    finally:
        ctx.shutdown()


def test_the_warm_up_compiles_the_neighbour_search_the_fit_will_run(ray_local):
    """UMAP searches a sample of 4096 rows or more with NN-descent and a smaller one by all distances: the actor
    warms the one the fit will take, for the sample the run can draw (no more rows than its data has); none when
    the graph is given (exact)."""
    import ray

    cases = ((70_000, 20_000, "nndescent", "nndescent"), (1_000, 20_000, "nndescent", "all"),
             (70_000, 4_000, "nndescent", "all"), (70_000, 20_000, "exact", "exact"))
    for count, sample, graph, search in cases:
        ctx = _rank0_context()
        ctx.manifest = SimpleNamespace(count=count)
        ctx.prepare_manifold(2, 10, "cosine", sample, warm_up=False, graph=graph)
        try:
            assert ray.get(ctx._fitter.__ray_call__.remote(lambda a: a.search)) == search, (count, sample, graph)
        finally:
            ctx.shutdown()


def test_a_dead_fitter_is_replaced_by_the_fit_on_rank_zero(ray_local):
    import ray

    lines: list[str] = []
    ctx = _rank0_context()
    ctx.log = lines.append
    ctx.prepare_manifold(2, 10, "cosine", 150, warm_up=False)
    ray.kill(ctx._fitter)  # its node lost, say: the readout still completes, here
    assert _fit_and_compare(ctx) == {}
    assert ctx._fitter is None and any("actor is gone" in line for line in lines)


def test_a_context_never_prepared_fits_in_process():
    """What the in-process harness and a run without Ray get (prepare_manifold starts nothing there)."""
    ctx = _rank0_context()
    assert ctx._fitter is None
    assert _fit_and_compare(ctx) == {}


@pytest.mark.slow  # the warm-up compiles UMAP in a fresh process
@pytest.mark.parametrize("rows", [150, 20_000])  # the fit's 150 rows in either case: what was warmed may differ
def test_a_warmed_up_fitter_reports_its_warm_up_and_fits_the_same(ray_local, rows):
    ctx = _rank0_context()
    ctx.prepare_manifold(2, 10, "cosine", rows)
    try:
        where = _fit_and_compare(ctx)
    finally:
        ctx.shutdown()
    assert where["manifold_warm_up_s"] > 0


@pytest.mark.slow  # fills a numba cache from nothing: a first fit's whole compile, four times
def test_filling_the_cache_leaves_the_kernels_of_both_searches_on_disk(tmp_path):
    """`make install`'s `fill_manifold_cache`: numba writes pynndescent's and umap's cacheable kernels (here to
    NUMBA_CACHE_DIR) for the all-distances search and for NN-descent, so a later process loads rather than
    compiles them. Warming one search alone leaves the other's kernels out."""
    import os
    import subprocess
    import sys

    from tests.helpers import REPO

    def cached(call: str, where) -> set[str]:
        env = {**os.environ, "NUMBA_CACHE_DIR": str(where), "PYTHONPATH": str(REPO)}
        subprocess.run([sys.executable, "-c", f"import raydc.core.merge as m; m.{call}"], env=env, check=True,
                       timeout=900)
        return {p.name for p in where.rglob("*.nbi")}

    both = cached("fill_manifold_cache()", tmp_path / "both")
    exact = cached("warm_up_manifold(metric='euclidean', search='all')", tmp_path / "exact")
    assert any("pynndescent" in str(p) for p in (tmp_path / "both").rglob("*.nbi"))
    assert exact < both  # NN-descent's kernels (and cosine's) come only from the fill
