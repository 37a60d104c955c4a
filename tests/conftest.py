import zlib

import numpy as np
import pytest

import attnkit
from attnkit._runtime import _use_isa


def isas_for(kernels):
    """The runnable variants that compile one of `kernels` themselves: a variant on top of
    another (avx512_vnni) shares the rest of its table with the variant below, already run."""
    return [i["name"] for i in attnkit.info()["isas"] if i["compiled"] and i["supported"]
            and (kernels is None or set(i["kernels"]) & set(kernels))]


def pytest_generate_tests(metafunc):
    """`isa` runs each test once per ISA variant this machine can execute; a module that sets
    ISA_KERNELS (the kernel-table entries it tests) skips variants that do not own any."""
    if "isa" in metafunc.fixturenames:
        metafunc.parametrize("isa", isas_for(getattr(metafunc.module, "ISA_KERNELS", None)),
                             indirect=True)


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

