"""The CUDA kernels on the CPU emulator (csrc/cuda/emulate/), through the public API (device arrays -> attnkit._cuda_backend).

The real kernel sources, compiled by the host compiler with ATTNKIT_CUDA_EMULATE, run as
fibers per CUDA thread with warp-collective ldmatrix / mma.sync / shuffles implementing the
PTX fragment layouts, against the float64 reference: index math, tiling tails, masks, GQA
packing, split-KV + combine, paging, the cache append and the Python layer are all tested
without a GPU. Device arrays are numpy arrays behind ``__cuda_array_interface__`` (the
emulated runtime treats host memory as device memory); the emulated GPU has 4 SMs (so small
problems take the split-KV path) and 99 KB of shared memory per block (the sm_86 limit); the
Hopper kernel's tests make it pose as an sm_90 with 227 KB (EmuBackend.as_sm90), and the emulator
implements TMA, mbarriers, named barriers and wgmma for them.

The module is built once into build/cuda-emu by tools/build_cuda_emulator.sh (about a minute on
two cores); the tests are skipped if that fails for want of a compiler, pybind11 or the CUDA
headers. What this cannot check: real concurrency, timing, register/shared-memory limits and
the PTX instruction encodings themselves -- that is test_cuda.py's job on a GPU.
"""
import contextlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from attnkit._arrays import Arr
from reference import bfloat16

ROOT = Path(__file__).resolve().parents[1]


class EmuArray:
    """A numpy array posing as CUDA device memory (for the emulator only)."""

    def __init__(self, a):
        self.a = a

    @property
    def __cuda_array_interface__(self):
        a = self.a
        return {"shape": a.shape, "typestr": a.dtype.str, "data": (a.ctypes.data, not a.flags.writeable),
                "strides": None if a.flags.c_contiguous else a.strides, "version": 3}

    @property
    def shape(self):
        return self.a.shape

    def __getitem__(self, idx):
        return EmuArray(self.a[idx])


def _build():
    if os.environ.get("ATTNKIT_SKIP_EMULATOR"):
        pytest.skip("ATTNKIT_SKIP_EMULATOR is set")
    r = subprocess.run(["bash", str(ROOT / "tools" / "build_cuda_emulator.sh")], cwd=ROOT, capture_output=True,
                       text=True, env=dict(os.environ, PYTHON=sys.executable))
    if r.returncode != 0:
        if r.returncode == 2:  # a missing prerequisite (the script says which)
            pytest.skip("cannot build the CUDA emulator: " + r.stderr.strip().splitlines()[-1])
        raise RuntimeError("building the CUDA emulator failed:\n" + r.stderr[-4000:])
    path = r.stdout.strip().splitlines()[-1]
    spec = importlib.util.spec_from_file_location("_cuda_emu", ROOT / path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


class EmuBackend:
    torch_device = "cpu"
    small = True

    def __init__(self, api):
        self.api = api

    def put(self, a):
        return EmuArray(np.array(a, copy=True))

    def get(self, d):
        return np.array(d.a, copy=True)

    def poisoned(self, shape, dtype):
        return EmuArray(np.full(shape, np.nan, dtype))

    def expand(self, d, shape):
        return EmuArray(np.broadcast_to(d.a, shape))

    def transpose(self, d, axes):
        return EmuArray(d.a.transpose(axes))

    @contextlib.contextmanager
    def as_sm90(self):
        """The emulated GPU poses as an H100/H200 (sm_90, 227 KB of shared memory per block)."""
        saved = {k: os.environ.get(k) for k in ("ATTNKIT_EMU_CC", "ATTNKIT_EMU_SMEM")}
        os.environ.update(ATTNKIT_EMU_CC="90", ATTNKIT_EMU_SMEM="232448")
        try:
            yield
        finally:
            for k, val in saved.items():
                if val is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = val


@pytest.fixture(scope="module")
def dev():
    import attnkit
    from attnkit import _cuda_backend as cb

    emu = _build()
    saved = (cb._module_cache, cb._describe, cb._empty)
    orig_describe = cb._describe

    def describe(obj, fn, name, stream=None):
        # __cuda_array_interface__ has no bfloat16 / float8 typestr: describe those arrays directly.
        if isinstance(obj, EmuArray) and obj.a.dtype.name in ("bfloat16", "float8_e4m3fn"):
            a = obj.a
            return Arr(obj, "cai", a.ctypes.data, a.shape, tuple(s // a.itemsize for s in a.strides),
                       a.dtype.name, 0, a.flags.writeable)
        return orig_describe(obj, fn, name, stream)

    def empty(like, shape, dtype, device, fn):
        dt = bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
        if dt.kind in "iu":  # integer results (8-bit codes): a sentinel instead of NaN
            return EmuArray(np.full(shape, 77, dt))
        return EmuArray(np.full(shape, np.nan, dt))

    cb._module_cache, cb._describe, cb._empty = emu, describe, empty
    try:
        yield EmuBackend(attnkit)
    finally:
        cb._module_cache, cb._describe, cb._empty = saved


from cuda_cases import *  # noqa: E402,F401,F403  (the shared tests, run with this module's `dev`)
