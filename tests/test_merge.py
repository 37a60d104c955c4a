"""merge_attention_states (NumPy front end + CPU kernel, and the torch version) against float64.

The merged state of N partial attention results must be the attention over the union of their
keys: out = sum w_n out_n / sum w_n, lse = m + log(sum w_n) with w_n = exp(lse_n - m). Checked
against a float64 reference (errors relative to the output's magnitude), and end to end: the
merge of attention over key blocks equals attention over all the keys.
"""
import numpy as np
import pytest

import attnkit
from reference import FLOAT_DTYPES, assert_close, bfloat16, dtype_id, max_error, merge_ref

ISA_KERNELS = ("merge_attention_states",)  # the kernel-table entries tested here (conftest.isas_for)

FN = "merge_attention_states"
NEG_INF = -np.inf


def parts(rng, shape, dtype, lse_dtype=np.float32, spread=3.0):
    outs = rng.standard_normal(shape).astype(dtype)
    lses = (rng.standard_normal(shape[:-1]) * spread).astype(lse_dtype)
    return outs, lses


def check(outs, lses, out, lse):
    ro, rl = merge_ref(outs, lses)
    assert out.dtype == outs.dtype and lse.dtype == lses.dtype
    assert out.shape == outs.shape[1:] and lse.shape == lses.shape[1:]
    assert_close(out, ro, outs.dtype, what="out")
    # lse: fp32 arithmetic on values of magnitude ~|lse|
    tol = 1e-12 if lses.dtype == np.float64 and outs.dtype == np.float64 else 2e-6
    assert max_error(lse, rl) <= tol * max(1.0, float(np.nanmax(np.abs(rl[np.isfinite(rl)]), initial=0)))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", [(1, 2, 3, 5), (3, 2, 4, 7, 33), (4, 1, 70, 16), (2, 5, 1), (5, 3, 9, 130)])
def test_matches_float64(isa, rng, dtype, shape):
    outs, lses = parts(rng, shape, dtype)
    if shape[0] > 1:
        lses[0, ..., 0] = NEG_INF            # one empty part in the first row
        lses[:, ..., -1] = NEG_INF           # the last row: every part empty
        outs[1, ..., -1, :] = np.nan         # ... and NaN in an empty part: never read
    out, lse = attnkit.merge_attention_states(outs, lses)
    check(outs, lses, out, lse)
    if shape[0] > 1:
        assert (out[..., -1, :] == 0).all() and np.isneginf(lse[..., -1]).all()


def test_one_part_is_returned_exactly(rng):
    for dtype in FLOAT_DTYPES:
        outs, lses = parts(rng, (1, 2, 3, 6, 40), dtype)
        out, lse = attnkit.merge_attention_states(outs, lses)
        assert np.array_equal(out.astype(np.float64), outs[0].astype(np.float64))
        assert np.array_equal(lse, lses[0])


def test_no_values_still_merges_lse():
    """Dv = 0: no values, but each row's lse is still the merge of the parts' (found by fuzzing)."""
    lses = np.array([[0.0, 1.0, -np.inf], [1.0, 0.0, -np.inf]], np.float32)
    out, lse = attnkit.merge_attention_states(np.zeros((2, 3, 0), np.float32), lses)
    assert out.shape == (3, 0)
    assert np.allclose(lse[:2], np.log(np.exp(0.0) + np.exp(1.0))) and np.isneginf(lse[2])


def test_float64_lse_and_mixed_precision(rng):
    outs, lses = parts(rng, (3, 2, 5, 9), np.float32, lse_dtype=np.float64)
    out, lse = attnkit.merge_attention_states(outs, lses)
    assert lse.dtype == np.float64
    check(outs, lses, out, lse)
    outs, lses = parts(rng, (3, 2, 5, 9), np.float64, lse_dtype=np.float64)
    check(outs, lses, *attnkit.merge_attention_states(outs, lses))


@pytest.mark.parametrize("causal", [False, True])
def test_merge_of_key_blocks_is_attention_over_all_keys(rng, causal):
    """Attention of q against three blocks of keys, merged, equals attention over all keys
    (bottom-right causal: the key blocks are the tail of the sequence the queries end)."""
    B, H, Sq, Sk, D = 2, 3, 6, 50, 16
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in
               ((B, H, Sq, D), (B, H, Sk, D), (B, H, Sk, D)))
    full, full_lse = attnkit.attention(q, k, v, causal=causal, causal_align="bottom_right",
                                       return_lse=True)
    outs, lses = [], []
    for lo, hi in ((0, 17), (17, 40), (40, Sk)):
        # key j of the block sits at global position lo + j: bottom-right causal over the whole
        # sequence allows it for query i when lo + j <= i + Sk - Sq
        mask = (lo + np.arange(hi - lo))[None, :] <= np.arange(Sq)[:, None] + Sk - Sq if causal else None
        o, l = attnkit.attention(q, k[:, :, lo:hi], v[:, :, lo:hi], mask=mask, return_lse=True)
        outs.append(o)
        lses.append(l)
    out, lse = attnkit.merge_attention_states(np.stack(outs), np.stack(lses))
    assert_close(out, full, np.float32)
    assert np.abs(lse - full_lse).max() <= 2e-6 * np.abs(full_lse).max()


def test_nan_and_inf_rows(rng):
    outs, lses = parts(rng, (3, 1, 4, 8), np.float32)
    lses[1, 0, 0] = np.nan       # a NaN lse: the row is NaN
    lses[2, 0, 1] = np.inf       # +inf: no forward makes it; the row is NaN
    outs[0, 0, 2, 3] = np.nan    # NaN in a non-empty part's values: NaN in that row
    out, lse = attnkit.merge_attention_states(outs, lses)
    assert np.isnan(out[0, :2]).all() and np.isnan(lse[0, :2]).all()
    assert np.isnan(out[0, 2, 3]) and not np.isnan(out[0, 2, :3]).any() and np.isfinite(lse[0, 2])
    assert np.isfinite(out[0, 3]).all() and np.isfinite(lse[0, 3])


def test_out_in_place_and_overlap(rng):
    outs, lses = parts(rng, (3, 2, 7, 24), np.float32)
    want, want_lse = attnkit.merge_attention_states(outs.copy(), lses)
    got, got_lse = attnkit.merge_attention_states(outs, lses, out=outs[0])
    assert got is outs[0] or np.shares_memory(got, outs)
    assert np.array_equal(outs[0], want) and np.array_equal(got_lse, want_lse)
    with pytest.raises(ValueError, match="merge_attention_states: out overlaps outs"):
        attnkit.merge_attention_states(outs, lses, out=outs[1])
    out = np.empty((2, 7, 24), np.float32)
    r, _ = attnkit.merge_attention_states(outs, lses, out=out)
    assert r is out


def test_strided_inputs(rng):
    outs, lses = parts(rng, (2, 6, 5, 3, 20), np.float32)
    t_outs = outs.transpose(0, 2, 1, 3, 4)          # strided row dims, contiguous values
    t_lses = lses.transpose(0, 2, 1, 3)
    out, lse = attnkit.merge_attention_states(t_outs, t_lses)
    check(t_outs, t_lses, out, lse)
    sliced = outs[..., ::2]                           # values with stride 2: copied first
    check(sliced, lses, *attnkit.merge_attention_states(sliced, lses))


def test_results_do_not_depend_on_threads(threads, rng):
    outs, lses = parts(rng, (4, 2, 8, 300, 64), np.float32)  # above the one-thread size
    lses[:, 0, 0, :7] = NEG_INF
    ref = None
    for n in (1, 2, 3):
        attnkit.set_num_threads(n)
        out, lse = attnkit.merge_attention_states(outs, lses)
        if ref is None:
            ref = (out, lse)
        assert np.array_equal(out, ref[0]) and np.array_equal(lse, ref[1])


@pytest.mark.parametrize("call, exc, words", [
    (lambda o, l: attnkit.merge_attention_states([1.0], l), TypeError, "outs must be a numpy.ndarray"),
    (lambda o, l: attnkit.merge_attention_states(o, l.tolist()), TypeError, "lses must be a numpy.ndarray"),
    (lambda o, l: attnkit.merge_attention_states(o.astype(np.int32), l), TypeError, "outs has dtype int32"),
    (lambda o, l: attnkit.merge_attention_states(o, l.astype(np.float16)), TypeError, "lses has dtype float16"),
    (lambda o, l: attnkit.merge_attention_states(o[0, 0], l[0, 0]), ValueError, "outs must be (N, ..., Sq, Dv)"),
    (lambda o, l: attnkit.merge_attention_states(o, l[:, :, :3]), ValueError, "lses has shape (3, 2, 3)"),
    (lambda o, l: attnkit.merge_attention_states(o[:0], l[:0]), ValueError, "at least one part"),
    (lambda o, l: attnkit.merge_attention_states(o, l, out=np.empty((2, 4, 9), np.float32)), ValueError, "out has shape"),
    (lambda o, l: attnkit.merge_attention_states(o, l, out=np.empty((2, 4, 8), np.float64)), TypeError, "out has dtype float64"),
])
def test_bad_arguments_are_named(rng, call, exc, words):
    outs, lses = parts(rng, (3, 2, 4, 8), np.float32)
    with pytest.raises(exc) as e:
        call(outs, lses)
    assert str(e.value).startswith(FN + ": ") and words in str(e.value)


def test_read_only_out_is_refused(rng):
    outs, lses = parts(rng, (3, 2, 4, 8), np.float32)
    out = np.empty((2, 4, 8), np.float32)
    out.flags.writeable = False
    with pytest.raises(ValueError, match="merge_attention_states: out is read-only"):
        attnkit.merge_attention_states(outs, lses, out=out)


# ---- the torch version ---------------------------------------------------------------------------

torch = pytest.importorskip("torch")
import attnkit.torch as at  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_torch_matches_numpy_and_math(rng, dtype):
    outs = torch.randn(3, 2, 5, 24, dtype=torch.float32).to(dtype)
    lses = torch.randn(3, 2, 5) * 3
    lses[0, 0, 0] = -float("inf")
    lses[:, 1, 4] = -float("inf")
    o, l = at.merge_attention_states(outs, lses)
    npo = outs.float().numpy() if dtype == torch.bfloat16 else outs.numpy()
    if dtype != torch.bfloat16:
        ko, kl = attnkit.merge_attention_states(npo, lses.numpy())
        assert np.array_equal(o.numpy(), ko) and np.array_equal(l.numpy(), kl)
    from attnkit._torch_merge import _merge_math

    mo, ml = _merge_math(outs, lses)  # the CUDA path, here on the CPU
    tol = {torch.float32: 1e-6, torch.float64: 1e-14, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert (mo.double() - o.double()).abs().max() <= tol * o.double().abs().max()
    assert torch.equal(torch.isneginf(ml), torch.isneginf(l))
    fin = torch.isfinite(l)
    assert (ml[fin] - l[fin]).abs().max() <= 1e-6 * l[fin].abs().max()
    ro, rl = merge_ref(outs.double().numpy(), lses.numpy())
    assert_close(o.double().numpy(), ro, {torch.float32: np.float32, torch.float64: np.float64,
                                          torch.float16: np.float16, torch.bfloat16: bfloat16}[dtype])


def test_torch_gradients():
    torch.manual_seed(0)
    outs = torch.randn(3, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    l = torch.randn(3, 2, 4, dtype=torch.float64) * 2
    l[0, 0, 0] = -float("inf")   # an empty part
    l[:, 1, 3] = -float("inf")   # an all-empty row
    lses = l.clone().requires_grad_(True)

    def f(o, ls):
        out, lse = at.merge_attention_states(o, ls)
        return out, lse[torch.isfinite(lse)]  # finite differences cannot see through -inf

    assert torch.autograd.gradcheck(f, (outs, lses))
    out, lse = at.merge_attention_states(outs, lses)
    (out.sum() + lse[torch.isfinite(lse)].sum()).backward()
    assert (outs.grad[:, 1, 3] == 0).all() and (lses.grad[:, 1, 3] == 0).all()
    assert (outs.grad[0, 0, 0] == 0).all() and lses.grad[0, 0, 0] == 0
    # lse's gradient through logsumexp, and out's through the softmax weights
    l2 = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    o2 = torch.randn(4, 3, 1, 1, dtype=torch.float64)
    _, m = at.merge_attention_states(o2.expand(4, 3, 1, 2), l2.unsqueeze(-1))
    g, = torch.autograd.grad(m.sum(), l2)
    assert torch.allclose(g, torch.softmax(l2, 0))


def test_torch_sequences_and_errors():
    o = [torch.randn(2, 3, 4) for _ in range(2)]
    ls = [torch.randn(2, 3) for _ in range(2)]
    out, lse = at.merge_attention_states(o, ls)
    assert out.shape == (2, 3, 4) and lse.shape == (2, 3)
    fn = "attnkit.torch.merge_attention_states"
    with pytest.raises(ValueError, match=f"{fn}: lses has shape"):
        at.merge_attention_states(torch.stack(o), torch.randn(2, 3, 3))
    with pytest.raises(TypeError, match=f"{fn}: lses has dtype torch.float16"):
        at.merge_attention_states(torch.stack(o), torch.stack(ls).half())
    with pytest.raises(TypeError, match=f"{fn}: outs and lses must be tensors"):
        at.merge_attention_states(np.zeros((2, 2, 3)), torch.stack(ls))
    # sequences are stacked with the function and argument named (torch.stack's errors do not)
    with pytest.raises(ValueError, match=f"{fn}: outs is an empty sequence"):
        at.merge_attention_states([], [])
    with pytest.raises(ValueError, match=rf"{fn}: outs\[1\] has shape \(2, 3, 5\) but outs\[0\] has"):
        at.merge_attention_states([o[0], torch.randn(2, 3, 5)], ls)
    with pytest.raises(TypeError, match=rf"{fn}: lses\[1\] must be a tensor, got float"):
        at.merge_attention_states(o, [ls[0], 1.0])
