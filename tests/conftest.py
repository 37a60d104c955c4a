import os
import subprocess
import sys
import zlib

import numpy as np
import pytest

# Variants whose instructions run on this CPU although CPUID does not list them (a hypervisor
# that masks CPUID bits: AVX512-BF16 on an Emerald Rapids VM). Probed before attnkit is
# imported, each in a child process that forces the variant and runs one of its kernels: a
# return code 0 (not -SIGILL) means it executes, and this session then imports attnkit with
# ATTNKIT_CPU_ASSUME naming it, so the `isa` tests run it too. An ATTNKIT_CPU_ASSUME set by the
# caller is kept as it is.
_PROBES = {
    # a bf16 matmul big enough to take the vdpbf16ps path (gemm_bf16.cpp), checked
    "avx512_bf16": "import attnkit, numpy as np, ml_dtypes; "
                   "a = np.ones((64, 1024), ml_dtypes.bfloat16); "
                   "assert attnkit.info()['isa'] == 'avx512_bf16'; "
                   "assert (attnkit.matmul(a, a.T).astype(np.float32) == 1024).all()",
}


def _probe(name):
    env = dict(os.environ, ATTNKIT_CPU_ASSUME=name, ATTNKIT_CPU=name)
    try:
        r = subprocess.run([sys.executable, "-c", _PROBES[name]], env=env, capture_output=True,
                           text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "the probe timed out"
    if r.returncode == 0:
        return None
    last = (r.stderr.strip().splitlines() or [""])[-1]
    return f"return code {r.returncode}" + (f": {last}" if last else "")


PROBE_FAILURES = {}  # variant -> why it cannot run here (for the skip reasons)
if "ATTNKIT_CPU_ASSUME" not in os.environ:
    _runs = []
    for _name in _PROBES:
        _why = _probe(_name)
        if _why is None:
            _runs.append(_name)
        else:
            PROBE_FAILURES[_name] = _why
    if _runs:
        os.environ["ATTNKIT_CPU_ASSUME"] = ",".join(_runs)

import attnkit  # noqa: E402
from attnkit._runtime import _use_isa  # noqa: E402


def isas_for(kernels):
    """The runnable variants that compile one of `kernels` themselves: a variant on top of
    another (avx512_vnni) shares the rest of its table with the variant below, already run."""
    return [i["name"] for i in attnkit.info()["isas"] if i["compiled"] and i["supported"]
            and (kernels is None or set(i["kernels"]) & set(kernels))]


def unrunnable_isas_for(kernels):
    """(variant, reason) for the compiled variants owning one of `kernels` that this machine
    cannot run: CPUID (or the OS) does not allow them and their probe (above), if any, failed;
    the reason is the probe's or info()'s."""
    out = []
    for i in attnkit.info()["isas"]:
        if not i["compiled"] or i["supported"]:
            continue
        if kernels is not None and not set(i["kernels"]) & set(kernels):
            continue
        why = PROBE_FAILURES.get(i["name"]) or i["unsupported"] or "not supported by this CPU"
        out.append((i["name"], f"{i['name']} cannot run here: {why}"))
    return out


def pytest_generate_tests(metafunc):
    """`isa` runs each test once per ISA variant this machine can execute; a module that sets
    ISA_KERNELS (the kernel-table entries it tests) skips variants that do not own any.
    Compiled variants that cannot run here appear as skipped, with the reason."""
    if "isa" in metafunc.fixturenames:
        kernels = getattr(metafunc.module, "ISA_KERNELS", None)
        params = isas_for(kernels)
        params += [pytest.param(name, marks=pytest.mark.skip(reason=why))
                   for name, why in unrunnable_isas_for(kernels)]
        metafunc.parametrize("isa", params, indirect=True)


@pytest.fixture
def isa(request):
    """The ISA variant of this run of the test (see pytest_generate_tests)."""
    with _use_isa(request.param):
        yield request.param


@pytest.fixture
def rng(request):
    # A per-test seed derived from the test id: reproducible, different across tests.
    seed = zlib.crc32(request.node.nodeid.encode())
    return np.random.default_rng(seed)


@pytest.fixture
def threads():
    """Restore the thread override after a test that changes it."""
    yield
    attnkit.set_num_threads(None)


def assert_refusals_write_nothing(cases, arrays, fn):
    """Each (name, exception, message regex, call) of `cases` raises that exception naming
    `fn`, and leaves every array of `arrays` byte for byte as it was."""
    before = [a.copy() for a in arrays]
    for name, exc, msg, call in cases:
        with pytest.raises(exc, match=msg) as info:
            call()
        assert str(info.value).startswith(f"{fn}: "), (name, str(info.value))
        for a, a0 in zip(arrays, before):
            assert np.array_equal(np.ascontiguousarray(a).view(np.uint8),
                                  np.ascontiguousarray(a0).view(np.uint8)), \
                f"{name}: a refused call changed {fn}'s arrays"


def poisoned(shape, dtype):
    """An output array full of NaN, so unwritten elements show."""
    out = np.empty(shape, dtype=dtype)
    out[...] = np.nan
    return out

