"""attnkit's CUDA kernels on a real GPU, with torch CUDA tensors.

Runs the shared grid of cuda_cases.py (the attention grid of test_attention.py, split-KV
decode, KV cache, varlen, softmax, matmul) against the float64 reference and torch's own CUDA
result (the 2x-torch-error rule), plus what only a GPU can show: bit-identical repeated runs
of large problems, agreement with torch SDPA at LLM sizes, the caller's stream, other array
producers (DLPack, CuPy) and several devices. Skipped, with the reason, when there is no GPU
or attnkit was built without CUDA (ATTNKIT_CUDA=ON).
"""
import contextlib
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import attnkit  # noqa: E402
from attnkit._arrays import is_device_array  # noqa: E402
from reference import bfloat16, from_torch, to_torch  # noqa: E402


def _skip_reason():
    info = attnkit.info()
    if not info.get("cuda_built"):
        return "attnkit was built without CUDA (reinstall with ATTNKIT_CUDA=ON)"
    if not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    if not info.get("cuda_available"):
        return "attnkit._cuda sees no CUDA device"
    return None


SKIP_REASON = _skip_reason()
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(SKIP_REASON is not None, reason=str(SKIP_REASON))]

_NP = {torch.float32: np.float32, torch.float64: np.float64, torch.float16: np.float16, torch.bool: np.bool_,
       torch.int32: np.int32, torch.int64: np.int64, torch.int8: np.int8}
try:
    import ml_dtypes
    _F8 = np.dtype(ml_dtypes.float8_e4m3fn)
except ImportError:  # pragma: no cover - ml_dtypes is in the test extra
    _F8 = None


class GpuBackend:
    torch_device = "cuda"
    small = False

    def __init__(self):
        self.api = attnkit  # the public functions: device arrays go to the CUDA backend

    def put(self, a):
        a = np.asarray(a)
        if _F8 is not None and a.dtype == _F8:  # float8 e4m3fn through its bits
            return torch.from_numpy(np.ascontiguousarray(a).view(np.uint8)).cuda().view(torch.float8_e4m3fn)
        return to_torch(a).cuda()

    def get(self, t):
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            return from_torch(t, bfloat16)
        if t.dtype == torch.float8_e4m3fn:
            return t.contiguous().view(torch.uint8).numpy().view(_F8).copy()
        return t.contiguous().numpy().astype(_NP[t.dtype], copy=True)

    def poisoned(self, shape, dtype):
        dt = torch.bfloat16 if bfloat16 is not None and np.dtype(dtype) == bfloat16 else \
            {np.dtype(k): v for v, k in _NP.items()}[np.dtype(dtype)]
        return torch.full(shape, float("nan"), dtype=dt, device="cuda")

    def expand(self, d, shape):
        return d.expand(shape)

    def transpose(self, d, axes):
        return d.permute(axes)

    @contextlib.contextmanager
    def as_sm90(self):
        """The Hopper kernel's tests need an sm_90 device: skip on any other."""
        if torch.cuda.get_device_capability() != (9, 0):
            pytest.skip("the Hopper attention kernel runs on sm_90 devices only")
        yield


@pytest.fixture(scope="module")
def dev():
    return GpuBackend()


from cuda_cases import *  # noqa: E402,F401,F403  (the shared tests, run with this module's `dev`)


# ---- GPU only ----

def _qkv(B, H, Hkv, S, D, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    mk = lambda h: torch.randn(B, h, S, D, device="cuda", dtype=dtype, generator=g)
    return mk(H), mk(Hkv), mk(Hkv)


@pytest.mark.parametrize("causal", [False, True])
def test_large_matches_torch_and_is_bit_identical(causal):
    api = attnkit

    q, k, v = _qkv(2, 16, 16, 2048, 128)
    outs = [api.attention(q, k, v, causal=causal) for _ in range(3)]
    assert all(torch.equal(o, outs[0]) for o in outs[1:]), "repeated runs differ"
    ref = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal)
    ours = (outs[0].double() - ref).abs().max().item()
    theirs = (torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal).double() - ref).abs().max().item()
    assert ours <= max(2 * theirs, 1.2e-2 * v.abs().max().item()), (ours, theirs)


def test_decode_gqa_bit_identical_and_close():
    api = attnkit

    q = torch.randn(4, 1, 32, 128, device="cuda", dtype=torch.float16)
    kc = torch.randn(4, 8192, 8, 128, device="cuda", dtype=torch.float16)
    vc = torch.randn_like(kc)
    lens = torch.tensor([8192, 100, 5000, 1], device="cuda", dtype=torch.int32)
    outs = [api.attention_with_kvcache(q, kc, vc, cache_seqlens=lens) for _ in range(3)]
    assert all(torch.equal(o, outs[0]) for o in outs[1:])
    for b, n in enumerate(lens.tolist()):
        kk = kc[b, :n].transpose(0, 1).repeat_interleave(4, 0)[None].double()
        vv = vc[b, :n].transpose(0, 1).repeat_interleave(4, 0)[None].double()
        ref = torch.nn.functional.scaled_dot_product_attention(q[b:b + 1].transpose(1, 2).double(), kk, vv)
        assert (outs[0][b:b + 1].transpose(1, 2).double() - ref).abs().max().item() < 2e-3 * vv.abs().max().item()


def test_runs_on_the_callers_stream():
    """Inputs that only become valid on the caller's stream, behind a ~50 ms sleep there: a
    kernel queued on any other stream would read them before they are written (zeros) and
    give a different result; on the caller's stream it waits behind them."""
    q, k, v = _qkv(1, 8, 8, 1024, 64)
    x = torch.randn(64, 2048, device="cuda")
    expect = attnkit.attention(q, k, v, causal=True)
    expect_y = torch.softmax(x, -1)
    expect_z = x.half() @ x.half().T
    torch.cuda.synchronize()
    qs, xs = torch.zeros_like(q), torch.zeros_like(x)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        torch.cuda._sleep(100_000_000)  # on the order of 50 ms of GPU clock on stream s
        qs.copy_(q)
        xs.copy_(x)
        got = attnkit.attention(qs, k, v, causal=True)
        y = attnkit.softmax(xs)
        z = attnkit.matmul(xs.half(), xs.half().T)
    torch.cuda.synchronize()
    assert torch.equal(got, expect)
    assert torch.allclose(y, expect_y, atol=1e-6)
    assert torch.allclose(z.float(), expect_z.float(), rtol=1e-2, atol=1e-1)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
def test_cutlass_sm90_matmul(dtype):
    """The CUTLASS sm90 matmul (gemm_sm90.cu; off unless ATTNKIT_CUDA_CUTLASS_GEMM=1 until it has
    run on a GPU) against float64: B row-major and column-major (w.T), ragged M and N, K over
    many k-steps, batched, broadcast and 4-d batches; shapes it does not cover (an odd K, a
    strided A) fall back to the mma.sync kernel and stay right. Each call says which kernel ran."""
    from attnkit import _cuda_backend as cb

    mod = cb._module()
    if not mod.cutlass_gemm_built():
        pytest.skip("this build has no CUTLASS sm90 matmul (CUTLASS headers and sm_90 at build time)")
    if torch.cuda.get_device_capability() != (9, 0):
        pytest.skip("the CUTLASS sm90 matmul runs on sm_90 devices only")
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, device="cuda", dtype=dtype, generator=g)
    tol = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11

    def check(a, b, kernel):
        got = attnkit.matmul(a, b)
        assert mod._last_gemm_kernel() == kernel, (a.shape, b.shape, a.stride(), b.stride())
        ref = torch.matmul(a.double(), b.double())
        scale = torch.matmul(a.double().abs(), b.double().abs()).max().item()
        err = (got.double() - ref).abs().max().item()
        assert err <= 4 * tol * scale, (a.shape, b.shape, err, scale)

    was = mod.cutlass_gemm_enabled()
    mod._set_cutlass_gemm(True)
    try:
        for m, k, n in [(256, 512, 384), (200, 1032, 136), (1000, 1000, 1000), (8, 64, 8)]:
            a, b = rnd(m, k), rnd(k, n)
            check(a, b, "sm90")                        # B row-major
            check(a, rnd(n, k).t(), "sm90")            # B column-major (x @ W.T)
        check(rnd(3, 200, 136), rnd(3, 136, 264), "sm90")      # batched
        check(rnd(4, 128, 64), rnd(64, 72), "sm90")            # B broadcast over the batch
        check(rnd(2, 3, 40, 96), rnd(2, 3, 96, 56), "sm90")    # two batch dims
        check(rnd(64, 100), rnd(100, 64), "mma")               # K not a multiple of 8: TMA cannot
        check(rnd(64, 256)[:, ::2], rnd(128, 64), "mma")       # A with a column stride
    finally:
        mod._set_cutlass_gemm(was)
    a, b = rnd(256, 512), rnd(512, 384)
    check(a, b, "mma")  # switched off again: the mma.sync kernel


@pytest.mark.parametrize("path", ["forward-decode", "decode-kernel", "hopper"])
def test_cuda_graph_capture_and_replay(path):
    """Issue 12 item 6: every CUDA entry point captures into a CUDA graph (no host
    synchronization, scratch from the stream-ordered allocator, outputs from torch's graph
    pool), and a replay on new input values gives the eager result bit for bit. The KV-cache
    call appends at the same positions on every replay (the lengths are not advanced)."""
    g = torch.Generator(device="cuda").manual_seed(1)
    rnd = lambda *shape, dtype=torch.float16: torch.randn(*shape, device="cuda", dtype=dtype, generator=g)
    x, a, b = rnd(64, 3000, dtype=torch.float32), rnd(128, 96), rnd(96, 80)
    q, k, v = _qkv(2, 8, 2, 300, 64, dtype=torch.float16)
    B, Smax, H, Hkv, D = 3, 512, 8, 2, 128
    kc, vc = rnd(B, Smax, Hkv, D, dtype=torch.bfloat16), rnd(B, Smax, Hkv, D, dtype=torch.bfloat16)
    q1, kn, vn = (rnd(B, 1, H, D, dtype=torch.bfloat16), rnd(B, 1, Hkv, D, dtype=torch.bfloat16),
                  rnd(B, 1, Hkv, D, dtype=torch.bfloat16))
    lens = torch.tensor([0, 200, 510], device="cuda", dtype=torch.int32)
    qv, kv_, vv = rnd(70, 4, 64), rnd(90, 2, 64), rnd(90, 2, 64)
    cu_q = torch.tensor([0, 30, 70], device="cuda", dtype=torch.int32)
    cu_k = torch.tensor([0, 50, 90], device="cuda", dtype=torch.int32)
    x8 = rnd(4, 16, 2, 64, dtype=torch.float32)

    def work():
        o, lse = attnkit.attention_with_kvcache(q1, kc, vc, k=kn, v=vn, cache_seqlens=lens, return_lse=True)
        codes, scale = attnkit.quantize_kv(x8, "int8")
        return {"softmax": attnkit.softmax(x), "matmul": attnkit.matmul(a, b),
                "attention": attnkit.attention(q, k, v, causal=True),
                "kvcache": o, "kvcache lse": lse,
                "varlen": attnkit.attention_varlen(qv, kv_, vv, cu_q, cu_k, causal=True),
                "quantize codes": codes, "quantize scale": scale}

    # "hopper": the attention and varlen calls (>= 64 query rows) on the Hopper kernel on sm_90
    with decode_kernel(path == "decode-kernel"), cuda_switch("hopper", path == "hopper"):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):  # warm-up outside the capture, as torch asks
            work()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = work()
        for t in (x, a, b, q, k, v, q1, kn, vn, qv, kv_, vv, x8):
            t.copy_(torch.randn(t.shape, device="cuda", generator=g).to(t.dtype))
        graph.replay()
        torch.cuda.synchronize()
        expect = work()
        torch.cuda.synchronize()
    for name, want in expect.items():
        assert torch.equal(captured[name], want), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_torch_adapter_trains_on_the_cuda_backward(dtype):
    """attnkit.torch with ATTNKIT_CUDA_BACKWARD on: gradients from attnkit's CUDA backward
    (no fallback warning), close to torch's own float32 SDPA gradients; GQA, causal."""
    import warnings

    import attnkit.torch as at

    g = torch.Generator(device="cuda").manual_seed(3)
    q, k, v = (torch.randn(2, h, 300, 64, device="cuda", dtype=dtype, generator=g) for h in (8, 2, 2))
    dout = torch.randn(2, 8, 300, 64, device="cuda", dtype=dtype, generator=g)
    with backward_kernel():
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # a fallback to torch would warn
            o = at.scaled_dot_product_attention(*leaves, is_causal=True, enable_gqa=True)
        o.backward(dout)
    ref = [t.float().requires_grad_() for t in (q, k, v)]
    torch.nn.functional.scaled_dot_product_attention(*ref, is_causal=True, enable_gqa=True).backward(dout.float())
    tol = 2e-2 if dtype == torch.bfloat16 else 4e-3
    for got, want, name in zip(leaves, ref, ("dq", "dk", "dv")):
        scale = want.grad.abs().max().item()
        assert (got.grad.float() - want.grad).abs().max().item() <= tol * scale, name


def test_results_keep_the_inputs_kind_and_device_guard():
    api = attnkit

    q, k, v = _qkv(1, 2, 2, 64, 32, dtype=torch.float16)
    before = torch.cuda.current_device()
    o, lse = api.attention(q, k, v, return_lse=True)
    assert isinstance(o, torch.Tensor) and o.is_cuda and o.dtype == torch.float16
    assert lse.dtype == torch.float32 and lse.shape == (1, 2, 64)
    assert torch.cuda.current_device() == before


def test_dlpack_only_producer():
    api = attnkit

    class DLOnly:
        def __init__(self, t):
            self.t = t

        def __dlpack__(self, stream=None):
            return self.t.__dlpack__(stream=stream)

        def __dlpack_device__(self):
            return self.t.__dlpack_device__()

    q, k, v = _qkv(1, 4, 2, 100, 64, dtype=torch.float16)
    assert is_device_array(DLOnly(q))
    got = api.attention(DLOnly(q), DLOnly(k), DLOnly(v))
    torch.cuda.synchronize()
    assert torch.equal(got, api.attention(q, k, v))


def test_cupy_arrays():
    cupy = pytest.importorskip("cupy")
    api = attnkit

    x = cupy.random.standard_normal((5, 300), dtype=cupy.float32)
    y = api.softmax(x)
    assert isinstance(y, cupy.ndarray)
    e = cupy.exp(x - x.max(-1, keepdims=True))
    assert float(cupy.abs(y - e / e.sum(-1, keepdims=True)).max()) < 1e-6


def test_host_arrays_and_wrong_devices_are_refused():
    api = attnkit

    q, k, v = _qkv(1, 2, 2, 16, 32, dtype=torch.float16)
    with pytest.raises(TypeError, match="k must be a CUDA device array"):
        api.attention(q, k.cpu(), v)
    with pytest.raises(TypeError, match="mask must be a CUDA device array like q, got numpy.ndarray"):
        api.attention(q, k, v, mask=np.ones((16, 16), bool))
    if torch.cuda.device_count() > 1:
        with pytest.raises(ValueError, match="is on cuda:1 but the call runs on cuda:0"):
            api.attention(q, k.to("cuda:1"), v)
        q1, k1, v1 = (t.to("cuda:1") for t in (q, k, v))
        assert api.attention(q1, k1, v1).device == torch.device("cuda:1")
