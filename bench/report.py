"""Text output: run header, table rows, the end-of-run summary and --compare."""
from __future__ import annotations

NAME_W = 50


def _methods(by: dict, fmt="{:.1f}") -> str:
    """'[numpy max 25.1, torch sum 20.3]' for a ceiling's per-method rates ('' if none)."""
    return " [" + ", ".join(f"{k} {fmt.format(v)}" for k, v in by.items()) + "]" if by else ""


def moved_above(row: dict) -> bool:
    """Some contender ran above the start-of-run ceiling but within the bandwidth timed beside
    it: the memory rate moved during the run (not a CEILING ERROR)."""
    return any(t.get("fraction_of_ceiling") is not None and t["fraction_of_ceiling"] > 1.0
               and t.get("fraction_of_beside") is not None and t["fraction_of_beside"] <= 1.0
               for t in row["timings"].values())


def llc_label(machine: dict) -> str:
    """'L3' (or L2/L4: the level of the machine's last-level cache; L3 when unknown)."""
    return f"L{(machine.get('llc') or {}).get('level', 3)}"


def header(machine: dict, threads: int, described: dict, ceilings: dict, mode: str) -> str:
    """Lines naming the machine, build, ISA, thread counts and the ceilings of this run."""
    lib = " ".join(f"{k}={v}" for k, v in described.items())
    llc = machine.get("llc") or {}
    llc_mb = ceilings.get("llc_bytes", llc.get("bytes", 0)) / 2**20
    lines = [
        f"# attnkit {machine['attnkit']} ({(machine['git_commit'] or '?')[:10]}"
        f"{'+dirty' if machine.get('git_dirty') else ''})  isa={machine['attnkit_isa']}  "
        f"threads={threads} ({lib})  mode={mode}",
        f"# cpu={machine['cpu']} ({machine['logical_cpus']} logical, {llc_label(machine)} "
        f"{llc_mb:.0f} MB from {llc.get('source', '?')})  numpy {machine['numpy']}  "
        f"torch {machine['torch']}  transformers {machine['transformers']}  "
        f"python {machine['python']}  load {machine.get('loadavg')}",
        f"# ceilings ({threads} threads, best round of the best method):",
        f"#   sgemm {ceilings['sgemm_gflops']:.1f} GFLOP/s (N={ceilings['sgemm_n']})"
        + _methods(ceilings.get("sgemm_by_method", {}), "{:.0f}"),
        (f"#   bf16 gemm {ceilings['bf16_gemm_gflops']:.1f} GFLOP/s (N<={ceilings['sgemm_n']}, "
         "bf16 in and out)" + _methods(ceilings.get("bf16_gemm_by_method", {}), "{:.0f}") + "\n"
         if ceilings.get("bf16_gemm_gflops") else "") +
        f"#   copy {ceilings['copy_gbs']:.1f} GB/s (read + write, 2 x "
        f"{ceilings.get('copy_buffer_mb', '?')} MB)" + _methods(ceilings.get("copy_by_method", {})),
        f"#   read {ceilings['read_gbs']:.1f} GB/s ({ceilings['buffer_mb']} MB = "
        f"{ceilings.get('buffer_vs_llc', 0):.1f}x the {llc_mb:.0f} MB {llc_label(machine)})"
        + _methods(ceilings.get("read_by_method", {})),
    ]
    lines += [f"# !!! ceiling warning: {w}" for w in ceilings.get("warnings", [])]
    return "\n".join(lines)


def suite_title(suite: str) -> str:
    """Column titles for a suite's table."""
    return (f"\n## {suite}\n{'case':<{NAME_W}} {'median':>10} {'[min - max] ms':>19} "
            f"{'rate':>14} {'%ceil':>6}  x = other's time / attnkit's (>1: attnkit faster)")


def _ms(s):
    """Seconds as milliseconds, 3 decimals below 10 s."""
    return f"{s * 1e3:.3f}" if s < 10 else f"{s * 1e3:.0f}"


def _size(nbytes) -> str:
    """Bytes as '1.2 GB', '128 MB' or '96 KB' (binary units)."""
    for unit, shift in (("GB", 30), ("MB", 20)):
        if nbytes >= 1 << shift:
            v = nbytes / (1 << shift)
            return f"{v:.1f} {unit}" if v < 10 else f"{v:.0f} {unit}"
    return f"{nbytes / 1024:.0f} KB"


def cache_note(row: dict, llc="L3") -> str:
    """'fits in L3 (128 MB)' / '1.6x L3, partly cached' for cache-resident rows, else ''."""
    fit, fp = row.get("cache_fit"), row.get("footprint_bytes") or 0
    if fit == "fits":
        return f"fits in {llc}: {_size(fp)}"
    if fit == "partial":
        return f"{_size(fp)}, under 2x {llc}: partly cached"
    return ""


def format_row(row: dict, llc="L3") -> str:
    """One table line: subject's median, spread, rate, % of ceiling, ratios, derived numbers.

    A memory-bound row whose data fits in (or under twice) the last-level cache shows `llc`
    instead of a % of the DRAM ceiling; a row above its ceiling gets a CEILING ERROR line.
    """
    name = row["name"] if len(row["name"]) <= NAME_W else row["name"][: NAME_W - 1] + "~"
    s = row["timings"].get(row.get("subject", "attnkit"))
    if s is None:
        line = f"{name:<{NAME_W}} {'-':>10} {'(not timed)':>19}"
    else:
        rate = f"{s['rate']:.1f} {row['unit']}" if s["rate"] is not None else "-"
        frac = s["fraction_of_ceiling"]
        note = cache_note(row, llc)
        pct = f"{100 * frac:.0f}%" if frac is not None else (f"in {llc}" if note else "-")
        line = (f"{name:<{NAME_W}} {_ms(s['median_s']):>7} ms "
                f"{'[' + _ms(s['min_s']) + ' - ' + _ms(s['max_s']) + ']':>19} "
                f"{rate:>14} {pct:>6}")
        ratios = [f"{n} {x:.2f}x" for n, x in row["speedup"].items()]
        if ratios:
            line += "  " + ", ".join(ratios)
    probe = row.get("beside")
    if s is not None and probe and s.get("fraction_of_beside") is not None:
        line += (f"  [{100 * s['fraction_of_beside']:.0f}% of a {probe['kind']} beside it, "
                 f"{probe['gbs']:.1f} GB/s]")
    for k, v in row.get("extra", {}).items():
        line += f"  {k}={v:.2f}" if isinstance(v, float) else f"  {k}={v}"
    if s is not None and cache_note(row, llc):
        line += f"  ({cache_note(row, llc)})"
    if row.get("ceiling_error"):
        line += "\n    !!! CEILING ERROR: " + row["ceiling_error"]
    if row["mismatch"]:
        line += "\n    !!! MISMATCH: " + "; ".join(f"{k}: {v}" for k, v in row["mismatch"].items())
    return line


def summary(results: dict) -> tuple:
    """(text, number of failing rows): skipped suites, mismatches and the wall time."""
    lines, bad, over, cached, moved = [], [], [], [], []
    llc = llc_label(results.get("machine", {}))
    for run in results["runs"]:
        for suite, why in run.get("skipped", {}).items():
            lines.append(f"# skipped {suite} at {run['threads']} threads: {why}")
        for w in run.get("ceilings", {}).get("warnings", []):
            lines.append(f"# !!! ceiling warning at {run['threads']} threads: {w}")
        bad += [f"{r['name']} @{run['threads']}t" for r in run["rows"] if r["mismatch"]]
        over += [f"{r['name']} @{run['threads']}t" for r in run["rows"] if r.get("ceiling_error")]
        moved += [f"{r['name']} @{run['threads']}t" for r in run["rows"] if moved_above(r)]
        cached += [r["name"] for r in run["rows"]
                   if r.get("cache_fit") in ("fits", "partial") and r["timings"]]
    if cached:
        lines.append(f"# {len(cached)} memory-bound row(s) have data under 2x the {llc} and are "
                     f"shown as cache-resident, without a % of the DRAM ceiling")
    if moved:
        lines.append(f"# {len(moved)} row(s) ran above the start-of-run ceiling but within the "
                     f"bandwidth timed beside them: the memory rate rose during the run {moved}")
    if over:
        lines.append(f"\n!!! {len(over)} row(s) above 100% of their ceiling (CEILING ERROR: the "
                     f"ceiling was measured wrong, not a fast kernel): {over}")
    if bad:
        lines.append(f"\n!!! {len(bad)} case(s) disagree with their reference or failed: {bad}")
    for run in results["runs"]:
        per = {}
        for r in run["rows"]:
            per[r["suite"]] = per.get(r["suite"], 0.0) + r.get("wall_s", 0.0)
        if per:
            parts = ", ".join(f"{k} {v:.1f}" for k, v in per.items())
            lines.append(f"# {run['threads']} threads: ceilings "
                         f"{run['ceilings'].get('wall_s', 0):.1f} s, {parts} s; "
                         f"load average at the end {run.get('loadavg_end')}")
    if "wall_s" in results:
        lines.append(f"# wall time {results['wall_s']:.1f} s")
    return "\n".join(lines), len(bad)


def _rows_by_key(results: dict) -> dict:
    """(threads, name) -> row over every pass of a run."""
    return {(run["threads"], r["name"]): r for run in results["runs"] for r in run["rows"]}


def compare_rows(old: dict, new: dict) -> list:
    """Rows present in both runs (matched by thread count and name), with attnkit's speedup.

    speedup = old median / new median of the subject (>1: faster now). ref_drift is the same
    ratio for the row's reference contender (torch, NumPy): when it moved as much as attnkit
    did, the machine changed, not the code.
    """
    o, n = _rows_by_key(old), _rows_by_key(new)
    out = []
    for key, b in n.items():
        a = o.get(key)
        if a is None:
            continue
        subj = b.get("subject", "attnkit")  # schema 1 files have no subject/reference keys
        sa, sb = a["timings"].get(a.get("subject", "attnkit")), b["timings"].get(subj)
        if not sa or not sb:
            continue
        ref = b.get("reference") or a.get("reference")
        ra, rb = a["timings"].get(ref), b["timings"].get(ref)
        drift = ra["median_s"] / rb["median_s"] if ra and rb and ref != subj else None
        out.append({"threads": key[0], "name": key[1], "old_s": sa["median_s"],
                    "new_s": sb["median_s"], "speedup": sa["median_s"] / sb["median_s"],
                    "ref_drift": drift})
    return out


def compare(old: dict, new: dict, slower=0.9, faster=1.1) -> str:
    """The --compare table: per case old and new median, speedup and reference drift."""
    rows = compare_rows(old, new)
    lines = [f"\n## compare with {(old['machine'].get('git_commit') or '?')[:10]} "
             f"({old['machine'].get('date', '?')}); speedup = old / new time, >1: faster now",
             f"{'case':<{NAME_W}} {'thr':>3} {'old ms':>9} {'new ms':>9} {'speedup':>8} "
             f"{'ref drift':>9}"]
    for r in rows:
        drift = f"{r['ref_drift']:.2f}x" if r["ref_drift"] is not None else "-"
        sp = r["speedup"]
        flag = "  slower" if sp < slower else ("  faster" if sp > faster else "")
        lines.append(f"{r['name'][:NAME_W]:<{NAME_W}} {r['threads']:>3} {_ms(r['old_s']):>9} "
                     f"{_ms(r['new_s']):>9} {sp:>7.2f}x {drift:>9}{flag}")
    o, n = set(_rows_by_key(old)), set(_rows_by_key(new))
    if o - n:
        lines.append(f"# only in old: {len(o - n)} row(s)")
    if n - o:
        lines.append(f"# only in new: {len(n - o)} row(s)")
    if not rows:
        lines.append("# no case in common")
    return "\n".join(lines)
