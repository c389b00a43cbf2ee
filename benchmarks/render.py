"""Turn `results/*.json` into `RESULTS.md` (headline ratios first, then one section per benchmark) and PNG plots
(matplotlib, Agg backend) beside the JSON files.

`python -m benchmarks.render [--out DIR]` redraws from the files alone. With the default results directory
the Markdown goes to `benchmarks/RESULTS.md`; with any other `--out DIR`, to `DIR/RESULTS.md`.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.common import BENCH_DIR, RESULTS_DIR

NAMES = ["kmeans", "reduction", "precision", "allocator", "features", "train", "dac", "epoch", "pca", "quality", "ablations",
         "seeds", "seeds70k", "demo", "readout", "scale", "scale_frozen", "probes", "export_memory", "embed_memory", "dac_ab",
         "probe_table", "sweep_table", "manifold_readout", "readout_restarts", "readout_knn", "baselines", "confusion"]


def _load(out: Path) -> dict[str, dict]:
    docs = {}
    for name in NAMES + ["suite"]:
        p = out / f"{name}.json"
        if p.exists():
            docs[name] = json.loads(p.read_text())
    return docs


def _f(x, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, str):
        return x
    ax = abs(x)
    if ax != 0 and (ax >= 1e5 or ax < 1e-3):
        return f"{x:.{digits - 1}e}"
    if ax >= 100:
        return f"{x:,.0f}"
    return f"{x:.{digits}g}"


def ratio_of(base: dict, variant: dict) -> float:
    """How many times faster `variant` ran than `base` (two rows of one interleaved run: median seconds)."""
    return base["seconds"]["median"] / variant["seconds"]["median"]


def _x(r) -> str:
    return "—" if r is None else f"{r:.2f}×"


def _pct(x) -> str:
    return "—" if x is None else f"{100 * x:.1f} %"


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# plots


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_kmeans(doc: dict, path: Path) -> None:
    import numpy as np

    plt = _plt()
    ks = list(doc["results"])
    impls = [name for name in doc["implementations"] if all(name in doc["results"][k]["impls"] for k in ks)]
    fig, ax = plt.subplots(figsize=(9, 4.2))
    w = 0.8 / len(impls)
    for i, name in enumerate(impls):
        vals = [doc["results"][k]["impls"][name]["s_per_iter"] * 1e3 for k in ks]
        ax.bar(np.arange(len(ks)) + i * w, vals, w, label=name)
    ax.set_xticks(np.arange(len(ks)) + w * (len(impls) - 1) / 2, [f"k={k}" for k in ks])
    ax.set_yscale("log")
    ax.set_ylabel("ms per iteration (median, log)")
    r0 = doc["results"][ks[0]]
    ax.set_title(f"k-means, N={r0['n']:,}, d={r0['d']} (lower is better)")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_scale(doc: dict, path: Path) -> None:
    """Peak RSS against N, log-log: flat lines for the driver, the coordinator and rank 0, a rising one for
    the shard actors."""
    plt = _plt()
    ns = [p["n"] for p in doc["points"]]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for key, name in (("driver", "driver"), ("rank0", "rank 0"), ("coordinator", "coordinator")):
        line, = ax.plot(ns, [p[key + "_peak_anon"] / 2**20 for p in doc["points"]], "o-", label=f"{name} (private)")
        ax.plot(ns, [p[key + "_peak_rss"] / 2**20 for p in doc["points"]], ":", color=line.get_color(),
                label=f"{name} (resident)")
    ax.plot(ns, [max(p["shard_peak_anon"]) / 2**20 for p in doc["points"]], "s--", label="largest shard (private)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("images N")
    ax.set_ylabel("peak memory (MiB)")
    what = "One frozen-feature round (train.epochs 0)" if doc.get("frozen") else "One DeepCluster round"
    ax.set_title(f"{what}, {doc['shards']} shard actors (flat is the goal, shards excepted)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_throughput(rows: dict[str, float], title: str, path: Path, ylabel: str = "images/s (median)") -> None:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 3.6))
    names = list(rows)
    bars = ax.bar(names, [rows[n] for n in names], color=["#4c72b0" if n != "plain_loop" else "#999999" for n in names])
    for b, n in zip(bars, names):
        ax.annotate(f"{rows[n]:.0f}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                    fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_epoch(doc: dict, path: Path) -> None:
    plt = _plt()
    epochs = doc["phases"]["epochs"]
    parts = ["time_features", "time_pca", "time_kmeans", "time_train", "other"]
    colors = ["#55a868", "#8172b2", "#c44e52", "#4c72b0", "#cccccc"]
    fig, ax = plt.subplots(figsize=(7, 3.6))
    bottom = [0.0] * len(epochs)
    labels = [f"epoch {e['epoch']}" for e in epochs]
    for p, c in zip(parts, colors):
        vals = [e["seconds"][p] for e in epochs]
        ax.bar(labels, vals, bottom=bottom, color=c, label=p.replace("time_", ""))
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax.set_ylabel("seconds")
    cfg = doc["config"]
    ax.set_title(f"DeepCluster epoch on {cfg['images']:,} MNIST images (k={cfg['k']})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_curves(curves: dict[str, list[dict]], path: Path) -> bool:
    plt = _plt()
    series = {n: [r for r in c if r.get("nmi") is not None] for n, c in curves.items()}
    series = {n: c for n, c in series.items() if c}
    if not series:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for n, rows in series.items():
        xs = [r.get("epoch") if r.get("epoch") is not None else i for i, r in enumerate(rows)]
        axes[0].plot(xs, [r["nmi"] for r in rows], marker="o", ms=3, label=n)
        axes[1].plot(xs, [r.get("acc") for r in rows], marker="o", ms=3, label=n)
    axes[0].set_title("NMI vs labels (arithmetic)")
    axes[1].set_title("ACC (Hungarian)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


# ----------------------------------------------------------------------------------------------------------
# sections


def _headlines(d: dict) -> list[str]:
    out = []
    if "kmeans" in d:
        res = d["kmeans"]["results"]
        kmax = max(res, key=int)
        r = res[kmax]
        p = r["impls"]
        out.append(
            f"**k-means** (N={r['n']:,}, d={r['d']}, k={kmax}, {r['niter']} it.): raydc single-process faiss "
            f"{_f(p['raydc_faiss']['s_per_iter'] * 1e3)} ms/it = **{_x(p['raydc_faiss']['speedup_vs_sklearn'])} "
            f"sklearn's speed**, {_x(p['raydc_faiss']['speedup_vs_faiss'])} direct faiss; distributed Lloyd over 2 "
            f"Ray actors {_x(p['raydc_distributed']['speedup_vs_sklearn'])} sklearn, "
            f"{_x(p['raydc_distributed']['speedup_vs_faiss'])} faiss. The assignment step reaches "
            f"**{_pct(r['assignment']['fraction_of_gemm_ceiling'])} of the fp32 GEMM ceiling** measured in the same run "
            f"({_f(r['assignment']['gflops'])} of {_f(r['gemm_ceiling_gflops'])} GFLOP/s); a whole raydc iteration "
            f"reaches {_pct(p['raydc_faiss']['fraction_of_gemm_ceiling'])}.")
        small = []
        for k in sorted(res, key=int):
            q = res[k]["impls"]
            small.append(f"k={k}: {_x(q['raydc_faiss']['speedup_vs_sklearn'])} / "
                         f"{_x(q['raydc_distributed']['speedup_vs_sklearn'])}")
        out.append("k-means vs sklearn per k (raydc faiss / raydc distributed): " + "; ".join(small) + ".")
    if "precision" in d:
        rr = d["precision"]["results"]
        out.append("**Per step, channels_last vs contiguous float32** (same process, interleaved; a training step / a "
                   "feature pass): " + "; ".join(f"{n}: {_x(r['train_step']['channels_last']['speedup_vs_fp32'])} / "
                                                 f"{_x(r['feature_pass']['channels_last']['speedup_vs_fp32'])}"
                                                 for n, r in rr.items() if "channels_last" in r["train_step"])
                   + "; bf16: " + ("; ".join(f"{n}: {_x(r['train_step']['bf16']['speedup_vs_fp32'])} / "
                                             f"{_x(r['feature_pass']['bf16']['speedup_vs_fp32'])}"
                                             for n, r in rr.items() if "bf16" in r["train_step"])
                                   or "not timed (" + next(iter(rr.values()))["skipped"].get("bf16", "") + ")") + ".")
        grad = [(n, r["grad_error_vs_float64"]) for n, r in rr.items() if "grad_error_vs_float64" in r]
        if grad:
            out.append("**Gradient error against float64, channels_last / contiguous** (one training step, same "
                       "weights and batch): " + "; ".join(
                           f"{n}: {_f(e['channels_last']['all'])} / {_f(e['fp32']['all'])} = "
                           f"{_x(e['channels_last']['all'] / e['fp32']['all'])}" for n, e in grad) + ".")
        folded = [(n, r["feature_pass"]) for n, r in rr.items() if "folded" in r["feature_pass"]]
        if folded:
            out.append("**Feature pass with BatchNorm folded** (channels_last weights, `raydc.core.bn_fold`; vs "
                       "contiguous float32 / vs channels_last unfolded, same run): " + "; ".join(
                           f"{n}: {_x(p['folded']['speedup_vs_fp32'])} / "
                           f"{_x(ratio_of(p['channels_last'], p['folded']))}" for n, p in folded) + ".")
    if "allocator" in d:
        rr = d["allocator"]["results"]
        out.append("**Freed batches kept mapped** (`raydc/_malloc.py`, set by `import raydc`; vs glibc's defaults, "
                   "each sample a fresh process, a training step / a feature pass): " + "; ".join(
                       f"{n}: {_x(r['train_step']['retain']['speedup_vs_default'])} / "
                       f"{_x(r['feature_pass']['retain']['speedup_vs_default'])}" for n, r in rr.items()) + ".")
    if "features" in d:
        rr = d["features"]["results"]
        cal = d["features"].get("calibration") or {}
        s = f"**Feature extraction** ({d['features']['config']['images']:,} MNIST images, vs a plain `no_grad` loop): "
        if "persistent_c1" in rr:
            s += (f"persistent pool (default on CPU) concurrency 1 = **{_x(rr['persistent_c1']['ratio_vs_plain'])}**, "
                  f"concurrency 2 = **{_x(rr['persistent_c2']['ratio_vs_plain'])}**; ")
        s += (f"Ray Data pool (a new pool each pass) concurrency 1 = **{_x(rr['ray_pool_c1']['ratio_vs_plain'])}**, "
              f"concurrency 2 = **{_x(rr['ray_pool_c2']['ratio_vs_plain'])}**")
        if cal:
            s += (f" (per call fixed cost {_f(cal['ray_pool_c1']['fixed_cost_s'])} s; steady state "
                  f"{_x(cal['ray_pool_c1'].get('steady_ratio_vs_plain'))} / {_x(cal['ray_pool_c2'].get('steady_ratio_vs_plain'))})")
        out.append(s + ".")
    if "train" in d:
        rr = d["train"]["results"]
        out.append(f"**Training** (DeepCluster's `train_round`, {d['train']['config']['images']:,} images/pass): Ray Train + "
                   f"Ray Data with 1 worker = **{_x(rr['ray_train_w1']['ratio_vs_plain'])}** a plain DataLoader loop, "
                   f"2 workers = **{_x(rr['ray_train_w2']['ratio_vs_plain'])}** (fit start-up "
                   f"{_f(rr['ray_train_w1']['fit_startup_s'])} s / {_f(rr['ray_train_w2']['fit_startup_s'])} s, "
                   f"not included)" + (f"; 1 worker streaming the shards every pass (`data.cache: never`) = "
                                       f"**{_x(rr['ray_train_w1_streamed']['ratio_vs_plain'])}**"
                                       if "ray_train_w1_streamed" in rr else "") + ".")
    if "epoch" in d:
        ms = d["epoch"]["phases"]["median_share"]
        out.append(f"**DeepCluster epoch** ({d['epoch']['config']['images']:,} MNIST images): k-means = "
                   f"**{_pct(ms['time_kmeans'])}** of an epoch, PCA {_pct(ms['time_pca'])}, features "
                   f"{_pct(ms['time_features'])}; the whole clustering step (features + PCA + k-means) = "
                   f"**{_pct(ms['clustering_step'])}** (the paper: about one third), training {_pct(ms['time_train'])}.")
    if "pca" in d:
        p = d["pca"]
        a = p["agreement_vs_raydc"]
        out.append(f"**PCA** (N={p['config']['n']:,}, d={p['config']['d']} → {p['config']['out']}): raydc sharded fit "
                   f"= {_x(p['fit_speedup_vs_sklearn']['raydc_sharded'])} sklearn's speed, "
                   f"{_x(p['fit_speedup_vs_faiss']['raydc_sharded'])} faiss.PCAMatrix; subspace max angle vs faiss "
                   f"{_f(a['faiss_PCAMatrix']['max_principal_angle_deg'])}°, vs sklearn "
                   f"{_f(a['sklearn_PCA']['max_principal_angle_deg'])}°.")
    return out


def _headline_quality(d: dict) -> list[str]:
    """The last round of every finished run the results hold: the settings over seeds (mean ± std, and the
    lowest), DAC's runs through a whole schedule (dac_ab.json), then the single runs of the quality table. A run
    still in progress is left out: its last row is not a final round."""
    have = []
    settings = {**(d.get("seeds70k") or {}).get("settings", {}), **(d.get("demo") or {}).get("settings", {}),
                **(d.get("seeds") or {}).get("settings", {})}
    for n, s in settings.items():
        acc = [r["acc"] for r in s["runs"] if r.get("acc") is not None]
        if acc:
            have.append(f"`{n}` ({s['data']}) ACC {_pm(s['summary'].get('acc'))} over {len(acc)} seeds, "
                        f"min {_f(min(acc))}")
    dac = d.get("dac_ab") or {}

    def whole(r: dict) -> bool:  # round 0 and every round of a 20-round schedule: the final row is the last
        return r.get("rounds", 0) >= 20 and len(r.get("acc_by_round") or []) == r["rounds"] + 1

    by_label = {r["label"]: r for r in dac.get("runs", [])}
    grouped = set()
    for g in dac.get("groups", []):
        runs = [by_label[n] for n in g["runs"] if n in by_label]
        if runs and all(whole(r) for r in runs):
            final = [r["acc_by_round"][-1] for r in runs]
            grouped.update(g["runs"])
            have.append(f"DAC, MNIST test 10k, {g.get('headline', 'the shipped schedule')} (dac_ab.json) ACC "
                        f"{_pm(_mean_std(final))} over "
                        f"{len(final)} seeds, min {_f(min(final))}")
    for r in dac.get("runs", []):
        if whole(r) and r["label"] not in grouped and r["label"].startswith("70k"):
            have.append(f"DAC, MNIST 70k, seed {r['train'].get('seed', '?')} (dac_ab.json) ACC "
                        f"{_f(r['acc_by_round'][-1])} after {r['rounds']} rounds")
        elif whole(r) and r["label"] not in grouped and r["label"].startswith("Fashion-MNIST"):
            have.append(f"DAC, {r['label']} (dac_ab.json) ACC {_f(r['acc_by_round'][-1])} (one seed)")
    single = [f"`{n}` ACC {_f(r['last_row'].get('acc'))}, NMI {_f(r['last_row'].get('nmi'))}"
              for n, r in (d.get("quality") or {}).get("runs", {}).items()
              if "last_row" in r and r["status"].startswith("finished")]
    if single:  # one seed each, some at older commits: after the settings measured over seeds
        have.append("single earlier runs (quality.json, one seed each, the code of their day): " + ", ".join(single))
    return have


def _goals(d: dict) -> str:
    """The performance issue's table (#13): each phase's ratio against its baseline in the same run, its goal, and
    whether these results meet it. Computed from the JSONs, so it cannot disagree with the sections below."""
    rows = []

    def row(phase: str, value, goal: float, goal_text: str) -> None:
        if value is None:
            return
        rows.append([phase, _x(value), goal_text, "yes" if value >= goal else "**no**"])

    if "train" in d:
        rr = d["train"]["results"]
        for w in (1, 2):
            if f"ray_train_w{w}" in rr:
                row(f"training, Ray Train + Ray Data vs a plain DataLoader loop, {w} worker(s)",
                    rr[f"ray_train_w{w}"]["ratio_vs_plain"], 0.95, "≥ 0.95×")
    if "features" in d:
        rr = d["features"]["results"]
        pers = {n: r["ratio_vs_plain"] for n, r in rr.items() if n.startswith("persistent_c")}
        if pers:
            row("features, persistent pool vs a plain `no_grad` loop, concurrency 1", pers.get("persistent_c1"),
                0.9, "≥ 0.9×")
            best = max(pers, key=pers.get)
            row(f"features, persistent pool at its best concurrency (`{best}`)", pers[best], 0.95, "≥ 0.95×")
    if "kmeans" in d:
        res = d["kmeans"]["results"]
        for k in sorted(res, key=int):
            p = res[k]["impls"]
            need = 1.5 if int(k) >= 1000 else 1.0
            row(f"k-means vs scikit-learn, k = {k}", p["raydc_faiss"]["speedup_vs_sklearn"], need, f"≥ {need}×")
        for k in sorted(res, key=int):
            p = res[k]["impls"]
            if int(k) >= 100:
                row(f"distributed Lloyd (2 actors) vs 1 actor, k = {k}",
                    p["raydc_actor"]["s_per_iter"] / p["raydc_distributed"]["s_per_iter"], 0.8, "≥ 0.8×")
    out = ("## Against the performance goals (issue #13)\n\n" + _table(["phase", "ratio, same run", "goal", "met"], rows)
           if rows else "")
    if any(r[-1] != "yes" for r in rows):
        out += ("\n\nWhere the time goes in a row that falls short: the feature pool's own clocks (\"Where a persistent "
                "pass's time goes\", under Feature extraction) and k-means' assignment step against the GEMM ceiling "
                "of the same run (under each k).")
    if "epoch" in d:
        other = d["epoch"]["phases"]["median_seconds"]["other"]
        out += (f"\n\nFixed cost per round outside the phases (epoch benchmark, median \"other\"): {_f(other)} s "
                f"(goal: under 1 s; {'met' if other < 1.0 else '**not met**'}).")
    return out + "\n" if out else ""


def _machine(d: dict) -> str:
    doc = max((v for k, v in d.items() if k != "suite"), key=lambda v: v.get("created", ""), default={})
    m = doc.get("machine", {})
    v = m.get("versions", {})
    loads = {n: doc_["load_average"] for n, doc_ in d.items() if "load_average" in doc_}
    lo = [x["before"][0] for x in loads.values() if x.get("before")] + [x["after"][0] for x in loads.values()
                                                                         if x.get("after")]
    suite = d.get("suite", {})
    s = (f"Machine: {m.get('cpu_model')}, {m.get('cpus_usable')} usable cores, {m.get('memory_gib')} GiB, "
         f"GPU: {'yes' if m.get('gpu') else 'no'}; torch {v.get('torch')}, ray {v.get('ray')}, faiss {v.get('faiss')} "
         f"({m.get('faiss_backend')}), numpy {v.get('numpy')}, scikit-learn {v.get('sklearn')}, "
         f"OPENBLAS_CORETYPE={m.get('OPENBLAS_CORETYPE')}, torch threads {m.get('torch_threads')}.")
    if lo:
        s += (f" 1-minute load average during the runs: {min(lo):.1f}–{max(lo):.1f} on {m.get('cpus_usable')} cores "
              f"(other developers' jobs share this machine).")
    if suite.get("ray_startup_s") is not None:
        s += f" Ray start-up (once per suite, excluded from every number below): {suite['ray_startup_s']:.1f} s."
    by_cpu: dict[str, list[str]] = {}
    for name, doc_ in d.items():
        if name != "suite" and doc_.get("machine", {}).get("cpu_model"):
            by_cpu.setdefault(doc_["machine"]["cpu_model"], []).append(name)
    if len(by_cpu) > 1:  # sessions run on whatever machine they get: absolute figures are per machine
        s += (" **The results below come from more than one machine**; compare ratios within a section, not "
              "absolute figures across sections: " + "; ".join(f"{cpu}: {', '.join(sorted(names))}"
                                                              for cpu, names in sorted(by_cpu.items())) + ".")
    return s


def _sec_kmeans(doc: dict, img: str) -> str:
    c = doc["config"]
    parts = [f"## k-means\n\nN={c['n']:,}, d={c['d']}, {c['niter']} iterations, {c['repeats']} repeats after a warm-up, "
             f"interleaved. Data: {c['data']}. Init: {c['init']}. s/it = {c['s_per_iter']}. Speed-up = "
             f"{c['speedup']}."
             + (" `raydc_bf16` is not timed: this CPU has no bf16 instructions, so torch would emulate them (many times "
                "slower than float32, which says nothing about the bf16 path); its labels are still compared below."
                if c.get("raydc_bf16_timed") is False else "") + "\n"]
    g = doc["gemm"]
    parts.append("fp32 GEMM ceiling (`torch.mm`, {} threads): ".format(g["threads"]) + ", ".join(
        f"{k}: {_f(v['gflops'])} GFLOP/s" for k, v in g["shapes"].items()) + ".\n")
    for k, r in doc["results"].items():
        rows = []
        for name, p in r["impls"].items():
            rows.append([f"`{name}`", p["iterations"], _f(p["s_per_iter"] * 1e3), _f(p["s_per_iter_iqr"] * 1e3),
                         _x(p["speedup_vs_sklearn"]), _x(p["speedup_vs_faiss"]), _f(p["gflops_effective"]),
                         _pct(p["fraction_of_gemm_ceiling"]), f"{p['objective_rel_diff_vs_faiss']:+.1e}"])
        a = r["assignment"]
        parts.append(f"### k = {k}\n\n" + _table(
            ["implementation", "iters", "ms/it", "IQR ms/it", "vs sklearn", "vs faiss", "GFLOP/s", "of GEMM ceiling",
             "objective vs faiss"], rows)
            + f"\n\nAssignment step alone (`raydc.core.kmeans.nearest_centroids`, faiss flat search): {_f(a['seconds']['median'] * 1e3)} ms"
              f" = {_f(a['gflops'])} GFLOP/s = **{_pct(a['fraction_of_gemm_ceiling'])}** of the GEMM ceiling for this shape "
              f"({_f(r['gemm_ceiling_gflops'])} GFLOP/s), {_pct(a['fraction_of_peak'])} of the square-GEMM peak. "
              f"Loading the points into the shard actors (not timed above): {_f(r['ray_load_seconds']['2_actors'])} s.\n"
            + _bound_pruning(r) + _bf16_agreement(r))
    parts.append("Implementations: " + "; ".join(f"`{k}` = {v}" for k, v in doc["implementations"].items()) + ".\n")
    parts.append(f"![k-means]({img})\n")
    if doc.get("search_paths"):
        parts.append(_search_paths(doc["search_paths"]))
    return "\n".join(parts)


def _bound_pruning(r: dict) -> str:
    """What exact pruning could save on these data (bench_kmeans.bound_pruning)."""
    b = r.get("bound_pruning")
    if not b:
        return ""
    it = b["skipped_per_iteration"]
    return (f"\nExact pruning on these data: Hamerly's bounds along the same Lloyd run skip {_pct(b['mean_skipped'])} of "
            f"the rows' searches per iteration on average (from {_pct(min(it, default=0))} to "
            f"{_pct(b['max_skipped'])} over iterations 2-{len(it) + 1}), so an exact bound-based assignment could be at "
            f"most {b['assignment_speedup_bound']:.2f}× the full search here, before its own bookkeeping; labels "
            f"differing from a full search over all iterations: {b['labels_differ_from_full_search']:,}, of which "
            f"{b.get('labels_farther_than_full_search', 0):,} farther than a float32 near-tie.\n")


def _bf16_agreement(r: dict) -> str:
    """One line per k: what `raydc_faiss` ran, and the bf16 assignment's labels against faiss's float32 ones."""
    out = []
    for name in ("raydc_faiss", "raydc_bf16"):
        backend = r["impls"].get(name, {}).get("backend")
        if backend:
            out.append(f"`{name}` ran: {backend}.")
    a = r.get("bf16_assignment")
    if a:
        per = "; ".join(f"{name} centroids: " + ", ".join(
            f"{m} → {v['labels_differ_from_fp32']:,} ({v['rows_changed_by_rerank']:,} rows re-ranked)"
            for m, v in rows.items()) for name, rows in a["centroids"].items())
        out.append(f"bf16 assignment (`Bf16Assigner`, CPU flag {a['cpu_bf16']}), labels differing from faiss's float32 "
                   f"search out of {a['n']:,}, by candidates re-ranked (raydc uses {a['candidates_used']}): {per}.")
    return ("\n" + " ".join(out) + "\n") if out else ""


def _sec_precision(doc: dict) -> str:
    c = doc["config"]
    ceiling = doc.get("gemm_ceiling_gflops")
    rows = []
    for name, r in doc["results"].items():
        for phase in ("train_step", "feature_pass"):
            p = r[phase]
            fp = p["fp32"]

            def cell(v: str) -> str:
                if v not in p:
                    return "—"
                return f"{_f(p[v]['images_per_s']['median'])} (**{_x(p[v]['speedup_vs_fp32'])}**)"

            rows.append([f"`{name}`", phase.replace("_", " "), r.get("batch", c["batch"]),
                         _f(r["flops_per_image"][phase] / 1e6),
                         f"{_f(fp['images_per_s']['median'])} (IQR {_f(fp['images_per_s']['iqr'])})",
                         f"{_f(fp['gflops'])} ({_pct(fp['gflops'] / ceiling) if ceiling else '—'})",
                         cell("channels_last"), cell("folded") if phase == "feature_pass" else "",
                         cell("compile"), cell("bf16"), _f(r["compile_seconds"].get(phase)),
                         _f(r["feature_rel_error"]) if phase == "feature_pass" else "",
                         _f(r["folded_rel_error"]) if phase == "feature_pass" and "folded_rel_error" in r else ""])
    out = (f"## What a step costs: float32, channels_last, BatchNorm folded, torch.compile, bf16 (issue #27)\n\n"
           f"{c['steps_per_sample']} step(s) per sample, {c['repeats']} repeats after a warm-up, every variant "
           f"interleaved in one process on the same weights and inputs; bf16 = {c['bf16']}. CPU bf16 instructions: "
           f"{c['cpu_bf16']}; torch threads {c['torch_threads']}. Inputs: {c.get('input', '—')}. Speed-up = {c['speedup']}. "
           f"FLOPs per image from "
           f"`torch.utils.flop_counter` (a training step: forward and backward); GFLOP/s against the float32 GEMM "
           f"ceiling measured in the same process ({_f(ceiling)} GFLOP/s, torch.mm 2048^3). raydc's default per "
           f"network on a CPU: contiguous float32 (`train.memory_format: auto` is channels_last on CUDA only; "
           f"`features.fold_batchnorm` is off: `folded` is DeepCluster's feature pass with each BatchNorm folded "
           f"into the layer before it, on channels_last weights, `raydc.core.bn_fold`), "
           f"(`train.precision: fp32` in every shipped preset; `auto` picks bf16 only on CUDA and CPUs with bf16 "
           f"instructions).\n\n"
           + _table(["network", "phase", "batch", "MFLOP / image", "fp32 images/s", "fp32 GFLOP/s (of ceiling)",
                     "channels_last images/s", "folded images/s", "compile images/s", "bf16 images/s",
                     "compile s", "bf16 feature rel. error", "folded feature rel. error"], rows)
           + "\n\nNot timed (—): " + "; ".join(sorted({f"{v}: {why}" for r in doc["results"].values()
                                                         for v, why in r["skipped"].items()}))
           + ".\n\nNetworks: " + "; ".join(f"`{k}` = {v}" for k, v in doc["nets"].items()) + ".\n")
    grad = {n: r["grad_error_vs_float64"] for n, r in doc["results"].items() if "grad_error_vs_float64" in r}
    if grad:
        out += ("\nOne training step's gradients against a float64 step on the same weights and batch (relative error "
                "of all gradients together; the worst parameter in brackets): oneDNN's channels_last backward is a "
                "different computation, not only another order of the same additions. It does not by itself explain "
                "why DeepCluster's runs ended lower with channels_last (the reason `train.memory_format: auto` is "
                "contiguous on the CPU): its error is larger for one network and smaller for another.\n\n"
                + _table(["network", "contiguous float32", "channels_last", "channels_last / contiguous"],
                         [[f"`{n}`"] + [f"{_f(e[v]['all'])} ({e[v]['worst_param']} {_f(e[v]['worst'])})"
                                        for v in ("fp32", "channels_last")]
                          + [_x(e["channels_last"]["all"] / e["fp32"]["all"])] for n, e in grad.items()]) + "\n")
    work = doc.get("workloads") or []
    if work:
        wrows = []
        for w in work:
            r = doc["results"][w["net"]]

            def minutes(train_variant: str, feature_variant: str) -> float:
                t = w["train_images"] / r["train_step"][train_variant]["images_per_s"]["median"]
                f = (w["forward_images"] / r["feature_pass"][feature_variant]["images_per_s"]["median"]
                     if w["forward_images"] else 0.0)
                return (t + f) / 60

            cl = "channels_last" in r["train_step"] and "channels_last" in r["feature_pass"]
            wrows.append([f"`{w['config']}`", w["method"], w["what"], f"{w['train_images']:,}",
                          f"{w['forward_images']:,}", _f(minutes("fp32", "fp32")),
                          _f(minutes("channels_last", "channels_last")) if cl else "—"])
        out += ("\nWhat the shipped 70k presets ask of these rates: images through a training step and images "
                "through a feature pass over a whole run (`workloads` in `bench_precision.py`, from each preset's "
                "fields), and the minutes those alone take at the rates above, one process with all the cores: the floor "
                "under the run's time to quality on this machine, before data loading, k-means, Ray and the readout.\n\n"
                + _table(["config", "method", "what", "images trained", "images forward",
                          "minutes at contiguous float32 (raydc's CPU default)", "minutes at channels_last"],
                         wrows) + "\n")
    return out


def _sec_allocator(doc: dict) -> str:
    c = doc["config"]
    rows = []
    for name, phases in doc["results"].items():
        for phase, rr in phases.items():
            rows.append([f"`{name}`", phase.replace("_", " "), c["batches"][phase]]
                        + [f"{_f(rr[v]['images_per_s']['median'], 4)} ({_x(rr[v]['speedup_vs_default'])})"
                           for v in ("default", "default_trained", "retain")]
                        + [_x(ratio_of(rr["default_trained"], rr["retain"]))])
    return "\n".join([
        "## Freed memory kept mapped", "",
        f"glibc {c['glibc']}; each sample is its own process (`benchmarks/bench_allocator.py`), {c['steps']} batches "
        f"after one warm-up, {c['repeats']} repeats interleaved, weights {c['memory_format']}, {c['threads']} "
        "threads. `default`: glibc's own thresholds (`RAYDC_MALLOC=default`), the way every raydc process ran "
        "before; `default, trained first`: the same after three SGD steps, which raise glibc's mmap threshold by "
        "themselves (up to 32 MiB) and so made a pass faster in a process that had trained than in a feature-pool "
        f"actor that never had; `retain`: what `import raydc` sets (mmap threshold {c['mmap_threshold'] >> 20} MiB, "
        f"trim threshold {c['trim_threshold'] >> 20} MiB: a batch's activations reuse the last batch's pages instead "
        "of faulting in fresh zeroed ones). Images/s, median, and the ratio to `default`.", "",
        _table(["network", "phase", "batch", "default", "default, trained first", "retain",
                "retain vs trained first"], rows), ""])


def _search_paths(sp: dict) -> str:
    rows = sp["rows"]
    ks = sorted({r["k"] for r in rows})
    table = []
    for threads, d in sorted({(r["threads"], r["d"]) for r in rows}):
        by_k = {r["k"]: r for r in rows if r["threads"] == threads and r["d"] == d}
        table.append([threads, d] + [_x(by_k[k]["direct_speedup"]) if k in by_k else "" for k in ks])
    n = rows[0]["n"] if rows else 0
    return ("### flat search path\n\nfaiss's flat search (N = {:,}, nearest of k centroids) on its direct distance loop "
            "instead of its BLAS path: speed ratio direct / BLAS, interleaved medians (> 1: the direct loop is faster). "
            "raydc takes the direct loop for k <= {} (`raydc.core.kmeans.SEQ_SEARCH_MAX_K`).\n\n".format(
                n, sp["seq_search_max_k"])
            + _table(["threads", "d"] + [f"k = {k}" for k in ks], table) + "\n")


def _sec_reduction(doc: dict) -> str:
    mib = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
    rows = []
    for r in doc["bytes"]:
        direct = (" (d={} measured: {} / {})".format(r["star_direct_d"], mib(r["star_direct"]["received"]),
                                                    mib(r["sharded_direct"]["received"])) if "star_direct" in r else "")
        rows.append([f"{r['k']:,}", str(r["shards"]), mib(r["star"]["received"]), mib(r["sharded"]["received"]),
                     mib(r["sharded"]["coordinator_received"]), f"{r['busiest_ratio']:.1f}x" + direct])
    trows = [[f"{t['k']:,}", f"{t['n']:,} x {t['d']}", str(t["iterations"]),
              f"{t['seconds']['star']['median'] / t['iterations'] * 1e3:.0f}",
              f"{t['seconds']['sharded']['median'] / t['iterations'] * 1e3:.0f}",
              f"{t['sharded_over_star']:.2f}", "yes" if t["same_centroids"] else "NO"] for t in doc["timing"]]
    return ("## Distributed k-means: the reduction (issue #14)\n\n"
            f"Bytes received per Lloyd iteration by the busiest process, d = {doc['target_d']} "
            "(`benchmarks/bench_reduction.py`: the engine's own payload accounting over in-process shards, measured "
            "at d = 8 and 16 and extended along its exact affine law in d; the bracket gives direct measurements "
            "at the d named, star / sharded). Star: every shard's sums to the coordinator. Sharded: a reduce-scatter "
            "among the shards; the coordinator gets only the k counts.\n\n"
            + _table(["k", "shards", "star: busiest MiB", "sharded: busiest MiB", "sharded: coordinator MiB",
                      "star / sharded"], rows)
            + "\n\nSeconds per iteration on Ray actors (3 shards on this host), interleaved:\n\n"
            + _table(["k", "points", "iterations", "star ms/it", "sharded ms/it", "sharded / star time",
                      "same centroids"], trows) + "\n" + _two_level_rows(doc.get("two_level") or []))


def _two_level_rows(rows: list[dict]) -> str:
    if not rows:
        return ""
    body = [[f"{r['k']:,}", f"{r['n']:,} x {r['d']}", str(r["super_k"]), _f(r["seconds"]["flat"]["median"]),
             _f(r["seconds"]["two_level"]["median"]), f"{r['speedup']:.1f}x", f"{r['objective_ratio']:.3f}",
             f"{r['nmi_between']:.3f}"] for r in rows]
    return ("\nTwo-level k-means (`cluster.hierarchical`: sqrt(k) super clusters, then k-means within each) against "
            "the flat k-means on the same points, in-process shards, interleaved. Objective ratio: two-level / "
            "flat sum of squared distances (lower is better).\n\n"
            + _table(["k", "points", "super clusters", "flat s", "two-level s", "speed-up", "objective ratio",
                      "NMI between"], body) + "\n")


def _sec_features(doc: dict, img: str) -> str:
    c = doc["config"]
    rows = [[f"`{n}`", _f(r["images_per_s"]), f"{_f(r['images_per_s_iqr'][0])}–{_f(r['images_per_s_iqr'][1])}",
             _f(r["seconds"]["median"]), _x(r["ratio_vs_plain"])] for n, r in doc["results"].items()]
    s = (f"## Feature extraction\n\n{c['images']:,} MNIST images in {c['shard_files']} shard file(s), batch {c['batch_size']}, "
         f"{c['repeats']} repeats. Pool: {c['pool']}. Plain: {c['plain']}.\n\n"
         + _table(["path", "images/s", "IQR images/s", "s per pass", "vs plain"], rows) + "\n")
    cal = doc.get("calibration") or {}
    if cal:
        s += "\nFixed cost per `extract_features` call (a run over 64 images) and steady-state rate:\n\n" + _table(
            ["pool", "fixed s", "steady images/s", "steady vs plain"],
            [[f"`{n}`", _f(v["fixed_cost_s"]), _f(v["steady_images_per_s"]), _x(v.get("steady_ratio_vs_plain"))]
             for n, v in cal.items()]) + "\n"
    prof = {n: r["profile"] for n, r in doc["results"].items() if r.get("profile")}
    if prof:
        s += ("\nWhere a persistent pass's time goes (medians; the actors' own clocks, `FeatureWorker.pass_clock`, per "
              "actor): wall is the driver's, busy the actor inside its `run` calls, embed the network forward, decode the "
              "images, read the Parquet row groups; idle = 1 - busy / (actors x wall), the pool's own overhead.\n\n"
              + _table(["pool", "wall s", "busy s / actor", "embed s / actor", "decode s / actor", "read s / actor",
                        "idle", "plain loop s", "embed / plain"],
                       [[f"`{n}`", _f(v["wall_s"]), _f(v["busy_s"] / int(n.rsplit("c", 1)[1])),
                         _f(v["embed_s"] / int(n.rsplit("c", 1)[1])), _f(v["decode_s"] / int(n.rsplit("c", 1)[1])),
                         _f(v["read_s"] / int(n.rsplit("c", 1)[1])), _pct(v["idle_share"]), _f(v["plain_loop_s"]),
                         _x(v["embed_vs_plain"])] for n, v in prof.items()]) + "\n")
    fp = doc.get("persistent_first_pass_s") or {}
    if fp:
        s += ("\nPersistent pool, first pass (actor start-up included, paid once per run): "
              + ", ".join(f"`{k}` {_f(v)} s" for k, v in fp.items()) + ".\n")
    s += (f"\nOutput blocks per call: {doc.get('output_blocks')}. Max |feature difference| vs plain: Ray Data pool "
          f"{_f(doc.get('max_abs_feature_diff_pool_vs_plain'))}, persistent pool "
          f"{_f(doc.get('max_abs_feature_diff_persistent_vs_plain'))}.\n\n![features]({img})\n")
    return s


def _sec_train(doc: dict, img: str, title: str = "Training") -> str:
    c = doc["config"]
    rows = []
    for n, r in doc["results"].items():
        ips = r["images_per_s"]
        rows.append([f"`{n}`", r.get("data_cache", "—"), _f(ips["median"]), f"{_f(ips['q1'])}–{_f(ips['q3'])}",
                     _f(r["seconds_per_pass"]["median"]), _x(r["ratio_vs_plain"]), _f(r.get("fit_startup_s")),
                     _f(r.get("loop_setup_s"))])
    return (f"## {title}\n\n{c['images']:,} MNIST images per pass, batch {c['batch_size']} per worker, "
            f"{c['passes']} passes per fit (first = warm-up, not counted). Ray side: {c['ray_side']}. Plain side: "
            f"{c['plain_side']}.\n\n"
            + _table(["path", "data.cache", "images/s", "IQR", "s per pass", "vs plain", "fit start-up s",
                      "loop setup s"], rows)
            + f"\n\n![{title}]({img})\n")


def _sec_epoch(doc: dict, img: str) -> str:
    c = doc["config"]
    rows = []
    for e in doc["phases"]["epochs"]:
        s, sh = e["seconds"], e["share"]
        rows.append([e["epoch"], _f(e["time_round"])] + [f"{_f(s[p])} ({_pct(sh[p])})" for p in
                                                          ("time_features", "time_pca", "time_kmeans", "time_train", "other")]
                    + [_pct(sh["clustering_step"]), _f(e.get("images_per_s_train")), _f(e.get("images_per_s_features"))])
    ms = doc["phases"]["median_share"]
    fin = doc.get("final_clustering", {})
    clocks = [[e["epoch"], _f(e["seconds"]["time_features"])] + [_f(e["features_clock"].get(k)) for k in
                                                                   ("pool", "load", "busy_s", "embed_s", "decode_s", "read_s")]
              for e in doc["phases"]["epochs"] if e.get("features_clock")]
    profile = ("\n\nInside the features phase (the round row's `features_clock`, seconds): the driver waiting for the pool's "
               "pieces, the shard actors loading the blocks, and the pool actor's own busy / embed / decode / read time. "
               "Round 0's features phase also starts the coordinator, the shard actors and the pool's actor (the "
               "difference to pool + load).\n\n"
               + _table(["epoch", "features s", "pool", "load", "busy", "embed", "decode", "read"], clocks)
               if clocks else "")
    return (f"## DeepCluster epoch breakdown\n\n`{c['method']}` with {c['base_config']} on {c['images']:,} MNIST images, "
            f"{c['epochs']} epochs, batch {c['batch_size']}, k={c['k']}; phases from the run's metrics.jsonl.\n\n"
            + _table(["epoch", "s", "features", "PCA", "k-means", "train", "other", "clustering step", "train img/s",
                      "features img/s"], rows)
            + profile
            + f"\n\nMedian shares: k-means {_pct(ms['time_kmeans'])}, PCA + k-means {_pct(ms['pca_plus_kmeans'])}, "
              f"features + PCA + k-means {_pct(ms['clustering_step'])}, training {_pct(ms['time_train'])}. Whole run "
              f"{_f(doc['run_wall_s'])} s, of which {_f(doc['fixed_s'])} s outside the epochs (Ray Train start-up, "
              f"closing clustering {_f(fin.get('time_round'))} s, report). Final clustering: ACC {_f(fin.get('acc'))}, "
              f"NMI {_f(fin.get('nmi'))}.\n\n![epoch]({img})\n")


def _sec_pca(doc: dict) -> str:
    c = doc["config"]
    fit, app = doc["fit_seconds"], doc["apply_seconds"]
    rows = [[f"`{n}`", _f(fit[n]["median"]), _f(fit[n]["iqr"]), _f(app[n]["median"]) if n in app else "—",
             _x(doc["fit_speedup_vs_sklearn"][n]), _x(doc["fit_speedup_vs_faiss"][n]),
             _f(doc["eigenvalue_max_rel_error_lead"].get(n))] for n in fit]
    agr = [[f"`{n}`", _f(a["max_principal_angle_deg"]), _f(a["mean_cos_principal_angles"], 6),
            _f(a["mean_abs_cos_matched_lead"], 6), _f(a["mean_abs_cos_matched_all"], 6), _f(a["whitened_scale"], 5),
            _f(a["whitened_rel_residual_lead"]), _f(a["whitened_rel_residual_all"])]
           for n, a in doc["agreement_vs_raydc"].items()]
    return (f"## PCA (whitening)\n\nN={c['n']:,}, d={c['d']} → {c['out']}, {c['shards']} shards, {c['repeats']} repeats. "
            f"Data: {c['data']}. sklearn solver: {c['sklearn_svd_solver']}; faiss trains on "
            f"min(N, 1000·d) = {c['faiss_rows_used']:,} rows.\n\n"
            + _table(["method", "fit s", "IQR", "project all rows s", "fit vs sklearn", "fit vs faiss",
                      f"max rel. eigenvalue error (lead {c['lead_axes']})"], rows)
            + "\n\nAgreement with raydc's sharded PCA (angles in degrees; whitened outputs compared after one global "
              "scale and a sign per axis):\n\n"
            + _table(["vs raydc", "max principal angle", "mean cos (principal angles)", f"mean abs cos matched (lead {c['lead_axes']})",
                      "mean abs cos matched (all)", "scale", f"rel. residual (lead {c['lead_axes']})", "rel. residual (all)"], agr)
            + "\n\nfaiss's whitened output is smaller by sqrt(N) (it whitens with the eigenvalues of the unnormalised "
              "scatter matrix); sklearn's by sqrt(N/(N-1)) (sample covariance). Both vanish in the L2 normalisation "
              "DeepCluster applies next.\n")


def _sec_quality(doc: dict, img: str | None) -> str:
    rows = []
    for n, r in doc["runs"].items():
        lr = r.get("last_row", {})
        rc = r.get("recomputed") or {}
        ae = r.get("ae_kmeans") or {}
        status = r["status"] + (" (earlier results; run dir gone)" if r.get("kept_from_earlier_results") else "")
        rows.append([f"`runs/{n}`", r["method"], r["data"], status, lr.get("epoch", "—"), _f(lr.get("acc")),
                     _f(lr.get("nmi")), _f(rc.get("nmi_geometric")), _f(lr.get("ari")),
                     _f((r.get("wall_s_rounds") or 0) / 60.0) if r.get("wall_s_rounds") else "—",
                     ", ".join(f"{k[10:]} {_f(v)}" for k, v in ae.items() if isinstance(v, (int, float))) or "—"])
    pub = [[p["method"], p["data"], _f(p.get("acc")), _f(p.get("nmi")) + (f" (untrained {p['nmi_init']})" if p.get("nmi_init") else ""),
            p["nmi_norm"], p["source"], f"`runs/{p['compare_with']}`" if p.get("compare_with") else "—"]
           for p in doc["published"]]
    s = ("## Clustering quality\n\nraydc's NMI is " + doc["nmi_normalisation"]["raydc"] + "; the 2016-2018 papers used "
         + doc["nmi_normalisation"]["papers_2016_2018"] + ". Where a run finished, NMI is recomputed from "
         "assignments.parquet with both. Wall time is the sum of the rounds' own seconds (Ray start-up and the "
         "gaps between a stop and a resume excluded). Runs not found are listed as missing (launch them with "
         "`python -m benchmarks.run --full --only quality --run-quality`).\n\n"
         + _table(["run", "method", "data", "status", "epoch", "ACC", "NMI (arith.)", "NMI (geom.)", "ARI", "wall (min)", "DEC: AE+k-means"], rows)
         + "\n\nPublished numbers (DESIGN.md):\n\n"
         + _table(["method", "data", "ACC", "NMI", "NMI norm.", "source", "compare with"], pub) + "\n")
    if img:
        s += f"\n![curves]({img})\n"
    return s


def _mean_std(values: list[float]) -> dict:
    import statistics

    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0}


def _pm(stat: dict | None) -> str:
    return "—" if not stat else f"{stat['mean']:.3f} ± {stat['std']:.3f}"


def _sec_ablations(doc: dict) -> str:
    if "results" not in doc:
        return ""
    rows = [[f"`{n}`", r["what"], _f(r.get("first_acc")), _f(r.get("acc")), _f(r.get("nmi")),
             _f(r.get("nmi_prev")), _f(r.get("train_k_acc_majority") or r.get("acc_majority")),
             " ".join(f"{a:.2f}" for a in r.get("curve_acc", [])), _f(r["seconds"] / 60)]
            for n, r in doc["results"].items()]
    return ("## DeepCluster ablations\n\n" + doc["setting"] + "; the final round of each run (never a best round), "
            "beside its first clustering (round 0, the untrained network). Base overrides: `"
            + " ".join(doc["base"]) + "`.\n\n"
            + _table(["run", "what changes", "ACC round 0", "ACC final", "NMI final", "NMI(t-1,t)",
                      "majority ACC (training k)", "ACC by round", "min"], rows) + "\n")


def _sec_seeds(doc: dict, title: str = "Quality over seeds") -> str:
    if "settings" not in doc:
        return ""
    rows = []
    for n, s in doc["settings"].items():
        m = s["summary"]
        acc = [r.get("acc") for r in s["runs"] if r.get("acc") is not None]
        rows.append([f"`{n}`", s["method"], s["data"], ", ".join(map(str, s.get("seeds", doc["seeds"]))),
                     _pm(m.get("acc")), _f(min(acc)) if acc else "—", _pm(m.get("nmi")), _pm(m.get("ari")),
                     _pm(m.get("first_acc")), _pm(m.get("nmi_prev")),
                     _pm(m.get("ae_kmeans_acc")) if m.get("ae_kmeans_acc") else "—",
                     " / ".join(_f(r.get("acc")) for r in s["runs"]), _f(m["seconds"]["mean"] / 60)])
    return (f"## {title}\n\n`train.seed` drives the weights, k-means, shuffles and crops; mean ± sample std of "
            "the final rounds, and the lowest.\n\n"
            + _table(["setting", "method", "data", "seeds", "ACC", "min ACC", "NMI", "ARI", "first ACC",
                      "NMI(t-1,t)", "DEC: AE+k-means ACC", "ACC per seed", "minutes per run"], rows) + "\n")


def _sec_probes(doc: dict) -> str:
    if "runs" not in doc:
        return ""
    rows = []
    for n, r in doc["runs"].items():
        knn, lin = r["probes"].get("knn", {}), r["probes"].get("linear", {})
        rows.append([f"`{n}`", r["label"], knn.get("arch", "—"), _f(knn.get("knn_top1_k20")),
                     _f(knn.get("knn_top1_k200")), _f(lin.get("linear_top1")), _f(r["final"].get("acc")),
                     _f(r["final"].get("nmi")), _f(knn.get("time_features"))])
    note = ""
    runs = doc["runs"]
    if "deepcluster" in runs and "untrained" in runs:
        def top(name: str, probe: str, key: str):
            return runs[name]["probes"].get(probe, {}).get(key)

        dk = top("deepcluster", "knn", "knn_top1_k20") - top("untrained", "knn", "knn_top1_k20")
        dl = top("deepcluster", "linear", "linear_top1") - top("untrained", "linear", "linear_top1")
        note = (f"\n\nTrained minus untrained: k-NN (k=20) {dk:+.3f}, linear {dl:+.3f}"
                + (": at this size training did not improve the features for k-NN." if dk < 0 else ".")
                + f" Load average {doc['load_average']['before'][0]:.0f}–{doc['load_average']['after'][0]:.0f} "
                  f"on 2 cores during these runs: the seconds are not comparable with other sections.")
    return ("## Feature probes (issue #31)\n\n" + doc["data"] + ". `raydc evaluate --probe`: weighted k-NN (cosine, "
            "votes exp(s / 0.07)) and a logistic regression on standardised features, top-1 accuracy on the "
            "test images; ACC/NMI are the run's own final clustering of its training images. Produced by "
            "`python -m benchmarks.run --full --only probes` (`benchmarks/bench_probes.py`)." + note + "\n\n"
            + _table(["run", "network", "arch", "k-NN k=20", "k-NN k=200", "linear", "clustering ACC",
                      "clustering NMI", "feature pass s"], rows) + "\n")


def _sec_probe_table(doc: dict) -> str:
    rows = []
    for r in doc["runs"]:
        knn, lin = r["probes"].get("knn", {}), r["probes"].get("linear", {})
        rows.append([r["label"], r["method"], r["arch"], r["trained_on"], f"{r['train_split']} → {r['test_split']}",
                     _f(knn.get("knn_top1_k20")), _f(knn.get("knn_top1_k200")), _f(lin.get("linear_top1")),
                     _f(r["final"].get("acc")), _f(r["final"].get("nmi")), r["commit"]])
    return ("## Feature probes of the shipped configs' networks (issue #31)\n\nEach row is a finished run "
            "directory, probed with `raydc evaluate --probe both`: a weighted k-NN (cosine, votes exp(s / 0.07), "
            "k = 20 and 200) and a logistic regression on standardised features, fit on the labelled train split, "
            "top-1 accuracy on the test split. \"trained on\" is what the network saw without labels (a run on "
            "all 70,000 images has seen the test images, as the clustering papers' runs have); ACC/NMI are the "
            "run's own final clustering of those images. Collected by `python -m benchmarks.probe_table` "
            "(results/probe_table.json) from runs trained in worktrees pinned to the commit shown.\n\n"
            + _table(["run", "method", "arch", "trained on", "probe split", "k-NN k=20", "k-NN k=200", "linear",
                      "clustering ACC", "clustering NMI", "commit"], rows) + "\n")


def _sec_time_to_quality(d: dict) -> str:
    """Minutes to the final round of each shipped 70k config, with its final ACC, beside what a user might try
    first (scikit-learn's k-means, UMAP + k-means, on the raw pixels). Each row says its file and machine."""
    import statistics

    def minutes(values: list[float]) -> str:
        values = [v / 60 for v in values]
        return _f(values[0]) if len(values) == 1 else (f"{_f(statistics.median(values))} "
                                                       f"({_f(min(values))}–{_f(max(values))})")

    def accs(values: list[float]) -> str:
        if len(values) == 1:
            return _f(values[0])
        return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f} (min {min(values):.3f})"

    def machine(doc: dict) -> str:
        m = doc.get("machine")
        return (m.get("cpu_model", "") if isinstance(m, dict) else str(m or "")) or "—"

    rows = []
    for bench in ("seeds70k", "demo"):
        for name, s in (d.get(bench) or {}).get("settings", {}).items():
            runs = s["runs"]
            sets = "".join(f" `{x}`" for x in s.get("sets", []))
            rows.append([f"`{s['config']}`{sets}", s["method"], s["data"], str(len(runs)),
                         minutes([r["seconds"] for r in runs]), accs([r["acc"] for r in runs]),
                         f"{bench}.json ({machine(d[bench])})"])
    for key in ("dec_mnist", "dec_fmnist"):  # runs of an earlier commit, read back by the quality benchmark
        r = (d.get("quality") or {}).get("runs", {}).get(key)
        if r and r.get("status") == "finished" and r.get("wall_s_rounds"):
            rows.append([f"`{r['dir']}` (earlier run)", r["method"], r["data"], "1", minutes([r["wall_s_rounds"]]),
                         _f(r["last_row"]["acc"]), f"quality.json ({machine(d['quality'])})"])
    for r in (d.get("dac_ab") or {}).get("runs", []):
        if r["label"].startswith("70k") and r.get("rounds") == 20:
            rows.append(["`dac_mnist.yaml`", "DAC", "MNIST, 70,000 images, k = 10, 20 rounds", "1",
                         minutes([r["wall_s_rounds"]]) + " (cores shared)", _f(r["acc_by_round"][-1]),
                         f"dac_ab.json ({machine(d['dac_ab'])})"])
    for r in (d.get("confusion") or {}).get("runs", []):  # a shipped config's full run, collected with --config
        if r.get("config") and r.get("wall_s_rounds"):
            rows.append([f"`{r['config']}`", {"dec": "DEC", "dac": "DAC"}.get(r["method"], r["method"]), r["label"],
                         "1", minutes([r["wall_s_rounds"]]), _f(r["final"]["acc"]),
                         f"confusion.json ({machine(d['confusion'])})"])
    base = d.get("baselines")
    for data, v in (base or {}).get("data", {}).items():
        for name, what in (("sklearn_kmeans", "scikit-learn k-means, raw pixels"),
                           ("umap_kmeans", "UMAP + k-means, raw pixels")):
            runs = v["runs"][name]
            rows.append(["—", what, f"{data}, k = {base['k']}", str(len(runs)), minutes([r["seconds"] for r in runs]),
                         accs([r["acc"] for r in runs]), f"baselines.json ({machine(base)})"])
    if not rows:
        return ""
    return ("## Time to quality (issue #27)\n\nMinutes of a run's rounds, from its first round to its final row "
            "(the sum of `time_round` in metrics.jsonl: Ray's start and the fit's start-up, about half a minute, "
            "are not in it; a re-read final step counts once), median and range over seeds, and the final round's ACC (mean ± std and the minimum "
            "over seeds). The baselines run on the same images in one process (`benchmarks/baselines.py`). "
            "Rows come from different files and machines, named in the last column: compare minutes within a "
            "machine. \"cores shared\": other jobs ran beside that run, so its minutes are an upper bound.\n\n"
            + _table(["config", "method", "data", "runs", "minutes", "final ACC", "from"], rows) + "\n")


def _sec_manifold_readout(doc: dict) -> str:
    """Readouts of the same final features, per run, and their mean +- std and minimum over a data set's runs."""
    import statistics

    names = list(doc["runs"][0]["readouts"]) if doc["runs"] else []
    rows = [[r["label"], _f(r["shipped"]["acc"]), _f(r["shipped"].get("train_k_acc_majority")),
             *[_f(r["readouts"][n]["acc"]) for n in names], r["commit"]] for r in doc["runs"]]
    for data in dict.fromkeys(r["label"].split(",")[0] for r in doc["runs"]):
        runs = [r for r in doc["runs"] if r["label"].split(",")[0] == data]

        def stat(values: list) -> str:
            values = [v for v in values if v is not None]
            sd = statistics.stdev(values) if len(values) > 1 else 0.0
            return f"{statistics.fmean(values):.3f} ± {sd:.3f} (min {min(values):.3f})" if values else "—"
        rows.append([f"**{data}, {len(runs)} run{'s' if len(runs) > 1 else ''}**", stat([r["shipped"]["acc"] for r in runs]),
                     stat([r["shipped"].get("train_k_acc_majority") for r in runs]),
                     *[stat([r["readouts"][n]["acc"] for r in runs]) for n in names], ""])
    return ("## DeepCluster's readout on the same final features (issue #30)\n\nEach finished run's final network "
            "embeds every image once (`raydc embed`); the readouts below cluster those features without labels "
            f"(`benchmarks/manifold_readout.py`: UMAP to 10 dimensions on a {doc['sample']:,}-image sample, a "
            "Gaussian mixture or k-means there, the other images placed by a vote of their 10 nearest sample "
            "images; and k-means at the delivered k). \"shipped\" is the run's own final ACC (the k-NN-graph "
            "merge of its 100 trained clusters); \"majority at k=100\" is the best any merge of those clusters "
            "could do. ACC only scores.\n\n"
            + _table(["run", "shipped", "majority at k=100", *names, "commit"], rows) + "\n")


def _sec_readout_knn(doc: dict) -> str:
    import statistics

    rows, by_data = [], {}
    for r in doc["runs"]:
        a, b = r["nndescent"], r["exact"]
        rows.append([r["label"], _f(a["seconds"]), _f(b["seconds"]), f"**{_x(a['seconds'] / b['seconds'])}**",
                     _f(a["acc"]), _f(b["acc"]), f"{b['acc'] - a['acc']:+.3f}"])
        by_data.setdefault(r["label"].split(",")[0], []).append(r)
    for data, rs in by_data.items():
        if len(rs) > 1:
            def ms(v: str) -> str:
                xs = [x[v]["acc"] for x in rs]
                return f"{statistics.fmean(xs):.3f} ± {statistics.stdev(xs):.3f} (min {min(xs):.3f})"
            rows.append([f"**{data}, {len(rs)} runs**", "", "", "", ms("nndescent"), ms("exact"), ""])
    c = doc["config"]
    return ("## The readout's neighbour graph: NN-descent or exact (issue #27)\n\n"
            f"The same sample of {c['sample']:,} images of each run's final features, read out twice with every seed "
            f"fixed: UMAP ({c['umap']}) on the neighbour graph of its own NN-descent (pynndescent: what raydc's "
            "readout uses), or on the exact one computed with faiss and handed to UMAP as `precomputed_knn`; then "
            f"the mixture ({c['mixture']}) and the vote of each image's {c['vote']} nearest sample "
            f"images. Seconds: {c['seconds']} (`benchmarks/readout_knn.py`). ACC only scores. The exact graph is "
            "not shipped: where its ACC falls on every run of a dataset, the seconds it saves are not worth it.\n\n"
            + _table(["run", "NN-descent s", "exact s", "speed-up", "NN-descent ACC", "exact ACC", "change"], rows)
            + "\n")


def _sec_readout_restarts(doc: dict) -> str:
    """The umap readout over its own seeds on each run's fixed features, and which restart each label-free score
    would keep (ACC only scores)."""
    import statistics

    rows = []
    for r in doc["runs"]:
        rs = r["restarts"]
        acc = [x["acc"] for x in rs]

        def kept(score: str) -> str:
            return _f(max(rs, key=lambda x: x[score])["acc"])
        rows.append([r["label"], " / ".join(_f(a) for a in acc),
                     f"{statistics.fmean(acc):.3f} ± {statistics.stdev(acc):.3f}" if len(acc) > 1 else _f(acc[0]),
                     f"{max(acc) - min(acc):.4f}", kept("consensus"), kept("silhouette"), kept("log_likelihood")])
    return ("## The umap readout over its own seeds (issue #30)\n\nEach run's final features (`raydc embed`), one "
            f"uniform sample of {doc['sample']:,} images, then the readout restarted with UMAP and mixture seeds "
            "0, 1, ... on that sample (`benchmarks/readout_restarts.py`). The last three columns are the ACC of the "
            "restart each label-free score would keep: the most agreed with the others (mean ARI: what "
            "`deepcluster.final_umap_restarts` keeps), the highest silhouette in feature space, the highest "
            "mixture likelihood.\n\n"
            + _table(["run", "ACC per restart", "mean ± std", "range", "kept by agreement", "by silhouette",
                      "by likelihood"], rows) + "\n")


def _sec_sweep_table(doc: dict) -> str:
    """Each collected sweep: its trials, the label-free pick, and ACC beside it (evaluation only)."""
    parts = ["## Sweeps: the label-free pick (issue #30)\n\nEach table is a finished `raydc sweep`, collected by "
             "`python -m benchmarks.sweep_table` (results/sweep_table.json) from a worktree pinned to the commit "
             "shown. The winner is chosen by the selection metric alone; ACC/NMI are read afterwards from the "
             "shards' labels, and the Spearman correlation says how well the metric ranks the trials by ACC.\n"]
    for s in doc["sweeps"]:
        metric = s["selection"].split(": ", 1)[-1].split(" ")[0]
        names = list(s["trials"][0]["params"]) if s["trials"] else []
        # DEC's scores of k beside the one selected on, where the trials measured them
        others = [m for m in ("ae_kmeans_stability", "ae_manifold_silhouette")
                  if m != metric and any(m in t for t in s["trials"])]
        rows = [[*[str(t["params"][n]).removesuffix(".0") for n in names], _f(t.get(metric)),
                 *[_f(t.get(m)) for m in others],
                 _f(t.get("silhouette")), _f(t.get("acc")), _f(t.get("nmi")), t["status"],
                 _f((t.get("wall_s") or 0) / 60), "**picked**" if t["trial_id"] == s["best"] else ""]
                for t in s["trials"]]
        lab = s.get("labels") or {}
        rho = lab.get("spearman_with_selection")
        acc_pick = ", ".join(f"{k}={v}" for k, v in (lab.get("label_best_params") or {}).items())
        parts.append(f"### {s['label']} (commit {s['commit']})\n\n{s['selection']}: picked "
                     + ", ".join(f"{k}={v}" for k, v in (s["best_params"] or {}).items())
                     + (f"; ACC would pick {acc_pick}" if acc_pick else "")
                     + (f"; Spearman(metric, ACC) over {lab.get('trials')} trials = {rho:+.2f}" if rho is not None
                        else "") + ".\n\n"
                     + _table([*names, metric, *others, "silhouette", "ACC", "NMI", "status", "min", ""], rows)
                     + "\n")
    return "\n".join(parts)


def _sec_scale(doc: dict, img: str) -> str:
    if "points" not in doc:
        return ""
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    rows = []
    for p in doc["points"]:
        t = p.get("kmeans_bytes_per_iteration") or {}
        rows.append([f"{p['n']:,}"] + [f"{mib(p[r + '_peak_anon'])} ({mib(p[r + '_peak_rss'])})"
                                       for r in ("driver", "rank0", "coordinator")]
                    + [" / ".join(f"{mib(a)} ({mib(r)})" for a, r in zip(p["shard_peak_anon"], p["shard_peak_rss"])),
                       f"{t.get('received', 0):,} in, {t.get('centroids_out', 0):,} out", _f(p["seconds"] / 60)])
    sl = doc["loglog_slopes"]
    per = doc["shard_bytes_per_image"]
    growth = doc.get("bytes_per_image", {})
    if doc.get("frozen"):
        head = ("## Memory against N, frozen-feature path (issue #31)\n\n"
                "The same round with `train.epochs 0`: no training, one feature pass of the network as built, PCA, "
                f"the distributed k-means, the final assignment and report, on the same synthetic {doc['side']}x"
                f"{doc['side']} images and {doc['shards']} shard actors (`benchmarks/bench_scale_frozen.py`). Peak")
    else:
        head = ("## Memory against N (issue #12)\n\n"
                f"One DeepCluster round on synthetic {doc['side']}x{doc['side']} images, {doc['shards']} shard actors "
                "(`benchmarks/bench_scale.py`). Peak")
    return (head + " private memory (RssAnon, sampled) in MiB, with the peak resident "
            "set (VmHWM, which also counts the object store's shared pages a process has read) in brackets. "
            "Log-log slopes against N (0 = flat, 1 = linear): "
            + ", ".join(f"{k.replace('_peak', '')} {v:.2f}" for k, v in sl.items())
            + ". Growth per image from the smallest to the largest N: "
            + ", ".join(f"{k.replace('_peak', '')} {v:.1f} B" for k, v in growth.items())
            + f"; a shard actor's private memory grows by {per:.0f} bytes per image it holds.\n\n"
            + _table(["N", "driver", "rank 0", "coordinator", "shard actors", "k-means bytes per iteration",
                      "min"], rows) + f"\n\n![memory]({img})\n\n"
            + ("" if doc.get("frozen") else _scale_projection(doc)) + "\n")


def _scale_projection(doc: dict) -> str:
    """10^9 images on 64 nodes (one shard actor each), from the measured per-image growth."""
    big = doc["points"][-1]
    base = max(doc["points"][0]["shard_peak_anon"])
    per = doc["shard_bytes_per_image"]
    n, nodes = 10**9, 64
    shard_gb = (base + per * n / nodes) / 2**30
    k, d = 10_000, 256
    star_gb = nodes * (k * d * 8 + k * 8) / 2**30
    g = doc.get("bytes_per_image", {})
    return (f"**Projection to 10^9 images on 64 nodes.** A shard actor's private memory was "
            f"{base / 2**20:.0f} MiB at the smallest N plus {per:.0f} bytes per image it holds (features at the "
            f"configured PCA width, row, id, label, the round's columns and the temporaries of the pair counts), so "
            f"one shard per node holding {n // nodes:,} images needs about {shard_gb:.1f} GiB at this feature width "
            f"(add 4 bytes per image per PCA dimension beyond {doc.get('pca_dim', 8)}). The coordinator's private "
            f"memory grew {g.get('coordinator_peak_anon', float('nan')):.1f} B per image and rank 0's "
            f"{g.get('rank0_peak_anon', float('nan')):.1f} B per image from {doc['points'][0]['n']:,} to "
            f"{big['n']:,} images (noise-level: flat), while their resident sets grow with the object-store "
            f"pages they read, which are bounded by the store, not by N. The driver's private memory grew "
            f"{g.get('driver_peak_anon', float('nan')):.1f} B per image over the same range: the report and "
            f"`raydc evaluate` read the assignment parts one 2^16-row group at a time and the shards for the "
            f"montage one file at a time, so what they hold is bounded by those sizes (and `data.rows_per_shard`), "
            f"not by N; before that change (parts in 2^20-row groups, pyarrow's default read-ahead) the driver grew "
            f"48 B per image over the same range. What grows with the cluster is the k-means reduction if it is "
            f"the star (`cluster.reduction: star`): each Lloyd iteration brings every shard's k x d float64 sums "
            f"to the coordinator, {star_gb:.1f} GiB per iteration for k = {k:,}, d = {d} over {nodes} shards. The "
            f"sharded reduction (chosen by `auto` above `cluster.star_max_mb`) bounds what any process receives "
            f"by about 12 k d bytes per iteration at any number of shards (see the reduction section).")


def _sec_confusion(doc: dict) -> str:
    """What each finished run's final clusters get wrong: the largest groups of a class in another class's
    cluster, and the classes that keep less than half of their images in their own cluster."""
    rows = []
    for r in doc["runs"]:
        n = r["n"]
        worst = "; ".join(f"{m['images']:,} {m['class']} in {m['in_cluster_of']}'s ({100 * m['share_of_all']:.1f} %)"
                          for m in r["largest_misplaced"][:3])
        weak = ", ".join(f"{c} {v:.2f}" for c, v in r["class_share_in_own_cluster"].items() if v < 0.5) or "none"
        rows.append([r["label"], f"{n:,}", _f(r["acc"]), worst, weak, r["commit"]])
    return "\n".join([
        "## What the final clusters confuse (issues #26, #30)", "",
        "Each finished run's final clusters against the labels, matched one to one as ACC matches them "
        "(`python -m benchmarks.confusion`, results/confusion.json, which also holds every class-by-cluster count). "
        "\"X in Y's\": images of class X in the cluster matched to class Y, and their share of all images.", "",
        _table(["run", "images", "ACC", "largest misplaced groups", "classes with under half in their own cluster",
                "commit"], rows), ""])


def _sec_dec_readout(doc: dict) -> str:
    """DEC's finished runs by what they deliver: the autoencoder's k-means start, DEC's argmax q, and the readout
    the run delivered (argmax q, or UMAP + mixture on z: N2D when no DEC step ran)."""
    rows = []
    for r in doc["runs"]:
        f = r.get("final") or {}
        if r.get("method") != "dec" or "ae_kmeans_acc" not in f:
            continue
        readout = f.get("readout", "q")
        q_acc = f.get("dec_acc", f.get("acc"))  # argmax q's, kept apart only when another readout delivered
        rows.append([r["label"], _f(f["ae_kmeans_acc"]), _f(q_acc),
                     "UMAP + mixture (dec.readout umap)" if readout == "umap" else "argmax q (the paper)",
                     _f(f.get("acc")), _f(f.get("nmi")), _f(r["wall_s_rounds"] / 60), r["commit"]])
    if not rows:
        return ""
    return "\n".join([
        "## DEC's readout: argmax q or UMAP + mixture (issue #30)", "",
        "Finished DEC runs on all 70,000 images, one seed each. \"AE + k-means\" is the k-means start on the "
        "pretrained autoencoder's embedding; \"argmax q\" what DEC's own clusters score (the k-means start itself "
        "when the run made no DEC step, `dec.max_iterations 0`); the delivered ACC is the readout's. UMAP + mixture "
        "on an autoencoder with no DEC step is N2D (McConville et al. 2020). Minutes are the sum of the run's rounds: a "
        "run that started from an earlier run's autoencoder (`model.weights`) does not count that pretraining; a "
        "finished run re-read with another readout (`--resume --set dec.readout=umap`, on a copy) counts its "
        "rounds and the re-read. From results/confusion.json "
        "(`python -m benchmarks.confusion`).", "",
        _table(["run", "AE + k-means ACC", "argmax q ACC", "delivered by", "delivered ACC", "NMI",
                "minutes in rounds", "commit"], rows), ""])


def _sec_dac_ab(doc: dict) -> str:
    """DAC's one-change comparisons after the first round, where raydc and the reference part first."""
    rows = [[f"`{r['label']}`", r["commit"], _f(r["acc"]), _f(r["nmi"]), _f(r["ari"]),
             " → ".join(_f(a) for a in r.get("acc_by_round", [])[1:]) if len(r.get("acc_by_round", [])) > 2 else "",
             _f(r["wall_s_rounds"] / 60) if r.get("wall_s_rounds") else "—"]
            for r in doc["runs"]]
    return "\n".join([
        "## DAC: what the first round depends on (issue #26)", "",
        f"{doc['what']}; each run changes one thing against `jobs/configs/dac_mnist.yaml` (the reference's MNIST "
        "log reaches ACC 0.956 after its first epoch of 70,000 images). Produced by `python -m benchmarks.dac_ab` "
        "from the runs' own metrics and configs (results/dac_ab.json). Single runs: a run repeats exactly on the "
        "same machine and thread count, but floating-point order alone (1 torch thread instead of 2) moved the same "
        "seed and config by as much as the largest difference here, so read these as leads. Precision is not what "
        "separates raydc from the reference (float32, Theano): the float32 rows end their first round below the "
        "bf16 ones at both sizes.", "",
        _table(["run", "commit", "ACC after round 1", "NMI", "ARI", "ACC after each round (longer runs)",
                "minutes in rounds"], rows), "",
        *_dac_groups(doc)])


def _dac_groups(doc: dict) -> list[str]:
    """The same change over seeds 31-33: final ACC mean ± std and the lowest, and whether any run fell below
    an earlier round of its own (the drift issue #26 is about)."""
    if not doc.get("groups"):
        return []
    by_label = {r["label"]: r for r in doc["runs"]}
    rows = []
    for g in doc["groups"]:
        runs = [by_label[name] for name in g["runs"]]
        final = [r["acc_by_round"][-1] for r in runs]
        drop = max(max(r["acc_by_round"][1:]) - r["acc_by_round"][-1] for r in runs)
        rows.append([g["name"], " / ".join(_f(a) for a in final), _pm(_mean_std(final)), _f(min(final)),
                     _f(drop)])
    return ["Over seeds 31, 32, 33 (unless the setting names fewer) on the 10,000 test images (4 rounds: th 0.9 → "
            "0.5 by 0.1, unless the setting says 20), final rounds:", "",
            _table(["setting", "final ACC per seed", "mean ± std", "min", "largest fall from a run's best round"],
                   rows), ""]


def _sec_output_memory(export: dict | None, embed: dict | None) -> str:
    """The driver's peak memory of `raydc export` and `raydc embed` against N (issue #29): flat means neither
    holds anything O(N)."""
    lines = ["## Driver memory of the outputs: export and embed (issue #29)", "",
             "Each command runs as a subprocess per N; its peak resident set comes from the kernel (`wait4`), the "
             "peak private memory (RssAnon) is sampled from outside. MiB."]
    if export:
        lines += ["", f"`raydc export` of a synthetic finished run ({export['cpus']} CPUs; "
                  "`python -m benchmarks.bench_export_memory`, results/export_memory.json):", "",
                  _table(["N", "format", "peak RSS MiB", "seconds", "output MiB"],
                         [[f"{r['n']:,}", r["format"], f"{r['peak_rss_bytes'] / 2**20:.0f}", f"{r['seconds']:.1f}",
                           f"{r['out_bytes'] / 2**20:.1f}"] for r in export["rows"]])]
    if embed:
        lines += ["", f"`raydc embed --run RUN --data SHARDS` over synthetic 8x8 shards, the run an untrained network (train.epochs 0) clustered on "
                  f"{embed['run_images']:,} of them (`python -m benchmarks.bench_embed_memory`, "
                  "results/embed_memory.json):", "",
                  _table(["N", "peak RSS MiB", "peak private MiB", "seconds", "rows written", "dim"],
                         [[f"{r['n']:,}", f"{r['peak_rss_bytes'] / 2**20:.0f}",
                           f"{r['peak_anon_bytes'] / 2**20:.0f}", f"{r['seconds']:.1f}", f"{r['rows_out']:,}",
                           r["dim"]] for r in embed["rows"]])]
    for name, doc in (("export", export), ("embed", embed)):
        if doc and len(doc["rows"]) > 1:
            rows = doc["rows"]
            a = min(rows, key=lambda r: r["n"])
            b = max(rows, key=lambda r: r["n"])
            if b["n"] > a["n"]:
                grow = (b["peak_rss_bytes"] - a["peak_rss_bytes"]) / (b["n"] - a["n"])
                lines += ["", f"{name}: peak RSS grew {grow:.1f} bytes per image from N = {a['n']:,} to "
                          f"{b['n']:,} (load average {doc['load_average'][0]:.1f} when it ended)."]
    return "\n".join(lines) + "\n"


def render(out: Path | str = RESULTS_DIR) -> Path:
    out = Path(out).resolve()
    d = _load(out)
    md_path = BENCH_DIR / "RESULTS.md" if out == RESULTS_DIR.resolve() else out / "RESULTS.md"
    rel = (lambda name: f"results/{name}") if md_path.parent != out else (lambda name: name)
    d_b = {k: v for k, v in d.items() if k not in ("suite", "export_memory", "embed_memory", "dac_ab",
                                                   "probe_table", "sweep_table", "manifold_readout",
                                                   "baselines")}  # collected from runs: their own format
    mode = {v.get("mode") for v in d_b.values()}
    lines = ["# raydc benchmark results", ""]
    if not d_b:
        lines.append("No results yet: run `make bench-quick` or `make bench`.")
        md_path.write_text("\n".join(lines) + "\n")
        return md_path
    created = max(v.get("created", "") for v in d_b.values())
    lines += [f"Mode: {', '.join(sorted(m for m in mode if m))}; last result written {created}. "
              "Generated by `python -m benchmarks.render` from `results/*.json` (raw timings, spreads and configs "
              "are there). Numbers are medians; ratios compare implementations measured in the same run, "
              "interleaved, which is what survives the noise of a shared 2-core machine.", "",
              _machine({**d_b, **({"suite": d['suite']} if 'suite' in d else {})}), "", "## Headline ratios", ""]
    lines += [f"- {h}" for h in _headlines(d_b)]
    quality = _headline_quality(d)  # all the results: dac_ab.json's runs are not in d_b
    if quality:
        lines.append("- **Quality, final rounds**: " + "; ".join(quality) + ".")
    lines.append("")
    ttq = _sec_time_to_quality(d)
    if ttq:
        lines.append(ttq)
    goals = _goals(d_b)
    if goals:
        lines.append(goals)
    if "kmeans" in d:
        plot_kmeans(d["kmeans"], out / "kmeans.png")
        lines.append(_sec_kmeans(d["kmeans"], rel("kmeans.png")))
    if "reduction" in d:
        lines.append(_sec_reduction(d["reduction"]))
    if "precision" in d:
        lines.append(_sec_precision(d["precision"]))
    if "allocator" in d:
        lines.append(_sec_allocator(d["allocator"]))
    if "features" in d:
        plot_throughput({n: r["images_per_s"] for n, r in d["features"]["results"].items()},
                        "Feature extraction (higher is better)", out / "features.png")
        lines.append(_sec_features(d["features"], rel("features.png")))
    if "train" in d:
        plot_throughput({n: r["images_per_s"]["median"] for n, r in d["train"]["results"].items()},
                        "Training throughput (higher is better)", out / "train.png")
        lines.append(_sec_train(d["train"], rel("train.png")))
    if "dac" in d:
        plot_throughput({n: r["images_per_s"]["median"] for n, r in d["dac"]["results"].items()},
                        "DAC pairwise training throughput (higher is better)", out / "dac.png")
        lines.append(_sec_train(d["dac"], rel("dac.png"), title="DAC pairwise training"))
    if "epoch" in d:
        plot_epoch(d["epoch"], out / "epoch.png")
        lines.append(_sec_epoch(d["epoch"], rel("epoch.png")))
    if "pca" in d:
        lines.append(_sec_pca(d["pca"]))
    if "quality" in d:
        curves = {f"runs/{n}": r["curve"] for n, r in d["quality"]["runs"].items() if r.get("curve")}
        if "epoch" in d:
            curves[f"epoch benchmark ({d['epoch']['config']['images']:,} images)"] = d["epoch"].get("curves", [])
        img = rel("quality_curves.png") if plot_curves(curves, out / "quality_curves.png") else None
        lines.append(_sec_quality(d["quality"], img))
    if "ablations" in d:
        lines.append(_sec_ablations(d["ablations"]))
    if "seeds" in d:
        lines.append(_sec_seeds(d["seeds"]))
    if "seeds70k" in d:
        lines.append(_sec_seeds(d["seeds70k"], "DeepCluster's 70,000-image configs over seeds (issue #30)"))
    if "demo" in d:
        lines.append(_sec_seeds(d["demo"], "`make demo` over seeds (issue #30)"))
    if "readout" in d:
        from benchmarks.bench_readout import section

        lines.append(section(d["readout"]))
    if "scale" in d and "points" in d["scale"]:
        plot_scale(d["scale"], out / "scale.png")
        lines.append(_sec_scale(d["scale"], rel("scale.png")))
    if "scale_frozen" in d and "points" in d["scale_frozen"]:
        plot_scale(d["scale_frozen"], out / "scale_frozen.png")
        lines.append(_sec_scale(d["scale_frozen"], rel("scale_frozen.png")))
    if "probes" in d:
        lines.append(_sec_probes(d["probes"]))
    if "probe_table" in d:
        lines.append(_sec_probe_table(d["probe_table"]))
    if "manifold_readout" in d:
        lines.append(_sec_manifold_readout(d["manifold_readout"]))
    if "readout_restarts" in d:
        lines.append(_sec_readout_restarts(d["readout_restarts"]))
    if "readout_knn" in d:
        lines.append(_sec_readout_knn(d["readout_knn"]))
    if "confusion" in d:
        lines.append(_sec_confusion(d["confusion"]))
        lines.append(_sec_dec_readout(d["confusion"]))
    if "sweep_table" in d:
        lines.append(_sec_sweep_table(d["sweep_table"]))
    if "dac_ab" in d:
        lines.append(_sec_dac_ab(d["dac_ab"]))
    if "export_memory" in d or "embed_memory" in d:
        lines.append(_sec_output_memory(d.get("export_memory"), d.get("embed_memory")))
    lines.append("What these numbers mean, where raydc loses and what would fix it: see `benchmarks/README.md`.")
    md_path.write_text("\n".join(lines).rstrip() + "\n")
    return md_path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.render")
    ap.add_argument("--out", type=Path, default=RESULTS_DIR)
    args = ap.parse_args(argv)
    print(render(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
