"""attnkit.torch.merge_attention_states: the merge of partial attention states on torch
tensors (the CPU kernel through raw descriptors, torch ops on other devices), differentiable.
Also the torch-ops merge the ring (``_ring``) and the CUDA backend use."""
import torch
from torch import Tensor

from . import _C
from ._torch_binding import desc as _desc
from ._torch_binding import rows as _rows
from ._torch_binding import threads as _threads

_MERGE_FN = "attnkit.torch.merge_attention_states"


def _merge_acc_dtype(outs: Tensor, lses: Tensor):
    """fp32 accumulation, fp64 when either input is float64 (the CPU kernel's rule)."""
    return torch.float64 if torch.float64 in (outs.dtype, lses.dtype) else torch.float32


def _merge_math(outs: Tensor, lses: Tensor):
    """merge_attention_states in torch ops, on any device, with the CPU kernel's semantics
    (csrc/cpu/merge.cpp): empty parts (lse -inf) are never read, an all-empty row gives 0 and
    -inf, a NaN or +inf lse makes the row NaN. Returns (out in outs' dtype, lse in lses')."""
    acc = _merge_acc_dtype(outs, lses)
    inf = float("inf")
    lf = lses.to(acc)
    empty = lf == -inf
    row_bad = (torch.isnan(lf) | (lf == inf)).any(0)
    m = lf.masked_fill(row_bad.unsqueeze(0), -inf).amax(0)
    m = torch.where(m == -inf, torch.zeros_like(m), m)  # -inf guard: all parts empty
    w = torch.exp(lf - m).masked_fill(empty, 0.0)
    s = w.sum(0)
    row_empty = s == 0
    s1 = torch.where(row_empty, torch.ones_like(s), s)
    p = w / s1
    vals = outs.to(acc).masked_fill(empty.unsqueeze(-1), 0.0)  # empty parts: never read
    out = (p.unsqueeze(-1) * vals).sum(0)
    lse = torch.where(row_empty, torch.full_like(s, -inf), m + torch.log(s1))
    out = out.masked_fill(row_bad.unsqueeze(-1), float("nan"))
    lse = lse.masked_fill(row_bad, float("nan"))
    return out.to(outs.dtype), lse.to(lses.dtype)


def _merge_kernel(outs: Tensor, lses: Tensor):
    """The CPU kernel on torch tensors (raw descriptors, zero copy but a non-unit last dim)."""
    outs = _rows(outs)
    out = torch.empty(outs.shape[1:], dtype=outs.dtype)
    lse = torch.empty(lses.shape[1:], dtype=lses.dtype)
    _C.merge_attention_states(_desc(outs), _desc(lses), _desc(out, True), _desc(lse, True),
                              _threads(), fn=_MERGE_FN)
    return out, lse


class _MergeStates(torch.autograd.Function):
    """Differentiable merge: p_n = exp(lse_n - lse) (0 for empty parts) gives
    d out / d outs[n] = p_n and d lse / d lses[n] = p_n, d out / d lses[n] = p_n (outs[n] - out)."""

    @staticmethod
    def forward(ctx, outs, lses):
        out, lse = _merge_kernel(outs, lses) if outs.device.type == "cpu" else _merge_math(outs, lses)
        ctx.save_for_backward(outs, lses, out, lse)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_out, g_lse):
        outs, lses, out, lse = ctx.saved_tensors
        acc = _merge_acc_dtype(outs, lses)
        lf, lm = lses.to(acc), lse.to(acc).unsqueeze(0)
        empty = lf == float("-inf")
        # exp(-inf - (-inf)) is NaN: an empty part (or an all-empty row) gets weight 0.
        p = torch.where(empty, torch.zeros_like(lf), torch.exp(lf - lm))
        g_outs = g_lses = None
        if ctx.needs_input_grad[0]:
            g_outs = (p.unsqueeze(-1) * g_out.to(acc).unsqueeze(0)).to(outs.dtype) \
                if g_out is not None else torch.zeros_like(outs)
        if ctx.needs_input_grad[1]:
            g = torch.zeros_like(lf)
            if g_out is not None:
                diff = (outs.to(acc) - out.to(acc).unsqueeze(0)).masked_fill(empty.unsqueeze(-1), 0.0)
                g = g + (diff * g_out.to(acc).unsqueeze(0)).sum(-1)
            if g_lse is not None:
                g = g + g_lse.to(acc).unsqueeze(0)
            g_lses = (p * g).to(lses.dtype)
        return g_outs, g_lses


def _check_merge_args(outs, lses, fn):
    if not isinstance(outs, Tensor) or not isinstance(lses, Tensor):
        raise TypeError(f"{fn}: outs and lses must be tensors (or sequences of tensors), got "
                        f"{type(outs).__name__} and {type(lses).__name__}")
    if outs.dtype not in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        raise TypeError(f"{fn}: outs has dtype {outs.dtype}; expected float32, float64, float16 or "
                        "bfloat16")
    if lses.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{fn}: lses has dtype {lses.dtype}; expected float32 or float64")
    if outs.dim() < 3:
        raise ValueError(f"{fn}: outs must be (N, ..., Sq, Dv) with at least 3 dims, got shape "
                         f"{tuple(outs.shape)}")
    if tuple(lses.shape) != tuple(outs.shape[:-1]):
        raise ValueError(f"{fn}: lses has shape {tuple(lses.shape)} but outs has "
                         f"{tuple(outs.shape)}; expected lses of shape {tuple(outs.shape[:-1])}")
    if outs.shape[0] < 1:
        raise ValueError(f"{fn}: outs must hold at least one part (N >= 1)")
    if outs.device != lses.device:
        raise ValueError(f"{fn}: outs is on {outs.device} but lses on {lses.device}")


def _stacked(parts, name, fn):
    """A sequence of N tensors stacked into one (N, ...) tensor; a tensor as it is. Errors name
    the function and the argument (torch.stack's do not)."""
    if not isinstance(parts, (list, tuple)):
        return parts
    if not parts:
        raise ValueError(f"{fn}: {name} is an empty sequence; pass at least one part")
    for i, t in enumerate(parts):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name}[{i}] must be a tensor, got {type(t).__name__}")
        if t.shape != parts[0].shape:
            raise ValueError(f"{fn}: {name}[{i}] has shape {tuple(t.shape)} but {name}[0] has "
                             f"{tuple(parts[0].shape)}; the parts must have one shape")
    try:
        return torch.stack(list(parts))
    except RuntimeError as e:  # dtypes or devices that do not stack
        raise ValueError(f"{fn}: the parts of {name} do not stack: {e}") from None


def merge_attention_states(outs, lses):
    """Merge partial attention states through their log-sum-exp, differentiably.

    ``outs`` (N, ..., Sq, Dv) and ``lses`` (N, ..., Sq) (or sequences of N tensors, stacked
    here) are N partial results of attention over the same query rows, each over its own keys,
    with their natural-log lse (float32 or float64). Returns ``(out, lse)``: out (..., Sq, Dv) in
    outs' dtype, lse (..., Sq) in lses' dtype, as :func:`attnkit.merge_attention_states` (same
    semantics: fp32 accumulation, fp64 with float64 inputs; empty parts, lse -inf, are never
    read; an all-empty row gives 0 and -inf; a NaN or +inf lse makes the row NaN).
    CPU tensors run attnkit's kernel (results independent of the thread count); other devices
    (CUDA) run torch ops. Autograd gives gradients for both outs and lses (first order).
    """
    fn = _MERGE_FN
    outs, lses = _stacked(outs, "outs", fn), _stacked(lses, "lses", fn)
    _check_merge_args(outs, lses, fn)
    if torch.is_grad_enabled() and (outs.requires_grad or lses.requires_grad):
        return _MergeStates.apply(outs, lses)
    return _merge_kernel(outs, lses) if outs.device.type == "cpu" else _merge_math(outs, lses)
