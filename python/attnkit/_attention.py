"""NumPy API of the attention kernels: argument checking, layouts, defaults, broadcasting.

Everything here produces canonical (B, H, S, D) *views* for the binding; nothing is copied
except where documented (a head dim that is not contiguous; int32 index arrays widened to
int64; ALiBi slopes converted to float32).
"""
import math
import numbers

import numpy as np

from . import _C, _alloc, _cuda_api
from ._validate import check_array, check_out

_FLOAT = ("float32", "float64", "float16", "bfloat16")


def _dtype_name(a):
    return np.dtype(a.dtype).name


def _check_float(a, fn, name):
    if _dtype_name(a) not in _FLOAT:
        raise TypeError(
            f"{fn}: {name} has dtype {a.dtype}; expected float32, float64, float16 or bfloat16"
        )


def check_qkv_dtypes(q, k, v, fn):
    _check_float(q, fn, "q")
    if k.dtype != v.dtype:
        raise TypeError(f"{fn}: k has dtype {k.dtype} but v has {v.dtype}")
    kd, qd = _dtype_name(k), _dtype_name(q)
    if not (kd == qd or (qd == "float32" and kd in ("float16", "bfloat16"))):
        raise TypeError(
            f"{fn}: q has dtype {q.dtype} but k/v have {k.dtype}; k/v must have q's dtype, or be "
            "float16/bfloat16 when q is float32"
        )


def _rows_contiguous(a):
    """The kernels need unit stride along the head dim; anything else is copied (documented)."""
    if a.shape[-1] > 1 and a.strides[-1] != a.itemsize:
        return np.ascontiguousarray(a)
    return a


def resolve_scale(scale, head_dim, fn):
    if scale is None:
        return 1.0 / math.sqrt(head_dim)
    if isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"{fn}: scale must be a real number or None, got {type(scale).__name__}")
    scale = float(scale)
    if not math.isfinite(scale):
        raise ValueError(f"{fn}: scale must be finite, got {scale}")
    return scale


def resolve_softcap(softcap, fn):
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, numbers.Real):
        raise TypeError(f"{fn}: softcap must be a real number or None, got {type(softcap).__name__}")
    softcap = float(softcap)
    if not math.isfinite(softcap) or softcap < 0:
        raise ValueError(f"{fn}: softcap must be a finite number > 0 (0 or None: off), got {softcap}")
    return softcap


def resolve_window(window, fn):
    if window is None:
        return -1, -1
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise TypeError(f"{fn}: window must be a (left, right) pair of ints, got {window!r}")
    out = []
    for w in window:
        if isinstance(w, bool) or not isinstance(w, (numbers.Integral,)):
            raise TypeError(f"{fn}: window entries must be ints (-1 = unbounded), got {window!r}")
        if w < -1:
            raise ValueError(f"{fn}: window entries must be >= -1 (-1 = unbounded), got {window!r}")
        out.append(int(w))
    return out[0], out[1]


def resolve_align(causal_align, fn):
    if causal_align not in ("top_left", "bottom_right"):
        raise ValueError(
            f"{fn}: causal_align must be 'top_left' or 'bottom_right', got {causal_align!r}"
        )
    return causal_align == "bottom_right"


def resolve_alibi(alibi_slopes, batch, heads, fn):
    if alibi_slopes is None:
        return None
    check_array(alibi_slopes, fn, "alibi_slopes")
    a = np.asarray(alibi_slopes)
    if a.dtype.kind != "f" and _dtype_name(a) != "bfloat16":
        raise TypeError(f"{fn}: alibi_slopes must be a float array, got {a.dtype}")
    if a.shape == (heads,):
        a = a[None, :]
    elif a.shape != (batch, heads):
        raise ValueError(
            f"{fn}: alibi_slopes has shape {a.shape}; expected ({heads},) or ({batch}, {heads})"
        )
    a = np.ascontiguousarray(a, dtype=np.float32)
    if not np.isfinite(a).all():
        raise ValueError(f"{fn}: alibi_slopes must be finite")
    return np.broadcast_to(a, (batch, heads))


def resolve_mask(mask, shape, fn):
    """Broadcast a bool/float mask to (B, H, Sq, Sk) as a view (stride 0 where broadcast)."""
    if mask is None:
        return None
    check_array(mask, fn, "mask")
    if mask.dtype != np.bool_ and _dtype_name(mask) not in _FLOAT:
        raise TypeError(f"{fn}: mask must be bool (True = attend) or float (added), got {mask.dtype}")
    if mask.ndim > 4:
        raise ValueError(f"{fn}: mask has {mask.ndim} dims; it must broadcast to (B, H, Sq, Sk) = {shape}")
    try:
        return np.broadcast_to(mask, shape)
    except ValueError:
        raise ValueError(
            f"{fn}: mask of shape {mask.shape} does not broadcast to (B, H, Sq, Sk) = {shape}"
        ) from None


def _check_bool(x, fn, name):
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{fn}: {name} must be a bool, got {type(x).__name__}")
    return bool(x)


def _int64_index(a, fn, name, ndim):
    check_array(a, fn, name)
    if a.dtype not in (np.int32, np.int64):
        raise TypeError(f"{fn}: {name} must be int32 or int64, got {a.dtype}")
    if a.ndim != ndim:
        raise ValueError(f"{fn}: {name} must be {ndim}-D, got shape {a.shape}")
    return np.ascontiguousarray(a, dtype=np.int64)


def resolve_dropout(dropout_p, dropout_seed, fn):
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, numbers.Real):
        raise TypeError(f"{fn}: dropout_p must be a float, got {type(dropout_p).__name__}")
    dropout_p = float(dropout_p)
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{fn}: dropout_p must be in [0, 1), got {dropout_p}")
    if isinstance(dropout_seed, bool) or not isinstance(dropout_seed, numbers.Integral):
        raise TypeError(f"{fn}: dropout_seed must be an int, got {type(dropout_seed).__name__}")
    return dropout_p, int(dropout_seed) & (2**64 - 1)


class _Call:
    """Canonical (B, H, S, D) views and resolved options of one attention call."""


def check_attention_shapes(fn, layout, q_shape, k_shape, v_shape, qc, kc, vc):
    """Shape checks of attention's q/k/v (shared by the CPU and CUDA front ends). ``q_shape`` etc.
    are the shapes as passed (for messages), ``qc`` etc. their canonical (B, H, S, D) shapes.
    Returns (B, H, Sq, D, Hkv, Sk, Dv)."""
    B, H, Sq, D = qc
    Bk, Hkv, Sk, Dk = kc
    Dv = vc[3]
    names = "(B, S, H, D)" if layout == "bshd" else "(B, H, S, D)"
    if Bk != B or vc[0] != B:
        raise ValueError(f"{fn}: q, k and v must have the same batch size, got {tuple(q_shape)}, "
                         f"{tuple(k_shape)}, {tuple(v_shape)}")
    if Dk != D:
        raise ValueError(f"{fn}: k has head_dim {Dk} but q has {D}")
    if vc[1] != Hkv or vc[2] != Sk:
        raise ValueError(f"{fn}: v has shape {tuple(v_shape)} but k has {tuple(k_shape)}; {names} "
                         "must agree but for D")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"{fn}: q has {H} heads, which is not a multiple of k/v's {Hkv} "
                         "(GQA needs H % Hkv == 0)")
    if D == 0 or Dv == 0:
        raise ValueError(f"{fn}: head dims must be at least 1, got D={D}, Dv={Dv}")
    return B, H, Sq, D, Hkv, Sk, Dv


def _resolve(fn, q, k, v, *, mask, causal, causal_align, scale, window, alibi_slopes, softcap,
             layout, dropout_p, dropout_seed):
    for name, a in (("q", q), ("k", k), ("v", v)):
        check_array(a, fn, name)
        if a.ndim != 4:
            raise ValueError(f"{fn}: {name} must be 4-D ({layout}), got shape {a.shape}")
    if layout not in ("bhsd", "bshd"):
        raise ValueError(f"{fn}: layout must be 'bhsd' or 'bshd', got {layout!r}")
    check_qkv_dtypes(q, k, v, fn)
    c = _Call()
    c.layout = layout
    if layout == "bshd":
        qc, kc, vc = (a.transpose(0, 2, 1, 3) for a in (q, k, v))
    else:
        qc, kc, vc = q, k, v
    B, H, Sq, D, Hkv, Sk, Dv = check_attention_shapes(fn, layout, q.shape, k.shape, v.shape,
                                                      qc.shape, kc.shape, vc.shape)
    c.B, c.H, c.Sq, c.D, c.Hkv, c.Sk, c.Dv = B, H, Sq, D, Hkv, Sk, Dv
    c.q, c.k, c.v = _rows_contiguous(qc), _rows_contiguous(kc), _rows_contiguous(vc)
    c.causal = _check_bool(causal, fn, "causal")
    c.bottom_right = resolve_align(causal_align, fn)
    c.scale = resolve_scale(scale, D, fn)
    c.softcap = resolve_softcap(softcap, fn)
    c.wl, c.wr = resolve_window(window, fn)
    c.alibi = resolve_alibi(alibi_slopes, B, H, fn)
    c.mask = resolve_mask(mask, (B, H, Sq, Sk), fn)
    c.dropout_p, c.seed = resolve_dropout(dropout_p, dropout_seed, fn)
    c.out_shape = (B, Sq, H, Dv) if layout == "bshd" else (B, H, Sq, Dv)
    return c


def _canonical(a, layout):
    return a.transpose(0, 2, 1, 3) if layout == "bshd" else a


def _check_result_array(a, fn, name, shape, dtype):
    check_array(a, fn, name) if name != "out" else check_out(a, fn)
    if a.shape != shape:
        raise ValueError(f"{fn}: {name} has shape {a.shape} but the result has {shape}")
    if a.dtype != dtype:
        raise TypeError(f"{fn}: {name} has dtype {a.dtype} but q has {dtype}")


def attention(q, k, v, *, mask=None, causal=False, causal_align="top_left", scale=None,
              window=None, alibi_slopes=None, softcap=None, layout="bhsd", return_lse=False,
              dropout_p=0.0, dropout_seed=0, out=None):
    """Scaled dot-product attention, fused (FlashAttention-style; no Sq x Sk matrix).

    Parameters
    ----------
    q, k, v : numpy.ndarray
        ``layout="bhsd"``: q (B, H, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) (torch SDPA's
        layout). ``layout="bshd"``: (B, S, H, D) (FlashAttention's). H must be a multiple of Hkv
        (GQA/MQA). dtypes: float32, float64, float16, ``ml_dtypes.bfloat16`` (half types are
        computed in fp32); k/v may be float16/bfloat16 under a float32 q. Any strides are read
        in place, except that a head dim with non-unit stride is copied first.
    mask : numpy.ndarray, optional
        Broadcastable to (B, H, Sq, Sk), whatever the layout. bool: True = attend. float: added
        to the scores (-inf entries count as masked out). Broadcast dims are never expanded.
    causal : bool
        Causal masking; ``causal_align="top_left"`` (torch's ``is_causal``) or
        ``"bottom_right"`` (FlashAttention's, key j allowed when j <= i + Sk - Sq).
    scale : float, optional
        Defaults to 1 / sqrt(D).
    window : (int, int), optional
        Sliding window (left, right); key j is allowed when i + off - left <= j <= i + off + right
        (off as for causal_align); -1 = unbounded.
    alibi_slopes : numpy.ndarray, optional
        (H,) or (B, H): scores get ``- slope * |i + off - j|``.
    softcap : float, optional
        Scores become ``softcap * tanh(s / softcap)`` before masking.
    return_lse : bool
        Also return the natural-log log-sum-exp of each row's scaled scores, (B, H, Sq) float32.
    dropout_p, dropout_seed : float, int
        Dropout on the attention probabilities, drawn by a counter-based (Philox) RNG from
        ``dropout_seed``: the same seed gives the same mask (see :func:`dropout_mask`), which
        :func:`attention_backward` regenerates. Kept entries are scaled by 1 / (1 - p).
    out : numpy.ndarray, optional
        Written in place; shape (B, H, Sq, Dv) (bhsd) or (B, Sq, H, Dv) (bshd), q's dtype.

    Order of score operations: scale, softcap, ALiBi, causal/window/bool mask (-inf), float mask
    (added). A row with no allowed key gives output 0 and lse -inf. NaN/inf in anything a row
    attends (its query, an unmasked K/V row, a float-mask value) make that row and its lse NaN,
    as in torch; NaN in masked-out K/V rows never reaches the output.

    Returns
    -------
    out, or (out, lse) with ``return_lse=True``.
    """
    if _cuda_api.is_device_array(q):
        if dropout_p:
            raise ValueError("attention: dropout is not implemented for device arrays")
        return _cuda_api.attention(q, k, v, mask=mask, causal=causal, causal_align=causal_align,
                                   scale=scale, window=window, alibi_slopes=alibi_slopes,
                                   softcap=softcap, layout=layout, return_lse=return_lse, out=out)
    fn = "attention"
    c = _resolve(fn, q, k, v, mask=mask, causal=causal, causal_align=causal_align, scale=scale,
                 window=window, alibi_slopes=alibi_slopes, softcap=softcap, layout=layout,
                 dropout_p=dropout_p, dropout_seed=dropout_seed)
    return_lse = _check_bool(return_lse, fn, "return_lse")
    if out is None:
        out = _alloc.empty(c.out_shape, q.dtype)
    else:
        _check_result_array(out, fn, "out", c.out_shape, q.dtype)
    outc = _canonical(out, layout)
    if outc.size and outc.shape[-1] > 1 and outc.strides[-1] != outc.itemsize:
        raise ValueError(f"{fn}: out must be contiguous along its last dim")
    lse = np.empty((c.B, c.H, c.Sq), np.float32) if return_lse else None
    _C.attention(c.q, c.k, c.v, outc, lse, c.mask, c.alibi, None, None, None, None, c.B, c.scale,
                 c.softcap, c.causal, c.bottom_right, c.wl, c.wr, c.dropout_p, c.seed, 0)
    return (out, lse) if return_lse else out


def attention_backward(dout, q, k, v, out, lse, *, mask=None, causal=False,
                       causal_align="top_left", scale=None, window=None, alibi_slopes=None,
                       softcap=None, layout="bhsd", dropout_p=0.0, dropout_seed=0):
    """Gradients (dq, dk, dv) of :func:`attention`, FlashAttention-2 style.

    ``out`` and ``lse`` are the forward's results (``return_lse=True``); every option must be the
    forward's. P is recomputed from q, k and lse (no Sq x Sk matrix); accumulation is in fp32
    (float64 inputs: in float64, with the lse recomputed in float64). For GQA, dk/dv sum over the
    query heads of each group. With dropout, the same ``dropout_seed`` regenerates the forward's
    mask. k/v must have q's dtype here. Results are bit-identical for any thread count.
    """
    if _cuda_api.is_device_array(q):
        raise NotImplementedError("attention_backward: the CUDA build has no backward kernel yet; "
                                  "use CPU arrays (or attnkit.torch, which falls back to torch)")
    fn = "attention_backward"
    c = _resolve(fn, q, k, v, mask=mask, causal=causal, causal_align=causal_align, scale=scale,
                 window=window, alibi_slopes=alibi_slopes, softcap=softcap, layout=layout,
                 dropout_p=dropout_p, dropout_seed=dropout_seed)
    if k.dtype != q.dtype:
        raise TypeError(f"{fn}: k/v have dtype {k.dtype} but q has {q.dtype}; the backward needs one dtype")
    for name, a in (("dout", dout), ("out", out)):
        check_array(a, fn, name)
        if a.shape != c.out_shape or a.dtype != q.dtype:
            raise ValueError(f"{fn}: {name} must have shape {c.out_shape} and dtype {q.dtype}, "
                             f"got {a.shape} {a.dtype}")
    check_array(lse, fn, "lse")
    if lse.shape != (c.B, c.H, c.Sq) or lse.dtype != np.float32:
        raise ValueError(f"{fn}: lse must be float32 of shape {(c.B, c.H, c.Sq)}, got {lse.shape} {lse.dtype}")
    dq, dk, dv = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    _C.attention_backward(_rows_contiguous(_canonical(dout, layout)), c.q, c.k, c.v,
                          _rows_contiguous(_canonical(out, layout)), lse,
                          _canonical(dq, layout), _canonical(dk, layout), _canonical(dv, layout),
                          c.mask, c.alibi, None, None, c.B, c.scale, c.softcap, c.causal,
                          c.bottom_right, c.wl, c.wr, c.dropout_p, c.seed, 0)
    return dq, dk, dv


def dropout_mask(shape, dropout_p, dropout_seed):
    """The keep-mask (bool, True = kept) that attention draws for ``(dropout_p, dropout_seed)``
    on a (B, H, Sq, Sk) problem: for tests and debugging of dropout at small sizes."""
    if len(shape) != 4:
        raise ValueError(f"dropout_mask: shape must be (B, H, Sq, Sk), got {shape}")
    p, seed = resolve_dropout(dropout_p, dropout_seed, "dropout_mask")
    out = np.empty(shape, np.bool_)
    _C.dropout_mask(out, p, seed, 0, shape[1])
    return out


def check_varlen(fn, q_shape, k_shape, v_shape, cu_q, cu_k):
    """Checks of attention_varlen's packed shapes against its int64 prefix sums (shared by the
    CPU and CUDA front ends). Returns (batch, total_q, H, D, Dv)."""
    if cu_q.shape != cu_k.shape or cu_q.shape[0] < 1:
        raise ValueError(f"{fn}: cu_seqlens_q and cu_seqlens_k must have the same length >= 1, "
                         f"got {cu_q.shape[0]} and {cu_k.shape[0]}")
    for name, cu, total in (("cu_seqlens_q", cu_q, q_shape[0]), ("cu_seqlens_k", cu_k, k_shape[0])):
        if cu[0] != 0 or (np.diff(cu) < 0).any() or cu[-1] != total:
            raise ValueError(f"{fn}: {name} must be non-decreasing from 0 to the token count "
                             f"{total}, got {cu.tolist() if cu.size < 20 else cu}")
    Tq, H, D = q_shape
    Tk, Hkv, Dk = k_shape
    Dv = v_shape[2]
    if Dk != D:
        raise ValueError(f"{fn}: k has head_dim {Dk} but q has {D}")
    if tuple(v_shape[:2]) != tuple(k_shape[:2]):
        raise ValueError(f"{fn}: v has shape {tuple(v_shape)} but k has {tuple(k_shape)}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"{fn}: q has {H} heads, which is not a multiple of k/v's {Hkv}")
    if D == 0 or Dv == 0:
        raise ValueError(f"{fn}: head dims must be at least 1")
    return cu_q.shape[0] - 1, Tq, H, D, Dv


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False,
                     causal_align="bottom_right", scale=None, window=None, alibi_slopes=None,
                     softcap=None, return_lse=False, out=None):
    """Attention over packed variable-length sequences (FlashAttention's varlen layout).

    q is (total_q, H, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv); sequence b owns query
    tokens ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and keys ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``
    (int32 or int64 prefix sums starting at 0 and ending at the totals). Sequences may be empty.
    Options as in :func:`attention` (no ``mask``); causal alignment defaults to bottom-right.
    Returns out (total_q, H, Dv), and with ``return_lse=True`` also lse (H, total_q) float32.
    """
    if _cuda_api.is_device_array(q):
        return _cuda_api.attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal=causal,
                                          causal_align=causal_align, scale=scale, window=window,
                                          alibi_slopes=alibi_slopes, softcap=softcap,
                                          return_lse=return_lse, out=out)
    fn = "attention_varlen"
    for name, a in (("q", q), ("k", k), ("v", v)):
        check_array(a, fn, name)
        if a.ndim != 3:
            raise ValueError(f"{fn}: {name} must be 3-D (total_tokens, heads, dim), got shape {a.shape}")
    check_qkv_dtypes(q, k, v, fn)
    cu_q = _int64_index(cu_seqlens_q, fn, "cu_seqlens_q", 1)
    cu_k = _int64_index(cu_seqlens_k, fn, "cu_seqlens_k", 1)
    batch, Tq, H, D, Dv = check_varlen(fn, q.shape, k.shape, v.shape, cu_q, cu_k)
    causal = _check_bool(causal, fn, "causal")
    return_lse = _check_bool(return_lse, fn, "return_lse")
    bottom_right = resolve_align(causal_align, fn)
    scale = resolve_scale(scale, D, fn)
    softcap = resolve_softcap(softcap, fn)
    wl, wr = resolve_window(window, fn)
    alibi = resolve_alibi(alibi_slopes, batch, H, fn)
    if out is None:
        out = np.empty((Tq, H, Dv), dtype=q.dtype)
    else:
        check_out(out, fn)
        if out.shape != (Tq, H, Dv) or out.dtype != q.dtype:
            raise ValueError(f"{fn}: out must have shape {(Tq, H, Dv)} and dtype {q.dtype}, "
                             f"got {out.shape} {out.dtype}")
    lse = np.empty((H, Tq), np.float32) if return_lse else None
    as4 = lambda a: _rows_contiguous(a).transpose(1, 0, 2)[None]  # (1, H, T, D) view
    if out.size and out.shape[-1] > 1 and out.strides[-1] != out.itemsize:
        raise ValueError(f"{fn}: out must be contiguous along its last dim")
    _C.attention(as4(q), as4(k), as4(v), out.transpose(1, 0, 2)[None],
                 None if lse is None else lse[None], None, alibi, cu_q, cu_k, None, None, batch,
                 scale, softcap, causal, bottom_right, wl, wr, 0.0, 0, 0)
    return (out, lse) if return_lse else out


def attention_with_kvcache(q, k_cache, v_cache, *, k=None, v=None, cache_seqlens,
                           block_table=None, causal=True, scale=None, window=None,
                           alibi_slopes=None, softcap=None, return_lse=False, out=None):
    """Attention of new query tokens against a KV cache, like FlashAttention's
    ``flash_attn_with_kvcache``; the memory-bound decode kernel serves small ``Sq``.

    Parameters
    ----------
    q : numpy.ndarray
        (B, Sq, H, D), float32 / float16 / bfloat16.
    k_cache, v_cache : numpy.ndarray
        Contiguous caches (B, Smax, Hkv, D) and (B, Smax, Hkv, Dv), or paged caches
        (num_blocks, page_size, Hkv, D) addressed through ``block_table``. Same dtype as q, or
        float16/bfloat16 under a float32 q (converted in registers, never copied).
    k, v : numpy.ndarray, optional
        New keys/values (B, Sq_new, Hkv, D/Dv), written **in place** into the caches at
        positions ``cache_seqlens[b] ...`` before attending. Everything is checked before the
        first write: on any error the caches are left untouched.
    cache_seqlens : int or numpy.ndarray
        (B,) int32/int64: tokens already in each sequence's cache. Sequence b then attends to
        ``cache_seqlens[b] + Sq_new`` keys (it is not modified).
    block_table : numpy.ndarray, optional
        (B, max_blocks_per_seq) int32: page index of each block of ``page_size`` positions.
    causal : bool
        Causal with bottom-right alignment (query i sees keys up to its own position).
    scale, window, alibi_slopes, softcap, return_lse
        As in :func:`attention`.
    out : numpy.ndarray, optional
        (B, Sq, H, Dv), q's dtype, written in place.

    Returns out (B, Sq, H, Dv), and with ``return_lse=True`` also lse (B, H, Sq) float32.
    """
    if _cuda_api.is_device_array(q):
        return _cuda_api.attention_with_kvcache(
            q, k_cache, v_cache, k=k, v=v, cache_seqlens=cache_seqlens, block_table=block_table,
            causal=causal, scale=scale, window=window, alibi_slopes=alibi_slopes, softcap=softcap,
            return_lse=return_lse, out=out)
    fn = "attention_with_kvcache"
    for name, a in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        check_array(a, fn, name)
        if a.ndim != 4:
            raise ValueError(f"{fn}: {name} must be 4-D, got shape {a.shape}")
    if _dtype_name(q) == "float64":
        raise TypeError(f"{fn}: q has dtype float64; the KV-cache path takes float32, float16 or bfloat16")
    check_qkv_dtypes(q, k_cache, v_cache, fn)
    B, Sq, H, D = q.shape
    paged = block_table is not None
    if paged:
        bt = _int64_index(block_table, fn, "block_table", 2)
        if bt.shape[0] != B:
            raise ValueError(f"{fn}: block_table has {bt.shape[0]} rows but q has batch {B}")
        num_blocks, page_size = k_cache.shape[:2]
        if page_size == 0:
            raise ValueError(f"{fn}: k_cache has page_size 0")
        capacity = bt.shape[1] * page_size
    else:
        if k_cache.shape[0] != B:
            raise ValueError(f"{fn}: k_cache has batch {k_cache.shape[0]} but q has {B}")
        capacity = k_cache.shape[1]
    Hkv, Dk = k_cache.shape[2], k_cache.shape[3]
    Dv = v_cache.shape[3]
    if Dk != D:
        raise ValueError(f"{fn}: k_cache has head_dim {Dk} but q has {D}")
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ValueError(f"{fn}: v_cache has shape {v_cache.shape} but k_cache has {k_cache.shape}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"{fn}: q has {H} heads, which is not a multiple of the caches' {Hkv}")
    if isinstance(cache_seqlens, (numbers.Integral,)) and not isinstance(cache_seqlens, bool):
        seqlens = np.full(B, int(cache_seqlens), np.int64)
    else:
        seqlens = _int64_index(cache_seqlens, fn, "cache_seqlens", 1)
        if seqlens.shape != (B,):
            raise ValueError(f"{fn}: cache_seqlens has shape {seqlens.shape}; expected ({B},)")
    if (seqlens < 0).any():
        raise ValueError(f"{fn}: cache_seqlens must be >= 0, got {seqlens.tolist()}")
    if (k is None) != (v is None):
        raise ValueError(f"{fn}: pass both k and v to append, or neither")
    s_new = 0
    if k is not None:
        for name, a, cache in (("k", k, k_cache), ("v", v, v_cache)):
            check_array(a, fn, name)
            if a.dtype != cache.dtype:
                raise TypeError(f"{fn}: {name} has dtype {a.dtype} but its cache has {cache.dtype}")
        s_new = k.shape[1] if k.ndim == 4 else -1
        if k.shape != (B, s_new, Hkv, D) or v.shape != (B, s_new, Hkv, Dv):
            raise ValueError(f"{fn}: k and v must be (B, Sq_new, Hkv, D/Dv) = ({B}, n, {Hkv}, {D}/{Dv}), "
                             f"got {k.shape} and {v.shape}")
    total = seqlens + s_new
    if (total > capacity).any():
        b = int(np.argmax(total > capacity))
        raise ValueError(f"{fn}: sequence {b} would hold {int(total[b])} tokens but the cache holds "
                         f"{capacity}")
    if paged:
        used = -(-total // page_size)  # pages each sequence touches
        for b in range(B):
            pages = bt[b, : used[b]]
            if ((pages < 0) | (pages >= num_blocks)).any():
                j = int(np.argmax((pages < 0) | (pages >= num_blocks)))
                raise ValueError(f"{fn}: block_table[{b}, {j}] = {int(pages[j])} is not a page "
                                 f"index in [0, {num_blocks})")
    causal = _check_bool(causal, fn, "causal")
    return_lse = _check_bool(return_lse, fn, "return_lse")
    scale = resolve_scale(scale, D, fn)
    softcap = resolve_softcap(softcap, fn)
    wl, wr = resolve_window(window, fn)
    alibi = resolve_alibi(alibi_slopes, B, H, fn)
    if out is None:
        out = np.empty((B, Sq, H, Dv), dtype=q.dtype)
    else:
        check_out(out, fn)
        if out.shape != (B, Sq, H, Dv) or out.dtype != q.dtype:
            raise ValueError(f"{fn}: out must have shape {(B, Sq, H, Dv)} and dtype {q.dtype}, "
                             f"got {out.shape} {out.dtype}")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if k is not None and not cache.flags.writeable:
            raise ValueError(f"{fn}: {name} is read-only but k/v were given to append")
    # All checks passed: append (numpy assignment with in-range indices cannot fail midway).
    if k is not None and s_new > 0:
        pos = seqlens[:, None] + np.arange(s_new)[None, :]  # (B, s_new)
        if paged:
            page = bt[np.arange(B)[:, None], pos // page_size]
            k_cache[page, pos % page_size] = k
            v_cache[page, pos % page_size] = v
        else:
            rows = np.arange(B)[:, None]
            k_cache[rows, pos] = k
            v_cache[rows, pos] = v
    lse = np.empty((B, H, Sq), np.float32) if return_lse else None
    qc = _rows_contiguous(q).transpose(0, 2, 1, 3)
    kc = k_cache.transpose(0, 2, 1, 3)
    vc = v_cache.transpose(0, 2, 1, 3)
    if kc.shape[-1] > 1 and kc.strides[-1] != kc.itemsize or vc.shape[-1] > 1 and vc.strides[-1] != vc.itemsize:
        raise ValueError(f"{fn}: the caches must be contiguous along their last dim")
    outc = out.transpose(0, 2, 1, 3)
    _C.attention(qc, kc, vc, outc, lse, None, alibi, None, None, total, bt if paged else None, B,
                 scale, softcap, causal, True, wl, wr, 0.0, 0, 0)
    return (out, lse) if return_lse else out
