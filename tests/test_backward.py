"""attention_backward (NumPy API) against float64 autograd."""
import numpy as np
import pytest
import torch

import attnkit
from reference import assert_close, bfloat16, grad_rounding_floors, randn, to64

ISA_KERNELS = ("attention_bwd",)  # the kernel-table entries tested here (conftest.isas_for)


def torch_reference_grads(q, k, v, dout, *, mask=None, causal=False, bottom_right=False,
                          scale=None, window=None, alibi=None, softcap=None, keep=None, p=0.0,
                          with_key_mass=False):
    """float64 autograd through an explicit masked-softmax attention (full semantics).
    with_key_mass: also return the largest attention mass a key receives, max over (batch, kv
    head, key) of sum P over the query rows of every head of its group (for
    grad_rounding_floors)."""
    tq, tk, tv = (torch.tensor(to64(a), requires_grad=True) for a in (q, k, v))
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = H // Hkv
    kk, vv = tk.repeat_interleave(G, 1), tv.repeat_interleave(G, 1)
    sc = 1 / np.sqrt(D) if scale is None else scale
    s = (tq @ kk.transpose(-1, -2)) * sc
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    off = Sk - Sq if bottom_right else 0
    i = torch.arange(Sq)[:, None] + off
    j = torch.arange(Sk)[None, :]
    if alibi is not None:
        sl = torch.tensor(to64(alibi)).reshape(-1, H)[:, :, None, None]
        s = s - sl * (i - j).abs()
    allowed = torch.ones(Sq, Sk, dtype=torch.bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        if window[0] >= 0:
            allowed &= j >= i - window[0]
        if window[1] >= 0:
            allowed &= j <= i + window[1]
    allowed = allowed.expand(B, H, Sq, Sk).clone()
    if mask is not None:
        m = torch.tensor(np.broadcast_to(mask, (B, H, Sq, Sk)).copy())
        if m.dtype == torch.bool:
            allowed &= m
        else:
            allowed &= m != -np.inf
            s = s + torch.where(m == -np.inf, torch.zeros_like(m, dtype=torch.float64), m.double())
    s = s.masked_fill(~allowed, -np.inf)
    P = torch.softmax(s, -1).nan_to_num(0.0)
    if keep is not None:
        P = P * torch.tensor(keep, dtype=torch.float64) / (1 - p)
    # (after dropout: dS carries P's Z / (1-p) too)
    key_mass = float(P.detach().reshape(B, Hkv, G * Sq, Sk).sum(2).max()) if Sq * Sk else 0.0
    o = P @ vv
    o.backward(torch.tensor(to64(dout)))
    out = (o.detach().numpy(), tq.grad.numpy(), tk.grad.numpy(), tv.grad.numpy())
    return out + (key_mass,) if with_key_mass else out


def torch_grads_in_dtype(q, k, v, dout, *, mask=None, causal=False, bottom_right=False,
                         scale=None, window=None, alibi=None, softcap=None, keep=None, p=0.0):
    """torch's own gradients in the inputs' dtype (its fused SDPA backward, options as a bias
    mask) for the 2x-torch rule: a gradient that is exactly 0 in float64 (one key per row:
    dS = P * (dP - D) cancels) carries fp32 rounding in any FlashAttention-style backward,
    torch's included. None where torch has no equivalent (softcap, a realised dropout mask)."""
    import torch.nn.functional as F

    from reference import from_torch, to_torch, torch_equivalent

    if softcap or keep is not None or np.dtype(q.dtype) != np.dtype(np.float32):
        return None
    if torch_equivalent(q, k, v, mask=mask, causal=causal, bottom_right=bottom_right, scale=scale,
                        window=window, alibi=alibi) is None:
        return None
    B, H, Sq, _ = q.shape
    Sk = k.shape[2]
    off = Sk - Sq if bottom_right else 0
    i, j = np.arange(Sq)[:, None] + off, np.arange(Sk)[None, :]
    bias = np.zeros((B, H, Sq, Sk))
    if alibi is not None:
        bias = bias - np.broadcast_to(to64(alibi).reshape(-1, H), (B, H))[:, :, None, None] * np.abs(i - j)
    allowed = np.ones((Sq, Sk), bool)
    if causal:
        allowed &= j <= i
    if window is not None:
        allowed &= (j >= i - window[0]) if window[0] >= 0 else True
        allowed &= (j <= i + window[1]) if window[1] >= 0 else True
    allowed = np.broadcast_to(allowed, bias.shape).copy()
    if mask is not None:
        m = np.broadcast_to(mask, bias.shape)
        allowed &= m if m.dtype == np.bool_ else to64(m) != -np.inf
        if m.dtype != np.bool_:
            bias = bias + np.where(allowed, to64(m), 0.0)
    bias = torch.from_numpy(np.where(allowed, bias, -np.inf).astype(np.float32))
    t = [to_torch(a).requires_grad_() for a in (q, k, v)]
    o = F.scaled_dot_product_attention(*t, attn_mask=bias, scale=scale, enable_gqa=H != k.shape[1])
    o.backward(to_torch(dout))
    return [from_torch(a.grad, q.dtype) for a in t]


def run(rng, B, H, Hkv, Sq, Sk, D, Dv=None, dtype=np.float32, **kw):
    Dv = Dv or D
    q, k, v = randn(rng, (B, H, Sq, D), dtype), randn(rng, (B, Hkv, Sk, D), dtype), randn(rng, (B, Hkv, Sk, Dv), dtype)
    ak = {kk: vv for kk, vv in kw.items() if kk not in ("bottom_right", "alibi", "keep", "p")}
    if kw.get("bottom_right"):
        ak["causal_align"] = "bottom_right"
    if kw.get("alibi") is not None:
        ak["alibi_slopes"] = kw["alibi"]
    o, lse = attnkit.attention(q, k, v, return_lse=True, **ak)
    dout = randn(rng, o.shape, dtype)
    dq, dk, dv = attnkit.attention_backward(dout, q, k, v, o, lse, **ak)
    tk = {kk: vv for kk, vv in kw.items() if kk not in ("dropout_p", "dropout_seed")}
    ref_o, rq, rk, rv, key_mass = torch_reference_grads(q, k, v, dout, with_key_mass=True, **tk)
    assert_close(o, ref_o, dtype, what="out")
    theirs = torch_grads_in_dtype(q, k, v, dout, **tk) or (None, None, None)
    floors = grad_rounding_floors(q, k, o, dout, kw.get("scale"), key_mass)
    for name, got, ref, t, fl in zip(("dq", "dk", "dv"), (dq, dk, dv), (rq, rk, rv), theirs, floors):
        assert got.shape == ref.shape and got.dtype == q.dtype
        assert_close(got, ref, dtype, torch_result=t, floor=fl, what=name)


@pytest.mark.parametrize("D", [1, 8, 40, 64, 80, 128])
def test_head_dims(isa, rng, D):
    run(rng, 1, 2, 2, 70, 90, D)
    run(rng, 1, 2, 2, 70, 90, D, causal=True)


@pytest.mark.parametrize("sq,sk", [(1, 1), (17, 2), (2, 17), (113, 128), (200, 65)])
def test_lengths(isa, rng, sq, sk):
    run(rng, 2, 2, 1, sq, sk, 32, 48, causal=True, bottom_right=True)
    run(rng, 1, 4, 2, sq, sk, 32)


def test_gqa_mqa_and_chunked_queries(isa, rng):
    run(rng, 1, 8, 2, 300, 200, 32)  # B * Hkv small: query chunks with partial dK/dV
    run(rng, 1, 8, 1, 250, 100, 16, causal=True)
    run(rng, 4, 4, 4, 40, 60, 16)   # enough groups: items own dK/dV outright


def test_masks_windows_alibi_softcap(isa, rng):
    B, H, Sq, Sk = 2, 4, 60, 90
    keypad = (np.arange(Sk)[None, :] < np.array([50, 90])[:, None])[:, None, None, :]
    fmask = randn(rng, (B, 1, Sq, Sk), np.float32)
    fmask[..., ::4] = -np.inf
    slopes = rng.random(H).astype(np.float32)
    run(rng, B, H, 2, Sq, Sk, 32, mask=keypad)
    run(rng, B, H, 2, Sq, Sk, 32, mask=fmask)
    run(rng, B, H, 2, Sq, Sk, 32, window=(10, 3), causal=True)
    run(rng, B, H, 2, Sq, Sk, 32, alibi=slopes, bottom_right=True, causal=True)
    run(rng, B, H, 2, Sq, Sk, 32, softcap=2.0, scale=1.0)
    full = np.ones((B, H, Sq, Sk), bool)
    full[:, :, 5] = False  # a fully masked row: zero gradients there
    run(rng, B, H, 2, Sq, Sk, 32, mask=full)


@pytest.mark.parametrize("dtype", ["float64", "float16", "bfloat16"])
def test_dtypes(isa, rng, dtype):
    dt = {"float64": np.float64, "float16": np.float16, "bfloat16": bfloat16}[dtype]
    if dt is None:
        pytest.skip("ml_dtypes not installed")
    run(rng, 1, 2, 2, 50, 70, 32, dtype=dt, causal=True)


# bf16 through the backward's shapes: the amx variants run the five GEMMs of a tile on AMX
# tiles (P and dS rounded to bf16), avx512_bf16 the same tile-layout path on vdpbf16ps, the
# others the fp32 path over widened bf16. Several 96-row
# query tiles and 64-key blocks with ragged ends, GQA, odd head dims and Dv != D, windows
# (tiles whose first reaching row is mid-tile), bottom-right causal with ALiBi, softcap, a
# float mask, query chunks with partial dK/dV, dropout.
@pytest.mark.skipif(bfloat16 is None, reason="ml_dtypes not installed")
@pytest.mark.parametrize("case", ["causal_gqa", "window_dv", "chunks", "alibi", "softcap",
                                  "fmask", "dropout"])
def test_bf16_shapes(isa, rng, case):
    from attnkit import _C

    bf = bfloat16
    _C._take_tile_items()
    if case == "causal_gqa":
        run(rng, 1, 4, 2, 200, 150, 64, dtype=bf, causal=True)
    elif case == "window_dv":
        run(rng, 2, 2, 1, 230, 190, 40, 72, dtype=bf, window=(30, 5))
    elif case == "chunks":
        run(rng, 1, 8, 2, 300, 200, 33, dtype=bf)
    elif case == "alibi":
        run(rng, 2, 2, 2, 70, 130, 128, dtype=bf, causal=True, bottom_right=True,
            alibi=rng.random(2).astype(np.float32))
    elif case == "softcap":
        run(rng, 1, 2, 1, 100, 100, 80, dtype=bf, softcap=2.0, scale=1.0)
    elif case == "fmask":
        fmask = randn(rng, (1, 1, 120, 90), np.float32)
        fmask[..., ::3] = -np.inf
        run(rng, 1, 2, 2, 120, 90, 32, dtype=bf, mask=fmask)
    else:
        keep = attnkit.dropout_mask((1, 2, 110, 70), 0.3, 99)
        run(rng, 1, 2, 2, 110, 70, 16, dtype=bf, dropout_p=0.3, dropout_seed=99, keep=keep, p=0.3)
    tiles = _C._take_tile_items()["backward"]  # the backward's items on the tile layout
    assert (tiles > 0) == (isa.startswith("amx") or isa == "avx512_bf16"), (isa, tiles)


def test_dropout_gradients_exact_for_realised_mask(isa, rng):
    B, H, Sq, Sk, p, seed = 1, 2, 40, 50, 0.3, 1234
    keep = attnkit.dropout_mask((B, H, Sq, Sk), p, seed)
    assert 0.55 < keep.mean() < 0.85
    run(rng, B, H, 2, Sq, Sk, 16, dropout_p=p, dropout_seed=seed, keep=keep, p=p)


def test_bit_identical_across_threads(threads, rng):
    for (B, H, Hkv, S) in [(1, 4, 1, 300), (4, 4, 2, 150)]:
        q, k, v = randn(rng, (B, H, S, 64), np.float32), randn(rng, (B, Hkv, S, 64), np.float32), randn(rng, (B, Hkv, S, 64), np.float32)
        o, lse = attnkit.attention(q, k, v, causal=True, return_lse=True)
        do = randn(rng, o.shape, np.float32)
        res = []
        for nt in (1, 2, 3):
            attnkit.set_num_threads(nt)
            res.append(attnkit.attention_backward(do, q, k, v, o, lse, causal=True))
        for r in res[1:]:
            for a, b in zip(r, res[0]):
                assert np.array_equal(a, b)


def test_nan_in_masked_kv_stays_out_of_gradients(isa, rng):
    q, k, v = randn(rng, (1, 2, 10, 16), np.float32), randn(rng, (1, 2, 80, 16), np.float32), randn(rng, (1, 2, 80, 16), np.float32)
    k[0, :, 70:] = np.nan
    v[0, :, 70:] = np.nan
    mask = np.ones((1, 1, 10, 80), bool)
    mask[..., 70:] = False
    o, lse = attnkit.attention(q, k, v, mask=mask, return_lse=True)
    dq, dk, dv = attnkit.attention_backward(np.ones_like(o), q, k, v, o, lse, mask=mask)
    assert np.isfinite(dq).all() and np.isfinite(dk[:, :, :70]).all() and np.isfinite(dv).all()


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("sq,sk", [(10, 80), (70, 130)])
def test_nonfinite_query_row_propagates_to_gradients(isa, rng, dtype, sq, sk):
    """As torch: a NaN (or +inf) query row gives a NaN output row and NaN gradients wherever
    that row reaches (its dq, and dk/dv of the keys it attends); every other dq row stays
    finite and correct, and keys masked out of every row get finite dk/dv."""
    for poison in (np.nan, np.inf):
        q = randn(rng, (1, 2, sq, 16), dtype)
        k, v = randn(rng, (1, 1, sk, 16), dtype), randn(rng, (1, 1, sk, 16), dtype)
        r, dead = sq // 3, sk - 5
        q[0, 1, r, 2] = poison
        k[0, 0, 0, 2] = 1.0  # an +inf score for the inf case
        mask = np.ones((1, 1, sq, sk), bool)
        mask[..., dead:] = False
        o, lse = attnkit.attention(q, k, v, mask=mask, return_lse=True)
        assert np.isnan(to64(o[0, 1, r])).all() and np.isnan(lse[0, 1, r])
        dout = randn(rng, o.shape, dtype)
        dq, dk, dv = attnkit.attention_backward(dout, q, k, v, o, lse, mask=mask)
        assert np.isnan(to64(dq[0, 1, r])).all()
        if poison != poison:  # NaN: every score of the row is NaN
            assert np.isnan(to64(dk[0, 0, :dead])).all() and np.isnan(to64(dv[0, 0, :dead])).all()
        else:  # inf: scores are +-inf (P NaN or 0); 0 * inf in dK's q column is NaN, as in torch
            assert np.isnan(to64(dk[0, 0, :dead])).any(-1).all() and np.isnan(to64(dv[0, 0, 0])).all()
        assert np.isfinite(to64(dk[0, 0, dead:])).all() and np.isfinite(to64(dv[0, 0, dead:])).all()
        # the other rows' dq against float64 autograd on the same inputs
        good = np.ones(sq, bool)
        good[r] = False
        ref_o, rq, _, _ = torch_reference_grads(q, k, v, dout, mask=mask)
        assert np.isfinite(to64(dq[0, 0])).all() and np.isfinite(to64(dq[0, 1, good])).all()
        scale = max(1.0, float(np.abs(rq[0, 0]).max()))
        assert_close(dq[0, 0], rq[0, 0], dtype, scale=scale, what="dq")
        assert_close(dq[0, 1, good], rq[0, 1, good], dtype, scale=scale, what="dq")


def test_float64_mask_keeps_float64_precision_in_gradients(isa, rng):
    """The backward adds a float64 mask in float64 too (gradients exact to float64)."""
    q, k, v = (randn(rng, (1, 2, 29, 8), np.float64) for _ in range(3))
    mask = rng.standard_normal((1, 1, 29, 29)) * 3.0
    o, lse = attnkit.attention(q, k, v, mask=mask, return_lse=True)
    dout = randn(rng, o.shape, np.float64)
    got = attnkit.attention_backward(dout, q, k, v, o, lse, mask=mask)
    _, *want = torch_reference_grads(q, k, v, dout, mask=mask)
    for name, a, b in zip(("dq", "dk", "dv"), got, want):
        err = np.abs(a - b).max() / np.abs(b).max()
        assert err < 1e-12, (name, err)  # a float32-rounded mask gives ~1e-7


def test_bad_inputs(rng):
    q, k, v = randn(rng, (1, 2, 8, 16), np.float32), randn(rng, (1, 2, 9, 16), np.float32), randn(rng, (1, 2, 9, 16), np.float32)
    o, lse = attnkit.attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match="dout must have shape"):
        attnkit.attention_backward(o[:, :, :3], q, k, v, o, lse)
    with pytest.raises(ValueError, match="lse must be float32"):
        attnkit.attention_backward(o, q, k, v, o, lse[:, :1])
    with pytest.raises(TypeError, match="k/v have dtype float16"):
        attnkit.attention_backward(o, q, k.astype(np.float16), v.astype(np.float16), o, lse)
    with pytest.raises(ValueError, match="dropout_p must be in"):
        attnkit.attention_backward(o, q, k, v, o, lse, dropout_p=1.5)


def test_nan_lse_propagates_instead_of_a_silent_zero_row(isa, rng):
    """A NaN in lse (a forward that met NaN) gives NaN in that row's dq, not a quiet zero
    row; -inf (a row with no allowed key) still gives exact zeros."""
    q, k, v = randn(rng, (1, 2, 6, 16), np.float32), randn(rng, (1, 2, 9, 16), np.float32), randn(rng, (1, 2, 9, 16), np.float32)
    o, lse = attnkit.attention(q, k, v, return_lse=True)
    bad = lse.copy()
    bad[0, 1, 2] = np.nan
    dq, dk, dv = attnkit.attention_backward(np.ones_like(o), q, k, v, o, bad)
    assert np.isnan(dq[0, 1, 2]).all()
    good = np.delete(np.arange(6), 2)
    assert np.isfinite(dq[0, :, good]).all() and np.isfinite(dq[0, 0]).all()
    dead = lse.copy()
    dead[0, 0, 4] = -np.inf
    dq, _, _ = attnkit.attention_backward(np.ones_like(o), q, k, v, o, dead)
    assert (dq[0, 0, 4] == 0).all()


@pytest.mark.skipif(bfloat16 is None, reason="ml_dtypes not installed")
def test_bf16_subnormal_inputs_give_exact_gradients(isa, rng):
    """The bf16 tile-layout GEMMs (AMX, vdpbf16ps) read subnormal bf16 as zero, and a gradient
    is as small as its operands: an item whose dO (or K, or V) holds one takes the exact fp32
    path. With every dO value subnormal, dV = P^T dO is subnormal too; bf16's subnormal step is
    2^-133 and the error stays within one (the tile path gave dV = 0). A subnormal in K alone
    goes the same way."""
    q, k, v = (randn(rng, (1, 2, 96, 64), bfloat16) for _ in range(3))
    o, lse = attnkit.attention(q, k, v, return_lse=True)
    dout = (rng.standard_normal(o.shape) * 2.0 ** -129).astype(bfloat16)
    assert np.abs(to64(dout)).max() < 2.0 ** -126 and np.count_nonzero(to64(dout)) > 0
    dq, dk, dv = attnkit.attention_backward(dout, q, k, v, o, lse)
    _, _, _, rv = torch_reference_grads(q, k, v, dout)
    assert np.abs(rv).max() > 2.0 ** -131  # what a flush to zero would lose
    assert np.abs(to64(dv) - rv).max() <= 2.0 ** -133, isa
    k2 = k.copy()
    k2[0, 1, 70, 9] = np.float32(2.0 ** -130)
    o2, lse2 = attnkit.attention(q, k2, v, return_lse=True)
    d2 = randn(rng, o.shape, bfloat16)
    got = attnkit.attention_backward(d2, q, k2, v, o2, lse2)
    ref = torch_reference_grads(q, k2, v, d2)[1:]
    for name, g, r in zip(("dq", "dk", "dv"), got, ref):
        assert_close(g, r, bfloat16, what=name)
