"""`raydc embed` extracts what the method's own assign extracts (no Ray: the recording context stops at the
first `extract` call)."""
from __future__ import annotations

import numpy as np
import torch

from raydc.config import load_config
from raydc.data.manifest import Manifest
from raydc.engine.embed import extraction
from raydc.methods import build_method


def _manifest() -> Manifest:
    return Manifest("npz", "/x", 100, "raw", [16, 16, 1], "L", False)


def test_deepcluster_reduced_is_the_runs_projection_and_l2_raw_is_none():
    from raydc.core.pca import PCAProjection
    from raydc.methods.deepcluster import _projection_to_plain

    cfg = load_config(None, ["cluster.k=3", "cluster.pca_dim=4", "data.shards=/x"])
    m = _manifest()
    method = build_method(cfg, m)
    model = method.build_model()
    proj = PCAProjection(mean=np.zeros(cfg.model.feature_dim, np.float32),
                         matrix=np.eye(cfg.model.feature_dim, 4, dtype=np.float32), eigenvalues=np.ones(4),
                         whiten=False)
    artifacts = {"projection": _projection_to_plain(proj), "centroids": torch.zeros(3, 4), "groups": None}
    spec = extraction(method, model, artifacts, cfg, m, reduced=True)
    assert spec.call == "embed" and spec.reduction.l2_normalize == cfg.cluster.l2_normalize
    assert np.array_equal(spec.reduction.projection.matrix, proj.matrix)
    assert extraction(method, model, artifacts, cfg, m, reduced=False).reduction is None


def test_dec_embeds_z_not_its_soft_assignment():
    cfg = load_config(None, ["method=dec", "cluster.k=3", "cluster.pca_dim=0", "data.shards=/x"])
    m = _manifest()
    method = build_method(cfg, m)
    spec = extraction(method, method.build_model(), {}, cfg, m, reduced=True)
    assert spec.call == "embed" and spec.reduction.projection is None

