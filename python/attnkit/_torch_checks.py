"""attnkit.torch's argument checks: the errors torch's SDPA raises (for the twin) and the
refusals of ``attention`` that the binding cannot make itself (it checks devices, layouts and
dtypes as it reads each tensor)."""
import numbers

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


def _check_like_torch(query, key, value, attn_mask, dropout_p, is_causal, enable_gqa):
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
    if query.dim() == 4:
        H, Hkv = query.shape[1], key.shape[1]
        if H != Hkv and not enable_gqa:
            raise RuntimeError(f"Expected query and key to have the same number of heads ({H} vs "
                               f"{Hkv}); pass enable_gqa=True for grouped-query attention")
        if Hkv == 0 or H % Hkv != 0 or value.shape[1] != Hkv:
            raise RuntimeError(f"number of heads in key/value must divide the number of heads in "
                               f"query ({H} vs {Hkv})")
