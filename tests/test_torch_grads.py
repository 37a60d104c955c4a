"""attnkit.torch gradients beyond q/k/v from the kernels, and the twin's edges against torch:
a float mask's gradient, second derivatives, vmap over the backward, transposed head dims,
head counts torch broadcasts, argument types. Each was once missing, silently wrong or an
error where torch computes a result."""
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import attnkit.torch as at


def rand(*shape, dtype=torch.float64, grad=False, seed=None):
    g = torch.Generator().manual_seed(seed) if seed is not None else None
    return torch.randn(*shape, dtype=dtype, generator=g).requires_grad_(grad)


def rel_err(a, b):
    return (a.double() - b.double()).abs().max().item() / max(b.double().abs().max().item(), 1e-30)


@pytest.mark.parametrize("mask_shape", [(2, 3, 5, 7), (1, 3, 5, 7), (5, 7)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_a_float_mask_gets_its_gradient(mask_shape, dtype):
    """attention() with an additive mask that requires grad (T5's position bias through the
    transformers adapter) returned no mask gradient, silently; with only the mask requiring
    grad the output did not require grad at all."""
    q, k, v = (rand(*s, dtype=dtype, grad=True, seed=i)
               for i, s in enumerate([(2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 6)]))
    bias = rand(*mask_shape, dtype=dtype, grad=True, seed=9)
    out = at.attention(q, k, v, attn_mask=bias, is_causal=False)
    do = rand(*out.shape, dtype=dtype, seed=10)
    grads = torch.autograd.grad(out, (q, k, v, bias), do)
    ref = F.scaled_dot_product_attention(*(t.double() for t in (q, k, v)), attn_mask=bias.double())
    want = torch.autograd.grad(ref, (q, k, v, bias), do.double())
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]
    assert rel_err(out, ref) <= tol
    for g, w in zip(grads, want):
        assert g.shape == w.shape and rel_err(g, w) <= tol
    # only the mask requires grad
    out = at.attention(q.detach(), k.detach(), v.detach(), attn_mask=bias)
    assert out.requires_grad
    (g,) = torch.autograd.grad(out, bias, do)
    assert rel_err(g, want[3]) <= tol


def test_t5_position_bias_trains_through_the_adapter():
    """A tiny T5 trained with attn_implementation="attnkit" had no gradient for its relative
    attention bias (encoder and decoder); it now matches sdpa's."""
    transformers = pytest.importorskip("transformers")
    import attnkit.transformers as akhf

    akhf.register()
    torch.manual_seed(0)
    cfg = transformers.T5Config(vocab_size=100, d_model=64, d_kv=16, d_ff=128, num_layers=2,
                                num_heads=4, dropout_rate=0.0, decoder_start_token_id=0,
                                pad_token_id=0)
    model = transformers.T5ForConditionalGeneration(cfg)
    ids, labels = torch.randint(1, 100, (2, 9)), torch.randint(1, 100, (2, 7))
    grads = {}
    for impl in ("sdpa", "attnkit"):
        model.set_attn_implementation(impl)
        model.zero_grad()
        model(input_ids=ids, labels=labels).loss.backward()
        grads[impl] = [s.layer[0].SelfAttention.relative_attention_bias.weight.grad
                       for s in (model.encoder.block[0], model.decoder.block[0])]
    for g, w in zip(grads["attnkit"], grads["sdpa"]):
        assert g is not None and w.abs().max() > 0
        assert rel_err(g, w) <= 1e-4


@pytest.mark.parametrize("opts", [dict(), dict(is_causal=True), dict(softcap=3.0),
                                  dict(window=(2, 1)), dict(mask=True)])
def test_second_derivatives(opts):
    """A backward run with create_graph=True returned gradients without a graph: the second
    derivative was silently dropped (q.grad of sum(g^2) + sum(q) came out all ones)."""
    q, k, v = (rand(*s, grad=True, seed=i)
               for i, s in enumerate([(1, 2, 4, 8), (1, 2, 6, 8), (1, 2, 6, 5)]))
    args = [q, k, v]
    if opts.pop("mask", False):
        args.append(rand(1, 1, 4, 6, grad=True, seed=5))

    def fn(q, k, v, m=None):
        return at.attention(q, k, v, attn_mask=m, **opts)

    assert torch.autograd.gradgradcheck(fn, tuple(args))
    # the twin, against torch's own second derivative (Dv != D: torch's math kernel)
    q0 = q.detach().clone().requires_grad_()
    g1, = torch.autograd.grad((at.scaled_dot_product_attention(q0, k, v) ** 2).sum(), q0,
                              create_graph=True)
    h1, = torch.autograd.grad((g1 ** 2).sum(), q0)
    q1 = q.detach().clone().requires_grad_()
    g2, = torch.autograd.grad((F.scaled_dot_product_attention(q1, k, v) ** 2).sum(), q1,
                              create_graph=True)
    h2, = torch.autograd.grad((g2 ** 2).sum(), q1)
    assert g1.requires_grad and rel_err(h1, h2) <= 1e-10


def test_vmap_over_the_backward_and_batched_gradcheck():
    """torch.vmap over autograd.grad of the output raised a functorch error from the math
    backward (requires_grad_ on a wrapped tensor); it now gives torch's result."""
    q = rand(1, 2, 4, 8, dtype=torch.float32, grad=True, seed=0)
    k, v = rand(1, 2, 5, 8, dtype=torch.float32, seed=1), rand(1, 2, 5, 8, dtype=torch.float32, seed=2)
    cot = rand(3, 1, 2, 4, 8, dtype=torch.float32, seed=3)

    def batched(fn):
        o = fn(q, k, v)
        return torch.vmap(lambda g: torch.autograd.grad(o, q, g, retain_graph=True)[0])(cot)

    ref = batched(F.scaled_dot_product_attention)
    for fn in (at.scaled_dot_product_attention, lambda q, k, v: at.attention(q, k, v)):
        got = batched(fn)
        assert got.shape == ref.shape and rel_err(got, ref) <= 2e-5
    q, k, v = (rand(*s, grad=True, seed=i) for i, s in enumerate([(1, 2, 3, 4), (1, 2, 5, 4), (1, 2, 5, 4)]))
    m = rand(1, 1, 3, 5, grad=True, seed=4)
    assert torch.autograd.gradcheck(lambda q, k, v, m: at.attention(q, k, v, attn_mask=m),
                                    (q, k, v, m), check_batched_grad=True)


def test_backward_with_transposed_head_dims():
    """q (and k, v) whose head dim is not contiguous: the forward ran, the backward raised
    'gradients must be contiguous along the head dim' (empty_like kept q's strides)."""
    q = rand(1, 2, 8, 5, grad=True, seed=0)
    k = rand(1, 2, 8, 6, grad=True, seed=1)
    v = rand(1, 2, 8, 6, grad=True, seed=2)
    qt, kt, vt = (t.transpose(2, 3) for t in (q, k, v))
    assert qt.stride(-1) != 1
    out = at.scaled_dot_product_attention(qt, kt, vt)
    do = rand(*out.shape, seed=3)
    grads = torch.autograd.grad(out, (q, k, v), do)
    want = torch.autograd.grad(F.scaled_dot_product_attention(qt, kt, vt), (q, k, v), do)
    for g, w in zip(grads, want):
        assert rel_err(g, w) <= 1e-10


@pytest.mark.parametrize("shapes,gqa", [
    (((2, 4, 5, 8), (2, 1, 6, 8), (2, 1, 6, 8)), False),  # k/v heads broadcast
    (((2, 1, 5, 8), (2, 4, 6, 8), (2, 4, 6, 8)), False),  # q heads broadcast
    (((2, 4, 5, 8), (2, 2, 6, 8), (2, 1, 6, 8)), True),   # k and v head counts differ
    (((4, 5, 8), (2, 6, 8), (2, 6, 8)), True),            # 3-D: leading dims are heads
])
def test_twin_head_counts_torch_broadcasts(shapes, gqa):
    """Head counts that are neither equal nor grouped-query: torch's math kernel broadcasts
    them, the twin raised 'Expected query and key to have the same number of heads'."""
    q, k, v = (rand(*s, seed=i) for i, s in enumerate(shapes))
    ref = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    at._warned.clear()  # "once" per process: start from a process that has not warned yet
    with pytest.warns(UserWarning, match="run torch's SDPA"):
        got = at.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
    assert got.shape == ref.shape and rel_err(got, ref) <= 1e-12


def test_twin_3d_batch_broadcast_stays_on_attnkit():
    """3-D inputs whose leading dims broadcast as a batch (1 against N) are attnkit's; only
    leading dims torch reads as heads (enable_gqa) or that do not broadcast go to torch."""
    q, k, v = rand(3, 5, 8, seed=0), rand(1, 6, 8, seed=1), rand(1, 6, 8, seed=2)
    ref = F.scaled_dot_product_attention(q, k, v)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = at.scaled_dot_product_attention(q, k, v)
    assert got.shape == ref.shape and rel_err(got, ref) <= 1e-12


def test_twin_argument_types_and_non_finite_scale_like_torch():
    q = rand(1, 2, 5, 8, dtype=torch.float32, seed=0)
    for kw in (dict(is_causal="no"), dict(is_causal=1), dict(scale="0.5"), dict(dropout_p="0.1"),
               dict(enable_gqa="x")):
        with pytest.raises(TypeError) as want:
            F.scaled_dot_product_attention(q, q, q, **kw)
        with pytest.raises(TypeError) as got:
            at.scaled_dot_product_attention(q, q, q, **kw)
        assert str(got.value) == str(want.value)
    # what torch takes for its float arguments, the twin takes too (on attnkit's kernels)
    ref = F.scaled_dot_product_attention(q, q, q, scale=0.5)
    for kw in (dict(dropout_p=False), dict(dropout_p=np.bool_(False)), dict(scale=np.float32(0.5)),
               dict(scale=torch.tensor(0.5)), dict(dropout_p=torch.tensor(0.0), scale=0.5)):
        kw.setdefault("scale", 0.5)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no fallback to torch
            got = at.scaled_dot_product_attention(q, q, q, **kw)
        assert rel_err(got, ref) <= 2e-6, kw
        assert rel_err(at.attention(q, q, q, **kw), ref) <= 2e-6, kw
    for s in (math.inf, math.nan):
        ref = F.scaled_dot_product_attention(q, q, q, scale=s)
        got = at.scaled_dot_product_attention(q, q, q, scale=s)
        assert torch.equal(ref.isnan(), got.isnan())


def test_attention_refuses_bad_scalars_up_front():
    q, k, v = rand(1, 2, 5, 8, dtype=torch.float32), rand(1, 2, 6, 8, dtype=torch.float32), \
        rand(1, 2, 6, 8, dtype=torch.float32)
    for name in ("scale", "dropout_p", "softcap"):
        with pytest.raises(TypeError, match=f"attnkit.torch.attention: {name} must be a float, got str"):
            at.attention(q, k, v, **{name: "x"})
    with pytest.raises(ValueError, match="attnkit.torch.attention: query has head dim 0"):
        at.attention(q[..., :0], k[..., :0], v)
    # mixed-precision key/value: forward-only, refused before the forward when grad is needed
    qg = q.clone().requires_grad_()
    with pytest.raises(TypeError, match="mixed-precision key/value are forward-only"):
        at.attention(qg, k.half(), v.half())
    out = at.attention(q, k.half(), v.half())  # no grad needed: computed
    ref = F.scaled_dot_product_attention(q.double(), k.half().double(), v.half().double())
    assert rel_err(out, ref) <= 2e-5
