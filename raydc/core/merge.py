"""Merging an over-clustering: k fine clusters -> the few clusters a user asked for.

k-means at k = classes cuts a feature space whose classes are curved, elongated manifolds into convex cells, so
it splits one class and joins two others. k-means at k >> classes gives clusters that each sit inside one class
(majority-vote ACC ~0.93 on MNIST), and what is left is to say which of them belong together. Two fine
clusters are neighbours when points lie between them: the co-neighbour graph counts, for every point, the pair
(nearest centroid, second-nearest centroid), the graph a growing neural gas or a topology-representing network
builds. Spectral clustering of that k x k graph then joins the fine clusters along the manifolds (landmark
spectral clustering, Chen & Cai, AAAI 2011, with the centroids as landmarks).

Scale: the counts are a k x k sum over shards (each shard searches its own points), and the spectral step is on
k nodes, so nothing here grows with N.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np


def coneighbour_counts(x: np.ndarray, centroids: np.ndarray, use_gpu: str = "never") -> np.ndarray:
    """(k, k) float64: how many rows of `x` have centroid i nearest and j second (symmetrised)."""
    from raydc.core.kmeans import nearest_two

    k = len(centroids)
    counts = np.zeros((k, k), np.float64)
    if len(x) == 0:
        return counts
    first, second = nearest_two(np.ascontiguousarray(x, np.float32), np.ascontiguousarray(centroids, np.float32),
                                use_gpu=use_gpu)
    np.add.at(counts, (first, second), 1.0)
    return counts + counts.T


def spectral_merge(counts: np.ndarray, n_groups: int, seed: int = 0) -> np.ndarray:
    """The group (0..n_groups-1) of each of the k fine clusters, by normalised spectral clustering of the
    co-neighbour graph (a tiny diagonal keeps a node without edges well defined)."""
    from sklearn.cluster import SpectralClustering

    k = counts.shape[0]
    if n_groups >= k:
        return np.arange(k, dtype=np.int64)
    a = np.asarray(counts, np.float64)
    a = a + np.eye(k) * 1e-9  # keeps the Laplacian defined for a node without edges
    sc = SpectralClustering(n_groups, affinity="precomputed", assign_labels="discretize", random_state=seed)
    with warnings.catch_warnings():  # "graph is not fully connected": expected, a group may be an island
        warnings.simplefilter("ignore", UserWarning)
        return sc.fit(a).labels_.astype(np.int64)


# ----------------------------------------------------------------------------------------------------------
# The k-NN graph readout: join fine clusters where the data's density joins them.
#
# The co-neighbour graph above has one edge per point, and its edges follow the centroids' geometry: a point in
# the middle of a fine cluster still counts an edge to whichever centroid is second nearest, which may sit across
# an empty gap in another class. A few such edges, or one k-means near-tie, decide the whole merge (seen on
# MNIST: 3 and 5 joined, 4 split, 15 points of ACC lost in one run out of four). Here the edges are the points'
# own nearest neighbours, so two fine clusters are linked only where points lie between them; the counts are
# weighed against what chance would give two clusters of their sizes (modularity's null model; PAGA, Wolf et
# al., Genome Biology 2019, divides by the same expectation), so a large pair of classes touching through a few
# bridge points stays weakly linked; and the final partition is the best of several by that label-free score
# rather than whatever one k-means restart gave. Which graph and score: benchmarks/results/readout.json.
#
# Scale: the neighbours are searched in a fixed-size sample of the points (gathered once, then broadcast), each
# shard searches its own points against it in bounded batches and returns a k x k count table; the graph step is
# on k nodes. Nothing grows with N on one process beyond the sample.


@dataclass
class MergeResult:
    """The group of each fine cluster, and why this partition was kept."""

    groups: np.ndarray              # (k,) int64 in 0..n_groups-1
    score: float                    # the kept partition's score on the connectivity graph (graph_merge's `score`)
    candidate: str                  # which candidate it was ("spectral-3", "average")
    scores: dict[str, float] = field(default_factory=dict)  # every candidate's score


def knn_edge_counts(x: np.ndarray, labels: np.ndarray, sample: np.ndarray, sample_labels: np.ndarray, k: int,
                    n_neighbors: int = 15, ids: np.ndarray | None = None, sample_ids: np.ndarray | None = None,
                    batch: int = 4096, use_gpu: str = "never") -> np.ndarray:
    """(k, k) float64 directed counts: row i, column j = how many of the `n_neighbors` nearest sample points of
    the rows of `x` in fine cluster i lie in fine cluster j. A row that is itself in the sample (same id) does
    not count itself. Memory: one batch of queries at a time, whatever len(x) is."""
    from raydc.core.faiss_backend import import_faiss, want_gpu

    counts = np.zeros((k, k), np.float64)
    sample = np.ascontiguousarray(sample, np.float32)
    if len(x) == 0 or len(sample) == 0:
        return counts
    faiss = import_faiss()
    index = faiss.IndexFlatL2(sample.shape[1])
    ngpu = want_gpu(use_gpu)
    if ngpu > 0:
        index = faiss.index_cpu_to_all_gpus(index, ngpu=ngpu)
    index.add(sample)
    sample_labels = np.asarray(sample_labels, np.int64)
    labels = np.asarray(labels, np.int64)
    want = min(n_neighbors + (ids is not None), len(sample))
    for lo in range(0, len(x), batch):
        q = np.ascontiguousarray(x[lo:lo + batch], np.float32)
        _, nb = index.search(q, want)
        keep = nb >= 0
        if ids is not None and sample_ids is not None:
            keep &= np.asarray(sample_ids)[np.maximum(nb, 0)] != np.asarray(ids[lo:lo + batch])[:, None]
            # only the first n_neighbors that are not the row itself
            keep &= np.cumsum(keep, axis=1) <= n_neighbors
        src = np.broadcast_to(labels[lo:lo + batch, None], nb.shape)[keep]
        np.add.at(counts, (src, sample_labels[nb[keep]]), 1.0)
    return counts


def paga_connectivity(edges: np.ndarray, sample_sizes: np.ndarray) -> np.ndarray:
    """(k, k) symmetric connectivity from directed k-NN edge counts: the edges between i and j in both
    directions over the number expected if each neighbour fell in a cluster in proportion to its share of the
    sample (PAGA's v1.2 statistic). Unlike PAGA it is not capped at 1: with the cap, most pairs of fine clusters
    of a partly trained network look equally linked. The diagonal is 0."""
    e = np.asarray(edges, np.float64)
    out_deg = e.sum(axis=1)
    p = np.asarray(sample_sizes, np.float64)
    p = p / max(p.sum(), 1.0)
    expected = out_deg[:, None] * p[None, :] + out_deg[None, :] * p[:, None]
    both = e + e.T
    conn = np.divide(both, expected, out=np.zeros_like(both), where=expected > 0)
    np.fill_diagonal(conn, 0.0)
    return conn


def fine_graph(edges: np.ndarray, sample_sizes: np.ndarray, kind: str = "counts") -> np.ndarray:
    """The k x k graph the merge cuts: "counts", the k-NN edges between two fine clusters in both directions
    (the spectral embedding's degree normalisation and modularity's null model then weigh them against what
    the clusters' sizes alone would give), or "paga", each count already divided by that expectation."""
    if kind == "paga":
        return paga_connectivity(edges, sample_sizes)
    if kind != "counts":
        raise ValueError(f"unknown graph {kind!r}: expected counts or paga")
    e = np.asarray(edges, np.float64)
    w = e + e.T
    np.fill_diagonal(w, 0.0)
    return w


def normalized_cut(w: np.ndarray, groups: np.ndarray) -> float:
    """Σ_g cut(g, rest) / vol(g) on the weighted graph `w` (Shi & Malik): low when each group's edges stay
    inside it. Needs no labels, so it can choose between partitions."""
    w = np.asarray(w, np.float64)
    deg = w.sum(axis=1)
    total = 0.0
    for g in np.unique(groups):
        inside = groups == g
        vol = deg[inside].sum()
        cut = w[inside][:, ~inside].sum()
        total += cut / vol if vol > 0 else 0.0
    return float(total)


def modularity(w: np.ndarray, groups: np.ndarray) -> float:
    """Newman's modularity of the partition on the weighted graph `w`: the share of edge weight inside groups
    minus what a random graph with the same degrees would put there (high: better). Like PAGA's statistic, it
    counts edges against their expected number, so a large pair of groups is not joined for its size alone."""
    w = np.asarray(w, np.float64)
    deg = w.sum(axis=1)
    m2 = deg.sum()
    if m2 <= 0:
        return 0.0
    return float(sum(w[np.ix_(groups == g, groups == g)].sum() / m2 - (deg[groups == g].sum() / m2) ** 2
                     for g in np.unique(groups)))


SCORES = {"ncut": (normalized_cut, 1.0), "modularity": (modularity, -1.0)}  # name -> (score, sign: lower wins)


def graph_merge(conn: np.ndarray, n_groups: int, seed: int = 0, restarts: int = 10,
                score: str = "modularity") -> MergeResult:
    """The group of each of the k fine clusters: candidates from spectral clustering of the connectivity graph
    (Ng-Jordan-Weiss embedding, k-means with `restarts` seeds drawn from `seed`) and from average linkage on
    1 - connectivity / its maximum; the candidate with the best `score` (lowest normalised cut, or highest
    modularity) is kept (the first one on a tie), so the
    result is a function of (conn, n_groups, seed). Fine clusters without any edge (empty, or no neighbours
    outside themselves) take no part and go to group 0: nothing links them to any group."""
    from scipy.cluster.hierarchy import fcluster, linkage
    from scipy.spatial.distance import squareform
    from sklearn.cluster import KMeans

    k = conn.shape[0]
    if n_groups >= k:
        return MergeResult(np.arange(k, dtype=np.int64), 0.0, "identity")
    w = np.asarray(conn, np.float64)
    w = (w + w.T) / 2
    np.fill_diagonal(w, 0.0)
    live = w.sum(axis=1) > 0
    if live.sum() <= n_groups:  # too few linked clusters to merge: each its own group, the rest in group 0
        groups = np.zeros(k, np.int64)
        groups[np.flatnonzero(live)] = np.arange(live.sum()) % n_groups
        return MergeResult(groups, SCORES[score][0](w, groups), "identity")
    wl = w[np.ix_(live, live)]
    d = wl.sum(axis=1)
    m = wl / np.sqrt(np.outer(d, d))
    _, vecs = np.linalg.eigh(m)
    u = vecs[:, -n_groups:]
    u = u / np.maximum(np.linalg.norm(u, axis=1, keepdims=True), 1e-12)
    rng = np.random.default_rng(seed)
    candidates: dict[str, np.ndarray] = {}
    for r in range(restarts):
        km = KMeans(n_groups, n_init=1, random_state=int(rng.integers(1 << 31)))
        candidates[f"spectral-{r}"] = km.fit(u).labels_.astype(np.int64)
    dist = squareform(1.0 - wl / wl.max(), checks=False)
    candidates["average"] = fcluster(linkage(dist, method="average"), n_groups, criterion="maxclust") - 1
    fn, sign = SCORES[score]
    scores = {name: fn(wl, g) for name, g in candidates.items()
              if len(np.unique(g)) == n_groups}  # average linkage can give fewer groups on ties
    best = min(scores, key=lambda name: (sign * scores[name], list(candidates).index(name)))
    groups = np.zeros(k, np.int64)
    groups[live] = candidates[best]
    return MergeResult(groups, scores[best], best, scores)


# ---- the per-shard halves, run by the shard actors where the rows live (a view in, a small array out). Here and
# not in the method's file: a function is pickled by reference to its module, and this one loads no torch.
def shard_coneighbours(view, centroids):
    """Run on a shard actor: this shard's co-neighbour counts (k x k) for the spectral merge."""
    return None if view.x is None or len(view.ids) == 0 else coneighbour_counts(np.asarray(view.x, np.float32),
                                                                                   centroids)


def shard_knn_edges(view, col: str, sample_x, sample_labels, sample_ids, k: int, n_neighbors: int):
    """Run on a shard actor: (k, k) counts of this shard's points' nearest sample points, by fine cluster."""
    if view.x is None or len(view.ids) == 0:
        return None
    return knn_edge_counts(view.x, view.cols[col], sample_x, sample_labels, k, n_neighbors, ids=view.ids,
                           sample_ids=sample_ids)


def shard_group(view, col: str, out: str, groups: np.ndarray):
    """Run on a shard actor: column `out` = the group of each row's fine cluster; the distance stays the one to
    the fine centroid."""
    view.cols[out] = np.asarray(groups, np.int64)[view.cols[col]]
    view.cols[out + "_distance"] = view.cols[col + "_distance"]


# ---- the manifold readout (N2D, McConville et al. 2020): clusters found on a UMAP of a sample, the rest voted ----
def manifold_embedding(sample: np.ndarray, *, dims: int = 10, n_neighbors: int = 20, seed: int = 0,
                       metric: str = "cosine", neighbors: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """UMAP of a sample to `dims` dimensions with min_dist 0, (len(sample), dims) float32: each class manifold
    packed into a compact blob. `neighbors`: the sample's own neighbour graph (`exact_neighbors`, at least
    `n_neighbors` per row), else UMAP searches it. One thread, so the seed fixes the result."""
    import warnings

    import umap

    sample = np.ascontiguousarray(sample, np.float32)
    n_neighbors = min(n_neighbors, len(sample) - 1)
    extra = {} if neighbors is None else {"precomputed_knn": (neighbors[0][:, :n_neighbors],
                                                              neighbors[1][:, :n_neighbors])}
    with warnings.catch_warnings():
        # a precomputed graph comes without pynndescent's search index, which only UMAP.transform would use
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")
        # n_jobs=1: a seed fixes UMAP's result only on one thread (and then it warns unless told so)
        z = umap.UMAP(n_components=dims, n_neighbors=n_neighbors, min_dist=0.0, metric=metric, random_state=seed,
                      n_jobs=1, **extra).fit_transform(sample)
    return np.asarray(z, np.float32)


def mixture_clusters(z: np.ndarray, k: int, *, seed: int = 0, n_init: int = 5) -> np.ndarray:
    """Cluster ids (len(z),) of a full-covariance Gaussian mixture with k components fitted on z."""
    from sklearn.mixture import GaussianMixture

    mixture = GaussianMixture(k, covariance_type="full", n_init=n_init, random_state=seed).fit(z)
    return mixture.predict(z).astype(np.int64)


def manifold_clusters(sample: np.ndarray, k: int, *, dims: int = 10, n_neighbors: int = 20, seed: int = 0,
                      n_init: int = 5, metric: str = "cosine",
                      neighbors: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Cluster ids (len(sample),) of a sample: UMAP to `dims` dimensions (min_dist 0, `metric`: cosine for a
    network's normalised features, euclidean for an autoencoder's embedding as N2D), then a full-covariance
    Gaussian mixture there. Only the sample is ever fitted, so the cost does not grow with N. `neighbors`: the
    sample's own neighbour graph (`exact_neighbors`, at least `n_neighbors` per row), else UMAP searches it.

    Why: the features of a trained network lie on curved, touching class manifolds; k-means cuts them with
    planes, and merging fine clusters can do no better than the fine clusters' purity. UMAP with min_dist 0
    packs each manifold into a compact blob the mixture separates (N2D: 0.979 on MNIST from an autoencoder)."""
    z = manifold_embedding(sample, dims=dims, n_neighbors=n_neighbors, seed=seed, metric=metric, neighbors=neighbors)
    return mixture_clusters(z, k, seed=seed, n_init=n_init)


def exact_neighbors(x: np.ndarray, k: int, metric: str = "cosine") -> tuple[np.ndarray, np.ndarray]:
    """(indices int64, distances float32), each len(x) x k: every row's k nearest rows of `x` itself, the row
    first at distance 0, in UMAP's `precomputed_knn` form. faiss ranks them (a flat search: the sample is
    bounded); the distances are recomputed per pair in float64 (cosine: 1 - cos; euclidean: not squared).

    Why: UMAP's own NN-descent is approximate, and its JIT code is specialised to the metric and compiled anew in
    every process, most of a fresh fit's time (`warm_up_manifold`); restarts on one sample each search again.
    A flat search of the sample is exact, compiles nothing, and is done once for all restarts."""
    from raydc.core.faiss_backend import import_faiss

    faiss = import_faiss()
    x = np.ascontiguousarray(x, np.float32)
    k = min(k, len(x))
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        index = faiss.IndexFlatIP(x.shape[1])
    elif metric == "euclidean":
        index = faiss.IndexFlatL2(x.shape[1])
    else:
        raise ValueError(f"exact_neighbors: unknown metric {metric!r} (cosine or euclidean)")
    index.add(x)
    _, idx = index.search(x, k)
    dist = np.empty(idx.shape, np.float64)
    for a in range(0, len(x), 4096):
        q, nb = x[a:a + 4096].astype(np.float64), x[idx[a:a + 4096]].astype(np.float64)
        if metric == "cosine":
            dist[a:a + 4096] = np.maximum(1.0 - np.einsum("nd,nkd->nk", q, nb), 0.0)
        else:
            dist[a:a + 4096] = np.sqrt(((nb - q[:, None, :]) ** 2).sum(-1))
    rows = np.arange(len(x))
    for r in np.flatnonzero(idx[:, 0] != rows):  # a duplicate row may have come first at the same distance
        where = np.flatnonzero(idx[r] == r)
        j = int(where[0]) if len(where) else k - 1
        idx[r, 1:j + 1], dist[r, 1:j + 1] = idx[r, :j].copy(), dist[r, :j].copy()
        idx[r, 0] = r
    dist[:, 0] = 0.0
    return idx.astype(np.int64), dist.astype(np.float32)


# umap-learn computes all pairwise distances for fewer rows than this and searches with NN-descent from here on
# (umap_.UMAP.fit): two different bodies of JIT code.
UMAP_EXACT_BELOW = 4096


# How a readout's UMAP finds the sample's neighbours: "exact" (given to it, `exact_neighbors`), or its own search,
# NN-descent ("nndescent") from UMAP_EXACT_BELOW rows on and all pairwise distances ("all") below.
GRAPHS = ("nndescent", "exact")


def umap_search(rows: int, graph: str = "nndescent") -> str:
    """The neighbour search a fit on `rows` rows runs for the readout's `graph`: "exact", "nndescent" or "all"."""
    if graph == "exact":
        return "exact"
    return "nndescent" if rows >= UMAP_EXACT_BELOW else "all"


def warm_up_manifold(*, dims: int = 10, n_neighbors: int = 20, metric: str = "cosine", seed: int = 0,
                     search: str = "nndescent") -> float:
    """Compile the JIT code a `manifold_clusters` fit runs (numba: the neighbour search specialised to `metric`,
    the fuzzy graph, the layout) on a few hundred random rows, and return the seconds it took. `search`
    (`umap_search`): the neighbour search the fit will run, NN-descent forced as UMAP searches a sample of
    UMAP_EXACT_BELOW rows or more, all distances below that, or none ("exact": the graph is given). Warming
    another would compile code the fit never runs, and make it wait.

    Why: most of that code cannot be cached on disk, so every fresh process compiles it on its first fit: about a
    minute of one core on a 2-core CPU, nearly all of it NN-descent's (benchmarks/RESULTS.md), against the fit
    itself. A process that warms up while the run trains fits as fast as a second fit would. Nothing of the
    result is kept: the compiled code is the same whatever data it was compiled on, so the real fit computes
    exactly what it would have cold."""
    import time
    import warnings

    import umap

    t0 = time.perf_counter()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((max(300, 4 * n_neighbors), 32)).astype(np.float32)
    extra = {"precomputed_knn": exact_neighbors(x, n_neighbors, metric)} if search == "exact" else {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*knn_search_index.*")
        umap.UMAP(n_components=dims, n_neighbors=n_neighbors, min_dist=0.0, metric=metric, random_state=seed,
                  n_jobs=1, force_approximation_algorithm=search == "nndescent", n_epochs=5, **extra).fit_transform(x)
    return time.perf_counter() - t0


def fill_manifold_cache() -> float:
    """Compile the part of UMAP's JIT code that numba can keep on disk (`cache=True`: pynndescent's and umap's
    distance and graph kernels, in their package's __pycache__) for both neighbour searches and both metrics a
    readout uses, and return the seconds it took. `make install` runs it, as pip compiles bytecode.

    Why: a fresh environment's first fit compiles those kernels and writes them there; every later process,
    a run's fitter actor or a test, then loads them instead: about half of a first fit's compile. The rest is
    compiled per process whatever is done here (see `warm_up_manifold`)."""
    seconds = 0.0
    for search in ("all", "nndescent"):
        for metric in ("euclidean", "cosine"):
            seconds += warm_up_manifold(metric=metric, search=search)
    return seconds


def consensus_partition(partitions: list[np.ndarray]) -> tuple[int, np.ndarray]:
    """(index of the partition that agrees most with the others, each partition's mean adjusted Rand index
    against the others). One partition: (0, [1.0]).

    Why: on the same sample, restarts of UMAP + mixture mostly land on one partition and now and then on a worse
    one (a garment class split, two joined); the medoid by agreement is the common answer, found without labels,
    and its agreement tells a user how settled the readout was."""
    from sklearn.metrics import adjusted_rand_score

    n = len(partitions)
    if n == 1:
        return 0, np.ones(1)
    ari = np.eye(n)
    for i in range(n):
        for j in range(i + 1, n):
            ari[i, j] = ari[j, i] = adjusted_rand_score(partitions[i], partitions[j])
    agreement = (ari.sum(axis=1) - 1.0) / (n - 1)
    return int(np.argmax(agreement)), agreement


def combine_partitions(partitions: list[np.ndarray], k: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """One partition into k clusters of the rows that `partitions` (each a cluster id per row) all label: k-means
    on each row's memberships, one one-hot block per partition side by side (the consensus Topchy, Jain & Punch
    2005 derive from the partitions' quadratic mutual information with it). A row's memberships
    count as often as partitions agree on it, so the rows they keep together stay together, and a row they
    disagree on goes where most of them put it. Returns (its cluster ids, each partition's adjusted Rand index
    with it: how settled the combination was). One partition: (it, [1.0]).

    Why not keep the most agreed partition (`consensus_partition`): on Fashion-MNIST readouts of different samples
    disagree on where a garment class ends, each in its own way; the medoid is still one of them, with its own
    errors. The combined partition keeps what they share. (Across samples it lifted `fmnist.yaml`; across seeds on
    one sample it did not: benchmarks/RESULTS.md, the 70,000-image configs over seeds.)"""
    from sklearn.cluster import KMeans
    from sklearn.metrics import adjusted_rand_score

    if len(partitions) == 1:
        return np.asarray(partitions[0], np.int64), np.ones(1)
    memberships = np.concatenate([np.eye(k, dtype=np.float32)[np.asarray(p, np.int64)] for p in partitions], axis=1)
    found = KMeans(k, n_init=10, random_state=seed % (1 << 31)).fit_predict(memberships).astype(np.int64)
    return found, np.array([adjusted_rand_score(found, p) for p in partitions])


COMBINE = ("pick", "consensus")


def manifold_consensus(sample: np.ndarray, k: int, *, restarts: int, dims: int = 10, n_neighbors: int = 20,
                       seed: int = 0, n_init: int = 5, metric: str = "cosine", combine: str = "pick",
                       graph: str = "nndescent") -> tuple[np.ndarray, np.ndarray]:
    """`manifold_clusters` with seeds seed, seed + 1, ... on the same sample, combined by `combine`: "pick" keeps
    the most agreed restart (`consensus_partition`), "consensus" combines them all (`combine_partitions`).
    Returns (the cluster ids, each restart's agreement: with the others for "pick", with the combined partition
    for "consensus"). `graph`: "exact" computes the sample's neighbour graph once (`exact_neighbors`) for every
    restart, "nndescent" leaves each restart's UMAP to search its own."""
    if combine not in COMBINE:
        raise ValueError(f"unknown combine {combine!r} (expected one of {', '.join(COMBINE)})")
    if graph not in GRAPHS:
        raise ValueError(f"unknown graph {graph!r} (expected one of {', '.join(GRAPHS)})")
    neighbors = exact_neighbors(sample, n_neighbors + 1, metric) if graph == "exact" else None
    parts = [manifold_clusters(sample, k, dims=dims, n_neighbors=n_neighbors, seed=(seed + r) % (1 << 31),
                               n_init=n_init, metric=metric, neighbors=neighbors) for r in range(restarts)]
    if combine == "consensus" and restarts > 1:
        return combine_partitions(parts, k, seed)
    best, agreement = consensus_partition(parts)
    return parts[best], agreement


def vote_labels(x: np.ndarray, sample: np.ndarray, sample_labels: np.ndarray, k: int, n_neighbors: int = 10,
                batch: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Each row's cluster: the one most of its `n_neighbors` nearest sample points (L2) hold, ties to the nearer
    neighbours; and 1 - the share of the neighbours that hold it (0: unanimous). One batch of queries at a time."""
    from raydc.core.faiss_backend import import_faiss

    faiss = import_faiss()
    sample = np.ascontiguousarray(sample, np.float32)
    index = faiss.IndexFlatL2(sample.shape[1])
    index.add(sample)
    sample_labels = np.asarray(sample_labels, np.int64)
    n_neighbors = min(n_neighbors, len(sample))
    # earlier neighbours weigh a little more: a tie goes to the cluster of the nearer ones
    weight = 1.0 + 1e-3 * np.arange(n_neighbors, 0, -1)
    labels = np.zeros(len(x), np.int64)
    share = np.zeros(len(x), np.float32)
    for lo in range(0, len(x), batch):
        _, nb = index.search(np.ascontiguousarray(x[lo:lo + batch], np.float32), n_neighbors)
        votes = np.zeros((len(nb), k), np.float64)
        rows = np.broadcast_to(np.arange(len(nb))[:, None], nb.shape)
        np.add.at(votes, (rows, sample_labels[nb]), np.broadcast_to(weight, nb.shape))
        labels[lo:lo + len(nb)] = votes.argmax(axis=1)
        share[lo:lo + len(nb)] = (sample_labels[nb] == labels[lo:lo + len(nb), None]).mean(axis=1)
    return labels, (1.0 - share).astype(np.float32)


def shard_vote(view, out: str, sample: np.ndarray, sample_labels: np.ndarray, k: int, n_neighbors: int
               ) -> np.ndarray:
    """Run on a shard actor: column `out` = each row's voted cluster (`vote_labels`), `out`_distance = 1 - the
    share of its neighbours that voted for it. Returns this shard's cluster sizes (k,)."""
    if view.x is None or len(view.ids) == 0:
        view.cols[out], view.cols[out + "_distance"] = np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.zeros(k, np.int64)
    labels, distance = vote_labels(view.x, sample, sample_labels, k, n_neighbors)
    view.cols[out], view.cols[out + "_distance"] = labels, distance
    return np.bincount(labels, minlength=k).astype(np.int64)
