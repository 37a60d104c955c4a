"""attnkit.torch's autograd on the CPU kernels: the forward and backward as ``torch.library``
custom ops (what ``torch.compile`` traces), the eager ``autograd.Function`` that calls the same
kernels without the custom-op dispatch, and the backward in torch ops (``_math_backward``) for
what the kernels do not compute: a float mask's gradient, second derivatives, functorch-wrapped
gradients. ``_torch_math`` states attnkit's semantics in plain torch ops. See
docs/ARCHITECTURE.md, "PyTorch front end"."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import _C
from ._torch_binding import DTYPE_NAMES
from ._torch_binding import rows as _rows
from ._torch_binding import threads as _threads
from ._torch_checks import _FN


def _torch_math(q, k, v, attn_mask, dropout_p, is_causal, scale, softcap, window, bottom_right,
                keep=None):
    """attnkit's semantics in plain torch ops (materializes the scores): the autograd fallback
    for devices without an attnkit backward, and the backward for functorch-wrapped gradients.
    ``keep``: a given dropout keep-mask (attnkit's), instead of drawing torch's."""
    G = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    Sq, Sk = q.shape[2], k.shape[2]
    i = torch.arange(Sq, device=q.device)[:, None] + (Sk - Sq if bottom_right else 0)
    j = torch.arange(Sk, device=q.device)[None, :]
    allowed = torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    if is_causal:
        allowed &= j <= i
    if window is not None:
        if window[0] >= 0:
            allowed &= j >= i - window[0]
        if window[1] >= 0:
            allowed &= j <= i + window[1]
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            allowed = allowed & attn_mask
        else:
            s = s + attn_mask
            allowed = allowed & (attn_mask != float("-inf"))
    s = s.masked_fill(~allowed, float("-inf"))
    # Fully masked rows give 0, as the kernels; a NaN from the inputs stays NaN, as there.
    p = torch.softmax(s, -1).masked_fill(~allowed.any(-1, keepdim=True), 0.0)
    if keep is not None:
        p = p * keep.to(p.dtype) / (1.0 - dropout_p)
    elif dropout_p > 0:
        p = torch.nn.functional.dropout(p, dropout_p)
    return p @ v


# ---- custom ops -------------------------------------------------------------------------------


def _full_mask(attn_mask, shape):
    """The mask as a (B, H, Sq, Sk) view (attention() has expanded it already: an expand op
    costs ~1.2 us, a shape comparison ~0.2)."""
    if attn_mask is None or attn_mask.shape == shape:
        return attn_mask
    return attn_mask.expand(shape)


def _forward_impl(q, k, v, attn_mask, dropout_p, is_causal, scale, seed, softcap, window_left,
                  window_right, bottom_right, bshd_out, need_lse=True):
    """(B, H, Sq, D) x (B, Hkv, Sk, D) x (B, Hkv, Sk, Dv) -> out, lse (B, H, Sq) fp32.

    ``bshd_out`` returns out as a contiguous (B, Sq, H, Dv) tensor (what transformers wants).
    ``need_lse=False`` (inference: no backward will read it) returns lse None, saving its
    allocation on every decode step."""
    B, H, Sq, _ = q.shape
    Dv = v.shape[-1]
    if bshd_out:
        out = q.new_empty((B, Sq, H, Dv))  # (0.4 us less than torch.empty(..., dtype=))
        # its (B, H, Sq, Dv) view as a raw descriptor: a transpose op costs ~1.2 us a call
        outc = (out.data_ptr(), (B, H, Sq, Dv), (Sq * H * Dv, Dv, H * Dv, 1), DTYPE_NAMES[q.dtype], True)
    else:
        out = outc = q.new_empty((B, H, Sq, Dv))
    lse = torch.empty((B, H, Sq), dtype=torch.float32) if need_lse else None
    mask = _full_mask(attn_mask, (B, H, Sq, k.shape[2]))
    # The binding reads the tensors itself (_torch_binding registers torch's types).
    _C.attention(_rows(q), _rows(k), _rows(v), outc, lse, mask, None, None, None, None, None, B,
                 scale, softcap, is_causal, bottom_right, window_left, window_right, dropout_p,
                 int(seed.item()) if dropout_p > 0 else 0, 0, _threads(), None, None, _FN)
    return out, lse


@torch.library.custom_op("attnkit::sdpa_forward", mutates_args=(), device_types="cpu")
def _sdpa_forward(q: Tensor, k: Tensor, v: Tensor, attn_mask: Optional[Tensor], dropout_p: float,
                  is_causal: bool, scale: float, seed: Tensor, softcap: float, window_left: int,
                  window_right: int, bottom_right: bool, bshd_out: bool) -> tuple[Tensor, Tensor]:
    """The forward as a custom op (what torch.compile traces); see _forward_impl."""
    return _forward_impl(q, k, v, attn_mask, dropout_p, is_causal, scale, seed, softcap,
                         window_left, window_right, bottom_right, bshd_out)


@_sdpa_forward.register_fake
def _(q, k, v, attn_mask, dropout_p, is_causal, scale, seed, softcap, window_left, window_right,
      bottom_right, bshd_out):
    B, H, Sq, _ = q.shape
    Dv = v.shape[-1]
    if bshd_out:
        out = q.new_empty((B, Sq, H, Dv))
    else:
        out = q.new_empty((B, H, Sq, Dv))
    return out, q.new_empty((B, H, Sq), dtype=torch.float32)


def _grad_like(t: Tensor) -> Tensor:
    """A gradient buffer for input t: t's layout when its head dim is contiguous (the kernels
    need that), else a contiguous one (empty_like keeps a transposed head dim's strides)."""
    return torch.empty_like(t) if t.stride(-1) == 1 or t.shape[-1] <= 1 else torch.empty(
        t.shape, dtype=t.dtype)


def _backward_impl(dout, q, k, v, out, lse, attn_mask, dropout_p, is_causal, scale, seed, softcap,
                   window_left, window_right, bottom_right, bshd_out):
    """Gradients of the forward (out/dout in the layout ``bshd_out`` says)."""
    B, H, Sq, _ = q.shape
    if bshd_out:
        out, dout = out.transpose(1, 2), dout.transpose(1, 2)
    dq, dk, dv = (_grad_like(t) for t in (q, k, v))
    mask = _full_mask(attn_mask, (B, H, Sq, k.shape[2]))
    _C.attention_backward(_rows(dout), _rows(q), _rows(k), _rows(v), _rows(out), lse, dq, dk, dv,
                          mask, None, None, None, B, scale, softcap, is_causal,
                          bottom_right, window_left, window_right, dropout_p,
                          int(seed.item()) if dropout_p > 0 else 0, 0, _threads())
    return dq, dk, dv


@torch.library.custom_op("attnkit::sdpa_backward", mutates_args=(), device_types="cpu")
def _sdpa_backward(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
                   attn_mask: Optional[Tensor], dropout_p: float, is_causal: bool, scale: float,
                   seed: Tensor, softcap: float, window_left: int, window_right: int,
                   bottom_right: bool, bshd_out: bool) -> tuple[Tensor, Tensor, Tensor]:
    """The backward as a custom op; see _backward_impl."""
    return _backward_impl(dout, q, k, v, out, lse, attn_mask, dropout_p, is_causal, scale, seed,
                          softcap, window_left, window_right, bottom_right, bshd_out)


def _wrapped(t) -> bool:
    """A functorch-wrapped tensor (vmap's BatchedTensor, grad's wrapper) or a batched tensor of
    the older torch._vmap_internals (gradcheck's batched-gradient check): no storage to read."""
    return (torch._C._functorch.is_functorch_wrapped_tensor(t)
            or torch._C._functorch.is_legacy_batchedtensor(t))


def _math_backward(needs, dout, q, k, v, out, lse, attn_mask, dropout_p, is_causal, scale, seed,
                   softcap, window_left, window_right, bottom_right, bshd_out):
    """The gradients of (q, k, v, attn_mask) where ``needs`` says, in torch ops (autograd
    through _torch_math, with attnkit's dropout mask), for what the kernels do not compute:
    a float mask's gradient, a backward that is itself differentiated (create_graph: the
    result keeps its graph, so second derivatives are right), and a dout the kernels cannot
    read: a functorch-wrapped one (vmap over the backward, gradcheck's batched-gradient check)."""
    keep = None
    if dropout_p > 0.0:
        from ._attention import dropout_mask

        B, H, Sq, _ = q.shape
        keep = torch.from_numpy(dropout_mask((B, H, Sq, k.shape[2]), dropout_p, int(seed.item())))
    window = (window_left, window_right)

    def forward(*xs):
        # half inputs in float32, as the kernels accumulate (the gradients come back in the
        # inputs' dtypes through the casts)
        xs = [x.float() if x is not None and x.dtype in _HALF else x for x in xs]
        o = _torch_math(*xs, dropout_p, is_causal, scale, softcap, window, bottom_right, keep=keep)
        o = o.to(q.dtype)
        return o.transpose(1, 2) if bshd_out else o

    inputs = (q, k, v, attn_mask)
    if torch._C._functorch.is_functorch_wrapped_tensor(dout):  # inside vmap / grad: vjp
        want = [i for i in range(4) if needs[i]]

        def some(*xs):
            full = list(inputs)
            for i, x in zip(want, xs):
                full[i] = x
            return forward(*full)

        _, vjp = torch.func.vjp(some, *(inputs[i] for i in want))
        grads = dict(zip(want, vjp(dout)))
        return tuple(grads.get(i) for i in range(4))
    create_graph = torch.is_grad_enabled()  # in a backward: only under create_graph=True
    with torch.enable_grad():
        xs = list(inputs)
        for i in range(4):
            if needs[i] and not (create_graph and xs[i].requires_grad):
                xs[i] = xs[i].detach().requires_grad_(True)
        want = [i for i in range(4) if needs[i]]
        grads = torch.autograd.grad(forward(*xs), [xs[i] for i in want], dout,
                                    create_graph=create_graph)
    grads = dict(zip(want, grads))
    return tuple(grads.get(i) for i in range(4))


_HALF = (torch.float16, torch.bfloat16)


def _needs_math(ctx, dout) -> bool:
    """The backward goes through _math_backward (see there) rather than the kernels."""
    return ctx.needs_input_grad[3] or torch.is_grad_enabled() or _wrapped(dout)


@_sdpa_backward.register_fake
def _(dout, q, k, v, out, lse, attn_mask, dropout_p, is_causal, scale, seed, softcap, window_left,
      window_right, bottom_right, bshd_out):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


_OPTIONS = ("attn_mask", "dropout_p", "is_causal", "scale", "seed", "softcap", "window_left",
            "window_right", "bottom_right", "bshd_out")


def _setup_context(ctx, inputs, output):
    q, k, v, *opts = inputs
    out, lse = output
    ctx.opts = dict(zip(_OPTIONS, opts))
    ctx.save_for_backward(q, k, v, out, lse, ctx.opts.pop("attn_mask"), ctx.opts.pop("seed"))


def _gradients(ctx, dout, kernel):
    """The backward of both autograd paths: ``kernel`` is the custom op (torch.compile) or
    _backward_impl (eager); _math_backward where the kernels do not serve (_needs_math)."""
    q, k, v, out, lse, attn_mask, seed = ctx.saved_tensors
    o = ctx.opts
    if _needs_math(ctx, dout):
        dq, dk, dv, dmask = _math_backward(ctx.needs_input_grad[:4], dout, q, k, v, out, lse,
                                           attn_mask, seed=seed, **o)
        return (dq, dk, dv, dmask) + (None,) * (len(_OPTIONS) - 1)
    dq, dk, dv = kernel(
        dout.contiguous() if dout.stride(-1) != 1 else dout, q, k, v, out, lse, attn_mask,
        o["dropout_p"], o["is_causal"], o["scale"], seed, o["softcap"], o["window_left"],
        o["window_right"], o["bottom_right"], o["bshd_out"])
    return (dq, dk, dv) + (None,) * len(_OPTIONS)


def _backward(ctx, dout, dlse):
    return _gradients(ctx, dout, torch.ops.attnkit.sdpa_backward)


_sdpa_forward.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """Eager-mode autograd without the custom-op dispatch (which costs ~100 us of Python per
    call, measurable in token-by-token generation). Same kernels, same results."""

    @staticmethod
    def forward(ctx, q, k, v, *opts):
        out, lse = _forward_impl(q, k, v, *opts)
        ctx.opts = dict(zip(_OPTIONS, opts))
        ctx.save_for_backward(q, k, v, out, lse, ctx.opts.pop("attn_mask"), ctx.opts.pop("seed"))
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        return _gradients(ctx, dout, _backward_impl)


def _run(q, k, v, *opts):
    """The custom op under torch.compile; a direct call (with autograd when needed) otherwise."""
    if torch.compiler.is_compiling():
        return torch.ops.attnkit.sdpa_forward(q, k, v, *opts)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad or (
            opts[0] is not None and opts[0].requires_grad)):
        return _EagerAttention.apply(q, k, v, *opts)
    return _forward_impl(q, k, v, *opts, need_lse=False)
