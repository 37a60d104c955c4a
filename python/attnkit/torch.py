"""PyTorch front end: a twin of ``torch.nn.functional.scaled_dot_product_attention`` on
attnkit's CPU kernels, with autograd (FlashAttention-2 style backward) and dropout.

The kernels are registered as ``torch.library`` custom ops (``attnkit::sdpa_forward`` and
``attnkit::sdpa_backward``) with fake implementations, so ``torch.compile(fullgraph=True)``
traces through them, and with ``register_autograd`` for training.

Zero copy: CPU tensors in float32, float16, bfloat16 (and float64) go to the kernels as raw
pointers with their strides (the binding reads them and refuses a tensor on another device, of
another layout or dtype); nothing is copied unless the last (head) dim is not contiguous, in
which case that operand is made contiguous first. Inputs attnkit cannot take fall back to
torch's own implementation with a one-time warning that says why; so do calls made under a
torch.func transform (vmap, grad, jvp), forward-mode AD and torch.jit.trace, whose tensors or
recorded graphs need torch's own op. TorchScript compiles the twin as torch's op.
"""
from __future__ import annotations

import contextlib
import math
import threading
import warnings
from typing import Optional

import torch
import torch.autograd.forward_ad as _fwad
from torch import Tensor

from ._front import window_entry
from ._torch_autograd import _run, _torch_math, _wrapped
from ._torch_checks import (_FN, _check_attention_args, _check_grad_dtypes, _check_like_torch,
                            _check_scalar_types, _check_twin_types, _refuse_layouts, _torch_decides)
from ._torch_merge import merge_attention_states

try:  # the attention-bias subclasses (torch >= 2.3)
    from torch.nn.attention.bias import CausalBias as _CausalBias
    from torch.nn.attention.bias import CausalVariant as _CausalVariant
except ImportError:  # pragma: no cover
    _CausalBias = _CausalVariant = None

__all__ = ["scaled_dot_product_attention", "sdpa_override", "merge_attention_states",
           "ring_attention", "shard_sequence", "unshard_sequence"]

_TORCH_SDPA = torch.nn.functional.scaled_dot_product_attention
_warned: set = set()
_local = threading.local()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"attnkit.torch: falling back to torch's scaled_dot_product_attention: {reason}",
                      stacklevel=3)


def _cuda_ready() -> bool:
    try:
        from . import _cuda

        return _cuda.device_count() > 0
    except ImportError:
        return False


def _cuda_forward(q, k, v, attn_mask, dropout_p, is_causal, scale, softcap, window, bottom_right,
                  bshd_out, need_lse=False):
    """CUDA tensors: attnkit's GPU kernels on torch's current stream, zero copy. Returns out,
    or with ``need_lse`` (out, its (B, H, Sq, Dv) view, lse) for the backward."""
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
    res = _attention(q, k, v, mask=attn_mask, causal=is_causal,
                     causal_align="bottom_right" if bottom_right else "top_left", scale=scale,
                     window=window, softcap=softcap or None, out=outc, return_lse=need_lse)
    return (out, outc, res[1]) if need_lse else out


def _cuda_backward_ready(q, k, v, attn_mask, dropout_p) -> bool:
    """attnkit's CUDA backward takes this call: turned on (ATTNKIT_CUDA_BACKWARD=1; it has run
    only on the emulator so far), fp16/bf16, head dims up to 128, no dropout, no mask gradient."""
    if dropout_p > 0.0 or q.dtype not in (torch.float16, torch.bfloat16):
        return False
    if max(q.shape[-1], v.shape[-1]) > 128 or (attn_mask is not None and attn_mask.requires_grad):
        return False
    from . import _cuda_backend

    try:
        return bool(_cuda_backend._module().backward_kernel_enabled())
    except (ImportError, RuntimeError, AttributeError):
        return False


class _CudaAttention(torch.autograd.Function):
    """CUDA tensors with autograd on attnkit's kernels: the forward keeps its lse, the backward
    is attention_backward on the device (csrc/cuda/attention_bwd.cu), on torch's stream."""

    @staticmethod
    def forward(ctx, q, k, v, attn_mask, is_causal, scale, softcap, window, bottom_right, bshd_out):
        out, outc, lse = _cuda_forward(q, k, v, attn_mask, 0.0, is_causal, scale, softcap, window,
                                       bottom_right, bshd_out, need_lse=True)
        ctx.opts = dict(mask=attn_mask, causal=is_causal,
                        causal_align="bottom_right" if bottom_right else "top_left", scale=scale,
                        window=window, softcap=softcap or None)
        ctx.bshd_out = bshd_out
        ctx.save_for_backward(q, k, v, outc, lse)
        return out

    @staticmethod
    def backward(ctx, dout):
        from ._attention import attention_backward

        q, k, v, outc, lse = ctx.saved_tensors
        if ctx.bshd_out:
            dout = dout.transpose(1, 2)
        if dout.stride(-1) != 1:
            dout = dout.contiguous()
        dq, dk, dv = attention_backward(dout, q, k, v, outc, lse, **ctx.opts)
        return (dq, dk, dv) + (None,) * 7


# ---- context parallelism: ring attention over torch.distributed ---------------------------------


def ring_attention(q: Tensor, k: Tensor, v: Tensor, *, group=None, is_causal: bool = False,
                   scale: Optional[float] = None, enable_gqa: bool = False, layout: str = "bhsd",
                   sharding: str = "zigzag") -> Tensor:
    """Context-parallel attention: this rank's shard of ``attention(Q, K, V)`` for a sequence
    sharded over the ranks of a ``torch.distributed`` group, with autograd.

    ``q``, ``k``, ``v`` are this rank's shards along the sequence: (B, H, S_r, D),
    (B, Hkv, S_r, D), (B, Hkv, S_r, Dv) with ``layout="bhsd"``, or (B, S_r, H, D) with
    ``"bshd"``; the result is this rank's shard of the output, (B, H, S_r, Dv) or
    (B, S_r, H, Dv), in q's dtype. Every rank of ``group`` (default: the world) must call it
    with the same options; the result equals single-process attention on the unsharded tensors
    (within fp32 rounding: the partial results are merged in a different order).

    * Sharding: ``"zigzag"`` (default; what :func:`shard_sequence` makes): the sequence is cut
      into 2W chunks and rank r holds chunks r and 2W-1-r, so with ``is_causal`` every rank does
      the same work. ``"contiguous"``: rank r holds the r-th of W consecutive pieces. Sequence
      lengths need not divide: shards are cut like ``torch.tensor_split`` (the first pieces one
      longer), and for causal zigzag the ranks' lengths must be that layout's (checked). Without
      ``is_causal``, any shard lengths work, and k/v may hold other tokens than q
      (cross-attention).
    * ``is_causal``: causal over global positions (query i sees keys at positions <= i). Fully
      masked blocks are skipped; a diagonal block runs the kernels' causal mask (or a window
      bound, for a query block that starts after its key block).
    * GQA (H a multiple of Hkv, with ``enable_gqa=True``) reads K/V without repeating them.
    * dtypes: float32, float16, bfloat16 (K/V travel in their dtype; blocks are computed and
      merged in fp32, the output rounded once), float64 (per-block torch math in fp64: a
      reference path, it materializes each block's scores).
    * Devices: CPU tensors over a gloo group (attnkit's CPU kernels). CUDA tensors over an NCCL
      group when attnkit's CUDA build is present: forward blocks on attnkit's CUDA kernels, the
      merge and the backward blocks in torch ops (attnkit has no CUDA backward kernel yet).
      **The CUDA path has not run on a GPU.**

    How it runs: the K/V shards go around the ring of ranks (``isend``/``irecv`` through
    ``batch_isend_irecv``; rank r sends to r + 1). While a rank computes its queries against the
    K/V it holds, the next K/V is already in transfer into a second buffer; W - 1 transfers per
    forward, no all-gather. Each block's (out, lse) is merged into a running fp32 state with the
    merge kernel (:func:`merge_attention_states`). The backward passes K/V around again and, with
    them, one fp32 dK/dV accumulator per shard, which gathers every rank's contribution
    (attnkit's backward against that shard, with the globally merged out and lse) and arrives
    home after W steps: per rank, forward (W-1) x the K/V shard's bytes, backward (W-1) x K/V +
    W x dK/dV (fp32) bytes.

    Checks: each rank checks its arguments, then the ranks exchange a summary (one small
    ``all_gather``) before anything else is sent; if any rank's inputs are refused (or the ranks
    disagree on shapes, dtype, options or whether gradients are needed), every rank raises
    (the refusing one with its own error, the others ``RuntimeError``) and nothing hangs. A
    failure after that (e.g. ``MemoryError`` on one rank mid-ring) leaves the peers waiting until
    the process group's timeout (``init_process_group(timeout=...)``). Eager mode only (no
    ``torch.compile``); threads per rank: ``torch.get_num_threads()``.
    """
    from ._ring import ring_attention as _ring_attention

    return _ring_attention(q, k, v, group=group, is_causal=is_causal, scale=scale,
                           enable_gqa=enable_gqa, layout=layout, sharding=sharding)


def shard_sequence(x: Tensor, dim: int, group=None, *, sharding: str = "zigzag") -> Tensor:
    """This rank's shard of ``x`` along ``dim``, for :func:`ring_attention`.

    ``x`` is the whole tensor (the same on every rank). ``"zigzag"`` (default): ``x`` is cut
    into 2W chunks like ``torch.tensor_split`` (the first ``S % 2W`` one longer) and rank r
    gets chunks r and 2W-1-r, concatenated (a new tensor); with causal attention this gives
    every rank the same work. ``"contiguous"``: the r-th of W pieces (a view). Shard position
    ids the same way (``shard_sequence(torch.arange(S), 0)``) to keep positions global. No
    communication; differentiable. Needs at least W positions (every rank gets one).
    """
    from ._ring import shard_sequence as _shard

    return _shard(x, dim, group, sharding=sharding)


def unshard_sequence(x: Tensor, dim: int, group=None, *, sharding: str = "zigzag") -> Tensor:
    """The whole tensor from every rank's shard along ``dim`` (the inverse of
    :func:`shard_sequence`), on every rank: an ``all_gather`` (shards padded to the longest).
    Collective: every rank of the group must call it. The shards must agree on everything but
    their length along ``dim``, and with ``"zigzag"`` the lengths must be that layout's; if any
    rank's input is refused, every rank raises before any data is sent. Not differentiable (the
    result carries no gradient history): use it for outputs, logits and checks.
    """
    from ._ring import unshard_sequence as _unshard

    return _unshard(x, dim, group, sharding=sharding)


# ---- the public twin of F.scaled_dot_product_attention ----------------------------------------


def _transformed(tensors) -> Optional[str]:
    """Why tensors under a torch.func transform or forward-mode AD must go to torch: the
    kernels read raw storage, which functorch's wrapped tensors lack, and they compute no
    tangents. Cheap when no transform is active (well under a microsecond per tensor).
    Under torch.compile the custom op is traced instead, and the compiler handles these."""
    if torch.compiler.is_compiling():
        return None
    if torch._C._functorch.maybe_current_level() is not None and any(_wrapped(t) for t in tensors):
        return "torch.func transforms (vmap, grad, jvp) run torch's SDPA on their wrapped tensors"
    if any(torch._C._functorch.is_legacy_batchedtensor(t) for t in tensors):
        return "batched tensors (torch._vmap_internals) run torch's SDPA"
    if _fwad._current_level >= 0 and any(_fwad.unpack_dual(t).tangent is not None for t in tensors):
        return "forward-mode AD (dual tensors) runs torch's SDPA"
    return None


def _unsupported(query, key, value, attn_mask) -> Optional[str]:
    tensors = (query, key, value) + ((attn_mask,) if attn_mask is not None else ())
    for t in tensors:
        if not isinstance(t, Tensor):
            return f"an argument is a {type(t).__name__}, not a Tensor"
        if t.is_nested:
            return "nested tensors are not supported"
        if t.device.type == "cuda":
            if not _cuda_ready():
                return "CUDA tensors need attnkit's CUDA build with a visible GPU, not present here"
            if (torch.is_grad_enabled() and any(x.requires_grad for x in (query, key, value))
                    and not _cuda_backward_ready(query, key, value, attn_mask, 0.0)):
                return ("gradients on CUDA use torch: attnkit's CUDA backward is off (unverified on "
                        "GPUs; ATTNKIT_CUDA_BACKWARD=1) or does not take this call")
        elif t.device.type != "cpu":
            return f"{t.device.type} tensors are not supported"
        if t.layout != torch.strided:
            return f"{t.layout} tensors are not supported"
    reason = _transformed(tensors)
    if reason is not None:
        return reason
    if torch.jit.is_tracing():
        return "torch.jit.trace records torch's SDPA (attnkit's kernels are not a traceable op)"
    if query.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        return f"dtype {query.dtype} is not supported"
    if query.dim() not in (3, 4) or key.dim() != query.dim() or value.dim() != query.dim():
        return f"inputs with {query.dim()} dims (attnkit takes 3-D or 4-D)"
    if attn_mask is not None:
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            return None  # torch raises for this below
        if attn_mask.requires_grad and torch.is_grad_enabled():
            return "a gradient for attn_mask is not computed by attnkit"
        if attn_mask.dim() > 4:
            return "attn_mask with more than 4 dims"
    return None


def _from_causal_bias(bias, is_causal, query, key):
    """A ``torch.nn.attention.bias.CausalBias`` as (attn_mask, is_causal, bottom_right), the way
    torch dispatches it: upper-left (or equal lengths) is ``is_causal=True`` on the actual
    inputs; lower-right is attnkit's bottom-right causal when the bias has the inputs' lengths,
    else the materialized bool mask (torch's CPU path), which must broadcast like any mask."""
    if is_causal:
        raise ValueError("CausalBias should not be used with causal=True")
    if bias.seq_len_q == bias.seq_len_kv or bias.variant == _CausalVariant.UPPER_LEFT:
        return None, True, False
    if bias.variant == _CausalVariant.LOWER_RIGHT:
        if (bias.seq_len_q, bias.seq_len_kv) == (query.shape[-2], key.shape[-2]):
            return None, True, True
        return bias._materialize(query.device), False, False
    raise ValueError(f"CausalBias.variant must be a CausalVariant type, but found: {bias.variant}")


_CAUSAL_AND_MASK = ("_scaled_dot_product_attention: Explicit attn_mask should not be set when "
                    "is_causal=True")


def _check_kernel_dependent(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    """Two behaviours of torch 2.13 depend on the kernel it selects for the call: is_causal
    together with attn_mask (its CPU flash kernel applies both, its math kernel raises) and a
    mask with fewer than 2 dims (the flash kernel's shape check raises IndexError, the math
    kernel broadcasts it). Ask torch's own selector (it raises torch's errors, and it honours
    sdpa_kernel); attnkit then computes what the selected kernel would."""
    if torch.compiler.is_compiling():  # the selector returns an int, which dynamo cannot trace
        flash = _flash_would_run(query, key, value, attn_mask, dropout_p)
    else:
        choice = torch._fused_sdp_choice(query, key, value, attn_mask, dropout_p, is_causal,
                                         scale=scale, enable_gqa=enable_gqa)
        flash = choice == int(torch.nn.attention.SDPBackend.FLASH_ATTENTION)
    if is_causal and not flash:
        raise RuntimeError(_CAUSAL_AND_MASK)


def _flash_would_run(query, key, value, attn_mask, dropout_p) -> bool:
    """Under torch.compile: torch 2.13's CPU kernel choice (sdp_utils_cpp.cpp,
    use_flash_attention_cpp) re-stated from its checks, in their order. Flash enabled, no
    dropout, 4-D inputs, equal batch sizes, a mask of >= 2 dims (fewer raise torch's
    IndexError, from that check), equal head dims, unit last-dim strides; else math."""
    if not torch._C._get_flash_sdp_enabled() or dropout_p != 0.0:
        return False
    if query.dim() != 4 or key.dim() != 4 or value.dim() != 4:
        return False
    if not query.shape[0] == key.shape[0] == value.shape[0]:
        return False
    if attn_mask is not None and attn_mask.dim() < 2:
        raise IndexError("Dimension out of range (expected to be in range of [-1, 0], but got -2)"
                         if attn_mask.dim() == 1 else
                         "Dimension specified as -2 but tensor has no dimensions")
    if not query.shape[-1] == key.shape[-1] == value.shape[-1]:
        return False
    return query.stride(-1) == 1 and key.stride(-1) == 1 and value.stride(-1) == 1


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
    :func:`scaled_dot_product_attention` and the transformers integration. Errors (before any
    work): TypeError/ValueError naming the argument, e.g. a tensor on another device than the
    others (a CPU call needs every tensor on the CPU), a dtype other than float32, float16,
    bfloat16, float64 (masks: bool or a float dtype), shapes that do not match or broadcast."""
    B, batches = _check_attention_args(query, key, value, attn_mask, window)
    if type(dropout_p) is not float or not (scale is None or type(scale) is float) or not (
            softcap is None or type(softcap) is float):
        _check_scalar_types(dropout_p, scale, softcap)
    if torch.is_grad_enabled():
        _check_grad_dtypes(query, key)
    if batches[0] != B:
        query = query.expand(B, *query.shape[1:])
    if batches[1] != B:
        key = key.expand(B, *key.shape[1:])
    if batches[2] != B:
        value = value.expand(B, *value.shape[1:])
    if scale is None:
        scale = 1.0 / math.sqrt(query.shape[-1])
    if query.is_cuda:
        if torch.is_grad_enabled() and any(t.requires_grad for t in (query, key, value)):
            if _cuda_backward_ready(query, key, value, attn_mask, dropout_p):
                return _CudaAttention.apply(query, key, value, attn_mask, bool(is_causal), float(scale),
                                            softcap, window, bool(bottom_right), bool(bshd_out))
            _warn_once("training on CUDA runs torch math (materialized scores): attnkit's CUDA "
                       "backward is off (ATTNKIT_CUDA_BACKWARD=1) or does not take this call")
            out = _torch_math(query, key, value, attn_mask, dropout_p, is_causal, scale, softcap,
                              window, bottom_right)
            return out.transpose(1, 2).contiguous() if bshd_out else out
        return _cuda_forward(query, key, value, attn_mask, dropout_p, is_causal, scale, softcap,
                             window, bottom_right, bshd_out)
    if attn_mask is not None:
        shape = (B, query.shape[1], query.shape[2], key.shape[2])
        try:
            attn_mask = attn_mask.expand(shape)  # a view: broadcast dims keep stride 0
        except RuntimeError:
            raise ValueError(f"{_FN}: attn_mask of shape {tuple(attn_mask.shape)} does not "
                             f"broadcast to {shape}") from None
    wl, wr = (window_entry(window[0]), window_entry(window[1])) if window is not None else (-1, -1)
    try:
        out, _ = _run(
            query, key, value, attn_mask, float(dropout_p), bool(is_causal), float(scale),
            _dropout_seed(dropout_p), float(softcap or 0.0), int(wl), int(wr), bool(bottom_right),
            bool(bshd_out))
    except RuntimeError:  # a torch op on a sparse tensor (no strides), before any kernel ran
        _refuse_layouts((("query", query), ("key", key), ("value", value), ("attn_mask", attn_mask)))
        raise
    return out


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0,
                                 is_causal=False, scale=None, enable_gqa=False):
    """Drop-in twin of ``torch.nn.functional.scaled_dot_product_attention`` on attnkit's kernels.

    Same signature and semantics as torch 2.13: (N, ..., L, E) inputs with 3 or 4 dims,
    top-left causal alignment, bool (True = attend) or additive float masks (float32 or the
    query's dtype) broadcastable to (N, H, L, S), ``torch.nn.attention.bias`` causal biases
    (``causal_upper_left`` / ``causal_lower_right``), ``enable_gqa`` for H % Hkv == 0, default
    scale 1/sqrt(E), and the errors torch raises, including the ones that depend on the kernel
    torch would pick (``is_causal`` with a mask applies both where torch's CPU flash kernel
    runs and raises where its math kernel would; a 1-D mask raises where the flash kernel would).
    A fully masked row gives 0 and NaN/inf propagate from every attended entry, as torch; NaN
    in K/V that is masked out never reaches the output (torch gives NaN there). Autograd works
    (the backward is attnkit's). Dropout is drawn from torch's default generator, so
    ``torch.manual_seed`` reproduces it, but the mask is attnkit's, not torch's.
    Inputs attnkit cannot take (CUDA tensors without the CUDA build, nested tensors, other
    dtypes, a mask that needs a gradient, torch.func transforms, forward-mode AD, tracing) and
    calls whose result torch's kernel choice decides (head counts that are neither equal nor
    grouped-query, which its math kernel broadcasts; 3-D inputs whose leading dims torch reads
    as heads or that do not broadcast; a non-finite scale) go to torch with a
    one-time warning. A backward differentiated again (``create_graph=True``) runs in torch
    ops, so second derivatives are exact. ``sdpa_kernel`` restrictions select among torch's
    kernels and do not apply to this function (they still shape the errors above).
    """
    _check_twin_types(dropout_p, is_causal, scale, enable_gqa)
    bottom_right = False
    torch_mask, torch_causal = attn_mask, is_causal  # what torch gets if the call goes to torch
    if _CausalBias is not None and isinstance(attn_mask, _CausalBias):
        attn_mask, is_causal, bottom_right = _from_causal_bias(attn_mask, is_causal, query, key)
    reason = _unsupported(query, key, value, attn_mask)
    if reason is None:
        reason = _torch_decides(query, key, value, scale, enable_gqa)
    if reason is None and isinstance(dropout_p, (int, float)) and dropout_p == 1.0:
        reason = "dropout_p=1.0 (everything dropped)"
    if reason is not None:
        _warn_once(reason)
    if reason is not None or query.numel() == 0 or key.numel() == 0 or value.numel() == 0:
        # Empty inputs: torch's own result (and its rules for them), no work to speak of.
        return _call_torch(query, key, value, attn_mask=torch_mask, dropout_p=dropout_p,
                           is_causal=torch_causal, scale=scale, enable_gqa=enable_gqa)
    _check_like_torch(query, key, value, attn_mask, dropout_p)
    if attn_mask is not None and (is_causal or attn_mask.dim() < 2):
        _check_kernel_dependent(query, key, value, attn_mask, dropout_p, is_causal, scale,
                                enable_gqa)
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
                    is_causal=is_causal, scale=scale, bottom_right=bottom_right)
    return out.squeeze(1) if three_d else out


def _call_torch(*args, **kwargs):
    """torch's own SDPA, not re-routed to attnkit by the override's mode."""
    previous = getattr(_local, "busy", False)
    _local.busy = True
    try:
        return _TORCH_SDPA(*args, **kwargs)
    finally:
        _local.busy = previous


# ---- routing every SDPA call to attnkit --------------------------------------------------------


class _SDPAMode(torch.overrides.TorchFunctionMode):
    """Catches calls of torch's SDPA made through any reference to it (``from
    torch.nn.functional import scaled_dot_product_attention`` included)."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is _TORCH_SDPA and not getattr(_local, "busy", False):
            return scaled_dot_product_attention(*args, **kwargs)
        return func(*args, **kwargs)


_SDPA_OP = "aten::scaled_dot_product_attention"


def _script_as_torch(fn) -> bool:
    """Registers fn as TorchScript's builtin for torch's SDPA op, so scripted code that calls
    it (nn.MultiheadAttention under the override, or the twin called directly) compiles to
    torch's own op instead of trying to compile fn's Python (which TorchScript cannot, and a
    failed compile leaves half-defined classes behind). Returns whether fn was newly added."""
    try:
        from torch.jit._builtins import _get_builtin_table
    except ImportError:  # pragma: no cover - a torch without the table: scripting unsupported
        return False
    table = _get_builtin_table()
    added = id(fn) not in table
    table[id(fn)] = _SDPA_OP
    return added


def _unscript(fn) -> None:
    from torch.jit._builtins import _get_builtin_table

    _get_builtin_table().pop(id(fn), None)


_script_as_torch(scaled_dot_product_attention)  # the twin itself, for good (same semantics)


@contextlib.contextmanager
def sdpa_override(*, catch_imported: bool = True):
    """Within the block, every ``torch.nn.functional.scaled_dot_product_attention`` call runs on
    attnkit: the module attribute is replaced, and (``catch_imported=True``) a
    ``TorchFunctionMode`` catches callers that imported the function by name. Everything is
    restored on exit, exceptions included.

    Any TorchFunctionMode turns off ``nn.MultiheadAttention``'s and ``TransformerEncoder``'s
    fused inference fastpath (torch's own kernel, which attnkit would not run anyway): their
    eval-mode calls then take the Python path (projections + SDPA on attnkit). Pass
    ``catch_imported=False`` to replace only the module attribute and keep the fastpath;
    calls through ``F.scaled_dot_product_attention`` (transformers, torch.nn) are still caught.
    TorchScript compiles the twin as torch's op (scripting works in the block and leaves no
    trace after it); ``torch.jit.trace`` records torch's op."""
    F = torch.nn.functional
    previous = F.scaled_dot_product_attention
    fn = scaled_dot_product_attention  # (the module global: a test may wrap it)
    added = _script_as_torch(fn)
    F.scaled_dot_product_attention = fn
    try:
        if catch_imported:
            with _SDPAMode():
                yield
        else:
            yield
    finally:
        F.scaled_dot_product_attention = previous
        if added:
            _unscript(fn)
