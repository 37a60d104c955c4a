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
    with pytest.raises(RuntimeError, match="attn_mask should not be set when is_causal"):
        at.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(5, 5, dtype=torch.bool), is_causal=True)
    with pytest.raises(RuntimeError, match="same dtype"):
        at.scaled_dot_product_attention(q, q.double(), q)
    with pytest.raises(RuntimeError, match="enable_gqa"):
        at.scaled_dot_product_attention(q, k, v)
    with pytest.raises(RuntimeError, match="does not broadcast"):
        at.scaled_dot_product_attention(q, q, q, attn_mask=torch.ones(3, 7, dtype=torch.bool))


def test_fallback_warns_once():
    q = torch.randn(1, 2, 4, 8).to(torch.int32)
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        with pytest.raises(RuntimeError):  # torch itself refuses int inputs
            at.scaled_dot_product_attention(q, q, q)
    assert any("falling back" in str(x.message) and "int32" in str(x.message) for x in w)
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
    assert close(compiled(q, k, v), f(q, k, v), torch.float32)


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
