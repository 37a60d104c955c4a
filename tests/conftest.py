import os
import zlib

import numpy as np
import pytest

import attnkit
from attnkit._runtime import _use_isa


def runnable_isas():
    return [i["name"] for i in attnkit.info()["isas"] if i["compiled"] and i["supported"]]


@pytest.fixture(params=runnable_isas())
def isa(request):
    """Run the test once per ISA variant this machine can execute."""
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


def poisoned(shape, dtype):
    """An output array full of NaN, so unwritten elements show."""
    out = np.empty(shape, dtype=dtype)
    out[...] = np.nan
    return out

