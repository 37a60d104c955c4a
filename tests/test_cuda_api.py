"""The CUDA backend (attnkit._cuda_backend) and the front end's device-array path without a
GPU: array detection, descriptors, argument checking and canonical views, with a recording stub
in place of the compiled module (the kernels themselves are tested by test_cuda_emulated.py
and, on a GPU, test_cuda.py). Every patch is undone by monkeypatch."""
import numpy as np
import pytest

import attnkit
import attnkit as api
from attnkit import _cuda_backend as cb
from attnkit._arrays import Arr, is_device_array


class CAI:
    """A numpy array behind __cuda_array_interface__ (never dereferenced here)."""

    def __init__(self, a, stream=None, readonly=False):
        self.a, self.stream, self.readonly = a, stream, readonly

    @property
    def __cuda_array_interface__(self):
        a = self.a
        d = {"shape": a.shape, "typestr": a.dtype.str, "data": (a.ctypes.data, self.readonly),
             "strides": None if a.flags.c_contiguous else a.strides, "version": 3}
        if self.stream is not None:
            d["stream"] = self.stream
        return d


class DL:
    def __init__(self, device_type):
        self.device_type = device_type

    def __dlpack__(self, stream=None):
        raise AssertionError("not consumed by is_device_array")

    def __dlpack_device__(self):
        return (self.device_type, 0)


class Recorder:
    """Stands in for attnkit._cuda: records each call's arguments."""

    def __init__(self):
        self.calls = []

    def pointer_device(self, ptr):
        return 0

    def _rec(self, name, *args):
        self.calls.append((name, args))

    def softmax(self, *args):
        self._rec("softmax", *args)

    def matmul(self, *args):
        self._rec("matmul", *args)

    def attention(self, *args):
        self._rec("attention", *args)

    def to_host(self, desc, device, stream):
        raise AssertionError("host index arrays only in these tests")


@pytest.fixture
def rec(monkeypatch):
    r = Recorder()
    monkeypatch.setattr(cb, "_module_cache", r)
    monkeypatch.setattr(cb, "_empty", lambda like, shape, dtype, device, fn: CAI(np.empty(shape, np.dtype(dtype))))
    return r


def f32(*shape):
    return np.zeros(shape, np.float32)


# ---- detection ----

def test_is_device_array_host_objects():
    torch = pytest.importorskip("torch")
    for obj in (np.zeros(3), np.zeros((2, 2))[:, 0], np.float32(1), 1, 2.5, None, [1, 2], (1,), "x",
                torch.zeros(3), DL(1)):
        assert is_device_array(obj) is False


def test_is_device_array_protocols():
    class Refusing:
        @property
        def __cuda_array_interface__(self):
            raise TypeError("not on a device")

    assert is_device_array(CAI(f32(2)))
    assert not is_device_array(Refusing())
    assert is_device_array(DL(2)) and is_device_array(DL(13))
    assert not is_device_array(DL(3))  # pinned host memory


# ---- descriptors ----

def test_describe_cai_strides_dtype_and_errors(rec):
    a = np.zeros((4, 6, 8), np.float16)
    d = cb._describe(CAI(a[:, ::2, 1:]), "f", "x")
    assert d.shape == (4, 3, 7) and d.strides == (48, 16, 1) and d.dtype == "float16" and d.writeable
    assert d.ptr == a[:, ::2, 1:].ctypes.data
    assert cb._describe(CAI(a, readonly=True), "f", "x").writeable is False
    assert cb._describe(CAI(np.zeros(3, bool)), "f", "m").dtype == "bool"
    with pytest.raises(TypeError, match="f: x must be a CUDA device array"):
        cb._describe(np.zeros(3), "f", "x")

    class Odd(CAI):
        @property
        def __cuda_array_interface__(self):
            return {"shape": (2,), "typestr": "<f4", "data": (64, False), "strides": (6,), "version": 3}

    with pytest.raises(ValueError, match="stride of 6 bytes, not a multiple"):
        cb._describe(Odd(f32(1)), "f", "x")


def test_views_match_numpy():
    a = np.zeros((3, 1, 5), np.float32)
    d = Arr(None, "cai", 0, a.shape, tuple(s // 4 for s in a.strides), "float32", 0, True)
    for shape in [(3, 4, 5), (2, 3, 7, 5)]:
        ref = np.broadcast_to(a, shape)
        got = d.broadcast_to(shape)
        assert got.shape == ref.shape
        assert all(st == rs // 4 or n == 1 for st, rs, n in zip(got.strides, ref.strides, ref.shape))
    with pytest.raises(ValueError):
        d.broadcast_to((4, 1, 5))
    t = d.transpose(2, 0, 1)
    assert t.shape == (5, 3, 1) and t.strides == (1, 5, 5)
    assert d.expand_dims(0).shape == (1, 3, 1, 5)


# ---- runtime without a GPU ----

def test_info_and_no_gpu_message(monkeypatch):
    info = attnkit.info()
    assert isinstance(info["cuda_built"], bool) and isinstance(info["cuda_available"], bool)
    if not info["cuda_built"]:
        assert info["cuda_available"] is False
    if info["cuda_available"]:
        pytest.skip("a GPU is present")
    monkeypatch.setattr(cb, "_module_cache", None)
    with pytest.raises(RuntimeError, match="no CUDA (support|device)"):
        api.softmax(CAI(f32(2, 3)))


# ---- arguments -> canonical device views (recorded) ----

def test_attention_canonical_views_and_defaults(rec):
    B, S, H, Hkv, D = 2, 7, 4, 2, 16
    q, k, v = CAI(f32(B, S, H, D)), CAI(f32(B, S, Hkv, D)), CAI(f32(B, S, Hkv, 8))
    mask = CAI(np.ones((S, S), bool))
    out, lse = api.attention(q, k, v, layout="bshd", mask=mask, causal=True, causal_align="bottom_right",
                             window=(3, -1), softcap=5.0, alibi_slopes=np.ones(H, np.float32), return_lse=True)
    name, args = rec.calls[-1]
    fn, qd, kd, vd, od, ld, md, al = args[:8]
    assert name == "attention" and fn == "attention"
    assert qd[1] == (B, H, S, D) and qd[2] == (S * H * D, D, H * D, 1)
    assert kd[1] == (B, Hkv, S, D) and vd[1] == (B, Hkv, S, 8)
    assert od[1] == (B, H, S, 8) and out.a.shape == (B, S, H, 8)
    assert ld[1] == (B, H, S) and lse.a.dtype == np.float32
    assert md[1] == (B, H, S, S) and md[2] == (0, 0, S, 1) and md[3] == "bool"
    assert al.shape == (B, H) and al.dtype == np.float32  # host slopes: uploaded by the binding
    batch, scale, softcap, causal, bottom_right, wl, wr = args[14:21]
    assert (batch, softcap, causal, bottom_right, wl, wr) == (B, 5.0, True, True, 3, -1)
    assert scale == pytest.approx(D ** -0.5)


def test_attention_streams(rec):
    q, k, v = CAI(f32(1, 2, 4, 8), stream=7), CAI(f32(1, 2, 4, 8), stream=9), CAI(f32(1, 2, 4, 8))
    api.attention(q, k, v)
    device, stream, waits = rec.calls[-1][1][-3:]
    assert (device, stream, waits) == (0, 7, [9])


def test_attention_bad_inputs(rec):
    q, k, v = CAI(f32(1, 4, 8, 16)), CAI(f32(1, 2, 9, 16)), CAI(f32(1, 2, 9, 16))
    A = api.attention
    cases = [
        (TypeError, "k must be a CUDA device array", lambda: A(q, np.zeros((1, 2, 9, 16), np.float32), v)),
        (ValueError, "k must be 4-D", lambda: A(q, CAI(f32(2, 9, 16)), v)),
        (ValueError, "k has head_dim 8 but q has 16", lambda: A(q, CAI(f32(1, 2, 9, 8)), v)),
        (ValueError, "not a multiple", lambda: A(CAI(f32(1, 3, 8, 16)), k, v)),
        (ValueError, "v has shape", lambda: A(q, k, CAI(f32(1, 2, 5, 16)))),
        (ValueError, "same batch size", lambda: A(q, CAI(f32(2, 2, 9, 16)), CAI(f32(2, 2, 9, 16)))),
        (TypeError, "k has dtype float32 but v has float64", lambda: A(q, k, CAI(np.zeros((1, 2, 9, 16))))),
        (TypeError, "k/v must have q's dtype", lambda: A(CAI(np.zeros((1, 4, 8, 16), np.float16)), k, v)),
        (TypeError, "q has dtype int32", lambda: A(CAI(np.zeros((1, 4, 8, 16), np.int32)), k, v)),
        (ValueError, "does not broadcast", lambda: A(q, k, v, mask=CAI(np.ones((3, 9), bool)))),
        (TypeError, "mask must be bool", lambda: A(q, k, v, mask=CAI(np.ones((8, 9), np.int32)))),
        (TypeError, "mask must be a CUDA device array", lambda: A(q, k, v, mask=np.ones((8, 9), bool))),
        (ValueError, "scale must be finite", lambda: A(q, k, v, scale=float("nan"))),
        (TypeError, "scale must be a real number", lambda: A(q, k, v, scale="1")),
        (TypeError, "window must be a", lambda: A(q, k, v, window=5)),
        (ValueError, "window entries must be >= -1", lambda: A(q, k, v, window=(-2, 2))),
        (ValueError, r"alibi_slopes has shape \(3,\)", lambda: A(q, k, v, alibi_slopes=np.ones(3, np.float32))),
        (ValueError, r"alibi_slopes has shape \(3,\)", lambda: A(q, k, v, alibi_slopes=CAI(np.ones(3, np.float32)))),
        (ValueError, "softcap must be a finite number", lambda: A(q, k, v, softcap=-1.0)),
        (ValueError, "causal_align must be", lambda: A(q, k, v, causal=True, causal_align="center")),
        (ValueError, "layout must be", lambda: A(q, k, v, layout="sbhd")),
        (ValueError, "out has shape", lambda: A(q, k, v, out=CAI(f32(1, 4, 8, 8)))),
        (TypeError, "out has dtype float64 but q has float32", lambda: A(q, k, v, out=CAI(np.zeros((1, 4, 8, 16))))),
        (ValueError, "out is read-only", lambda: A(q, k, v, out=CAI(f32(1, 4, 8, 16), readonly=True))),
        (TypeError, "causal must be a bool", lambda: A(q, k, v, causal=1)),
    ]
    for exc, msg, call in cases:
        with pytest.raises(exc, match=msg):
            call()
    assert rec.calls == []


def test_kvcache_arguments(rec):
    B, Sq, H, Hkv, D = 2, 1, 4, 2, 16
    q = CAI(f32(B, Sq, H, D))
    kc, vc = CAI(f32(B, 64, Hkv, D)), CAI(f32(B, 64, Hkv, D))
    A = api.attention_with_kvcache
    A(q, kc, vc, cache_seqlens=5, k=CAI(f32(B, 1, Hkv, D)), v=CAI(f32(B, 1, Hkv, D)))
    args = rec.calls[-1][1]
    seqlens, table, kn, vn = args[10:14]
    assert seqlens.dtype == np.int64 and seqlens.tolist() == [5, 5] and table is None
    assert kn[1] == (B, Hkv, 1, D) and args[18] is True  # bottom-right
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = 64 plus 1 new tokens does not fit the cache capacity 64"):
        A(q, kc, vc, cache_seqlens=np.array([3, 64]), k=CAI(f32(B, 1, Hkv, D)), v=CAI(f32(B, 1, Hkv, D)))
    with pytest.raises(ValueError, match="pass both k and v"):
        A(q, kc, vc, cache_seqlens=3, k=CAI(f32(B, 1, Hkv, D)))
    with pytest.raises(TypeError, match="cache_seqlens must be int32 or int64"):
        A(q, kc, vc, cache_seqlens=np.array([1.0, 2.0]))
    with pytest.raises(ValueError, match="k_cache has batch size 3 but q has 2"):
        A(q, CAI(f32(3, 64, Hkv, D)), CAI(f32(3, 64, Hkv, D)), cache_seqlens=1)
    pages = CAI(f32(10, 16, Hkv, D))
    table = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    A(q, pages, pages, cache_seqlens=np.array([40, 64]), block_table=table)
    args = rec.calls[-1][1]
    assert args[2][1] == (10, Hkv, 16, D) and args[11].dtype == np.int64
    table[1, 3] = 12
    with pytest.raises(ValueError, match=r"block_table\[1, 3\] = 12 is not a page index in \[0, 10\)"):
        A(q, pages, pages, cache_seqlens=np.array([40, 64]), block_table=table)
    A(q, pages, pages, cache_seqlens=np.array([40, 48]), block_table=table)  # page 3 of entry 1 unused


def test_softmax_and_matmul_arguments(rec):
    x = CAI(f32(3, 5))
    api.softmax(x, axis=0)
    assert rec.calls[-1][1][2] == 0
    with pytest.raises(TypeError, match="axis must be an int"):
        api.softmax(x, axis=1.0)
    with pytest.raises(TypeError, match="x has dtype int32"):
        api.softmax(CAI(np.zeros(3, np.int32)))
    a, b = CAI(f32(7)), CAI(f32(2, 7, 4))
    out = api.matmul(a, b)
    ad, bd, od = rec.calls[-1][1][:3]
    assert out.a.shape == (2, 4) and ad[1] == (2, 1, 7) and ad[2][0] == 0 and od[1] == (2, 1, 4)
    with pytest.raises(ValueError, match="not aligned"):
        api.matmul(CAI(f32(3, 4)), CAI(f32(5, 6)))
    with pytest.raises(TypeError, match="mixed dtypes"):
        api.matmul(CAI(f32(3, 4)), CAI(np.zeros((4, 2))))
    with pytest.raises(ValueError, match="do not broadcast"):
        api.matmul(CAI(f32(2, 3, 4)), CAI(f32(3, 4, 2)))
