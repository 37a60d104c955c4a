"""attnkit.torch's argument checks: the errors torch's SDPA raises (for the twin) and the
refusals of ``attention`` that the binding cannot make itself (it checks devices, layouts and
dtypes as it reads each tensor)."""
import math
import numbers

import numpy as np
import torch
from torch import Tensor

_FN = "attnkit.torch.attention"


def _refuse_layouts(tensors):
    """Raises TypeError naming the first nested or non-strided tensor of (name, tensor) pairs:
    attention() looks for one only when a torch op has failed (a nested tensor has no sizes,
    a sparse one no strides), so dense calls do not pay for the two attribute reads."""
    for name, t in tensors:
        if isinstance(t, Tensor) and (t.is_nested or t.layout is not torch.strided):
            raise TypeError(f"{_FN}: {name} is a {'nested' if t.is_nested else t.layout} tensor; "
                            "attnkit takes dense (strided) tensors") from None


def _check_attention_args(query, key, value, attn_mask, window):
    """attention()'s refusals that the binding cannot make itself (it checks devices, layouts,
    dtypes and shapes when it reads each tensor): argument types, ranks, batch broadcasting,
    the window. Returns the batch size and the three inputs' batches. (On every decode step:
    each torch attribute read is 60-150 ns, so each is read once, and the common case runs
    no loop.)"""
    try:
        sq, sk, sv = query.shape, key.shape, value.shape
    except AttributeError:
        sq = sk = sv = None
    except RuntimeError:  # a nested tensor has no sizes
        _refuse_layouts((("query", query), ("key", key), ("value", value)))
        raise
    if sq is None or len(sq) != 4 or len(sk) != 4 or len(sv) != 4 or not (
            isinstance(query, Tensor) and isinstance(key, Tensor) and isinstance(value, Tensor)):
        for name, t in (("query", query), ("key", key), ("value", value)):
            if not isinstance(t, Tensor):
                raise TypeError(f"{_FN}: {name} must be a torch.Tensor, got {type(t).__name__}")
            if t.dim() != 4:
                raise ValueError(f"{_FN}: {name} must be 4-D (B, H, S, D), got shape {tuple(t.shape)}")
    if sq[3] == 0:  # (the default scale divides by its root)
        raise ValueError(f"{_FN}: query has head dim 0")
    if attn_mask is not None and not isinstance(attn_mask, Tensor):
        raise TypeError(f"{_FN}: attn_mask must be a torch.Tensor or None, got {type(attn_mask).__name__}")
    if window is not None and (not isinstance(window, (tuple, list)) or len(window) != 2
                               or not all(isinstance(w, numbers.Integral) for w in window)):
        raise ValueError(f"{_FN}: window must be a pair of ints (left, right), got {window!r}")
    if window is not None and min(window) < -1:
        raise ValueError(f"{_FN}: window entries must be >= -1 (-1 = unbounded), got {window!r}")
    batches = (sq[0], sk[0], sv[0])
    B = max(batches)
    if (batches[0] != B and batches[0] != 1) or (batches[1] != B and batches[1] != 1) or (
            batches[2] != B and batches[2] != 1):
        raise ValueError(f"{_FN}: batch sizes {batches[0]} (query), {batches[1]} (key), "
                         f"{batches[2]} (value) do not broadcast")
    return B, batches


def _check_like_torch(query, key, value, attn_mask, dropout_p):
    """The errors torch's SDPA raises for invalid combinations."""
    if not (query.dtype == key.dtype == value.dtype):
        raise RuntimeError("Expected query, key, and value to have the same dtype, but got "
                           f"query.dtype: {query.dtype} key.dtype: {key.dtype} and value.dtype: "
                           f"{value.dtype} instead.")
    if attn_mask is not None and attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
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
    # (head counts that are not equal or grouped-query went to torch: _torch_decides)


def _real_scalar(x) -> bool:
    """What torch's SDPA binding takes for a float argument: a Python or NumPy real or bool
    (``dropout_p=self.training and p`` gives False), or a one-element tensor."""
    return isinstance(x, (numbers.Real, np.bool_)) or (isinstance(x, Tensor) and x.numel() == 1)


def _check_scalar_types(dropout_p, scale, softcap):
    """attention()'s scalar options are numbers (a string reached float() and raised its own
    message). attention() calls this only when one of them is not a float or None: isinstance
    against the numbers ABC and Tensor costs ~0.5 us a value, on every decode step."""
    for name, x in (("dropout_p", dropout_p), ("scale", scale), ("softcap", softcap)):
        if x is not None and not _real_scalar(x):
            raise TypeError(f"{_FN}: {name} must be a float, got {type(x).__name__}")


def _check_grad_dtypes(query, key):
    """Key/value match query's dtype when a backward will run (the backward takes one dtype:
    refused here, not at .backward()). Called only with grad mode on."""
    if (query.requires_grad or key.requires_grad) and key.dtype != query.dtype:
        raise TypeError(f"{_FN}: key/value have dtype {key.dtype} but query has {query.dtype}; "
                        "mixed-precision key/value are forward-only (no gradient)")


def _torch_decides(query, key, value, scale, enable_gqa):
    """Why a twin call goes to torch's SDPA although attnkit could read it: head counts that
    are neither equal nor grouped-query (torch's math kernel broadcasts them), 3-D inputs whose
    leading dims differ (with enable_gqa torch reads them as heads), a non-finite scale
    (torch computes NaN where attnkit refuses). None when attnkit takes the call."""
    if scale is not None and not math.isfinite(float(scale)):
        return "a non-finite scale runs torch's SDPA"
    if query.dim() == 3:  # attnkit reads (N, L, E) as (N, 1, L, E): N broadcasts as a batch
        n = (query.shape[0], key.shape[0], value.shape[0])
        if len(set(n)) > 1 and (enable_gqa or any(x not in (1, max(n)) for x in n)):
            return "3-D inputs whose leading dims are heads to torch (enable_gqa) or do not " \
                   "broadcast run torch's SDPA"
        return None
    H, Hkv, Hv = query.shape[1], key.shape[1], value.shape[1]
    if Hv != Hkv or (H != Hkv and not (enable_gqa and Hkv > 0 and H % Hkv == 0)):
        return "head counts that are neither equal nor grouped-query run torch's SDPA"
    return None


def _check_twin_types(dropout_p, is_causal, scale, enable_gqa):
    """The argument types torch's SDPA binding enforces, with its TypeError messages."""
    def refuse(name, want, x):
        raise TypeError(f"scaled_dot_product_attention(): argument '{name}' must be {want}, "
                        f"not {type(x).__name__}")

    for name, x in (("is_causal", is_causal), ("enable_gqa", enable_gqa)):
        if not isinstance(x, bool):
            refuse(name, "bool", x)
    for name, x in (("dropout_p", dropout_p), ("scale", scale)):
        if x is not None and not _real_scalar(x):
            refuse(name, "float", x)

