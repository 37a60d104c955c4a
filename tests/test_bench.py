"""Tests of the benchmark code itself (bench/), on the hidden --tiny shape set: seconds, not minutes.

They check that the runner runs and exits 0, that the JSON schema is stable, that --compare,
--load, --plot and the filters work, that a wrong kernel is reported as a mismatch (exit 1),
that the decode / backward / HF suites run attnkit's real APIs (attention_with_kvcache,
attnkit.torch, attnkit.transformers) and flag them when they are wrong, and that ceilings are
measured past the last-level cache, cache-resident rows are marked and rows above their
ceiling are flagged.
"""
import copy
import importlib
import json
import os
import re
import sys
import time

import numpy as np
import pytest

import attnkit

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
run = importlib.import_module("run")
harness = importlib.import_module("harness")
report = importlib.import_module("report")
env = importlib.import_module("env")
plots = importlib.import_module("plots")
decode_suite = importlib.import_module("suites.decode")

TOP_KEYS = {"schema", "machine", "config", "runs", "wall_s"}
MACHINE_KEYS = {"cpu", "logical_cpus", "threads", "machine", "hostname", "date", "python", "numpy",
                "torch", "transformers", "attnkit", "attnkit_isa", "attnkit_isas_compiled",
                "attnkit_openmp", "git_commit", "git_dirty", "omp_num_threads_env", "loadavg",
                "llc"}
CONFIG_KEYS = {"mode", "threads", "suites", "shape", "dtype", "rounds", "burst_s", "argv"}
RUN_KEYS = {"threads", "threads_by_library", "ceilings", "skipped", "rows", "wall_s",
            "loadavg_end"}
CEILING_KEYS = {"sgemm_gflops", "sgemm_n", "sgemm_by_method", "bf16_gemm_gflops",
                "bf16_gemm_by_method", "copy_gbs", "copy_by_method",
                "read_gbs", "read_by_method", "buffer_mb", "copy_buffer_mb", "llc_bytes",
                "buffer_vs_llc", "stat", "threads", "warnings", "wall_s"}
ROW_KEYS = {"suite", "name", "params", "unit", "ceiling", "work", "subject", "reference",
            "mismatch", "timings", "speedup", "extra", "threads", "wall_s", "footprint_bytes",
            "cache_fit", "ceiling_error", "beside"}
TIMING_KEYS = {"median_s", "min_s", "max_s", "q1_s", "q3_s", "calls", "rounds", "rate",
               "fraction_of_ceiling", "fraction_of_beside"}
CORE_SUITES = ["softmax", "matmul", "attention", "decode"]


def bench_main(args, capsys=None):
    """run.main(args) -> (exit status, captured stdout); one thread unless args say otherwise.

    One thread keeps these functional tests fast on a busy machine: with two threads on two
    loaded cores every OpenMP barrier can wait a scheduler slice (a tiny GPT-2 forward took
    100 ms instead of 1 ms).
    """
    if "--threads" not in args:
        args = args + ["--threads", "1"]
    rc = run.main(args)
    out = capsys.readouterr().out if capsys is not None else ""
    return rc, out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """One tiny run of the core suites with --json and --plot, shared by several tests."""
    d = tmp_path_factory.mktemp("bench")
    path, plots = str(d / "run.json"), str(d / "plots")
    args = ["--tiny", "--threads", "1", "--json", path]
    for s in CORE_SUITES:
        args += ["--suite", s]
    try:
        import matplotlib  # noqa: F401

        args += ["--plot", plots]
    except ImportError:
        plots = None
    rc = run.main(args)
    with open(path) as f:
        return rc, json.load(f), path, plots


def test_tiny_run_passes_and_times_every_contender(tiny_run):
    """Exit 0, no mismatch, every contender timed with ordered quartiles and a rate; a fraction
    of the ceiling exactly where the row is not cache-resident (tiny rows all fit in any LLC)."""
    rc, res, _, _ = tiny_run
    assert rc == 0
    rows = res["runs"][0]["rows"]
    assert {r["suite"] for r in rows} == set(CORE_SUITES)
    for r in rows:
        assert r["mismatch"] == {}, r["name"]
        assert r["subject"] in r["timings"]
        bandwidth = r["ceiling"] in ("copy", "read")
        assert (r["cache_fit"] == "fits") == bandwidth, r["name"]
        assert (r["footprint_bytes"] is not None) == bandwidth
        for name, t in r["timings"].items():
            assert t["min_s"] <= t["q1_s"] <= t["median_s"] <= t["q3_s"] <= t["max_s"], name
            assert t["rate"] > 0
            if bandwidth:
                assert t["fraction_of_ceiling"] is None, (r["name"], name)
            else:
                assert t["fraction_of_ceiling"] > 0
        assert set(r["speedup"]) == set(r["timings"]) - {r["subject"]}


def test_json_schema_is_stable(tiny_run):
    """The documented keys, no more and no fewer, at every level."""
    _, res, _, _ = tiny_run
    assert set(res) == TOP_KEYS
    assert res["schema"] == run.SCHEMA == "attnkit-bench/3"
    assert set(res["machine"]) == MACHINE_KEYS
    assert set(res["config"]) == CONFIG_KEYS
    assert res["config"]["mode"] == "tiny"
    for r in res["runs"]:
        assert set(r) == RUN_KEYS
        assert set(r["ceilings"]) == CEILING_KEYS
        assert r["threads"] == r["threads_by_library"]["attnkit"]
        for row in r["rows"]:
            assert set(row) == ROW_KEYS, row["name"]
            for t in row["timings"].values():
                assert set(t) == TIMING_KEYS


def test_rows_use_the_documented_work_counts(tiny_run):
    """FLOP and byte counts follow docs/ARCHITECTURE.md, "Measuring"; rate = work / median."""
    _, res, _, _ = tiny_run
    rows = {r["name"]: r for r in res["runs"][0]["rows"]}
    a = rows["attn f32 B2 H4 S80 D32"]
    assert a["work"] == 4 * 2 * 4 * 80 * 80 * 32 and a["unit"] == "GFLOP/s"
    c = rows["attn f32 B2 H4 Hkv2 S48 D32 causal gqa"]
    assert c["work"] == 4 * 2 * 4 * 48 * 48 * 32 / 2
    d = rows["decode kv=bf16 B1 H4 Sq1 Sk128 D32"]
    assert d["work"] == 2 * 1 * 128 * 4 * 32 * 2 and d["ceiling"] == "read"
    s = rows["softmax f32 64x1000"]
    assert s["work"] == 2 * 64 * 1000 * 4 and s["ceiling"] == "copy"
    t = s["timings"]["attnkit"]
    assert t["rate"] == pytest.approx(s["work"] / t["median_s"] / 1e9)


def test_plots_are_written(tiny_run):
    """--plot writes the four PNGs."""
    pytest.importorskip("matplotlib")
    _, _, _, plots = tiny_run
    for stem in ("attention", "decode", "matmul", "softmax"):
        p = os.path.join(plots, stem + ".png")
        with open(p, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", p
        assert os.path.getsize(p) > 10_000


def test_compare_reports_speedup_per_case(tiny_run, tmp_path, capsys):
    """--compare: a halved attnkit time shows as 2.00x faster, the rest as 1.00x."""
    _, res, path, _ = tiny_run
    new = copy.deepcopy(res)
    row = new["runs"][0]["rows"][0]
    row["timings"][row["subject"]]["median_s"] /= 2  # attnkit twice as fast "now"
    new_path = tmp_path / "new.json"
    new_path.write_text(json.dumps(new))
    rc, out = bench_main(["--load", str(new_path), "--compare", path], capsys)
    assert rc == 0
    assert "## compare with" in out
    compared = out[out.index("## compare with"):].splitlines()
    line = next(ln for ln in compared if ln.startswith(row["name"]))
    assert "2.00x" in line and "faster" in line
    rows = report.compare_rows(res, new)
    assert len(rows) == len(res["runs"][0]["rows"])
    by_name = {r["name"]: r for r in rows}
    assert by_name[row["name"]]["speedup"] == pytest.approx(2.0)
    others = [r["speedup"] for r in rows if r["name"] != row["name"]]
    assert others == pytest.approx([1.0] * len(others))


def test_compare_reads_schema_1_files(tiny_run, tmp_path, capsys):
    """A JSON from the first harness (no subject/reference/skipped keys) still compares."""
    _, res, path, _ = tiny_run
    old = copy.deepcopy(res)
    for k in ("schema", "config", "wall_s"):
        del old[k]
    for r in old["runs"]:
        for k in ("skipped", "wall_s", "threads_by_library", "loadavg_end"):
            del r[k]
        for row in r["rows"]:
            for k in ("subject", "reference", "extra", "work", "wall_s"):
                del row[k]
            for t in row["timings"].values():
                for k in ("q1_s", "q3_s", "rounds"):
                    del t[k]
    old_path = tmp_path / "v1.json"
    old_path.write_text(json.dumps(old))
    rc, out = bench_main(["--load", path, "--compare", str(old_path)], capsys)
    assert rc == 0
    rows = report.compare_rows(old, res)
    assert len(rows) == len(res["runs"][0]["rows"])
    assert [r["speedup"] for r in rows] == pytest.approx([1.0] * len(rows))
    assert all(r["ref_drift"] == pytest.approx(1.0) for r in rows)


def test_load_prints_saved_table(tiny_run, capsys):
    """--load prints every saved row without running anything."""
    _, res, path, _ = tiny_run
    rc, out = bench_main(["--load", path], capsys)
    assert rc == 0
    for r in res["runs"][0]["rows"]:
        assert r["name"] in out


def test_wrong_softmax_is_a_mismatch(monkeypatch, tmp_path, capsys):
    """A softmax off by 0.01 is flagged on both attnkit contenders, exit 1."""
    good = attnkit.softmax
    monkeypatch.setattr(attnkit, "softmax", lambda x, **kw: good(x, **kw) + 0.01)
    path = tmp_path / "bad.json"
    rc, out = bench_main(["--tiny", "--suite", "softmax", "--json", str(path)], capsys)
    assert rc == 1
    assert "!!! MISMATCH" in out and "disagree" in out
    rows = json.loads(path.read_text())["runs"][0]["rows"]
    assert rows and all({"attnkit", "attnkit out="} <= set(r["mismatch"]) for r in rows)
    assert all("torch" not in r["mismatch"] for r in rows)  # the reference is not blamed


def test_wrong_attention_and_raising_contender(monkeypatch, capsys):
    """A tail bug in attention is flagged; a raising kernel is reported, not timed."""
    good = attnkit.attention

    def wrong(q, k, v, **kw):
        """attention with the last query row zeroed."""
        out = good(q, k, v, **kw)
        out[..., -1, :] = 0  # only the last query row is wrong: a tail bug
        return out

    monkeypatch.setattr(attnkit, "attention", wrong)
    rc, out = bench_main(["--tiny", "--suite", "attention", "--shape", "S80"], capsys)
    assert rc == 1 and "attnkit: max error" in out

    def broken(*a, **kw):
        """A kernel that raises."""
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(attnkit, "attention", broken)
    monkeypatch.setattr(attnkit, "attention_with_kvcache", broken)  # the decode suite's entry
    rc, out = bench_main(["--tiny", "--suite", "decode", "--shape", "Sk64"], capsys)
    assert rc == 1 and "raised RuntimeError: kernel exploded" in out and "(not timed)" in out


def test_filters_select_cases(capsys):
    """--dtype and --shape select exactly the matching rows."""
    rc, out = bench_main(["--tiny", "--list", "--suite", "decode", "--dtype", "bf16"], capsys)
    assert rc == 0
    names = [ln.strip() for ln in out.splitlines() if ln.startswith("  ")]
    assert names == ["decode kv=bf16 B1 H4 Sq1 Sk128 D32"]
    rc, out = bench_main(["--tiny", "--list", "--suite", "attention", "--shape", "causal"], capsys)
    names = [ln.strip() for ln in out.splitlines() if ln.startswith("  ")]
    assert names == ["attn f32 B2 H4 Hkv2 S48 D32 causal gqa"]
    assert run.shape_matches("B1 H32 Hkv8 S2048 D128 causal gqa", ["H32 causal"])
    assert not run.shape_matches("B1 H12 S1024 D64", ["S1024 causal"])
    assert run.shape_matches("64x1000", ["4096x4096", "64x1000"])
    with pytest.raises(SystemExit):
        run.parse_args(["--dtype", "int7"])


def test_quick_mode_has_the_issue_cases():
    """The default (quick) run includes every case named in the issue."""
    cfg = run.Config(mode="quick")
    args = run.parse_args([])
    names = {s.name for m in ("attention", "decode", "backward")
             for s in run.selected_specs(importlib.import_module(f"suites.{m}"), cfg, args)}
    for n in ["attn f32 B1 H12 S1024 D64", "attn f32 B8 H12 S128 D64 padmask",
              "attn f32 B1 H32 S2048 D128 causal", "attn f32 B1 H32 Hkv8 S2048 D128 causal gqa",
              "decode kv=f32 B1 H32 Sq1 Sk4096 D128", "decode kv=f32 B4 H32 Hkv8 Sq1 Sk2048 D128 gqa",
              "decode kv=f16 B1 H32 Sq1 Sk4096 D128", "decode kv=bf16 B1 H32 Sq1 Sk4096 D128",
              "bwd f32 B1 H12 S1024 D64", "bwd f32 B1 H12 S1024 D64 causal",
              "fwd+bwd f32 B8 H12 S128 D64"]:
        assert n in names, n


def test_bf16_rows_are_measured_against_the_bf16_ceiling():
    """bf16 GEMM-bound rows (matmul, attention, backward) take the bf16 GEMM ceiling, fp32 rows
    the sgemm one: on a CPU with a bf16 unit (AVX512-BF16 on Zen 5, AMX) a bf16 row runs past
    the sgemm ceiling (attention bf16 at 305% of it on a Zen 5)."""
    pytest.importorskip("ml_dtypes")
    cfg = run.Config(mode="quick")
    seen = set()
    for m in ("matmul", "attention", "backward"):
        mod = importlib.import_module(f"suites.{m}")
        by_dtype = {}
        for s in mod.specs(cfg):
            by_dtype.setdefault(s.params["dtype"], s)
        for dtype, want in (("bfloat16", "bf16"), ("float32", "sgemm")):
            assert mod.build(by_dtype[dtype]).ceiling == want, (m, dtype)
            seen.add((m, dtype))
    assert len(seen) == 6


def test_two_thread_counts_give_two_runs(tmp_path, capsys):
    """--threads 1,2: two passes, each at its own count; no bar off a TTY."""
    path = tmp_path / "t.json"
    rc, out = bench_main(["--tiny", "--suite", "softmax", "--shape", "8x4096", "--threads", "1,2",
                          "--json", str(path)], capsys)
    assert rc == 0
    res = json.loads(path.read_text())
    assert [r["threads"] for r in res["runs"]] == [1, 2]
    assert [r["threads_by_library"]["attnkit"] for r in res["runs"]] == [1, 2]
    assert out.count("threads=1 ") == 1 and out.count("threads=2 ") == 1
    assert "%|" not in capsys.readouterr().err  # no progress bar when stdout is not a TTY


def test_interleaved_timing_orders_contenders():
    """A slower callable times slower; settling applies after NumPy's bursts and before them."""
    import time

    cfg = harness.TimingConfig(rounds=3, burst_s=0.004, gap_s=0.0, settle=False)
    t = harness.time_interleaved({"fast": lambda: time.sleep(0.001),
                                  "slow": lambda: time.sleep(0.006)}, cfg)
    assert t["fast"].median_s < t["slow"].median_s
    assert t["fast"].rounds == 3 and t["slow"].calls >= 1
    assert harness.settle_time("numpy", 0.01) == harness.SETTLE_AFTER["numpy"]
    assert harness.settle_time("numpy", 0.01, settle=False) == 0.01
    assert harness.settle_time("attnkit", 0.01, next_name="numpy") == harness.SETTLE_BEFORE["numpy"]
    assert harness.settle_time("attnkit", 0.01, next_name="torch") == 0.01


def test_calibration_is_not_set_by_one_slow_first_call():
    """A short call whose first run is slow (another pool's threads still spinning) still gets
    a burst of many calls: the burst length comes from the median of repeated calls."""
    import time

    state = {"first": True}

    def fn():
        time.sleep(0.02 if state["first"] else 0.0002)
        state["first"] = False

    calls = harness._calibrate(fn, 0.5)
    assert calls > 100, calls  # ~0.5 s / 0.2-0.3 ms; one 20 ms call would have given 25


def test_work_helpers():
    """The FLOP / byte helpers on hand-checked numbers."""
    assert harness.attention_flops(1, 12, 1024, 1024, 64) == 4 * 12 * 1024 * 1024 * 64
    assert harness.attention_flops(1, 1, 8, 8, 4, causal=True) == 4 * 8 * 8 * 4 / 2
    assert harness.attention_bwd_flops(1, 1, 8, 8, 4) == 2.5 * 4 * 8 * 8 * 4
    assert harness.kv_bytes(4, 2048, 8, 128, 4) == 2 * 4 * 2048 * 8 * 128 * 4
    assert harness.matmul_flops(2, 3, 4, batch=5) == 2 * 2 * 3 * 4 * 5
    # window (1, 0) on 4 x 4: rows allow 1, 2, 2, 2 keys
    assert harness.window_pairs(4, 4, 1, 0) == 7
    assert harness.window_pairs(4, 4, -1, -1) == 16
    assert harness.attention_flops(1, 1, 4, 4, 2, window=(1, 0)) == 4 * 7 * 2


# ---- the decode / backward / HF suites on attnkit's real APIs ----


@pytest.fixture
def fresh_hf_models():
    """The HF suite caches its models; build them anew for a test (and drop them after)."""
    pytest.importorskip("transformers")
    hf = importlib.import_module("suites.hf")
    hf._MODELS.clear()
    yield hf
    hf._MODELS.clear()


def _counting(monkeypatch, owner, attr, change=None):
    """Replace owner.attr by a wrapper that counts calls and optionally changes the result."""
    real = getattr(owner, attr)
    calls = []

    def wrapper(*a, **kw):
        """The real function, counted (and changed by `change`)."""
        calls.append(1)
        out = real(*a, **kw)
        return change(out) if change else out

    monkeypatch.setattr(owner, attr, wrapper)
    return calls


def test_api_suites_run_the_real_apis(fresh_hf_models, monkeypatch, tmp_path, capsys):
    """decode, backward and hf run end to end on attention_with_kvcache, attnkit.torch and
    attnkit.transformers (each seen to be called), all agreeing with torch."""
    import attnkit.torch as atorch

    kvc_calls = _counting(monkeypatch, attnkit, "attention_with_kvcache")
    sdpa_calls = _counting(monkeypatch, atorch, "scaled_dot_product_attention")
    adapter_calls = _counting(monkeypatch, atorch, "attention")  # what the HF adapter runs on
    path = tmp_path / "api.json"
    rc, out = bench_main(["--tiny", "--suite", "decode", "--suite", "backward", "--suite", "hf",
                          "--json", str(path)], capsys)
    assert rc == 0, out
    assert kvc_calls and sdpa_calls and adapter_calls
    run0 = json.loads(path.read_text())["runs"][0]
    assert run0["skipped"] == {}
    rows = {r["name"]: r for r in run0["rows"]}
    assert all(r["mismatch"] == {} for r in rows.values())
    dec = [r for r in rows.values() if r["suite"] == "decode"]
    assert dec and all(r["params"]["api"] == "attention_with_kvcache" for r in dec)
    plain = [r for r in dec if not r["params"]["capacity"] and not r["params"].get("q8")]
    assert plain and all({"attnkit", "attnkit attention", "torch sdpa"} == set(r["timings"])
                         for r in plain)
    q8 = [r for r in dec if r["params"].get("q8")]  # 8-bit caches next to fp16 / fp32 ones
    assert {r["params"]["format"] for r in q8} == {"int8", "fp8_e4m3"}
    assert all({"attnkit", "attnkit fp16 cache", "attnkit fp32 cache"} == set(r["timings"]) and
               r["reference"] == "attnkit fp32 cache" and "gbs attnkit" in r["extra"] for r in q8)
    bwd = [r for r in rows.values() if r["suite"] == "backward"]
    assert {r["params"]["kind"] for r in bwd} == {"bwd", "fwd+bwd"}
    hf = [r for r in rows.values() if r["suite"] == "hf"]
    assert {r["params"]["kind"] for r in hf} == {"forward", "generate", "overhead"}
    models = fresh_hf_models.models("tiny")  # each model runs the implementation it is named for
    assert {k: m.config._attn_implementation for k, m in models.items()} == {
        k: k for k in fresh_hf_models.IMPLS}
    for r in hf:
        if r["params"]["kind"] == "overhead":
            assert set(r["extra"]) == {"attnkit_adapter_overhead_us", "sdpa_adapter_overhead_us"}
        else:
            assert set(r["timings"]) == {"attnkit", "sdpa", "eager"} and r["unit"] == "tok/s"


def test_capacity_row_times_both_caches(tiny_run):
    """The issue-16 row: the same tokens in a large and an exact-size cache, interleaved, with
    the slowdown of the large one; the quick run has the issue's shape."""
    _, res, _, _ = tiny_run
    row = next(r for r in res["runs"][0]["rows"] if r["params"].get("capacity"))
    assert row["name"] == "decode kv=f32 B1 H4 Hkv2 Sq1 Sk64 D32 gqa Smax1024"
    assert row["params"]["Smax"] == 1024 and row["params"]["Sk"] == 64
    assert set(row["timings"]) == {"attnkit", "attnkit Smax=64", "torch sdpa"}
    t = row["timings"]
    assert row["extra"]["slowdown_vs_exact_cache"] == pytest.approx(
        t["attnkit"]["median_s"] / t["attnkit Smax=64"]["median_s"])
    cfg = run.Config(mode="quick", llc_bytes=32 << 20)
    names = [s.name for s in decode_suite.specs(cfg)]
    assert "decode kv=f32 B1 H32 Hkv8 Sq1 Sk2048 D128 gqa Smax32768" in names


def test_wrong_decode_is_a_mismatch(monkeypatch, capsys):
    """attention_with_kvcache 1% off is flagged on every decode row (both caches of the capacity
    row), attnkit.attention is not blamed."""
    monkeypatch.setattr(attnkit, "attention_with_kvcache",
                        lambda *a, _real=attnkit.attention_with_kvcache, **kw: _real(*a, **kw) * 1.01)
    rc, out = bench_main(["--tiny", "--suite", "decode", "--dtype", "f32"], capsys)
    assert rc == 1
    mism = [ln for ln in out.splitlines() if "!!! MISMATCH" in ln]
    assert len(mism) == 4 and all("attnkit: max error" in ln for ln in mism)
    assert "attnkit attention:" not in out
    assert any("attnkit Smax=64: max error" in ln for ln in mism)


def test_wrong_backward_is_a_mismatch(monkeypatch, capsys):
    """attnkit.torch's gradients 1% off are flagged on every backward row."""
    import attnkit.torch as atorch

    real = atorch.scaled_dot_product_attention
    monkeypatch.setattr(atorch, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: real(q, k, v, **kw) * 1.01)
    rc, out = bench_main(["--tiny", "--suite", "backward"], capsys)
    assert rc == 1 and out.count("!!! MISMATCH") == 2


def test_wrong_hf_adapter_is_a_mismatch(fresh_hf_models, monkeypatch, capsys):
    """attnkit.transformers' attention 1% off: the forward and adapter rows are flagged."""
    import attnkit.torch as atorch

    _counting(monkeypatch, atorch, "attention", change=lambda out: out * 1.01)
    rc, out = bench_main(["--tiny", "--suite", "hf"], capsys)
    assert rc == 1
    bad = [ln for ln in out.splitlines() if "!!! MISMATCH" in ln]
    assert any("attnkit:" in ln for ln in bad) and any("attnkit adapter:" in ln for ln in bad)


# ---- ceilings and the cache ----


def _fake_sysfs(root, l3_groups):
    """cpu*/cache/index{0..3} with L1d 48K, L1i 32K, L2 2048K and the given L3 groups
    ({shared_cpu_list: size text}, each CPU of a group listing it)."""
    cpu = 0
    for shared, size in l3_groups.items():
        for _ in shared.split(","):
            base = root / f"cpu{cpu}" / "cache"
            for i, (lvl, kind, sz, sh) in enumerate([(1, "Data", "48K", str(cpu)),
                                                      (1, "Instruction", "32K", str(cpu)),
                                                      (2, "Unified", "2048K", str(cpu)),
                                                      (3, "Unified", size, shared)]):
                d = base / f"index{i}"
                d.mkdir(parents=True)
                (d / "level").write_text(f"{lvl}\n")
                (d / "type").write_text(f"{kind}\n")
                (d / "size").write_text(f"{sz}\n")
                (d / "shared_cpu_list").write_text(f"{sh}\n")
            cpu += 1


def test_llc_is_read_from_sysfs_with_fallbacks(tmp_path, monkeypatch):
    """One shared L3 counts once, two instances add up; without sysfs or lscpu some size is
    still given, with its source."""
    one = tmp_path / "one"
    _fake_sysfs(one, {"0,1": "266240K"})
    assert env.llc_from_sysfs(str(one)) == {"bytes": 260 << 20, "level": 3, "instances": 1,
                                            "source": "sysfs"}
    two = tmp_path / "two"
    _fake_sysfs(two, {"0,1": "32768K", "2,3": "32768K"})
    assert env.llc_from_sysfs(str(two))["bytes"] == 64 << 20
    assert env.llc_from_sysfs(str(tmp_path / "none")) is None
    assert env.parse_size("260 MiB (1 instance)") == 260 << 20
    assert env.parse_size("1.5 MiB (2 instances)") == 3 << 19
    monkeypatch.setattr(env, "llc_from_sysfs", lambda: None)
    monkeypatch.setattr(env, "llc_from_lscpu", lambda: None)
    info = env.llc_info()
    assert info["bytes"] > 0 and info["source"] in ("sysconf", "assumed")


def test_ceiling_buffers_exceed_the_llc():
    """Quick/full buffers are >= 4x the LLC (and >= 256/512 MB), capped by free memory."""
    mb = 1 << 20
    assert harness.ceiling_buffer_bytes("quick", 260 * mb) >= 4 * 260 * mb
    assert harness.ceiling_buffer_bytes("full", 300 * mb) >= 4 * 300 * mb
    assert harness.ceiling_buffer_bytes("quick", 32 * mb) == 256 * mb
    assert harness.ceiling_buffer_bytes("full", 32 * mb) == 512 * mb
    assert harness.ceiling_buffer_bytes("quick", 260 * mb, mem_available=1536 * mb) == 512 * mb
    assert harness.ceiling_buffer_bytes("tiny", 260 * mb) == 8 * mb


def test_measure_ceilings_takes_the_best_method(monkeypatch):
    """Every ceiling is the best of its methods (several multi-threaded reads, no NumPy sum);
    a buffer under 2x the LLC is a warning."""
    monkeypatch.setattr(harness, "BF16_SLOW_SHARE", 0.0)  # torch's bf16 GEMM at every N
    c = harness.measure_ceilings(2, "tiny", llc_bytes=1 << 20, mem_available=None)
    assert set(c) == CEILING_KEYS - {"wall_s"}
    assert {"numpy max", "blas dot", "blas dot 2 streams", "torch sum"} <= set(c["read_by_method"])
    assert c["read_gbs"] == max(c["read_by_method"].values()) > 0
    assert c["copy_gbs"] == max(c["copy_by_method"].values()) > 0
    assert c["sgemm_gflops"] == max(c["sgemm_by_method"].values()) > 0
    assert {"numpy sgemm", "attnkit matmul", "torch mm"} <= set(c["sgemm_by_method"])
    assert {"attnkit matmul", "torch mm"} <= set(c["bf16_gemm_by_method"])
    assert c["bf16_gemm_gflops"] == max(c["bf16_gemm_by_method"].values()) > 0
    assert c["buffer_vs_llc"] == pytest.approx(8.0)
    assert not any("ceiling buffer" in w for w in c["warnings"])
    c = harness.measure_ceilings(1, "tiny", llc_bytes=64 << 20)
    assert any("ceiling buffer is under 2x" in w for w in c["warnings"])


def test_bf16_ceiling_also_times_the_middle_squares(monkeypatch):
    """bf16 GEMMs ran 1024^3 and 2048^3 faster than 4096^3 (attnkit's and torch's, Zen 5): the
    bf16 ceiling times both below the sgemm's N (here scaled down: N 256, middle 96, cached 64)
    and takes the best."""
    monkeypatch.setattr(harness, "BF16_MID_GEMM_N", (96, 512))
    monkeypatch.setattr(harness, "CACHED_GEMM_N", 64)
    monkeypatch.setattr(harness, "BF16_SLOW_SHARE", 0.0)
    c = harness.measure_ceilings(1, "tiny", llc_bytes=1 << 20)
    want = {"attnkit matmul", "attnkit matmul N=64", "attnkit matmul N=96", "torch mm N=96", "torch mm"}
    assert want <= set(c["bf16_gemm_by_method"])
    assert not any("N=512" in k for k in c["bf16_gemm_by_method"])  # not above the sgemm's N
    assert c["bf16_gemm_gflops"] == max(c["bf16_gemm_by_method"].values())


def test_slow_torch_bf16_gemm_is_timed_at_the_cached_size_only(monkeypatch):
    """Where torch's bf16 GEMM runs below BF16_SLOW_SHARE of the sgemm ceiling (no bf16 hardware
    path: one 2048^3 call took 17 s on a CPU showing only AVX2), the bf16 ceiling times it at
    CACHED_GEMM_N only; attnkit's are all timed."""
    pytest.importorskip("torch")
    monkeypatch.setattr(harness, "BF16_MID_GEMM_N", (96, 512))
    monkeypatch.setattr(harness, "CACHED_GEMM_N", 64)
    monkeypatch.setattr(harness, "BF16_SLOW_SHARE", 1e9)  # every rate counts as slow
    c = harness.measure_ceilings(1, "tiny", llc_bytes=1 << 20)
    methods = set(c["bf16_gemm_by_method"])
    assert {"attnkit matmul", "attnkit matmul N=64", "attnkit matmul N=96", "torch mm N=64"} <= methods
    assert not {"torch mm", "torch mm N=96"} & methods


def test_cache_resident_rows_and_ceiling_errors(capsys, monkeypatch):
    """A read-bound row in the cache gets no %, "fits in L3" instead; one from DRAM above its
    ceiling, and above the read timed beside it, is a CEILING ERROR in the row and the
    summary (the exit status stays 0)."""
    real_probe = harness.bandwidth_probe

    def slow_probe(kind, nbytes, threads, by_method=None):
        """The real method's name, but a call that reads 1 byte in 1 ms."""
        method = real_probe(kind, 4096, threads, by_method)[0]
        return method, (lambda: time.sleep(0.001)), 1

    monkeypatch.setattr(harness, "bandwidth_probe", slow_probe)
    assert harness.cache_fit(100, 200) == "fits"
    assert harness.cache_fit(300, 200) == "partial"
    assert harness.cache_fit(400, 200) == "exceeds"
    x = np.ones(1 << 16, np.float32)
    case = harness.Case(suite="decode", name="fake read row", work=x.nbytes, ceiling="read",
                        contenders={"attnkit": lambda: x.copy(), "other": lambda: x.copy()},
                        check=lambda a, b: None)
    cfg = harness.TimingConfig(rounds=2, burst_s=0.001, gap_s=0.0, settle=False)
    in_cache = harness.run_case(case, {"read_gbs": 1e-6, "llc_bytes": 1 << 30}, cfg)
    assert in_cache["cache_fit"] == "fits" and in_cache["ceiling_error"] is None
    assert all(t["fraction_of_ceiling"] is None for t in in_cache["timings"].values())
    line = report.format_row(in_cache)
    assert "fits in L3: 256 KB" in line and "%" not in line and "CEILING" not in line
    dram = harness.run_case(case, {"read_gbs": 1e-6, "llc_bytes": 1 << 10}, cfg)
    assert dram["cache_fit"] == "exceeds"
    assert dram["timings"]["attnkit"]["fraction_of_ceiling"] > 1
    assert "attnkit" in dram["ceiling_error"] and "other" in dram["ceiling_error"]
    assert "!!! CEILING ERROR" in report.format_row(dram)
    slow = harness.run_case(case, {"read_gbs": 1e9, "llc_bytes": 1 << 10}, cfg)
    assert slow["ceiling_error"] is None and "!!!" not in report.format_row(slow)
    assert in_cache["beside"] is None and "beside it" not in line
    text, n_bad = report.summary({"runs": [{"threads": 1, "rows": [dram, in_cache],
                                            "ceilings": {}}]})
    assert n_bad == 0 and "1 row(s) above 100% of their ceiling" in text
    assert "1 memory-bound row(s)" in text


def test_a_row_within_the_bandwidth_beside_it_is_no_ceiling_error():
    """The start-of-run ceiling said 57 GB/s, the row ran at 62 and the read beside it at 120
    (the VM's memory rate rose mid-run, Zen 5): not a CEILING ERROR, but a summary line. A
    contender above both is still an error."""
    t = {"rate": 62.5, "fraction_of_ceiling": 62.5 / 57.2, "fraction_of_beside": 62.5 / 120.0}
    row = {"suite": "decode", "name": "decode kv=f32 B1 H32 Sq1 Sk2048 D128", "ceiling": "read",
           "timings": {"attnkit": dict(t)}, "mismatch": {}, "cache_fit": "exceeds"}
    ceilings = {"read_gbs": 57.2}
    assert harness.ceiling_error(row, ceilings) is None and report.moved_above(row)
    row["ceiling_error"] = None
    text, n_bad = report.summary({"runs": [{"threads": 2, "rows": [row], "ceilings": {}}]})
    assert n_bad == 0 and "memory rate rose during the run" in text and "CEILING" not in text
    row["timings"]["other"] = dict(t, fraction_of_beside=1.2)
    msg = harness.ceiling_error(row, ceilings)
    assert msg and "other" in msg and "attnkit" not in msg
    row["timings"] = {"attnkit": dict(t, fraction_of_beside=None)}  # no probe: an error
    assert "attnkit" in harness.ceiling_error(row, ceilings) and not report.moved_above(row)


def test_ceiling_check_runs(capsys):
    """bench/ceiling_check.py times every method and a decode row (small sizes here)."""
    check = importlib.import_module("ceiling_check")
    rc = check.main(["--threads", "1", "--rounds", "2", "--buffer-mb", "8", "--sk", "256"])
    out = capsys.readouterr().out
    assert rc in (0, 1)  # 1 = a cached decode row beat the read methods: possible at this size
    for name in ("numpy copyto", "numpy max", "blas dot", "torch sum", "decode Sk256"):
        assert name in out
    assert "of the best read method" in out


def test_decode_sweep_reaches_dram():
    """The quick sweep gets an fp32 point whose K+V is >= 2x the LLC when the sweep has none."""
    mb = 1 << 20
    assert decode_suite.dram_sk(260 * mb) == 32768  # 1 GB of K+V for a 260 MB L3
    assert decode_suite.dram_sk(32 * mb) == 4096
    assert decode_suite.dram_sk(1 << 40) is None
    big = [s for s in decode_suite.specs(run.Config(mode="quick", llc_bytes=260 * mb))
           if s.params["sweep"] == "kv"]
    assert big[-1].name == "decode kv=f32 B1 H32 Sq1 Sk32768 D128" and big[-1].heavy
    small = [s for s in decode_suite.specs(run.Config(mode="quick", llc_bytes=32 * mb))
             if s.params["sweep"] == "kv"]
    assert [s.params["Sk"] for s in small] == decode_suite.KV_SWEEP["quick"]


def test_attention_plot_has_causal_and_gqa_panels(tiny_run):
    """One panel per sweep present: the quick and full runs sweep non-causal, causal and GQA."""
    _, res, _, _ = tiny_run
    titles = [t for t, _ in plots.attention_panels(res["runs"][0])]
    assert titles == ["non-causal", "causal GQA"]  # tiny has no causal B1 H12 sweep
    for mode in ("quick", "full"):
        sweeps = {s.params["sweep"] for s in importlib.import_module("suites.attention").specs(
            run.Config(mode=mode))}
        assert {"seq", "seq_causal", "seq_gqa"} <= sweeps, mode


def test_missing_api_skips_with_a_notice(monkeypatch, tmp_path, capsys):
    """Missing attnkit.torch / attnkit.transformers: one-line skip, exit 0."""
    monkeypatch.setitem(sys.modules, "attnkit.torch", None)  # import attnkit.torch now fails
    monkeypatch.setitem(sys.modules, "attnkit.transformers", None)
    path = tmp_path / "skip.json"
    rc, out = bench_main(["--tiny", "--suite", "backward", "--suite", "hf", "--json", str(path)],
                         capsys)
    assert rc == 0
    assert "## backward: skipped (attnkit.torch.scaled_dot_product_attention is missing)" in out
    assert "## hf: skipped (" in out
    run0 = json.loads(path.read_text())["runs"][0]
    assert set(run0["skipped"]) == {"backward", "hf"} and run0["rows"] == []


def test_cp_suite_runs_the_ring_on_local_processes(tmp_path, capsys):
    """--suite cp (tiny, the W = 2 rows: two spawned ranks): every row checked against one
    process, timed, with the bytes each rank sent ((W-1) K/V shards forward; backward adds W-1
    K/V and W fp32 dK/dV shards) and the overlap numbers. cp is not part of the default suites."""
    cp = importlib.import_module("suites.cp")
    assert "cp" not in run.SUITES and "cp" in run.OPTIONAL
    assert [s.params["W"] for s in cp.specs(run.Config(mode="quick"))] == [1, 2, 4, 1, 2, 4]
    path = tmp_path / "cp.json"
    rc, out = bench_main(["--tiny", "--suite", "cp", "--shape", "W2", "--json", str(path)], capsys)
    assert rc == 0, out
    rows = json.loads(path.read_text())["runs"][0]["rows"]
    assert [(r["params"]["kind"], r["params"]["W"]) for r in rows] == [("fwd", 2), ("fwd+bwd", 2)]
    for r in rows:
        assert not r["mismatch"] and set(r["timings"]) == {"attnkit", "one process"}, r["name"]
        e, p = r["extra"], r["params"]
        shard = p["B"] * p["Hkv"] * (p["S"] // e["W"]) * 2 * p["D"] * 4  # K/V of one rank, fp32
        want = (e["W"] - 1) * shard
        if p["kind"] == "fwd+bwd":
            want += (e["W"] - 1) * shard + e["W"] * shard
        assert e["bytes_per_rank"] == (want if e["W"] > 1 else 0), (r["name"], e)
        assert e["threads_per_rank"] == 1 and e["compute_ms"] > 0
        if e["W"] > 1:
            assert e["comm_ms"] > 0 and 0.0 <= e["hidden"] <= 1.0
    cp._POOL.close()
    cp._POOL = None


def test_usage_errors_exit_2_before_any_work(tmp_path, monkeypatch, capsys):
    """A --compare file that is missing was opened after the run (a full run lost, its --json
    never written); a bad --load file was a raw traceback with exit 1 (the status of a
    mismatch); a filter matching nothing measured the ceilings for nothing. Each is now a
    message naming the option and exit 2, before any ceiling is measured."""
    def no_ceilings(*a, **k):
        raise AssertionError("ceilings measured for a call that fails")

    monkeypatch.setattr(harness, "measure_ceilings", no_ceilings)
    bad = tmp_path / "bad.json"
    bad.write_text('{"foo": 1}')
    cut = tmp_path / "cut.json"
    cut.write_text('{"runs": [')
    cases = [(["--tiny", "--suite", "softmax", "--compare", str(tmp_path / "none.json")],
              "--compare .*none.json: No such file"),
             (["--load", str(bad)], "--load .*bad.json: not a bench run"),
             (["--load", str(cut)], "--load .*cut.json: not JSON"),
             (["--tiny", "--shape", "nosuchshape"], "no case matches")]
    for argv, msg in cases:
        with pytest.raises(SystemExit) as e:
            run.main(argv)
        assert e.value.code == 2, argv
        assert re.search(msg, capsys.readouterr().err), argv
    with pytest.raises(SystemExit) as e:
        run.parse_args(["--dtype", "f99"])
    assert e.value.code == 2 and "unknown dtype 'f99'; use one of" in capsys.readouterr().err


def test_dram_rows_time_their_bandwidth_beside_them(monkeypatch):
    """A memory-bound row from DRAM also times a plain read (read rows) or copy (copy rows) of
    its own footprint, interleaved with its contenders: the row keeps that rate and each
    contender's fraction of it (medians of the same rounds), the probe is neither a contender
    nor in the ratios, and the line prints it. The method the ceilings rated fastest is used,
    never a BLAS one; rows in the cache get no probe."""
    x = np.ones(1 << 16, np.float32)
    cfg = harness.TimingConfig(rounds=3, burst_s=0.001, gap_s=0.0, settle=False)
    ceilings = {"read_gbs": 1e9, "copy_gbs": 1e9, "llc_bytes": 1 << 10, "threads": 2,
                "read_by_method": {"numpy max": 2.0, "torch sum": 1.0, "blas dot": 9.0},
                "copy_by_method": {"numpy copyto": 1.0, "torch copy_": 2.0}}
    for kind, method in (("read", "numpy max"), ("copy", "torch copy_")):
        if method.startswith("torch"):
            pytest.importorskip("torch")
        case = harness.Case(suite="decode", name="fake row", work=x.nbytes, ceiling=kind,
                            contenders={"attnkit": lambda: x.copy(), "other": lambda: x.copy()},
                            check=lambda a, b: None)
        row = harness.run_case(case, ceilings, cfg)
        probe = row["beside"]
        assert probe["kind"] == kind and probe["method"] == method
        assert probe["bytes"] == x.nbytes  # a copy counts its read and its write
        assert probe["gbs"] == pytest.approx(probe["bytes"] / probe["median_s"] / 1e9)
        assert probe["rounds"] == 3
        assert set(row["timings"]) == {"attnkit", "other"} and set(row["speedup"]) == {"other"}
        for t in row["timings"].values():
            assert t["fraction_of_beside"] == pytest.approx(t["rate"] / probe["gbs"])
        line = report.format_row(row)
        assert f"of a {kind} beside it" in line and f"{probe['gbs']:.1f} GB/s" in line
        capped = harness.run_case(case, dict(ceilings, buffer_mb=0.125), cfg)  # 128 KB
        assert capped["beside"]["bytes"] == 1 << 17
        cached = harness.run_case(case, dict(ceilings, llc_bytes=1 << 30), cfg)
        assert cached["beside"] is None
        assert all(t["fraction_of_beside"] is None for t in cached["timings"].values())
    # the probes do what they say: a read of every element, a copy into the second half
    pytest.importorskip("torch")
    method, fn, nbytes = harness.bandwidth_probe("read", 1 << 20, 1, {"torch sum": 3.0})
    assert method == "torch sum" and nbytes == 1 << 20 and float(fn()) == (1 << 18)
    assert harness.bandwidth_probe("read", 1 << 20, 1)[0] == "torch sum"
    method, fn, nbytes = harness.bandwidth_probe("copy", 1 << 20, 2, {"numpy copyto": 5.0})
    assert method == "numpy copyto" and nbytes == 1 << 20
    fn()
