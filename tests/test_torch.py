"""attnkit.torch: the SDPA twin, custom ops, autograd, compile, dropout, override."""
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnkit
import attnkit.torch as at


def rand(*shape, dtype=torch.float32, grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def close(a, b, dtype):
    tol = {torch.float32: 2e-5, torch.float64: 1e-10, torch.float16: 3e-3, torch.bfloat16: 2e-2}[dtype]
    return (a.double() - b.double()).abs().max().item() <= tol * max(1.0, b.double().abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_torch_sdpa(dtype, causal):
    torch.manual_seed(0)
    q, k, v = rand(2, 4, 33, 64, dtype=dtype), rand(2, 4, 33, 64, dtype=dtype), rand(2, 4, 33, 64, dtype=dtype)
    ref = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=causal).to(dtype)
    out = at.scaled_dot_product_attention(q, k, v, is_causal=causal)
    assert out.dtype == dtype and out.shape == ref.shape
    assert close(out, ref, dtype)


def test_masks_gqa_shapes_scale():
    torch.manual_seed(1)
    q, k, v = rand(2, 8, 20, 32), rand(2, 2, 30, 32), rand(2, 2, 30, 16)
    bmask = torch.rand(2, 1, 20, 30) > 0.3
    fmask = torch.randn(20, 30)
    for mask in (None, bmask, fmask, bmask[0, 0]):
        ref = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=0.3)
        out = at.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True, scale=0.3)
        assert close(out, ref, torch.float32)
    # 3-D inputs (no head dim)
    q3, k3, v3 = rand(3, 10, 8), rand(3, 12, 8), rand(3, 12, 8)
    assert close(at.scaled_dot_product_attention(q3, k3, v3), F.scaled_dot_product_attention(q3, k3, v3), torch.float32)


def test_zero_copy_for_transposed_views():
    torch.manual_seed(2)
    x = rand(2, 16, 3, 4, 32)  # (B, S, 3, H, D) like a fused qkv projection
    q, k, v = (x[:, :, i].transpose(1, 2) for i in range(3))
    assert not q.is_contiguous()
    ref = F.scaled_dot_product_attention(q, k, v)
    assert close(at.scaled_dot_product_attention(q, k, v), ref, torch.float32)


def test_errors_like_torch():
    q, k, v = rand(1, 4, 5, 8), rand(1, 2, 5, 8), rand(1, 2, 5, 8)
    # (is_causal with attn_mask: see test_is_causal_with_mask_like_torch)
    with pytest.raises(RuntimeError, match="same dtype"):
        at.scaled_dot_product_attention(q, q.double(), q)
    # 4 query heads over 2 key heads without enable_gqa: torch decides (its math kernel would
    # broadcast heads of 1; these do not broadcast), with its own message
    with pytest.raises(RuntimeError) as want:
        F.scaled_dot_product_attention(q, k, v)
    with pytest.raises(RuntimeError) as got, pytest.warns(UserWarning, match="run torch's SDPA"):
        at._warned.clear()
        at.scaled_dot_product_attention(q, k, v)
    assert str(got.value) == str(want.value)
    with pytest.raises(RuntimeError, match="does not broadcast"):
        at.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(3, 7, dtype=torch.bool))


def test_attention_refusals_name_the_argument():
    """attnkit.torch.attention (what the transformers adapter calls) hands raw pointers to the
    kernels: a tensor on the meta device once reached them and crashed the process. Every
    refusal is a Python error naming the function and the argument, and nothing is computed."""
    fn = "attnkit.torch.attention"
    q, k, v = rand(1, 2, 3, 8), rand(1, 2, 5, 8), rand(1, 2, 5, 8)
    meta = torch.empty(1, 2, 5, 8, device="meta")
    cases = [
        ((q, meta, v), {}, ValueError, "k is on device meta"),
        ((q, k, meta), {}, ValueError, "v is on device meta"),
        ((q.to("meta"), k, v), {}, ValueError, "q is on device meta"),
        ((q, k, v), dict(attn_mask=torch.ones(3, 5, dtype=torch.bool, device="meta")), ValueError,
         "mask is on device meta"),
        ((q.requires_grad_(), meta, v), {}, ValueError, "k is on device meta"),
        ((q.int(), k.int(), v.int()), {}, TypeError, "q has unsupported dtype torch.int32"),
        ((q, k, v), dict(attn_mask=torch.ones(3, 5, dtype=torch.int32)), TypeError,
         "mask has unsupported dtype torch.int32"),
        ((q.to_sparse(), k, v), {}, TypeError, "query is a torch.sparse_coo tensor"),
        ((torch.nested.nested_tensor([torch.randn(2, 3, 8)] * 2), k, v), {}, TypeError,
         "query is a nested tensor"),
        ((q[0], k, v), {}, ValueError, r"query must be 4-D \(B, H, S, D\), got shape \(2, 3, 8\)"),
        ((q, k.numpy(), v), {}, TypeError, "key must be a torch.Tensor, got ndarray"),
        ((rand(2, 2, 3, 8), rand(3, 2, 5, 8), rand(3, 2, 5, 8)), {}, ValueError,
         r"batch sizes 2 \(query\), 3 \(key\), 3 \(value\) do not broadcast"),
        ((q, k, v), dict(attn_mask=torch.ones(7, 7, dtype=torch.bool)), ValueError,
         r"attn_mask of shape \(7, 7\) does not broadcast"),
        ((q, k, v), dict(window=(1,)), ValueError, "window must be a pair of ints"),
    ]
    for args, kw, exc, msg in cases:
        with pytest.raises(exc, match=f"{fn}: {msg}"):
            at.attention(*args, **kw)
    # each input's batch broadcasts on its own (v with batch 1 beside k with batch 2)
    k2, v1 = rand(2, 2, 5, 8), rand(1, 2, 5, 8)
    ref = F.scaled_dot_product_attention(q.detach().expand(2, -1, -1, -1), k2, v1.expand(2, -1, -1, -1))
    assert close(at.attention(q.detach(), k2, v1), ref, torch.float32)


def test_fallback_warns_once():
    q = torch.randn(1, 2, 4, 8).to(torch.int32)
    at._warned.clear()  # "once" per process: start from a process that has not warned yet
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        for _ in range(3):
            with pytest.raises(RuntimeError):  # torch itself refuses int inputs
                at.scaled_dot_product_attention(q, q, q)
    hits = [x for x in w if "falling back" in str(x.message) and "int32" in str(x.message)]
    assert len(hits) == 1, [str(x.message) for x in w]
    # a mask that needs a gradient goes to torch too, with the answer torch gives
    q, k, v = rand(1, 2, 4, 8), rand(1, 2, 4, 8), rand(1, 2, 4, 8)
    m = torch.zeros(4, 4, requires_grad=True)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        out = at.scaled_dot_product_attention(q, k, v, attn_mask=m)
    out.sum().backward()
    assert m.grad is not None


@pytest.mark.parametrize("causal", [False, True])
def test_autograd_matches_torch(causal):
    torch.manual_seed(3)
    q, k, v = rand(2, 8, 40, 32, grad=True), rand(2, 2, 40, 32, grad=True), rand(2, 2, 40, 32, grad=True)
    out = at.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    g = torch.randn_like(out)
    gq, gk, gv = torch.autograd.grad(out, (q, k, v), g)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)
    rq, rk, rv = torch.autograd.grad(ref, (q, k, v), g)
    for a, b in ((gq, rq), (gk, rk), (gv, rv)):
        assert close(a, b, torch.float32)


def test_gradcheck_float64():
    torch.manual_seed(4)
    q, k, v = (rand(1, 2, 6, 5, dtype=torch.float64, grad=True) for _ in range(3))
    mask = torch.rand(1, 1, 6, 6) > 0.3
    mask[..., 0] = True
    assert torch.autograd.gradcheck(lambda a, b, c: at.scaled_dot_product_attention(a, b, c, attn_mask=mask), (q, k, v))
    assert torch.autograd.gradcheck(lambda a, b, c: at.scaled_dot_product_attention(a, b, c, is_causal=True), (q, k, v))
    assert torch.autograd.gradcheck(
        lambda a, b, c: at.attention(a, b, c, softcap=2.0, window=(2, 1), bottom_right=True), (q, k, v))


def test_opcheck():
    torch.manual_seed(5)
    q, k, v = rand(1, 2, 7, 8, grad=True), rand(1, 2, 9, 8, grad=True), rand(1, 2, 9, 8, grad=True)
    seed = torch.zeros(1, dtype=torch.int64)
    args = (q, k, v, None, 0.0, True, 0.35, seed, 0.0, -1, -1, False, False)
    torch.library.opcheck(torch.ops.attnkit.sdpa_forward.default, args)
    out, lse = torch.ops.attnkit.sdpa_forward(*args)
    bargs = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse.detach(), None, 0.0,
             True, 0.35, seed, 0.0, -1, -1, False, False)
    torch.library.opcheck(torch.ops.attnkit.sdpa_backward.default, bargs)


def test_torch_compile_fullgraph():
    torch.manual_seed(6)
    q, k, v = rand(1, 4, 16, 32), rand(1, 4, 16, 32), rand(1, 4, 16, 32)

    def f(a, b, c):
        return at.scaled_dot_product_attention(a * 2, b, c, is_causal=True) + 1

    compiled = torch.compile(f, fullgraph=True, backend="eager")
    # against torch's own function on the same inputs, in float64 (not against eager attnkit)
    want = F.scaled_dot_product_attention(q.double() * 2, k.double(), v.double(), is_causal=True) + 1
    assert close(compiled(q, k, v), want, torch.float32)


def test_dropout_statistics_and_exact_gradient():
    torch.manual_seed(7)
    B, H, S, D, p = 1, 2, 64, 16, 0.25
    q, k, v = rand(B, H, S, D, grad=True), rand(B, H, S, D, grad=True), rand(B, H, S, D, grad=True)
    # the realised mask: the wrapper draws its seed from torch's default generator
    torch.manual_seed(11)
    out = at.scaled_dot_product_attention(q, k, v, dropout_p=p)
    torch.manual_seed(11)
    seed = int(torch.randint(0, 2**62, (1,), dtype=torch.int64))
    keep = torch.from_numpy(attnkit.dropout_mask((B, H, S, S), p, seed))
    drop_rate = 1 - keep.double().mean().item()
    assert abs(drop_rate - p) < 4 * np.sqrt(p * (1 - p) / keep.numel())
    P = torch.softmax((q.double() @ k.double().transpose(-1, -2)) / np.sqrt(D), -1)
    ref = (P * keep / (1 - p)) @ v.double()
    assert (out.double() - ref).abs().max() < 1e-5
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), g)
    want = torch.autograd.grad(ref, (q, k, v), g.double())
    for a, b in zip(got, want):
        assert (a.double() - b).abs().max() < 1e-4
    # expectation: averaged over many masks the output approaches the no-dropout output
    with torch.no_grad():
        mean = sum(at.scaled_dot_product_attention(q, k, v, dropout_p=p) for _ in range(400)) / 400
        full = at.scaled_dot_product_attention(q, k, v)
    assert (mean - full).abs().mean() < 0.05 * full.abs().mean() + 0.02


def test_sdpa_override_catches_imported_names_and_restores():
    from torch.nn.functional import scaled_dot_product_attention as imported

    original = F.scaled_dot_product_attention
    calls = []
    real = at.scaled_dot_product_attention

    def spy(*a, **kw):
        calls.append(1)
        return real(*a, **kw)

    at_sdpa_saved = at.scaled_dot_product_attention
    q = rand(1, 2, 5, 8)
    try:
        at.scaled_dot_product_attention = spy
        with at.sdpa_override():
            F.scaled_dot_product_attention(q, q, q)
            imported(q, q, q)
        assert len(calls) == 2
    finally:
        at.scaled_dot_product_attention = at_sdpa_saved
    assert F.scaled_dot_product_attention is original
    with pytest.raises(ZeroDivisionError):
        with at.sdpa_override():
            1 / 0
    assert F.scaled_dot_product_attention is original


def test_torch_math_fallback_matches_kernels():
    """The autograd fallback used on devices without an attnkit backward (CUDA training)."""
    torch.manual_seed(8)
    q, k, v = rand(2, 4, 10, 8, grad=True), rand(2, 2, 12, 8, grad=True), rand(2, 2, 12, 8, grad=True)
    m = torch.rand(2, 1, 10, 12) > 0.3
    for kw in (dict(attn_mask=m, softcap=2.0, window=(3, 1), bottom_right=True),
               dict(attn_mask=None, is_causal=True), dict(attn_mask=torch.randn(10, 12))):
        want = at.attention(q, k, v, scale=0.3, **kw)
        got = at._torch_math(q, k, v, kw.get("attn_mask"), 0.0, kw.get("is_causal", False), 0.3,
                             kw.get("softcap"), kw.get("window"), kw.get("bottom_right", False))
        assert close(got, want, torch.float32)
        g1 = torch.autograd.grad(want.sum(), (q, k, v))
        g2 = torch.autograd.grad(got.sum(), (q, k, v))
        assert all(close(a, b, torch.float32) for a, b in zip(g1, g2))


# ---- torch's own SDPA test suite, as attnkit tests (issue 17) ---------------------------------

from torch.nn.attention import SDPBackend, sdpa_kernel  # noqa: E402
from torch.nn.attention.bias import causal_lower_right, causal_upper_left  # noqa: E402


def reference_math(q, k, v, mask=None, causal=False, scale=None):
    """torch's math on float64 copies (a bool/float mask, top-left causal)."""
    with sdpa_kernel(SDPBackend.MATH):
        m = mask if mask is None or mask.dtype == torch.bool else mask.double()
        return F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=m,
                                              is_causal=causal, scale=scale)


def rel_err(a, b):
    b = b.double()
    fin = torch.isfinite(b)
    assert torch.equal(torch.isnan(a.double()), torch.isnan(b)), "NaN patterns differ"
    return ((a.double() - b)[fin].abs().max() / b[fin].abs().max().clamp_min(1e-30)).item() if fin.any() else 0.0


BIAS_SHAPES = [(2, 3, 16, 16, 8), (2, 3, 13, 40, 16), (1, 2, 40, 13, 16), (1, 1, 23, 56, 15)]


@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
@pytest.mark.parametrize("shape", BIAS_SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("override", [False, True])
def test_causal_bias_variants(variant, shape, dtype, override):
    """torch.nn.attention.bias masks are honoured (top-left / bottom-right causal natively),
    called directly or through F under the override, forward and backward."""
    B, H, Sq, Sk, D = shape
    make = causal_upper_left if variant == "upper_left" else causal_lower_right
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns for lower-right with Sq > Sk
        bias = make(Sq, Sk)
    torch.manual_seed(20)
    q, k, v = (rand(B, H, n, D, dtype=dtype, grad=True) for n in (Sq, Sk, Sk))
    dense = bias._materialize()
    if override:
        with at.sdpa_override():
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    else:
        out = at.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = reference_math(qd, kd, vd, mask=dense)
    tol = 1e-5 if dtype == torch.float32 else 3e-3
    assert rel_err(out, want) < tol
    g = torch.randn_like(want)
    got = torch.autograd.grad(out, (q, k, v), g.to(dtype))
    ref = torch.autograd.grad(want, (qd, kd, vd), g)
    for a, b in zip(got, ref):
        assert rel_err(a, b) < 10 * tol


def test_causal_bias_errors_like_torch():
    q = rand(1, 2, 8, 16)
    with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
        at.scaled_dot_product_attention(q, q, q, attn_mask=causal_upper_left(8, 8), is_causal=True)
    with at.sdpa_override():
        with pytest.raises(ValueError, match="CausalBias should not be used with causal=True"):
            F.scaled_dot_product_attention(q, q, q, attn_mask=causal_lower_right(8, 8), is_causal=True)
    # a lower-right bias whose sizes are not the inputs': torch materializes it, so must we
    k = rand(1, 2, 12, 16)
    bias = causal_lower_right(1, 12)  # broadcasts over the 8 query rows
    want = reference_math(q, k, k, mask=bias._materialize())
    assert rel_err(at.scaled_dot_product_attention(q, k, k, attn_mask=bias), want) < 1e-5
    with pytest.raises(RuntimeError):
        F.scaled_dot_product_attention(q, k, k, attn_mask=causal_lower_right(5, 12))
    with pytest.raises(RuntimeError):
        at.scaled_dot_product_attention(q, k, k, attn_mask=causal_lower_right(5, 12))


@pytest.mark.parametrize("variant", ["upper_left", "lower_right"])
def test_causal_bias_under_compile(variant):
    """torch.compile of F.sdpa with a CausalBias under the override: one graph, no recursion,
    the same result and gradients as torch."""
    torch._dynamo.reset()
    make = causal_upper_left if variant == "upper_left" else causal_lower_right
    torch.manual_seed(21)
    q, k, v = rand(2, 2, 12, 16, grad=True), rand(2, 2, 20, 16, grad=True), rand(2, 2, 20, 16, grad=True)
    bias = make(12, 20)
    from torch._dynamo.testing import CompileCounterWithBackend

    cnt = CompileCounterWithBackend("aot_eager")
    with at.sdpa_override():
        out = torch.compile(F.scaled_dot_product_attention, backend=cnt)(q, k, v, attn_mask=bias)
    assert cnt.frame_count == 1
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    want = reference_math(qd, kd, vd, mask=bias._materialize())
    assert rel_err(out, want) < 1e-5
    g = torch.randn_like(out)
    for a, b in zip(torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(want, (qd, kd, vd), g.double())):
        assert rel_err(a, b) < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64])
def test_nan_and_inf_propagate_like_torch(dtype):
    """torch's test_cpu_flash_attn_nan_propagation / test_non_masked_rows_nan_props: what a row
    attends to propagates NaN/inf (also to the gradient); NaN in masked-out K/V stays out."""
    q = torch.full((1, 1, 16, 16), float("nan"), dtype=dtype)
    k, v = rand(1, 1, 16, 16, dtype=dtype), rand(1, 1, 16, 16, dtype=dtype)
    assert torch.isnan(at.scaled_dot_product_attention(q, k, v)).all()
    for fill in (float("nan"), float("inf")):
        for Sq in (4, 40):  # the decode and the prefill kernel
            torch.manual_seed(22)
            q = rand(1, 2, Sq, 16, dtype=dtype)
            q[0, 1, 2, 3] = fill
            q.requires_grad_(True)
            k, v = rand(1, 2, 4, 16, dtype=dtype, grad=True), rand(1, 2, 4, 16, dtype=dtype, grad=True)
            out = at.scaled_dot_product_attention(q, k, v)
            bad = torch.isnan(out).any(-1)
            assert bad[0, 1, 2] and bad.sum() == 1  # that row only, as torch
            out.sum().backward()
            assert torch.isnan(q.grad).any()
            assert not torch.isnan(q.grad[0, 0]).any()
    # a NaN in one unmasked key poisons every row that attends it (as torch) ...
    q, k, v = rand(1, 2, 6, 16, dtype=dtype), rand(1, 2, 9, 16, dtype=dtype), rand(1, 2, 9, 16, dtype=dtype)
    k[0, 0, 4, 0] = float("nan")
    out = at.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert torch.isnan(out[0, 0, 4:]).all() and not torch.isnan(out[0, 0, :4]).any()
    assert not torch.isnan(out[0, 1]).any()
    # ... and none it is masked out of (here torch gives NaN everywhere: 0 * NaN in P @ V)
    mask = torch.ones(6, 9, dtype=torch.bool)
    mask[:, 4] = False
    v[0, 0, 4] = float("nan")
    assert torch.isfinite(at.scaled_dot_product_attention(q, k, v, attn_mask=mask)).all()


def test_mask_dtype_rules_like_torch():
    """torch 2.13: a mask is bool, float32, or the query's dtype."""
    torch.manual_seed(23)
    for qd in (torch.float16, torch.bfloat16, torch.float64, torch.float32):
        q, k, v = rand(1, 2, 5, 8, dtype=qd), rand(1, 2, 7, 8, dtype=qd), rand(1, 2, 7, 8, dtype=qd)
        for md in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
            m = torch.randn(5, 7).to(md)
            try:
                F.scaled_dot_product_attention(q, k, v, attn_mask=m)
            except RuntimeError as e:
                with pytest.raises(RuntimeError, match="attn_mask dtype"):
                    at.scaled_dot_product_attention(q, k, v, attn_mask=m)
                assert md not in (torch.float32, qd), e
                continue
            got = at.scaled_dot_product_attention(q, k, v, attn_mask=m)
            tol = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 3e-3, torch.bfloat16: 2e-2}[qd]
            assert got.dtype == qd and rel_err(got, reference_math(q, k, v, mask=m)) < tol


def test_is_causal_with_mask_like_torch():
    """torch 2.13 applies both when its flash kernel takes the call (the default on CPU) and
    raises where it would pick the math kernel (dropout, 3-D inputs, sdpa_kernel(MATH))."""
    torch.manual_seed(24)
    q, k, v = rand(2, 2, 6, 8, grad=True), rand(2, 2, 9, 8, grad=True), rand(2, 2, 9, 8, grad=True)
    for m in (torch.rand(6, 9) > 0.3, torch.randn(2, 1, 6, 9)):
        want = F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True)
        got = at.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True)
        assert rel_err(got, want) < 1e-5
        g = torch.randn_like(want)
        for a, b in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
            assert rel_err(a, b) < 1e-4
    m = torch.rand(6, 9) > 0.3
    for kw, args in ((dict(dropout_p=0.1), (q, k, v)), ({}, (q[0], k[0], v[0]))):
        with pytest.raises(RuntimeError, match="attn_mask should not be set when is_causal"):
            F.scaled_dot_product_attention(*args, attn_mask=m, is_causal=True, **kw)
        with pytest.raises(RuntimeError, match="attn_mask should not be set when is_causal"):
            at.scaled_dot_product_attention(*args, attn_mask=m, is_causal=True, **kw)
    with sdpa_kernel(SDPBackend.MATH):
        with pytest.raises(RuntimeError, match="attn_mask should not be set when is_causal"):
            at.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True)


def test_kernel_dependent_rules_under_compile():
    """The same rules under torch.compile (fullgraph), where torch's selector cannot be traced."""
    torch.manual_seed(31)
    q, k, v = rand(2, 2, 6, 8), rand(2, 2, 9, 8), rand(2, 2, 9, 8)
    m = torch.rand(6, 9) > 0.3
    torch._dynamo.reset()
    f = torch.compile(lambda a, b, c: at.scaled_dot_product_attention(a, b, c, attn_mask=m, is_causal=True),
                      fullgraph=True, backend="eager")
    assert rel_err(f(q, k, v), F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=True)) < 1e-5
    # refusals: the same exception type as torch's (fullgraph=True would turn both into the
    # compiler's own RuntimeError subclasses)
    for g, exc in ((lambda a, b, c: at.scaled_dot_product_attention(a[0], b[0], c[0], attn_mask=m, is_causal=True),
                    RuntimeError),
                   (lambda a, b, c: at.scaled_dot_product_attention(a, b, c, attn_mask=m[0]), IndexError)):
        torch._dynamo.reset()
        with pytest.raises(exc):
            torch.compile(g, backend="eager")(q, k, v)


def test_low_dim_masks_like_torch():
    """A 1-D or 0-D mask: torch 2.13 raises an IndexError for 4-D inputs (its flash kernel's
    check) and broadcasts it where its math kernel runs (3-D inputs)."""
    q, k = rand(1, 2, 5, 8), rand(1, 2, 7, 8)
    for m in (torch.ones(7, dtype=torch.bool), torch.zeros(7), torch.tensor(True)):
        with pytest.raises(IndexError):
            F.scaled_dot_product_attention(q, k, k, attn_mask=m)
        with pytest.raises(IndexError):
            at.scaled_dot_product_attention(q, k, k, attn_mask=m)
    m = torch.rand(7) > 0.3
    m[0] = True
    want = F.scaled_dot_product_attention(q[0], k[0], k[0], attn_mask=m)
    assert rel_err(at.scaled_dot_product_attention(q[0], k[0], k[0], attn_mask=m), want) < 1e-5


def test_float64_mask_precision_like_torch():
    """A float64 mask with float64 inputs: exact to float64, forward and backward."""
    torch.manual_seed(25)
    q, k, v = (rand(2, 2, 11, 8, dtype=torch.float64, grad=True) for _ in range(3))
    m = torch.randn(2, 1, 11, 11, dtype=torch.float64) * 3
    got = at.scaled_dot_product_attention(q, k, v, attn_mask=m)
    want = reference_math(q, k, v, mask=m)
    assert rel_err(got, want) < 1e-13
    g = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(got, (q, k, v), g), torch.autograd.grad(want, (q, k, v), g)):
        assert rel_err(a, b) < 1e-12


def test_torchscript_under_the_override_leaves_no_trace():
    """torch.jit.script of modules that call SDPA works under the override (scripted code runs
    torch's SDPA: the twin is registered as that builtin), and scripting still works after."""
    import torch.nn as nn

    class MyLayer(nn.TransformerEncoderLayer):
        pass

    torch.manual_seed(26)
    x = rand(2, 5, 8)
    for make in (lambda: nn.MultiheadAttention(8, 2, batch_first=True),
                 lambda: MyLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)):
        mod = make().eval()
        with torch.no_grad():
            want = mod(x, x, x)[0] if isinstance(mod, nn.MultiheadAttention) else mod(x)
            with at.sdpa_override():
                sm = torch.jit.script(mod)
                got = sm(x, x, x)[0] if isinstance(mod, nn.MultiheadAttention) else sm(x)
            assert rel_err(got, want) < 1e-5
            sm2 = torch.jit.script(make().eval())  # no "Can't redefine method" afterwards
            assert sm2 is not None
    # a function calling the twin directly is scriptable too (as torch's op)
    def f(a, b, c):
        return at.scaled_dot_product_attention(a, b, c, None, 0.0, True)

    sf = torch.jit.script(f)
    q = rand(1, 2, 6, 8)
    assert rel_err(sf(q, q, q), F.scaled_dot_product_attention(q, q, q, is_causal=True)) < 1e-6


def test_jit_trace_under_the_override_records_torchs_op():
    """A trace must record an op it can replay: under tracing the twin calls torch's SDPA."""
    torch.manual_seed(27)

    def f(a, b, c):
        return F.scaled_dot_product_attention(a, b, c, is_causal=True)

    q = rand(1, 2, 6, 8)
    with at.sdpa_override():
        traced = torch.jit.trace(f, (q, q, q))
    q2, k2, v2 = rand(1, 2, 6, 8), rand(1, 2, 6, 8), rand(1, 2, 6, 8)
    assert rel_err(traced(q2, k2, v2), reference_math(q2, k2, v2, causal=True)) < 1e-5


def test_vmap_and_functorch_transforms():
    """torch.func transforms over the twin (they run torch's SDPA on wrapped tensors)."""
    torch.manual_seed(28)
    q, k, v = rand(3, 2, 5, 8), rand(3, 2, 7, 8), rand(3, 2, 7, 8)
    got = torch.func.vmap(at.scaled_dot_product_attention)(q, k, v)
    assert rel_err(got, reference_math(q, k, v)) < 1e-5
    with at.sdpa_override():
        got = torch.func.vmap(lambda a, b, c: F.scaled_dot_product_attention(a, b, c, is_causal=True))(q, k, v)
    assert rel_err(got, reference_math(q, k, v, causal=True)) < 1e-5
    gq = torch.func.grad(lambda a: at.scaled_dot_product_attention(a, k, v).sum())(q)
    qd = q.double().requires_grad_()
    (want,) = torch.autograd.grad(reference_math(qd, k, v).sum(), qd)
    assert rel_err(gq, want) < 1e-4
    # forward-mode AD (dual tensors): what torch does. Its default CPU kernel has no forward
    # AD (NotImplementedError); its math kernel has (never a silently missing tangent).
    import torch.autograd.forward_ad as fwAD

    t = torch.randn_like(q)
    with fwAD.dual_level():
        with pytest.raises(NotImplementedError):
            F.scaled_dot_product_attention(fwAD.make_dual(q, t), k, v)
        with pytest.raises(NotImplementedError):
            at.scaled_dot_product_attention(fwAD.make_dual(q, t), k, v)
        with sdpa_kernel(SDPBackend.MATH):
            out = at.scaled_dot_product_attention(fwAD.make_dual(q, t), k, v)
        tangent = fwAD.unpack_dual(out).tangent
    _, want_t = torch.func.jvp(lambda a: reference_math(a, k.double(), v.double()), (q.double(),), (t.double(),))
    assert tangent is not None and rel_err(tangent, want_t) < 1e-4


def test_gradcheck_with_batched_grad():
    torch.manual_seed(29)
    q, k, v = (rand(1, 2, 4, 3, dtype=torch.float64, grad=True) for _ in range(3))
    mask = torch.rand(1, 1, 4, 4) > 0.3
    mask[..., 0] = True
    for kw in (dict(attn_mask=mask), dict(is_causal=True)):
        assert torch.autograd.gradcheck(lambda a, b, c: at.scaled_dot_product_attention(a, b, c, **kw),
                                        (q, k, v), check_batched_grad=True)
    assert torch.autograd.gradcheck(
        lambda a, b, c: at.attention(a, b, c, softcap=2.0, window=(2, 1), bottom_right=True), (q, k, v),
        check_batched_grad=True)


def test_dropout_reproducible_under_manual_seed():
    """attnkit draws its own dropout mask: reproducible under torch.manual_seed (not torch's)."""
    q, k, v = rand(1, 2, 9, 8), rand(1, 2, 9, 8), rand(1, 2, 9, 8)
    outs = []
    for _ in range(2):
        torch.manual_seed(30)
        outs.append(at.scaled_dot_product_attention(q, k, v, dropout_p=0.3))
    assert torch.equal(outs[0], outs[1])


def test_override_without_the_mode_keeps_the_mha_fastpath():
    """Any TorchFunctionMode turns off nn.MultiheadAttention's fused inference path; the
    override's mode catches callers that imported SDPA by name. catch_imported=False replaces
    only F.scaled_dot_product_attention, and the fastpath stays."""
    from unittest.mock import patch

    import torch.nn as nn

    mha = nn.MultiheadAttention(8, 2, batch_first=True).eval()
    x = rand(1, 3, 8)
    for catch, expect_fast in ((True, False), (False, True)):
        with torch.no_grad(), at.sdpa_override(catch_imported=catch):
            with patch("torch._native_multi_head_attention") as fast:
                fast.return_value = (torch.zeros(1, 3, 8), None)
                mha(x, x, x)
            assert fast.called == expect_fast
            calls = []
            real = at.scaled_dot_product_attention
            try:
                at.scaled_dot_product_attention = lambda *a, **kw: calls.append(1) or real(*a, **kw)
                with at.sdpa_override(catch_imported=catch):
                    F.scaled_dot_product_attention(x[None], x[None], x[None])
            finally:
                at.scaled_dot_product_attention = real
            assert calls
