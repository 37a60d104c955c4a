import multiprocessing as mp
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import attnkit
from reference import bfloat16


def test_info_keys():
    info = attnkit.info()
    for key in ("version", "isa", "isas", "isas_compiled", "openmp", "threads", "cuda_built"):
        assert key in info
    assert info["isa"] in info["isas_compiled"]
    assert "scalar" in info["isas_compiled"]
    assert info["threads"] >= 1
    assert info["version"] == attnkit.__version__


def test_set_get_num_threads(threads):
    attnkit.set_num_threads(3)
    assert attnkit.get_num_threads() == 3
    assert attnkit.info()["threads"] == 3
    attnkit.set_num_threads(None)
    assert attnkit.get_num_threads() >= 1
    with pytest.raises(ValueError, match="n must be >= 0"):
        attnkit.set_num_threads(-1)
    with pytest.raises(TypeError, match="n must be an int"):
        attnkit.set_num_threads(2.0)


def run_py(code, env_extra=None, timeout=120):
    env = dict(os.environ)
    env.update(env_extra or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True, text=True, env=env, timeout=timeout,
    )


def test_omp_num_threads_env_applies():
    r = run_py("import attnkit; print(attnkit.get_num_threads())", {"OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"


def test_threadpoolctl_applies():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    r = run_py(
        """
        import attnkit, threadpoolctl, numpy as np
        attnkit.softmax(np.zeros((4, 4), np.float32))
        with threadpoolctl.threadpool_limits(1, user_api="openmp"):
            print(attnkit.get_num_threads())
        """,
        {"OMP_NUM_THREADS": "2"},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "1"


@pytest.mark.parametrize("name", ["scalar", "avx2", "avx512", "avx512_vnni", "avx512_bf16", "amx",
                                  "amx_emulated"])
def test_env_forces_isa(name):
    supported = {i["name"]: i["supported"] and i["compiled"] for i in attnkit.info()["isas"]}
    r = run_py(
        """
        import attnkit, numpy as np
        x = np.random.default_rng(0).standard_normal((7, 300)).astype(np.float32)
        y = attnkit.softmax(x)
        assert abs(y.sum(-1) - 1).max() < 1e-5
        print(attnkit.info()["isa"])
        """,
        {"ATTNKIT_CPU": name},
    )
    if supported.get(name):
        assert r.returncode == 0, r.stderr
        assert r.stdout.strip() == name
    else:
        assert r.returncode != 0
        assert "ATTNKIT_CPU" in r.stderr


def test_info_says_why_a_variant_is_unsupported():
    """A compiled variant this machine cannot run carries the reason (for amx: CPUID, the
    OS's tile state, or a refused tile permission); a runnable one carries None."""
    for i in attnkit.info()["isas"]:
        if i["compiled"] and not i["supported"]:
            assert isinstance(i["unsupported"], str) and len(i["unsupported"]) > 10, i
        else:
            assert i["unsupported"] is None, i
    amx = {i["name"]: i for i in attnkit.info()["isas"]}["amx"]
    if amx["compiled"] and not amx["supported"]:
        assert any(w in amx["unsupported"] for w in ("CPUID", "XCR0", "permission", "AVX-512"))


def test_env_unknown_isa_is_a_clear_error():
    r = run_py("import attnkit", {"ATTNKIT_CPU": "sse9"})
    assert r.returncode != 0
    assert "ATTNKIT_CPU=sse9" in r.stderr and "unknown variant" in r.stderr


def _child_softmax(q):
    x = np.random.default_rng(1).standard_normal((256, 4096)).astype(np.float32)
    y = attnkit.softmax(x)
    q.put(float(np.abs(y.sum(-1) - 1).max()))


def _in_forked_child(target):
    """Run target(queue) in a forked child; asserts it neither hangs nor fails, returns what it
    put on the queue."""
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(q,))
    p.start()
    p.join(60)
    hung = p.is_alive()
    if hung:
        p.kill()
    assert not hung, "forked child hung in an OpenMP region"
    assert p.exitcode == 0
    return q.get(timeout=5)


def test_fork_child_does_not_hang():
    # Run a parallel kernel in the parent first: that is what breaks libgomp after fork().
    x = np.random.default_rng(0).standard_normal((256, 4096)).astype(np.float32)
    attnkit.softmax(x)
    assert _in_forked_child(_child_softmax) < 1e-5


def _amx_runs_here():
    i = {x["name"]: x for x in attnkit.info()["isas"]}["amx"]
    return i["compiled"] and i["supported"]


def test_auto_takes_amx_where_it_runs():
    """amx passed the whole suite on an AMX CPU (an Emerald Rapids), so auto takes it wherever
    CPUID, XCR0 and the OS's tile data permission allow; elsewhere auto takes another variant and
    info() says why amx cannot run."""
    r = run_py("import attnkit, json; i = attnkit.info(); "
               "print(json.dumps([i['isa'], {x['name']: x['unsupported'] for x in i['isas']}['amx']]))",
               {"ATTNKIT_CPU": "auto"})
    assert r.returncode == 0, r.stderr
    import json
    isa, why = json.loads(r.stdout)
    if _amx_runs_here():
        assert isa == "amx" and why is None
    else:
        assert isa != "amx"
        assert "amx" not in attnkit.info()["isas_compiled"] or why


def _child_bf16_matmul(q):
    a = (np.random.default_rng(2).standard_normal((256, 512)) / 8).astype(bfloat16)
    b = (np.random.default_rng(3).standard_normal((512, 256)) / 8).astype(bfloat16)
    c = attnkit.matmul(a, b).astype(np.float64)
    ref = a.astype(np.float64) @ b.astype(np.float64)
    plan = attnkit._C._last_gemm_plan()  # the tile kernel ran (32-row micro-panels)
    q.put((plan["elem_bytes"], plan["mr"], float(np.abs(c - ref).max() / np.abs(ref).max())))


@pytest.mark.skipif(bfloat16 is None, reason="ml_dtypes not installed")
def test_fork_child_runs_tiles():
    """A bf16 matmul on AMX tiles in the parent (tile data granted, tiles configured on the
    OpenMP threads), then one in a forked child: the child inherits the permission, configures
    its own threads' tiles and gets the right product (bf16 rounding of C only)."""
    if not _amx_runs_here():
        pytest.skip("amx does not run here")
    from attnkit._runtime import _use_isa
    with _use_isa("amx"):
        _child_bf16_matmul(mp.get_context("fork").SimpleQueue())  # parent: tiles in use
        elem_bytes, mr, err = _in_forked_child(_child_bf16_matmul)
        assert (elem_bytes, mr) == (2, 32) and err < 2 ** -7, (elem_bytes, mr, err)


def test_output_cache_reuses_only_dead_buffers():
    import gc

    from attnkit import _alloc

    attnkit.empty_cache()
    x = np.random.default_rng(0).standard_normal((1024, 2048)).astype(np.float32)  # 8 MB
    y = attnkit.softmax(x)
    view = y[100:]
    ptr = y.ctypes.data
    expected = view.copy()
    del y
    gc.collect()
    assert _alloc.cached_bytes() == 0, "buffer cached while a view of it is alive"
    z = attnkit.softmax(x * 2)
    assert z.ctypes.data != ptr
    assert np.array_equal(view, expected)
    del view
    gc.collect()
    assert _alloc.cached_bytes() == x.nbytes
    w = attnkit.softmax(x)
    assert w.ctypes.data == ptr and _alloc.cached_bytes() == 0  # reused
    del w, z
    gc.collect()
    attnkit.empty_cache()
    assert _alloc.cached_bytes() == 0


def test_output_cache_can_be_disabled():
    r = run_py(
        """
        import gc, numpy as np, attnkit
        from attnkit import _alloc
        x = np.ones((1024, 2048), np.float32)
        y = attnkit.softmax(x); del y; gc.collect()
        print(_alloc.cached_bytes())
        """,
        {"ATTNKIT_OUTPUT_CACHE_MB": "0"},
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0"


def test_output_cache_release_never_takes_the_lock():
    """Garbage collection can run a cached buffer's __del__ on a thread that already holds the
    cache's lock (inside attnkit's own allocation): releasing must not wait for that lock."""
    import gc
    import threading

    from attnkit import _alloc

    attnkit.empty_cache()
    y = attnkit.softmax(np.ones((1024, 2048), np.float32))  # 8 MB: from the cache
    done = threading.Event()

    def release_while_locked():
        nonlocal y
        with _alloc._lock:  # as if GC struck inside _alloc.empty
            del y
            gc.collect()
        done.set()

    t = threading.Thread(target=release_while_locked, daemon=True)
    t.start()
    assert done.wait(10), "releasing a buffer under the cache lock deadlocked"
    assert _alloc.cached_bytes() == 1024 * 2048 * 4  # and it did reach the cache
    attnkit.empty_cache()


def test_info_lists_the_kernels_each_variant_compiles():
    """Full variants own every kernel-table entry. avx512_vnni owns only attention_fwd (its int8
    decode) and shares the rest with avx512; avx512_bf16, amx and amx_emulated own gemm,
    attention_fwd and attention_bwd (their bf16 paths) and share the rest with avx512_vnni. The
    test suite runs the shared entries once (conftest)."""
    everything = {"softmax", "gemm", "attention_fwd", "attention_bwd", "quantize_kv",
                  "merge_attention_states"}
    for i in attnkit.info()["isas"]:
        if not i["compiled"]:
            assert i["kernels"] == []
        elif i["name"] == "avx512_vnni":
            assert i["kernels"] == ["attention_fwd"]
        elif i["name"] in ("avx512_bf16", "amx", "amx_emulated"):  # bf16, on avx512_vnni
            assert i["kernels"] == ["gemm", "attention_fwd", "attention_bwd"]
        else:
            assert set(i["kernels"]) == everything, i


def test_cpu_assume_env():
    """ATTNKIT_CPU_ASSUME marks a variant supported without its CPUID bit (and says so in
    info()); it accepts only the variants a hypervisor may hide; auto never takes a variant
    that is not verified or that has an auto_skip (avx512_bf16 on Intel: slower where measured)."""
    code = """
        import attnkit, json
        i = attnkit.info()
        print(json.dumps([i["isa"], i["assumed_isas"],
                          {x["name"]: [x["supported"], x["assumed"], x["verified"], x["auto_skip"]]
                           for x in i["isas"]}]))
        """
    env = {"ATTNKIT_CPU": "auto"}
    plain = run_py(code, dict(env, ATTNKIT_CPU_ASSUME=""))
    assert plain.returncode == 0, plain.stderr
    import json
    isa0, assumed0, flags0 = json.loads(plain.stdout)
    assert assumed0 == [] and not any(f[1] for f in flags0.values())
    r = run_py(code, dict(env, ATTNKIT_CPU_ASSUME="avx512_bf16"))
    assert r.returncode == 0, r.stderr
    isa, assumed, flags = json.loads(r.stdout)
    compiled = set(attnkit.info()["isas_compiled"])
    # avx512_bf16 also needs AVX512-VBMI, which is never assumed (dispatch.cpp)
    vbmi = "avx512vbmi" in (bench_env().cpuinfo_field("flags") or "").split()
    if "avx512_bf16" in compiled and flags0["avx512_vnni"][0] and not flags0["avx512_bf16"][0] and vbmi:
        assert assumed == ["avx512_bf16"] and flags["avx512_bf16"][:2] == [True, True]
    else:  # CPUID lists it already, or the variant below or VBMI is missing: nothing is assumed
        assert assumed == []
    if not flags["avx512_bf16"][2] or flags["avx512_bf16"][3]:
        assert isa == isa0  # auto takes verified variants without an auto_skip only
    bad = run_py("import attnkit", dict(env, ATTNKIT_CPU_ASSUME="avx2"))
    assert bad.returncode != 0
    assert "ATTNKIT_CPU_ASSUME=avx2" in bad.stderr and "cannot assume avx2" in bad.stderr


def bench_env():
    """bench/env.py: the machine facts the bench records (cpuinfo_field reads /proc/cpuinfo)."""
    import importlib

    bench = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
    if bench not in sys.path:
        sys.path.insert(0, bench)
    return importlib.import_module("env")


def test_auto_takes_avx512_bf16_on_amd_only():
    """avx512_bf16 carries an auto_skip on Intel CPUs (vdpbf16ps at half the fp32 FMA FLOP rate
    on an Emerald Rapids) and none on AMD (1.85x it on a Zen 5): auto picks it exactly there,
    when it is supported and verified and nothing better is (amx, where the CPU has it)."""
    i = next(x for x in attnkit.info()["isas"] if x["name"] == "avx512_bf16")
    vendor = bench_env().cpuinfo_field("vendor_id")
    if not (i["compiled"] and i["supported"]) or vendor not in ("AuthenticAMD", "GenuineIntel"):
        pytest.skip(f"avx512_bf16 does not run here (vendor {vendor})")
    amd = vendor == "AuthenticAMD"
    assert (i["auto_skip"] is None) == amd, i
    r = run_py("import attnkit; print(attnkit.info()['isa'])", {"ATTNKIT_CPU": "auto"})
    assert r.returncode == 0, r.stderr
    if amd:
        assert r.stdout.strip() == "avx512_bf16"
    else:
        assert r.stdout.strip() != "avx512_bf16"
