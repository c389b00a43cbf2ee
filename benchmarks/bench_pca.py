"""PCA with whitening: raydc's sharded PCA (moments over 4 shards -> one reduction -> `pca_from_moments`,
in-process, and the same through 4 Ray shard actors) against `faiss.PCAMatrix(d, 256, eigen_power=-0.5)` and
scikit-learn's `PCA(256, whiten=True)` on the same data.

Data: N rows of d-dim correlated Gaussian data, x = z @ (diag(sqrt(lambda)) @ Q) with a random rotation Q
and a spectrum that decays smoothly over the first `out` axes and then drops by 10x (so the top-`out`
subspace is well defined and its leading axes are well separated).

Agreement with raydc, for each other method:
- principal angles between the two `out`-dim subspaces (scipy.linalg.subspace_angles): max angle and
  mean cos;
- mean |cos| of matched components (axis i against axis i), over the leading 32 axes and over all;
- whitened outputs up to scale: per axis, the two projections are fitted by one global scale and a sign per
  axis; reported are that scale (faiss's whitened output has variance 1/N per axis where raydc's has 1, so
  expect sqrt(N)) and the relative residual over the leading 32 axes and over all.
"""
from __future__ import annotations

import time

import numpy as np

from benchmarks.common import Context, interleaved, ratio, summarize

NAME = "pca"
NEEDS_RAY = True

CONFIGS = {
    "quick": {"n": 8_000, "d": 128, "out": 32, "shards": 4, "repeats": 3},
    "full": {"n": 100_000, "d": 1024, "out": 256, "shards": 4, "repeats": 3},
}
LEAD = 32  # leading axes, whose eigenvalues are well separated


def correlated_data(n: int, d: int, out: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lam = np.concatenate([10.0 * np.exp(-np.arange(out) / (out / 4)), 0.05 * np.exp(-np.arange(d - out) / d)])
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a = (np.sqrt(lam)[:, None] * q.T).astype(np.float32)            # rows: scaled axes
    x = np.empty((n, d), np.float32)
    step = 16384
    for i in range(0, n, step):
        z = rng.standard_normal((min(step, n - i), d), dtype=np.float32)
        x[i:i + step] = z @ a
    x += rng.standard_normal(d).astype(np.float32)                  # a non-zero mean
    return x, lam


def _unit_cols(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, np.float64)
    return m / np.linalg.norm(m, axis=0, keepdims=True)


def _agreement(ref_dirs: np.ndarray, dirs: np.ndarray, y_ref: np.ndarray, y: np.ndarray) -> dict:
    from scipy.linalg import subspace_angles

    ang = subspace_angles(ref_dirs, dirs)
    cos_matched = np.abs(np.sum(ref_dirs * dirs, axis=0))
    # Whitened outputs: sign per axis, one scale for all (least squares), relative residual.
    sign = np.sign(np.sum(y_ref * y, axis=0))
    sign[sign == 0] = 1
    ys = y * sign
    scale = float(np.sum(y_ref * ys) / np.sum(ys * ys))
    resid = y_ref - scale * ys
    rel = np.linalg.norm(resid, axis=0) / np.linalg.norm(y_ref, axis=0)
    return {
        "max_principal_angle_deg": float(np.degrees(ang.max())),
        "mean_cos_principal_angles": float(np.mean(np.cos(ang))),
        "mean_abs_cos_matched_lead": float(cos_matched[:LEAD].mean()),
        "mean_abs_cos_matched_all": float(cos_matched.mean()),
        "whitened_scale": scale,
        "whitened_rel_residual_lead": float(np.median(rel[:LEAD])),
        "whitened_rel_residual_all": float(np.median(rel)),
    }


def run(ctx: Context) -> dict:
    import ray

    from raydc.core.faiss_backend import import_faiss
    from raydc.core.pca import Moments, pca_from_moments, reduce_moments
    from raydc.engine.clustering import ClusteringService
    from sklearn.decomposition import PCA

    faiss = import_faiss()
    cfg = CONFIGS[ctx.mode]
    n, d, out, nsh = cfg["n"], cfg["d"], cfg["out"], cfg["shards"]
    x, lam = correlated_data(n, d, out)
    bounds = np.linspace(0, n, nsh + 1).astype(int)
    shards = [x[a:b] for a, b in zip(bounds, bounds[1:])]

    ctx.ensure_ray()
    svc = ClusteringService(nsh, log=lambda *_: None)
    refs = [ray.put({"row": np.arange(a, b, dtype=np.int64), "id": np.arange(a, b, dtype=np.int64),
                     "feature": x[a:b]}) for a, b in zip(bounds, bounds[1:])]
    t0 = time.perf_counter()
    svc.load(refs)
    ray_load_s = time.perf_counter() - t0
    del refs

    def raydc_sharded():
        return pca_from_moments(reduce_moments(Moments.from_array(s) for s in shards), out, whiten=True)

    def raydc_ray():  # the shards reduce to moments, their sum gives the projection (ClusteringService.extract)
        parts = ray.get([sh.moments.remote() for sh in svc.shards])
        return pca_from_moments(reduce_moments(m for m in parts if m is not None), out, whiten=True)

    def faiss_pca():
        p = faiss.PCAMatrix(d, out, -0.5)
        p.train(x)
        return p

    def sklearn_pca():
        return PCA(out, whiten=True, random_state=0).fit(x)

    fits = {"raydc_sharded": raydc_sharded, "raydc_ray_4_actors": raydc_ray, "faiss_PCAMatrix": faiss_pca,
            "sklearn_PCA": sklearn_pca}
    ctx.log(f"  N={n}, d={d} -> {out}, {cfg['repeats']} repeats (interleaved)")
    fit_times, models = interleaved(fits, repeats=cfg["repeats"], warmup=1)
    svc.shutdown()

    # Projection of all rows (the second pass every method needs), timed the same way.
    proj = models["raydc_sharded"]
    applies = {
        "raydc_sharded": lambda: proj.apply(x, l2_normalize=False),
        "faiss_PCAMatrix": lambda: models["faiss_PCAMatrix"].apply(x),
        "sklearn_PCA": lambda: models["sklearn_PCA"].transform(x),
    }
    apply_times, ys = interleaved(applies, repeats=cfg["repeats"], warmup=1)

    fp = models["faiss_PCAMatrix"]
    faiss_A = faiss.vector_to_array(fp.A).reshape(out, d)            # rows: axes scaled by lambda^-1/2
    dirs = {
        "raydc_sharded": _unit_cols(proj.matrix),
        "raydc_ray_4_actors": _unit_cols(models["raydc_ray_4_actors"].matrix),
        "faiss_PCAMatrix": _unit_cols(faiss_A.T),
        "sklearn_PCA": _unit_cols(models["sklearn_PCA"].components_.T),
    }
    y_ref = ys["raydc_sharded"].astype(np.float64)
    agree = {
        "raydc_ray_4_actors": _agreement(dirs["raydc_sharded"], dirs["raydc_ray_4_actors"], y_ref,
                                         models["raydc_ray_4_actors"].apply(x, l2_normalize=False).astype(np.float64)),
        "faiss_PCAMatrix": _agreement(dirs["raydc_sharded"], dirs["faiss_PCAMatrix"], y_ref,
                                      ys["faiss_PCAMatrix"].astype(np.float64)),
        "sklearn_PCA": _agreement(dirs["raydc_sharded"], dirs["sklearn_PCA"], y_ref,
                                  ys["sklearn_PCA"].astype(np.float64)),
    }
    # Against the true axes the data were drawn from (first `out` columns of Q are not kept; compare spectra).
    evals = {
        "raydc_sharded": proj.eigenvalues[:LEAD],
        "faiss_PCAMatrix": faiss.vector_to_array(fp.eigenvalues)[:LEAD] / n,
        "sklearn_PCA": models["sklearn_PCA"].explained_variance_[:LEAD],
    }
    eig_rel = {k: float(np.max(np.abs(v / lam[:LEAD] - 1))) for k, v in evals.items()}

    total = {k: fit_times[k]["median"] + (apply_times[k]["median"] if k in apply_times else 0.0) for k in fit_times}
    payload = {
        "config": {**cfg, "lead_axes": LEAD, "data": "correlated Gaussian, smooth spectrum over `out` axes then "
                   "x10 drop, random rotation, non-zero mean", "sklearn_svd_solver": models["sklearn_PCA"]._fit_svd_solver,
                   "faiss_rows_used": min(n, 1000 * d)},
        "fit_seconds": fit_times,
        "apply_seconds": apply_times,
        "fit_speedup_vs_sklearn": {k: ratio(fit_times["sklearn_PCA"], v) for k, v in fit_times.items()},
        "fit_speedup_vs_faiss": {k: ratio(fit_times["faiss_PCAMatrix"], v) for k, v in fit_times.items()},
        "fit_plus_apply_seconds": total,
        "agreement_vs_raydc": agree,
        "eigenvalue_max_rel_error_lead": eig_rel,
        "ray_load_seconds": ray_load_s,
    }
    ctx.log("  fit: " + ", ".join(f"{k} {v['median']:.3f}s" for k, v in fit_times.items()))
    ctx.log("  agreement: " + ", ".join(f"{k} max angle {v['max_principal_angle_deg']:.2g} deg, "
                                        f"scale {v['whitened_scale']:.4g}" for k, v in agree.items()))
    return payload
