"""PyTorch front end: a twin of ``torch.nn.functional.scaled_dot_product_attention`` on
attnkit's CPU kernels, with autograd (FlashAttention-2 style backward) and dropout.

The kernels are registered as ``torch.library`` custom ops (``attnkit::sdpa_forward`` and
``attnkit::sdpa_backward``) with fake implementations, so ``torch.compile(fullgraph=True)``
traces through them, and with ``register_autograd`` for training.

Zero copy: CPU tensors in float32, float16, bfloat16 (and float64) go to the kernels as raw
pointers with their strides; nothing is copied unless the last (head) dim is not contiguous,
in which case that operand is made contiguous first. Inputs attnkit cannot take fall back to
torch's own implementation with a one-time warning that says why.
"""
from __future__ import annotations

import contextlib
import math
import threading
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import _C

__all__ = ["scaled_dot_product_attention", "sdpa_override"]

_TORCH_SDPA = torch.nn.functional.scaled_dot_product_attention
_DTYPES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.bool: "bool",
}
_warned: set = set()
_local = threading.local()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"attnkit.torch: falling back to torch's scaled_dot_product_attention: {reason}",
                      stacklevel=3)


def _desc(t: Tensor, writeable: bool = False):
    """A raw (pointer, shape, strides, dtype, writeable) descriptor for the binding."""
    return (t.data_ptr(), t.shape, t.stride(), _DTYPES[t.dtype], writeable)


def _rows(t: Tensor) -> Tensor:
    """The kernels read the head dim with unit stride; anything else is copied (documented)."""
    if t.dim() and t.shape[-1] > 1 and t.stride(-1) != 1:
        return t.contiguous()
    return t


def _threads() -> int:
    return torch.get_num_threads()


def _cuda_ready() -> bool:
    try:
        from . import _cuda

        return _cuda.device_count() > 0
    except ImportError:
        return False


def _torch_math(q, k, v, attn_mask, dropout_p, is_causal, scale, softcap, window, bottom_right):
    """attnkit's semantics in plain torch ops (materializes the scores): the autograd fallback
    for devices without an attnkit backward."""
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
    p = torch.softmax(s, -1).nan_to_num(0.0)  # fully masked rows: 0, as the kernels give
    if dropout_p > 0:
        p = torch.nn.functional.dropout(p, dropout_p)
    return p @ v


def _cuda_forward(q, k, v, attn_mask, dropout_p, is_causal, scale, softcap, window, bottom_right,
                  bshd_out):
    """CUDA tensors (inference): attnkit's GPU kernels on torch's current stream, zero copy."""
    from ._attention import attention as _attention

    if dropout_p > 0.0:
        raise NotImplementedError("attnkit.torch: dropout is not implemented on CUDA yet")
    B, H, Sq, _ = q.shape
    Dv = v.shape[-1]
    if bshd_out:
        out = torch.empty((B, Sq, H, Dv), dtype=q.dtype, device=q.device)
        outc = out.transpose(1, 2)
    else:
        out = outc = torch.empty((B, H, Sq, Dv), dtype=q.dtype, device=q.device)
    _attention(q, k, v, mask=attn_mask, causal=is_causal,
               causal_align="bottom_right" if bottom_right else "top_left", scale=scale,
               window=window, softcap=softcap or None, out=outc)
    return out


# ---- custom ops -------------------------------------------------------------------------------


def _forward_impl(q, k, v, attn_mask, dropout_p, is_causal, scale, seed, softcap, window_left,
                  window_right, bottom_right, bshd_out):
    """(B, H, Sq, D) x (B, Hkv, Sk, D) x (B, Hkv, Sk, Dv) -> out, lse (B, H, Sq) fp32.

    ``bshd_out`` returns out as a contiguous (B, Sq, H, Dv) tensor (what transformers wants)."""
    B, H, Sq, _ = q.shape
    Dv = v.shape[-1]
    if bshd_out:
        out = torch.empty((B, Sq, H, Dv), dtype=q.dtype)
        outc = out.transpose(1, 2)
    else:
        out = outc = torch.empty((B, H, Sq, Dv), dtype=q.dtype)
    lse = torch.empty((B, H, Sq), dtype=torch.float32)
    mask = None if attn_mask is None else _desc(attn_mask.expand(B, H, Sq, k.shape[2]))
    _C.attention(_desc(_rows(q)), _desc(_rows(k)), _desc(_rows(v)), _desc(outc, True),
                 _desc(lse, True), mask, None, None, None, None, None, B, scale, softcap,
                 is_causal, bottom_right, window_left, window_right, dropout_p,
                 int(seed.item()) if dropout_p > 0 else 0, 0, _threads())
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


def _backward_impl(dout, q, k, v, out, lse, attn_mask, dropout_p, is_causal, scale, seed, softcap,
                   window_left, window_right, bottom_right, bshd_out):
    """Gradients of the forward (out/dout in the layout ``bshd_out`` says)."""
    B, H, Sq, _ = q.shape
    if bshd_out:
        out, dout = out.transpose(1, 2), dout.transpose(1, 2)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    mask = None if attn_mask is None else _desc(attn_mask.expand(B, H, Sq, k.shape[2]))
    _C.attention_backward(_desc(_rows(dout)), _desc(_rows(q)), _desc(_rows(k)), _desc(_rows(v)),
                          _desc(_rows(out)), _desc(lse), _desc(dq, True), _desc(dk, True),
                          _desc(dv, True), mask, None, None, None, B, scale, softcap, is_causal,
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


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, attn_mask, seed = ctx.saved_tensors
    o = ctx.opts
    dq, dk, dv = torch.ops.attnkit.sdpa_backward(
        dout.contiguous() if dout.stride(-1) != 1 else dout, q, k, v, out, lse, attn_mask,
        o["dropout_p"], o["is_causal"], o["scale"], seed, o["softcap"], o["window_left"],
        o["window_right"], o["bottom_right"], o["bshd_out"])
    return (dq, dk, dv) + (None,) * len(_OPTIONS)


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
        q, k, v, out, lse, attn_mask, seed = ctx.saved_tensors
        o = ctx.opts
        dq, dk, dv = _backward_impl(
            dout.contiguous() if dout.stride(-1) != 1 else dout, q, k, v, out, lse, attn_mask,
            o["dropout_p"], o["is_causal"], o["scale"], seed, o["softcap"], o["window_left"],
            o["window_right"], o["bottom_right"], o["bshd_out"])
        return (dq, dk, dv) + (None,) * len(_OPTIONS)


def _run(q, k, v, *opts):
    """The custom op under torch.compile; a direct call (with autograd when needed) otherwise."""
    if torch.compiler.is_compiling():
        return torch.ops.attnkit.sdpa_forward(q, k, v, *opts)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _EagerAttention.apply(q, k, v, *opts)
    return _forward_impl(q, k, v, *opts)


# ---- the public twin of F.scaled_dot_product_attention ----------------------------------------


def _unsupported(query, key, value, attn_mask) -> Optional[str]:
    for t in (query, key, value) + ((attn_mask,) if attn_mask is not None else ()):
        if not isinstance(t, Tensor):
            return f"an argument is a {type(t).__name__}, not a Tensor"
        if t.is_nested:
            return "nested tensors are not supported"
        if t.device.type == "cuda":
            if not _cuda_ready():
                return "CUDA tensors need attnkit's CUDA build with a visible GPU, not present here"
            if torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value)):
                return "the CUDA build has no backward kernel yet (gradients on CUDA use torch)"
        elif t.device.type != "cpu":
            return f"{t.device.type} tensors are not supported"
        if t.layout != torch.strided:
            return f"{t.layout} tensors are not supported"
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return f"dtype {query.dtype} is not supported"
    if query.dim() not in (3, 4) or key.dim() != query.dim() or value.dim() != query.dim():
        return f"inputs with {query.dim()} dims (attnkit takes 3-D or 4-D)"
    if attn_mask is not None:
        if attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
            return None  # torch raises for this below
        if attn_mask.requires_grad and torch.is_grad_enabled():
            return "a gradient for attn_mask is not computed by attnkit"
        if attn_mask.dim() > 4:
            return "attn_mask with more than 4 dims"
    return None


def _check_like_torch(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
    """The errors torch's SDPA raises for invalid combinations."""
    if attn_mask is not None and is_causal:
        raise RuntimeError("_scaled_dot_product_attention: Explicit attn_mask should not be set "
                           "when is_causal=True")
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError("Expected query, key, and value to have the same dtype, but got "
                           f"query.dtype: {query.dtype} key.dtype: {key.dtype} and value.dtype: "
                           f"{value.dtype} instead.")
    if attn_mask is not None and attn_mask.dtype != torch.bool and attn_mask.dtype != query.dtype:
        raise RuntimeError(f"Expected attn_mask dtype to be bool or float or to match query dtype, "
                           f"but got attn_mask.dtype: {attn_mask.dtype} and query.dtype: {query.dtype} instead.")
    if query.shape[-1] != key.shape[-1]:
        raise RuntimeError(f"Expected query and key to have the same head dim, got {query.shape[-1]} "
                           f"and {key.shape[-1]}")
    if key.shape[-2] != value.shape[-2]:
        raise RuntimeError(f"Expected key and value to have the same sequence length, got "
                           f"{key.shape[-2]} and {value.shape[-2]}")
    if not 0.0 <= dropout_p <= 1.0:
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {dropout_p}")
    if query.dim() == 4:
        H, Hkv = query.shape[1], key.shape[1]
        if H != Hkv and not enable_gqa:
            raise RuntimeError(f"Expected query and key to have the same number of heads ({H} vs "
                               f"{Hkv}); pass enable_gqa=True for grouped-query attention")
        if Hkv == 0 or H % Hkv != 0 or value.shape[1] != Hkv:
            raise RuntimeError(f"number of heads in key/value must divide the number of heads in "
                               f"query ({H} vs {Hkv})")


_NO_SEED = torch.zeros(1, dtype=torch.int64)  # never read: the kernels only use it with dropout


def _dropout_seed(dropout_p: float) -> Tensor:
    """A seed drawn from torch's default generator (so torch.manual_seed reproduces masks)."""
    if dropout_p > 0.0:
        return torch.randint(0, 2**62, (1,), dtype=torch.int64)
    return _NO_SEED


def attention(query: Tensor, key: Tensor, value: Tensor, *, attn_mask: Optional[Tensor] = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
              softcap: Optional[float] = None, window: Optional[tuple] = None,
              bottom_right: bool = False, bshd_out: bool = False) -> Tensor:
    """attnkit attention on (B, H, S, D) torch tensors with autograd, and attnkit's extras
    (``softcap``, ``window=(left, right)``, bottom-right alignment, output in (B, S, H, D)
    with ``bshd_out=True``). GQA is implied by H % Hkv == 0. Used by
    :func:`scaled_dot_product_attention` and the transformers integration."""
    B = max(query.shape[0], key.shape[0], value.shape[0])
    if query.shape[0] != B:
        query = query.expand(B, *query.shape[1:])
    if key.shape[0] != B:
        key, value = key.expand(B, *key.shape[1:]), value.expand(B, *value.shape[1:])
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if query.is_cuda:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
            _warn_once("the CUDA build has no backward kernel yet: training on CUDA runs torch "
                       "math (materialized scores)")
            out = _torch_math(query, key, value, attn_mask, dropout_p, is_causal, scale, softcap,
                              window, bottom_right)
            return out.transpose(1, 2).contiguous() if bshd_out else out
        return _cuda_forward(query, key, value, attn_mask, dropout_p, is_causal, scale, softcap,
                             window, bottom_right, bshd_out)
    wl, wr = window if window is not None else (-1, -1)
    out, _ = _run(
        query, key, value, attn_mask, float(dropout_p), bool(is_causal), float(scale),
        _dropout_seed(dropout_p), float(softcap or 0.0), int(wl), int(wr), bool(bottom_right),
        bool(bshd_out))
    return out


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False):
    """Drop-in twin of ``torch.nn.functional.scaled_dot_product_attention`` on attnkit's kernels.

    Same signature and semantics: (N, ..., L, E) inputs with 3 or 4 dims, top-left causal
    alignment, bool (True = attend) or additive float masks broadcastable to (N, H, L, S),
    ``enable_gqa`` for H % Hkv == 0, default scale 1/sqrt(E), dropout drawn from torch's default
    generator, and the errors torch raises for invalid combinations. Autograd works (the
    backward is attnkit's). A fully masked row gives 0 (torch's math kernel gives NaN there).
    Inputs attnkit cannot take (CUDA tensors without the CUDA build, nested tensors, other
    dtypes, a mask that needs a gradient) fall back to torch with a one-time warning.
    """
    reason = _unsupported(query, key, value, attn_mask)
    if reason is None and isinstance(dropout_p, (int, float)) and dropout_p == 1.0:
        reason = "dropout_p=1.0 (everything dropped)"
    if reason is not None:
        _warn_once(reason)
    if reason is not None or query.numel() == 0 or key.numel() == 0 or value.numel() == 0:
        # Empty inputs: torch's own result (and its rules for them), no work to speak of.
        return _call_torch(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                           is_causal=is_causal, scale=scale, enable_gqa=enable_gqa)
    _check_like_torch(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa)
    three_d = query.dim() == 3
    if three_d:
        query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
    if attn_mask is not None:
        shape = (max(query.shape[0], key.shape[0]), query.shape[1], query.shape[2], key.shape[2])
        try:
            attn_mask = attn_mask.expand(shape)  # a view: broadcast dims keep stride 0
        except RuntimeError:
            raise RuntimeError(f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to "
                               f"{shape}") from None
    out = attention(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                    is_causal=is_causal, scale=scale)
    return out.squeeze(1) if three_d else out


def _call_torch(*args, **kwargs):
    _local.busy = True
    try:
        return _TORCH_SDPA(*args, **kwargs)
    finally:
        _local.busy = False


# ---- routing every SDPA call to attnkit --------------------------------------------------------


class _SDPAMode(torch.overrides.TorchFunctionMode):
    """Catches calls of torch's SDPA made through any reference to it (``from
    torch.nn.functional import scaled_dot_product_attention`` included)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _TORCH_SDPA and not getattr(_local, "busy", False):
            return scaled_dot_product_attention(*args, **kwargs)
        return func(*args, **kwargs)


@contextlib.contextmanager
def sdpa_override():
    """Within the block, every ``torch.nn.functional.scaled_dot_product_attention`` call runs on
    attnkit: the module attribute is replaced, and a ``TorchFunctionMode`` catches callers that
    imported the function by name. Everything is restored on exit, exceptions included."""
    F = torch.nn.functional
    previous = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = scaled_dot_product_attention
    try:
        with _SDPAMode():
            yield
    finally:
        F.scaled_dot_product_attention = previous
