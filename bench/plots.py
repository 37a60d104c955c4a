"""PNG plots of a run (matplotlib, Agg backend), each with the ceiling measured in the run.

    attention.png  GFLOP/s vs sequence length, one panel per sweep (B1 H12 D64 non-causal,
                   causal; B1 H32/Hkv8 D128 causal GQA): attnkit, torch SDPA, naive torch;
                   sgemm line
    decode.png     GB/s vs KV length: attnkit, torch SDPA; read-bandwidth line, the lengths
                   whose K/V is under 2x the last-level cache shaded (cache-resident)
    matmul.png     GFLOP/s vs N (square): attnkit, NumPy, torch; sgemm (peak) line
    softmax.png    GB/s per shape: attnkit, NumPy, torch; copy-bandwidth line; cache-resident
                   shapes marked

The run with the most threads gets these names; other thread counts get a `_t{n}` suffix.
"""
from __future__ import annotations

import os

COLORS = {"attnkit": "C0", "attnkit out=": "C0", "attnkit attention": "C9", "torch sdpa": "C1",
          "torch": "C1", "torch naive": "C2", "numpy": "C3"}


def _plt():
    """pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _rate(row, name):
    """A contender's rate in a row, or None."""
    t = row["timings"].get(name)
    return t["rate"] if t else None


def _series(rows, x):
    """contender -> sorted [(x(row), rate)] over rows (rows without a timing are left out)."""
    out = {}
    for r in rows:
        for name, t in r["timings"].items():
            if t.get("rate") is not None:
                out.setdefault(name, []).append((x(r), t["rate"]))
    return {n: sorted(v) for n, v in out.items()}


def _title(results, run, what):
    """Figure title: what, CPU, threads, ISA, commit."""
    m = results["machine"]
    commit = (m.get("git_commit") or "?")[:8]
    return f"{what}\n{m['cpu']}, {run['threads']} threads, {m['attnkit_isa']}, attnkit {commit}"


def _line_plot(ax, series, ceiling, ceiling_label, xlabel, ylabel):
    """Rate vs a log2 x axis per contender, with the ceiling as a dotted line."""
    for name, pts in series.items():
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="o", label=name, color=COLORS.get(name),
                linestyle="--" if name.startswith("attnkit ") else "-")
    if ceiling:
        ax.axhline(ceiling, color="k", linestyle=":", label=ceiling_label)
    ax.set_xscale("log", base=2)
    xs = sorted({x for pts in series.values() for x, _ in pts})
    ax.set_xticks(xs)
    ax.set_xticklabels([str(x) for x in xs], fontsize=8)
    ax.minorticks_off()
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


ATTENTION_SWEEPS = [("seq", "non-causal"), ("seq_causal", "causal"), ("seq_gqa", "causal GQA")]


def attention_panels(run) -> list:
    """[(title, rows)] for each attention sweep present in a run, in ATTENTION_SWEEPS order."""
    rows = [r for r in run["rows"] if r["suite"] == "attention" and r["timings"]]
    out = []
    for kind, title in ATTENTION_SWEEPS:
        rs = [r for r in rows if r["params"].get("sweep") == kind]
        if rs:
            out.append((title, rs))
    return out


def plot_attention(plt, results, run, path):
    """GFLOP/s vs S, one panel per sweep: non-causal and causal B1 H12 D64, causal GQA."""
    panels = attention_panels(run)
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.0 * len(panels), 4.5), squeeze=False)
    c = run["ceilings"]
    for ax, (title, rs) in zip(axes[0], panels):
        p = rs[0]["params"]
        _line_plot(ax, _series(rs, lambda r: r["params"]["Sq"]), c["sgemm_gflops"],
                   f"sgemm {c['sgemm_gflops']:.0f}", "sequence length S", "GFLOP/s")
        heads = f"H{p['H']}" + (f"/{p['Hkv']}" if p["Hkv"] != p["H"] else "")
        ax.set_title(f"{title}, B{p['B']} {heads} D{p['D']} {p['dtype']}", fontsize=9)
    fig.suptitle(_title(results, run, "attention forward"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_decode(plt, results, run, path):
    """GB/s vs Sk for the fp32 decode sweep; K/V under 2x the LLC shaded as cache-resident."""
    rows = [r for r in run["rows"] if r["suite"] == "decode" and r["params"].get("sweep") == "kv"
            and r["timings"]]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    c = run["ceilings"]
    p = rows[0]["params"]
    _line_plot(ax, _series(rows, lambda r: r["params"]["Sk"]), c["read_gbs"],
               f"read {c['read_gbs']:.0f} GB/s ({c['buffer_mb']} MB)", "KV length Sk",
               "GB/s (K+V bytes / time)")
    llc = c.get("llc_bytes")
    if llc and any(r.get("cache_fit") in ("fits", "partial") for r in rows):
        # K+V = 2 * B * Sk * Hkv * D * itemsize reaches 2x the LLC at this Sk
        size = {"float32": 4, "float16": 2, "bfloat16": 2}.get(p["dtype"], 4)
        edge = 2 * llc / (2 * p["B"] * p["Hkv"] * p["D"] * size)
        xs = sorted(r["params"]["Sk"] for r in rows)
        lo, hi = xs[0] / 1.4, xs[-1] * 1.4
        ax.axvspan(lo, min(edge, hi), color="0.85", alpha=0.5, zorder=0,
                   label=f"K+V < 2x L3 ({llc / 2**20:.0f} MB): cache-resident")
        ax.set_xlim(lo, hi)
        ax.legend(fontsize=8)
    ax.set_title(f"decode Sq=1, B{p['B']} H{p['H']} Hkv{p['Hkv']} D{p['D']} kv {p['dtype']}",
                 fontsize=9)
    fig.suptitle(_title(results, run, "attention decode"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_matmul(plt, results, run, path):
    """GFLOP/s vs N for square fp32 products."""
    rows = [r for r in run["rows"] if r["suite"] == "matmul" and r["params"].get("sweep") == "square"
            and r["timings"]]
    if not rows:
        return None
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    c = run["ceilings"]
    _line_plot(ax, _series(rows, lambda r: r["params"]["b"][-1]), c["sgemm_gflops"],
               f"sgemm ceiling N={c['sgemm_n']} {c['sgemm_gflops']:.0f}", "N (N x N x N)",
               "GFLOP/s")
    fig.suptitle(_title(results, run, "matmul fp32"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_softmax(plt, results, run, path):
    """Grouped bars: GB/s per shape and contender."""
    rows = [r for r in run["rows"] if r["suite"] == "softmax" and r["timings"]]
    if not rows:
        return None
    names = []
    for r in rows:
        names += [n for n in r["timings"] if n not in names]
    fig, ax = plt.subplots(figsize=(max(6.5, 1.2 * len(rows) + 2), 4.5))
    width = 0.8 / len(names)
    for i, n in enumerate(names):
        xs = [j + i * width for j, r in enumerate(rows) if _rate(r, n) is not None]
        ys = [_rate(r, n) for r in rows if _rate(r, n) is not None]
        ax.bar(xs, ys, width, label=n, color=COLORS.get(n), alpha=0.6 if n.endswith("=") else 1)
    c = run["ceilings"]
    ax.axhline(c["copy_gbs"], color="k", linestyle=":", label=f"copy {c['copy_gbs']:.0f} GB/s")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))])
    ax.set_xticklabels([r["name"].replace("softmax ", "")
                        + ("\n(in cache)" if r.get("cache_fit") in ("fits", "partial") else "")
                        for r in rows], fontsize=8, rotation=20)
    ax.set_ylabel("GB/s (read x + write out)")
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8)
    fig.suptitle(_title(results, run, "softmax over the last axis"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


PLOTS = [("attention", plot_attention), ("decode", plot_decode), ("matmul", plot_matmul),
         ("softmax", plot_softmax)]


def write_plots(results: dict, outdir: str) -> list:
    """Write every plot the run has data for into outdir; returns the paths written."""
    plt = _plt()
    os.makedirs(outdir, exist_ok=True)
    runs = sorted(results["runs"], key=lambda r: r["threads"])
    written = []
    for run in runs:
        suffix = "" if run is runs[-1] else f"_t{run['threads']}"
        for stem, fn in PLOTS:
            path = fn(plt, results, run, os.path.join(outdir, f"{stem}{suffix}.png"))
            if path:
                written.append(path)
    return written
