"""Tests of the benchmark code itself (bench/), on the hidden --tiny shape set: seconds, not minutes.

They check that the runner runs and exits 0, that the JSON schema is stable, that --compare,
--load, --plot and the filters work, that a wrong kernel is reported as a mismatch (exit 1),
and that the decode / backward / HF suites work against stand-ins of the APIs they target.
"""
import copy
import importlib
import json
import os
import sys
import types

import numpy as np
import pytest

import attnkit

BENCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
sys.path.insert(0, BENCH)
run = importlib.import_module("run")
harness = importlib.import_module("harness")
report = importlib.import_module("report")

TOP_KEYS = {"schema", "machine", "config", "runs", "wall_s"}
MACHINE_KEYS = {"cpu", "logical_cpus", "threads", "machine", "hostname", "date", "python", "numpy",
                "torch", "transformers", "attnkit", "attnkit_isa", "attnkit_isas_compiled",
                "attnkit_openmp", "git_commit", "git_dirty", "omp_num_threads_env", "loadavg"}
CONFIG_KEYS = {"mode", "threads", "suites", "shape", "dtype", "rounds", "burst_s", "argv"}
RUN_KEYS = {"threads", "threads_by_library", "ceilings", "skipped", "rows", "wall_s",
            "loadavg_end"}
CEILING_KEYS = {"sgemm_gflops", "sgemm_n", "copy_gbs", "read_gbs", "buffer_mb", "stat", "wall_s"}
ROW_KEYS = {"suite", "name", "params", "unit", "ceiling", "work", "subject", "reference",
            "mismatch", "timings", "speedup", "extra", "threads", "wall_s"}
TIMING_KEYS = {"median_s", "min_s", "max_s", "q1_s", "q3_s", "calls", "rounds", "rate",
               "fraction_of_ceiling"}
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
    """Exit 0, no mismatch, every contender timed with ordered quartiles and a rate."""
    rc, res, _, _ = tiny_run
    assert rc == 0
    rows = res["runs"][0]["rows"]
    assert {r["suite"] for r in rows} == set(CORE_SUITES)
    for r in rows:
        assert r["mismatch"] == {}, r["name"]
        assert r["subject"] in r["timings"]
        for name, t in r["timings"].items():
            assert t["min_s"] <= t["q1_s"] <= t["median_s"] <= t["q3_s"] <= t["max_s"], name
            assert t["rate"] > 0 and 0 < t["fraction_of_ceiling"]
        assert set(r["speedup"]) == set(r["timings"]) - {r["subject"]}


def test_json_schema_is_stable(tiny_run):
    """The documented keys, no more and no fewer, at every level."""
    _, res, _, _ = tiny_run
    assert set(res) == TOP_KEYS
    assert res["schema"] == run.SCHEMA == "attnkit-bench/2"
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
    """FLOP and byte counts follow DESIGN.md; rate = work / median."""
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
    line = next(ln for ln in out.splitlines() if ln.startswith(row["name"]) and "x " in ln[50:])
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
    """A slower callable times slower; settling applies only after NumPy."""
    import time

    cfg = harness.TimingConfig(rounds=3, burst_s=0.004, gap_s=0.0, settle=False)
    t = harness.time_interleaved({"fast": lambda: time.sleep(0.001),
                                  "slow": lambda: time.sleep(0.006)}, cfg)
    assert t["fast"].median_s < t["slow"].median_s
    assert t["fast"].rounds == 3 and t["slow"].calls >= 1
    assert harness.settle_time("numpy", 0.01) == harness.SETTLE_AFTER["numpy"]
    assert harness.settle_time("numpy", 0.01, settle=False) == 0.01


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


# ---- suites for APIs still being built: stand-ins with the described signatures ----


def _kvcache_standin(q, k_cache, v_cache, *, k=None, v=None, cache_seqlens, block_table=None,
                     causal=True, **kw):
    """attention_with_kvcache as described, from attnkit.attention one sequence at a time."""
    outs = [attnkit.attention(q[b:b + 1], k_cache[b:b + 1, :n], v_cache[b:b + 1, :n],
                              layout="bshd", causal=causal, causal_align="bottom_right")
            for b, n in enumerate(np.asarray(cache_seqlens))]
    return np.concatenate(outs)


def _hf_adapter_standin(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                        is_causal=None, **kw):
    """An "attnkit" transformers attention function over the NumPy API."""
    import torch

    sq = query.shape[2]
    if is_causal is None:
        is_causal = sq > 1 and attention_mask is None and getattr(module, "is_causal", True)
    mask = None if attention_mask is None else attention_mask.numpy()
    out = attnkit.attention(query.numpy(), key.numpy(), value.numpy(), mask=mask,
                            causal=bool(is_causal), causal_align="bottom_right", scale=scaling)
    return torch.from_numpy(out).transpose(1, 2), None


@pytest.fixture
def standins(monkeypatch):
    """Install attention_with_kvcache, attnkit.torch and attnkit.transformers stand-ins."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    monkeypatch.setattr(attnkit, "attention_with_kvcache", _kvcache_standin, raising=False)
    at = types.ModuleType("attnkit.torch")
    at.scaled_dot_product_attention = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setitem(sys.modules, "attnkit.torch", at)
    hf = types.ModuleType("attnkit.transformers")

    def register():
        """Register the adapter and the sdpa mask under "attnkit" (undone after the test)."""
        monkeypatch.setitem(AttentionInterface._global_mapping, "attnkit", _hf_adapter_standin)
        monkeypatch.setitem(AttentionMaskInterface._global_mapping, "attnkit", sdpa_mask)

    hf.register = register
    monkeypatch.setitem(sys.modules, "attnkit.transformers", hf)
    importlib.import_module("suites.hf")._MODELS.clear()
    yield at
    importlib.import_module("suites.hf")._MODELS.clear()


def test_api_suites_run_against_standins(standins, tmp_path, capsys):
    """decode, backward and hf run end to end on stand-ins of the coming APIs."""
    path = tmp_path / "api.json"
    rc, out = bench_main(["--tiny", "--suite", "decode", "--suite", "backward", "--suite", "hf",
                          "--json", str(path)], capsys)
    assert rc == 0, out
    run0 = json.loads(path.read_text())["runs"][0]
    assert run0["skipped"] == {}
    rows = {r["name"]: r for r in run0["rows"]}
    dec = [r for r in rows.values() if r["suite"] == "decode"]
    assert dec and all(r["params"]["api"] == "attention_with_kvcache" for r in dec)
    assert all({"attnkit", "attnkit attention", "torch sdpa"} == set(r["timings"]) for r in dec)
    bwd = [r for r in rows.values() if r["suite"] == "backward"]
    assert {r["params"]["kind"] for r in bwd} == {"bwd", "fwd+bwd"}
    hf = [r for r in rows.values() if r["suite"] == "hf"]
    assert {r["params"]["kind"] for r in hf} == {"forward", "generate", "overhead"}
    for r in hf:
        if r["params"]["kind"] == "overhead":
            assert set(r["extra"]) == {"attnkit_adapter_overhead_us", "sdpa_adapter_overhead_us"}
        else:
            assert set(r["timings"]) == {"attnkit", "sdpa", "eager"} and r["unit"] == "tok/s"


def test_wrong_backward_standin_is_a_mismatch(standins, capsys):
    """Gradients 1% off are flagged on every backward row."""
    import torch

    standins.scaled_dot_product_attention = (
        lambda q, k, v, **kw: torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw) * 1.01)
    rc, out = bench_main(["--tiny", "--suite", "backward"], capsys)
    assert rc == 1 and out.count("!!! MISMATCH") == 2


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
