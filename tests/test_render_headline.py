"""RESULTS.md's headline quality line: final rounds only. A run still in progress, or a DAC run stopped before
the end of its schedule, has a last row that is not a final round and must not be quoted there."""
from __future__ import annotations

from benchmarks.render import _headline_quality


def _dac(label: str, chain: list[float], seed: int = 31) -> dict:
    return {"label": label, "rounds": len(chain) - 1, "acc_by_round": chain, "train": {"seed": seed}}


def test_only_final_rounds_reach_the_headline():
    whole = [0.2] + [0.9] * 19 + [0.977]
    d = {
        "quality": {"runs": {"done": {"status": "finished", "last_row": {"acc": 0.8, "nmi": 0.7}},
                             "going": {"status": "in progress", "last_row": {"acc": 0.99, "nmi": 0.99}}}},
        "dac_ab": {"runs": [_dac("70k images, the preset", whole), _dac("70k images, stopped", [0.2, 0.95, 0.96]),
                            _dac("10k a", [0.2] * 20 + [0.96]), _dac("10k b", [0.2] * 20 + [0.94], 32),
                            _dac("Fashion-MNIST test 10k, seed 31", [0.2] * 20 + [0.493]),
                            _dac("Fashion-MNIST test 10k, stopped", [0.2, 0.45, 0.61])],
                   "groups": [{"name": "10k", "runs": ["10k a", "10k b"]}]},
    }
    line = "; ".join(_headline_quality(d))
    assert "`done` ACC 0.8" in line and "going" not in line and "0.99" not in line
    assert "DAC, MNIST 70k, seed 31 (dac_ab.json) ACC 0.977 after 20 rounds" in line
    assert line.count("DAC, MNIST 70k") == 1  # the stopped 70k run's last row is no final round
    assert "over 2 seeds, min 0.94" in line
    assert "DAC, Fashion-MNIST test 10k, seed 31 (dac_ab.json) ACC 0.493 (one seed)" in line
    assert "0.61" not in line  # nor the stopped Fashion-MNIST run's
    assert line.index("over 2 seeds") < line.index("single earlier runs") < line.index("`done` ACC 0.8")


def test_the_time_to_quality_table_lists_each_seeded_config_and_the_baselines():
    from benchmarks.render import _sec_time_to_quality

    seeds70k = {"machine": {"cpu_model": "AMD EPYC"}, "settings": {"deepcluster_mnist70k": {
        "config": "mnist.yaml", "method": "DeepCluster", "data": "MNIST 70k",
        "runs": [{"seed": 31, "seconds": 360.0, "acc": 0.95}, {"seed": 32, "seconds": 420.0, "acc": 0.96},
                 {"seed": 33, "seconds": 600.0, "acc": 0.97}]}}}
    baselines = {"machine": "x86_64", "k": 10, "data": {"MNIST 70k": {"runs": {
        "sklearn_kmeans": [{"seed": 0, "seconds": 30.0, "acc": 0.54}],
        "umap_kmeans": [{"seed": 0, "seconds": 240.0, "acc": 0.82}, {"seed": 1, "seconds": 246.0, "acc": 0.84}]}}}}
    text = _sec_time_to_quality({"seeds70k": seeds70k, "baselines": baselines})
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows[0] == ("| `mnist.yaml` | DeepCluster | MNIST 70k | 3 | 7 (6–10) | 0.960 ± 0.010 (min 0.950) "
                       "| seeds70k.json (AMD EPYC) |")
    assert rows[1].startswith("| — | scikit-learn k-means, raw pixels | MNIST 70k, k = 10 | 1 | 0.5 | 0.54 |")
    assert "| 2 | 4.05 (4–4.1) | 0.830 ± 0.014 (min 0.820) |" in rows[2]
    assert _sec_time_to_quality({}) == ""


def test_the_dec_readout_table_shows_the_start_argmax_q_and_what_was_delivered():
    from benchmarks.render import _sec_dec_readout

    runs = [{"label": "DEC, paper readout", "method": "dec", "commit": "a", "wall_s_rounds": 600.0,
             "final": {"acc": 0.95, "nmi": 0.89, "ae_kmeans_acc": 0.908}},
            {"label": "N2D", "method": "dec", "commit": "b", "wall_s_rounds": 60.0,
             "final": {"acc": 0.972, "nmi": 0.928, "ae_kmeans_acc": 0.882, "dec_acc": 0.881, "readout": "umap"}},
            {"label": "DAC", "method": "dac", "commit": "c", "wall_s_rounds": 60.0, "final": {"acc": 0.9}},
            {"label": "DEC, collected before the summary", "method": "dec", "commit": "d", "final": {"acc": 0.5}}]
    text = _sec_dec_readout({"runs": runs})
    rows = [line for line in text.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert rows == ["| DEC, paper readout | 0.908 | 0.95 | argmax q (the paper) | 0.95 | 0.89 | 10 | a |",
                    "| N2D | 0.882 | 0.881 | UMAP + mixture (dec.readout umap) | 0.972 | 0.928 | 1 | b |"]
    assert _sec_dec_readout({"runs": runs[2:]}) == ""


def test_a_seeds_run_limited_to_some_settings_keeps_the_others_recorded_rows(tmp_path):
    """`benchmarks.run --settings b`: only b is measured (here: read back from its finished run directory); a,
    whose runs are gone, keeps the rows its result file held instead of being trained again."""
    import json

    import pytest

    from benchmarks.bench_seeds import run_settings
    from benchmarks.common import Context

    ctx = Context(mode="full", out=tmp_path / "results", work=tmp_path / "work", settings=["b"])
    ctx.out.mkdir()
    recorded_a = {"method": "DeepCluster", "data": "a", "config": "mnist.yaml", "sets": [], "seeds": [31],
                  "runs": [{"seed": 31, "acc": 0.5}], "summary": {}}
    (ctx.out / "sx.json").write_text(json.dumps({"settings": {"a": recorded_a}}))
    run_dir = ctx.work / "sx" / "b-seed31"
    run_dir.mkdir(parents=True)
    (run_dir / "clustering.pt").write_bytes(b"")
    (run_dir / "metrics.jsonl").write_text(json.dumps({"round": 0, "acc": 0.2, "time_round": 3.0}) + "\n"
                                           + json.dumps({"round": 1, "final": True, "acc": 0.9, "nmi": 0.8,
                                                         "time_round": 2.0}) + "\n")
    settings = {name: {"config": "mnist.yaml", "sets": [], "seeds": (31,), "method": "DeepCluster", "data": name}
                for name in ("a", "b")}
    out = run_settings(ctx, settings, "sx")
    assert out["settings"]["a"] == recorded_a
    b = out["settings"]["b"]["runs"][0]
    assert (b["acc"], b["first_acc"], b["seconds"]) == (0.9, 0.2, 5.0)
    with pytest.raises(ValueError, match="unknown setting"):
        run_settings(Context(mode="full", out=ctx.out, work=ctx.work, settings=["c"]), settings, "sx")


def test_the_step_cost_section_prices_each_presets_workload_at_the_measured_rates():
    """Minutes = images trained / training rate + images forward / feature rate, at fp32 contiguous and at the
    channels_last (where the network has it); untimed variants show a dash and say why."""
    from benchmarks.render import _sec_precision

    def phase(fp32, cl=None):
        rows = {"fp32": {"images_per_s": {"median": fp32, "iqr": 1.0}, "gflops": 50.0, "speedup_vs_fp32": 1.0}}
        if cl:
            rows["channels_last"] = {"images_per_s": {"median": cl, "iqr": 1.0}, "gflops": 90.0,
                                     "speedup_vs_fp32": cl / fp32}
        return rows

    doc = {"config": {"batch": 8, "steps_per_sample": 1, "repeats": 2, "bf16": "autocast", "cpu_bf16": None,
                      "torch_threads": 2, "speedup": "ratio"},
           "gemm_ceiling_gflops": 100.0, "nets": {"conv": "a conv net"},
           "results": {"conv": {"batch": 8, "skipped": {"bf16": "no bf16 instructions"},
                                "flops_per_image": {"train_step": 3e6, "feature_pass": 1e6},
                                "train_step": phase(100.0, 200.0), "feature_pass": phase(600.0, 1200.0),
                                "compile_seconds": {}, "feature_rel_error": 0.01}},
           "workloads": [{"config": "x.yaml", "method": "deepcluster", "net": "conv", "images": 10,
                          "train_images": 6000, "forward_images": 36000, "what": "w"}]}
    text = _sec_precision(doc)
    row = next(line for line in text.splitlines() if line.startswith("| `x.yaml`"))
    # fp32: 6000/100 + 36000/600 = 120 s = 2 min; channels_last: 30 + 30 s = 1 min
    assert row.endswith("| 2 | 1 |"), row
    assert "bf16: no bf16 instructions" in text and "(**2.00×**)" in text
