"""The quick benchmark suite runs end to end and writes well-formed results. Never asserts speed.

It runs `python -m benchmarks.run --quick` in a subprocess that joins the test session's Ray through
RAY_ADDRESS (`make bench-quick` starts its own; joining saves a start and a shutdown) into a temporary results
directory, then checks every expected JSON: present,
strict JSON (no NaN/Inf), the common keys, the benchmark's own keys, every number finite, every ratio
positive; and RESULTS.md with its sections and plots.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
EXPECTED = ["quality", "pca", "kmeans", "features", "train", "epoch"]

# The suite takes under 3 minutes on an idle 2-core machine; other jobs on a shared one can stretch it many
# times over, and this test checks the results' form, not the speed: hence the generous limits.
# Slow: it starts every benchmark's Ray pools and trainers (minutes); `make bench-quick` and `make test-all` run it.
pytestmark = [pytest.mark.ray, pytest.mark.slow, pytest.mark.timeout(2400)]


def _strict_load(path: Path) -> dict:
    def bad(const: str):
        raise AssertionError(f"{path.name}: non-finite number {const}")

    return json.loads(path.read_text(), parse_constant=bad)


def _numbers(obj, where: str = ""):
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _numbers(v, f"{where}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _numbers(v, f"{where}[{i}]")
    elif isinstance(obj, (int, float)) and not isinstance(obj, bool):
        yield where, obj


def _positive(x, what: str) -> None:
    assert isinstance(x, (int, float)) and math.isfinite(x) and x > 0, f"{what} = {x!r}"


# The quality benchmark only reads the long runs' directories; these stand for one of each state it reports.
FAKE_RUNS = {
    "fmnist3": [{"epoch": 0, "acc": 0.5, "time_round": 2.0, "time_train": 1.5},
                {"epoch": 1, "final": True, "acc": 0.625, "time_round": 1.0}],
    "mnist": [{"epoch": 0, "acc": 0.25, "time_round": 3.0}],
    "dec_mnist": [],
}
EXPECTED_STATUS = {"fmnist3": "finished", "mnist": "in progress", "dec_mnist": "empty", "dec_fmnist": "missing"}


@pytest.fixture(scope="module")
def quick_results(tmp_path_factory, mnist_root, ray_local):
    out = tmp_path_factory.mktemp("bench") / "results"
    work, runs = out.parent / "work", out.parent / "runs"
    for name, rows in FAKE_RUNS.items():
        (runs / name).mkdir(parents=True)
        (runs / name / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = dict(os.environ, RAYDC_DATA_ROOT=str(mnist_root), RAY_USAGE_STATS_ENABLED="0",
               RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "benchmarks.run", "--quick", "--out", str(out), "--work", str(work),
                           "--runs", str(runs)], cwd=REPO, env=env, capture_output=True, text=True, timeout=2300)
    wall = time.perf_counter() - t0
    assert proc.returncode == 0, f"suite failed ({wall:.0f}s):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
    print(f"quick suite: {wall:.0f}s")  # the target is < 3 min on an idle 2-core machine; not asserted
    return out


def test_every_result_is_well_formed(quick_results):
    for name in EXPECTED:
        path = quick_results / f"{name}.json"
        assert path.exists(), f"missing {path.name}"
        doc = _strict_load(path)
        assert doc["benchmark"] == name and doc["mode"] == "quick"
        for key in ("created", "wall_s", "load_average", "machine", "config"):
            assert key in doc, f"{name}: no {key!r}"
        m = doc["machine"]
        assert m["cpu_model"] and m["cpu_count"] >= 1
        for lib in ("torch", "ray", "faiss", "numpy", "sklearn"):
            assert m["versions"][lib], f"{name}: no version for {lib}"
        assert "OPENBLAS_CORETYPE" in m
        for where, x in _numbers(doc):
            assert math.isfinite(x), f"{name}{where} = {x}"
    suite = _strict_load(quick_results / "suite.json")
    _positive(suite["ray_startup_s"], "suite.ray_startup_s")
    assert all(b["status"] == "ok" for b in suite["benchmarks"].values()), suite["benchmarks"]


def test_kmeans_result(quick_results):
    doc = _strict_load(quick_results / "kmeans.json")
    assert doc["results"], "no k"
    for shape in doc["gemm"]["shapes"].values():
        _positive(shape["gflops"], "gemm gflops")
    for k, r in doc["results"].items():
        assert set(r["impls"]) == set(doc["implementations"])
        for name, p in r["impls"].items():
            for key in ("s_per_iter", "speedup_vs_sklearn", "speedup_vs_faiss", "gflops_effective",
                        "fraction_of_gemm_ceiling"):
                _positive(p[key], f"kmeans k={k} {name}.{key}")
            assert p["iterations"] >= 1
            # Same data, same initial centroids: every implementation reaches the same objective.
            assert abs(p["objective_rel_diff_vs_faiss"]) < 2e-2, (k, name, p["objective_rel_diff_vs_faiss"])
        _positive(r["assignment"]["fraction_of_gemm_ceiling"], "assignment fraction")


def test_features_train_epoch_results(quick_results):
    feats = _strict_load(quick_results / "features.json")
    assert {"ray_pool_c1", "ray_pool_c2", "persistent_c1", "persistent_c2", "plain_loop"} <= set(feats["results"])
    assert feats["max_abs_feature_diff_persistent_vs_plain"] < 1e-2
    for name, r in feats["results"].items():
        _positive(r["images_per_s"], f"features {name}")
        _positive(r["ratio_vs_plain"], f"features {name} ratio")
    assert feats["max_abs_feature_diff_pool_vs_plain"] < 1e-2

    train = _strict_load(quick_results / "train.json")
    assert {"ray_train_w1", "ray_train_w2", "plain_loop"} <= set(train["results"])
    for name, r in train["results"].items():
        _positive(r["images_per_s"]["median"], f"train {name}")
        _positive(r["ratio_vs_plain"], f"train {name} ratio")
    for w in ("ray_train_w1", "ray_train_w2"):
        _positive(train["results"][w]["fit_startup_s"], f"{w} fit start-up")

    epoch = _strict_load(quick_results / "epoch.json")
    assert epoch["phases"]["epochs"], "no epoch rows"
    for e in epoch["phases"]["epochs"]:
        shares = e["share"]
        total = sum(shares[p] for p in ("time_features", "time_pca", "time_kmeans", "time_train", "other"))
        assert total == pytest.approx(1.0, abs=0.02), shares
        assert all(0 <= v <= 1 for v in shares.values()), shares
    _positive(epoch["phases"]["median_time_round"], "epoch time_round")


def test_pca_and_quality_results(quick_results):
    pca = _strict_load(quick_results / "pca.json")
    assert set(pca["fit_seconds"]) == {"raydc_sharded", "raydc_ray_4_actors", "faiss_PCAMatrix", "sklearn_PCA"}
    for name, r in pca["fit_speedup_vs_sklearn"].items():
        _positive(r, f"pca {name} vs sklearn")
    for name, a in pca["agreement_vs_raydc"].items():
        assert a["max_principal_angle_deg"] < 1.0, (name, a)
        _positive(a["whitened_scale"], f"pca {name} scale")

    q = _strict_load(quick_results / "quality.json")
    # Each run's status and numbers are read from its directory, not assumed.
    from benchmarks.bench_quality import RUNS

    # The fake runs' states; every other listed run has no directory here and no earlier results to keep.
    assert {name: r["status"] for name, r in q["runs"].items()} == {**{n: "missing" for n in RUNS}, **EXPECTED_STATUS}
    fm = q["runs"]["fmnist3"]
    assert fm["rows"] == 2 and fm["last_row"]["acc"] == 0.625 and fm["last_row"]["final"] is True
    assert fm["wall_s_rounds"] == pytest.approx(3.0) and fm["phase_seconds"] == {"train": 1.5}
    assert q["runs"]["mnist"]["rows"] == 1 and q["runs"]["mnist"]["last_row"]["acc"] == 0.25
    # every run it reports comes from a shipped config (`dec_mnist_ft110`: dec_mnist.yaml + --set)
    for name in q["runs"]:
        assert any(name.startswith(c.stem) for c in (REPO / "jobs" / "configs").glob("*.yaml")), name
    assert q["published"] and "arithmetic" in q["nmi_normalisation"]["raydc"]


def test_results_md_rendered(quick_results):
    md = (quick_results / "RESULTS.md").read_text()
    for heading in ("## Headline ratios", "## k-means", "## Feature extraction", "## Training",
                    "## DeepCluster epoch breakdown", "## PCA", "## Clustering quality"):
        assert heading in md, f"RESULTS.md lacks {heading!r}"
    for png in ("kmeans.png", "features.png", "train.png", "epoch.png"):
        p = quick_results / png
        assert p.exists() and p.stat().st_size > 1000, png
        assert f"]({png})" in md
    quality = md[md.index("## Clustering quality"):]
    for name, status in EXPECTED_STATUS.items():
        assert re.search(rf"\| `runs/{name}` \|[^\n]*\| {status} \|", quality), (name, status)
