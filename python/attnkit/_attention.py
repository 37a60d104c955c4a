"""The attention functions of the public API (device-neutral; see _front.py).

Each function checks everything on its arguments -- the same checks and messages for NumPy
and device arrays -- then hands canonical (B, H, S, D) views to its backend. Nothing is copied
except where documented (a head dim that is not contiguous; int32 index arrays widened to
int64; ALiBi slopes converted to float32).
"""
import operator

import numpy as np

from . import _cpu_backend
from ._arrays import CODE_DTYPES, is_device_array
from ._front import (Call, Options, check_attention_shapes, check_bool, check_float,
                     check_out_rows, check_qkv_dtypes, check_varlen, resolve_alibi, resolve_mask)


def _canonical(d, layout):
    return d.swap_seq_heads() if layout == "bshd" else d


class _Qkv:
    """Canonical views and resolved options of an attention / attention_backward call."""


def _resolve_qkv(call, q, k, v, *, layout, mask, causal, causal_align, scale, window,
                 alibi_slopes, softcap, dropout_p, dropout_seed):
    fn = call.fn
    qd = call.first
    kd, vd = call.arg(k, "k"), call.arg(v, "v")
    for name, d in (("q", qd), ("k", kd), ("v", vd)):
        if d.ndim != 4:
            raise ValueError(f"{fn}: {name} must be 4-D ({layout}), got shape {d.shape}")
    if layout not in ("bhsd", "bshd"):
        raise ValueError(f"{fn}: layout must be 'bhsd' or 'bshd', got {layout!r}")
    check_qkv_dtypes(qd, kd, vd, fn)
    c = _Qkv()
    c.q_arr, c.k_arr, c.v_arr = qd, kd, vd
    views = [_canonical(d, layout) for d in (qd, kd, vd)]
    B, H, Sq, D, Hkv, Sk, Dv = check_attention_shapes(fn, layout, qd, kd, vd, *views)
    c.B, c.H, c.Sq, c.D, c.Hkv, c.Sk, c.Dv = B, H, Sq, D, Hkv, Sk, Dv
    for i, (d, n) in enumerate(((qd, "q"), (kd, "k"), (vd, "v"))):
        if not d.last_dim_contiguous():
            views[i] = _canonical(call.contiguous(d, n), layout)
    c.q, c.k, c.v = views
    c.opts = Options(fn, B, D, causal=causal, causal_align=causal_align, scale=scale, window=window,
                     softcap=softcap, dropout_p=dropout_p, dropout_seed=dropout_seed)
    c.alibi = resolve_alibi(call, alibi_slopes, B, H)
    c.mask = resolve_mask(call, mask, (B, H, Sq, Sk))
    c.out_shape = (B, Sq, H, Dv) if layout == "bshd" else (B, H, Sq, Dv)
    return c


def attention(q, k, v, *, mask=None, causal=False, causal_align="top_left", scale=None,
              window=None, alibi_slopes=None, softcap=None, layout="bhsd", return_lse=False,
              dropout_p=0.0, dropout_seed=0, out=None):
    """Scaled dot-product attention, fused (FlashAttention-style; no Sq x Sk matrix).

    Parameters
    ----------
    q, k, v : numpy.ndarray or CUDA device arrays
        ``layout="bhsd"``: q (B, H, Sq, D), k (B, Hkv, Sk, D), v (B, Hkv, Sk, Dv) (torch SDPA's
        layout). ``layout="bshd"``: (B, S, H, D) (FlashAttention's). H must be a multiple of Hkv
        (GQA/MQA). dtypes: float32, float64, float16, ``ml_dtypes.bfloat16`` (half types are
        computed in fp32); k/v may be float16/bfloat16 under a float32 q. Any strides are read
        in place, except that a head dim with non-unit stride is copied first. Device arrays
        (the CUDA build) run on the GPU and return arrays of the same kind.
    mask : array, optional
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
    alibi_slopes : array, optional
        (H,) or (B, H): scores get ``- slope * |i + off - j|``.
    softcap : float, optional
        Scores become ``softcap * tanh(s / softcap)`` before masking.
    return_lse : bool
        Also return the natural-log log-sum-exp of each row's scaled scores, (B, H, Sq) float32.
    dropout_p, dropout_seed : float, int
        Dropout on the attention probabilities, drawn by a counter-based (Philox) RNG from
        ``dropout_seed``: the same seed gives the same mask (see :func:`dropout_mask`), which
        :func:`attention_backward` regenerates. Kept entries are scaled by 1 / (1 - p). CPU only.
    out : array, optional
        Written in place; shape (B, H, Sq, Dv) (bhsd) or (B, Sq, H, Dv) (bshd), q's dtype,
        contiguous along its last dim.

    Order of score operations: scale, softcap, ALiBi, causal/window/bool mask (-inf), float mask
    (added). A row with no allowed key gives output 0 and lse -inf. NaN/inf in anything a row
    attends (its query, an unmasked K/V row, a float-mask value) make that row and its lse NaN,
    as in torch; NaN in masked-out K/V rows never reaches the output.

    Returns
    -------
    out, or (out, lse) with ``return_lse=True``.
    """
    fn = "attention"
    call = Call(fn, q, "q")
    c = _resolve_qkv(call, q, k, v, layout=layout, mask=mask, causal=causal,
                     causal_align=causal_align, scale=scale, window=window,
                     alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p,
                     dropout_seed=dropout_seed)
    return_lse = check_bool(return_lse, fn, "return_lse")
    out, od = call.result(out, c.out_shape, c.q_arr.dtype, c.q_arr)
    outc = _canonical(od, layout)
    check_out_rows(outc, fn)
    lse, lsed = call.empty((c.B, c.H, c.Sq), "float32") if return_lse else (None, None)
    call.backend.attention(call, c.q, c.k, c.v, outc, lsed, c.mask, c.alibi, None, None, None,
                           None, None, None, c.opts)
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
    An lse of -inf (a row with no allowed key) gives a zero gradient row; NaN in lse (a
    forward that saw NaN) gives NaN in that row's gradients, as in any NaN-carrying backward;
    +inf (which no forward produces) gives P = 0, a zero row, as the limit of exp(s - lse).
    CUDA device arrays (float16/bfloat16, head dims up to 128, no dropout) run only with
    ``ATTNKIT_CUDA_BACKWARD=1``: that kernel has not yet run on a GPU (``info()["cuda_unverified"]``).
    """
    fn = "attention_backward"
    call = Call(fn, q, "q")
    c = _resolve_qkv(call, q, k, v, layout=layout, mask=mask, causal=causal,
                     causal_align=causal_align, scale=scale, window=window,
                     alibi_slopes=alibi_slopes, softcap=softcap, dropout_p=dropout_p,
                     dropout_seed=dropout_seed)
    qd = c.q_arr
    if c.k_arr.dtype != qd.dtype:
        raise TypeError(f"{fn}: k/v have dtype {c.k_arr.dtype} but q has {qd.dtype}; the backward "
                        "needs one dtype")
    grads_in = {}
    for name, a in (("dout", dout), ("out", out)):
        d = call.arg(a, name)
        if d.shape != c.out_shape or d.dtype != qd.dtype:
            raise ValueError(f"{fn}: {name} must have shape {c.out_shape} and dtype {qd.dtype}, "
                             f"got {d.shape} {d.dtype}")
        grads_in[name] = _canonical(call.contiguous(d, name), layout)
    lsed = call.arg(lse, "lse")
    if lsed.shape != (c.B, c.H, c.Sq) or lsed.dtype != "float32":
        raise ValueError(f"{fn}: lse must be float32 of shape {(c.B, c.H, c.Sq)}, got {lsed.shape} "
                         f"{lsed.dtype}")
    dq, dqd = call.empty(qd.shape, qd.dtype, qd)
    dk, dkd = call.empty(c.k_arr.shape, qd.dtype, qd)
    dv, dvd = call.empty(c.v_arr.shape, qd.dtype, qd)
    call.backend.attention_backward(call, grads_in["dout"], c.q, c.k, c.v, grads_in["out"], lsed,
                                    _canonical(dqd, layout), _canonical(dkd, layout),
                                    _canonical(dvd, layout), c.mask, c.alibi, c.opts)
    return dq, dk, dv


def dropout_mask(shape, dropout_p, dropout_seed):
    """The keep-mask (bool, True = kept) that attention draws for ``(dropout_p, dropout_seed)``
    on a (B, H, Sq, Sk) problem: for tests and debugging of dropout at small sizes."""
    from ._front import resolve_dropout

    try:
        shape = tuple(operator.index(s) for s in shape)
    except TypeError:
        raise TypeError(f"dropout_mask: shape must be a (B, H, Sq, Sk) tuple of ints, got "
                        f"{shape!r}") from None
    if len(shape) != 4 or min(shape) < 0:
        raise ValueError(f"dropout_mask: shape must be (B, H, Sq, Sk) with sizes >= 0, got {shape}")
    p, seed = resolve_dropout(dropout_p, dropout_seed, "dropout_mask")
    out = np.empty(shape, np.bool_)
    _cpu_backend.dropout_mask(out, p, seed, shape[1])
    return out


def attention_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, *, causal=False,
                     causal_align="bottom_right", scale=None, window=None, alibi_slopes=None,
                     softcap=None, return_lse=False, out=None):
    """Attention over packed variable-length sequences (FlashAttention's varlen layout).

    q is (total_q, H, D), k (total_k, Hkv, D), v (total_k, Hkv, Dv); sequence b owns query
    tokens ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` and keys ``cu_seqlens_k[b]:cu_seqlens_k[b+1]``
    (int32 or int64 prefix sums starting at 0 and ending at the totals; with device q they may
    be device arrays, copied to the host: one synchronization). Sequences may be empty.
    Options as in :func:`attention` (no ``mask``); causal alignment defaults to bottom-right.
    Returns out (total_q, H, Dv), and with ``return_lse=True`` also lse (H, total_q) float32.
    """
    fn = "attention_varlen"
    call = Call(fn, q, "q")
    qd = call.first
    kd, vd = call.arg(k, "k"), call.arg(v, "v")
    for name, d in (("q", qd), ("k", kd), ("v", vd)):
        if d.ndim != 3:
            raise ValueError(f"{fn}: {name} must be 3-D (total_tokens, heads, dim), got shape {d.shape}")
    check_qkv_dtypes(qd, kd, vd, fn)
    cu_q = call.index(cu_seqlens_q, "cu_seqlens_q", 1, to_host=True)
    cu_k = call.index(cu_seqlens_k, "cu_seqlens_k", 1, to_host=True)
    batch, Tq, H, D, Dv = check_varlen(fn, qd, kd, vd, cu_q, cu_k)
    opts = Options(fn, batch, D, causal=causal, causal_align=causal_align, scale=scale,
                   window=window, softcap=softcap)
    return_lse = check_bool(return_lse, fn, "return_lse")
    alibi = resolve_alibi(call, alibi_slopes, batch, H)
    out, od = call.result(out, (Tq, H, Dv), qd.dtype, qd)
    check_out_rows(od, fn)
    lse, lsed = call.empty((H, Tq), "float32") if return_lse else (None, None)
    as4 = lambda d: d.transpose(1, 0, 2).expand_dims(0)  # (1, H, T, D) view
    call.backend.attention(call, as4(call.contiguous(qd, "q")), as4(call.contiguous(kd, "k")),
                           as4(call.contiguous(vd, "v")), as4(od),
                           None if lsed is None else lsed.expand_dims(0), None, alibi, cu_q, cu_k,
                           None, None, None, None, opts)
    return (out, lse) if return_lse else out


def attention_with_kvcache(q, k_cache, v_cache, *, k=None, v=None, cache_seqlens,
                           block_table=None, causal=True, scale=None, window=None,
                           alibi_slopes=None, softcap=None, return_lse=False, out=None,
                           k_scale=None, v_scale=None):
    """Attention of new query tokens against a KV cache, like FlashAttention's
    ``flash_attn_with_kvcache``; the memory-bound decode kernel serves small ``Sq``.

    Parameters
    ----------
    q : numpy.ndarray or CUDA device array
        (B, Sq, H, D), float32 / float64 / float16 / bfloat16.
    k_cache, v_cache : arrays
        Contiguous caches (B, Smax, Hkv, D) and (B, Smax, Hkv, Dv), or paged caches
        (num_blocks, page_size, Hkv, D) addressed through ``block_table``. Same dtype as q, or
        float16/bfloat16 under a float32 q (converted in registers, never copied). Their last
        dim must be contiguous (a cache is never copied). 8-bit caches: int8 or
        ``ml_dtypes.float8_e4m3fn`` (``torch.float8_e4m3fn`` on a GPU) codes under a float32,
        float16 or bfloat16 q, each row with its scale in ``k_scale`` / ``v_scale`` (see
        :func:`quantize_kv`); the kernels read the 8-bit bytes and convert in registers. The CPU
        decode kernel quantizes q per row to int8 over an int8 cache, and over an e4m3 cache on
        the ``avx512_bf16`` variant rounds q to bf16, and P too except with one query row per
        kv head over 4 or more kv heads (docs/ARCHITECTURE.md, "int8 KV caches", "e4m3 KV
        caches on vdpbf16ps", "Decode walks").
    k, v : arrays, optional
        New keys/values (B, Sq_new, Hkv, D/Dv), written **in place** into the caches at
        positions ``cache_seqlens[b] ...`` before attending. Every argument is checked before
        the first write: a call that raises (a bad argument, or a ``MemoryError`` in the
        kernel) leaves the caches untouched. For 8-bit caches they are float32, float16 or
        bfloat16 and are quantized on append (codes and scales written, as quantize_kv would).
    cache_seqlens : int or array
        (B,) int32/int64: tokens already in each sequence's cache. Sequence b then attends to
        ``cache_seqlens[b] + Sq_new`` keys (it is not modified). Split-KV sizes its chunks from
        the longest of these lengths, not from the cache's capacity. A device array (CUDA) is
        checked on the device instead: an invalid entry makes that sequence's output NaN.
    block_table : array, optional
        (B, max_blocks_per_seq) int32 or int64: page index of each block of ``page_size``
        positions.
    causal : bool
        Causal with bottom-right alignment (query i sees keys up to its own position).
    scale, window, alibi_slopes, softcap, return_lse
        As in :func:`attention`.
    out : array, optional
        (B, Sq, H, Dv), q's dtype, contiguous along its last dim, written in place.
    k_scale, v_scale : float32 arrays, required with 8-bit caches (refused with float ones)
        One scale per cache row: (B, Smax, Hkv), paged (num_blocks, page_size, Hkv); row
        element d stands for ``code[d] * scale``. Written in place for appended rows.

    Returns out (B, Sq, H, Dv), and with ``return_lse=True`` also lse (B, H, Sq) float32.
    """
    fn = "attention_with_kvcache"
    call = Call(fn, q, "q")
    qd = call.first
    kcd, vcd = call.arg(k_cache, "k_cache"), call.arg(v_cache, "v_cache")
    for name, d in (("q", qd), ("k_cache", kcd), ("v_cache", vcd)):
        if d.ndim != 4:
            raise ValueError(f"{fn}: {name} must be 4-D, got shape {d.shape}")
    check_float(qd, fn, "q")
    codes = kcd.dtype in CODE_DTYPES
    if codes:
        if vcd.dtype != kcd.dtype:
            raise TypeError(f"{fn}: k_cache has dtype {kcd.dtype} but v_cache has {vcd.dtype}")
        if qd.dtype == "float64":
            raise TypeError(f"{fn}: q has dtype float64 but the caches are {kcd.dtype}; 8-bit "
                            "caches need a float32, float16 or bfloat16 q")
    else:
        check_qkv_dtypes(qd, kcd, vcd, fn)
    B, Sq, H, D = qd.shape
    paged = block_table is not None
    P, S_or_page, Hkv, Dk = kcd.shape
    Dv = vcd.shape[3]
    if vcd.shape[:3] != kcd.shape[:3]:
        raise ValueError(f"{fn}: v_cache has shape {vcd.shape} but k_cache has {kcd.shape}")
    if not paged and P != B:
        raise ValueError(f"{fn}: k_cache has batch size {P} but q has {B}")
    if Dk != D:
        raise ValueError(f"{fn}: k_cache has head_dim {Dk} but q has {D}")
    if Hkv == 0 or H % Hkv != 0:
        raise ValueError(f"{fn}: q has {H} heads, which is not a multiple of the caches' {Hkv}")
    if D == 0 or Dv == 0:
        raise ValueError(f"{fn}: head dims must be at least 1")
    if paged and S_or_page == 0:
        raise ValueError(f"{fn}: k_cache has page_size 0")
    for name, d in (("k_cache", kcd), ("v_cache", vcd)):
        if not d.last_dim_contiguous():
            raise ValueError(f"{fn}: {name} must be contiguous along its last dim (a cache is "
                             "never copied)")
    if (k is None) != (v is None):
        raise ValueError(f"{fn}: pass both k and v to append, or neither")
    ksd = vsd = None
    if codes:
        if k_scale is None or v_scale is None:
            raise ValueError(f"{fn}: k_cache is {kcd.dtype}: k_scale and v_scale (float32, shape "
                             f"{kcd.shape[:3]}, one scale per cache row) are required")
        ksd, vsd = call.arg(k_scale, "k_scale"), call.arg(v_scale, "v_scale")
        for name, d in (("k_scale", ksd), ("v_scale", vsd)):
            if d.dtype != "float32":
                raise TypeError(f"{fn}: {name} has dtype {d.dtype}; expected float32")
            if d.shape != kcd.shape[:3]:
                raise ValueError(f"{fn}: {name} has shape {d.shape}; expected {kcd.shape[:3]} "
                                 "(one scale per cache row)")
            if k is not None and not d.writeable:
                raise ValueError(f"{fn}: {name} is read-only but k/v were given to append")
    elif k_scale is not None or v_scale is not None:
        raise ValueError(f"{fn}: k_scale/v_scale go with int8 or float8_e4m3fn caches, but the "
                         f"caches are {kcd.dtype}")
    kn = vn = None
    n_new = 0
    if k is not None:
        kn, vn = call.arg(k, "k"), call.arg(v, "v")
        for name, d in (("k", kn), ("v", vn)):
            if codes and d.dtype not in ("float32", "float16", "bfloat16"):
                raise TypeError(f"{fn}: {name} has dtype {d.dtype}; rows appended to a "
                                f"{kcd.dtype} cache must be float32, float16 or bfloat16 "
                                "(they are quantized on append)")
            if not codes and d.dtype != kcd.dtype:
                raise TypeError(f"{fn}: {name} has dtype {d.dtype} but the caches have {kcd.dtype}")
        if vn.dtype != kn.dtype:
            raise TypeError(f"{fn}: k has dtype {kn.dtype} but v has {vn.dtype}")
        n_new = kn.shape[1] if kn.ndim == 4 else -1
        if kn.shape != (B, n_new, Hkv, D) or vn.shape != (B, n_new, Hkv, Dv):
            raise ValueError(f"{fn}: k and v must be (B, Sq_new, Hkv, D/Dv) = ({B}, n, {Hkv}, "
                             f"{D}/{Dv}), got {kn.shape} and {vn.shape}")
        for name, d in (("k_cache", kcd), ("v_cache", vcd)):
            if not d.writeable:
                raise ValueError(f"{fn}: {name} is read-only but k/v were given to append")
        kn, vn = call.contiguous(kn, "k"), call.contiguous(vn, "v")
    if isinstance(cache_seqlens, (int, np.integer)) and not isinstance(cache_seqlens, (bool, np.bool_)):
        if not -2**63 <= int(cache_seqlens) < 2**63:
            raise ValueError(f"{fn}: cache_seqlens = {int(cache_seqlens)} is not an int64 length")
        cache_seqlens = np.full(B, int(cache_seqlens), np.int64)
    elif not isinstance(cache_seqlens, np.ndarray) and not is_device_array(cache_seqlens):
        raise TypeError(f"{fn}: cache_seqlens must be an int or a ({B},) int32/int64 array, got "
                        f"{type(cache_seqlens).__name__}")
    seqlens = call.index(cache_seqlens, "cache_seqlens", 1, to_host=False)
    if seqlens.shape != (B,):
        raise ValueError(f"{fn}: cache_seqlens has shape {seqlens.shape}; expected ({B},)")
    table = None
    if paged:
        table = call.index(block_table, "block_table", 2, to_host=False)
        if table.shape[0] != B:
            raise ValueError(f"{fn}: block_table has {table.shape[0]} rows but q has batch {B}")
    capacity = table.shape[1] * S_or_page if paged else S_or_page
    if isinstance(seqlens, np.ndarray) and B:  # host lengths: checked here (device: on the device)
        # The common, passing case: two reductions (a short batch through a Python list: the
        # NumPy reductions cost ~2 us per decode call).
        vals = seqlens.tolist() if B <= 64 else None
        lo, hi = (min(vals), max(vals)) if vals else (int(seqlens.min()), int(seqlens.max()))
        if lo < 0:
            b = int(np.argmax(seqlens < 0))
            raise ValueError(f"{fn}: cache_seqlens[{b}] = {int(seqlens[b])} is negative")
        if hi + n_new > capacity:
            b = int(np.argmax(seqlens > capacity - n_new))  # (seqlens + n_new could wrap)
            raise ValueError(f"{fn}: cache_seqlens[{b}] = {int(seqlens[b])} plus {n_new} new tokens "
                             f"does not fit the cache capacity {capacity}")
        if isinstance(table, np.ndarray):
            used = -(-(seqlens + n_new) // S_or_page)  # pages each sequence reads or writes
            for b in range(B):
                row = table[b, :used[b]]
                bad = np.nonzero((row < 0) | (row >= P))[0]
                if bad.size:
                    j = int(bad[0])
                    raise ValueError(f"{fn}: block_table[{b}, {j}] = {int(row[j])} is not a page "
                                     f"index in [0, {P})")
    opts = Options(fn, B, D, causal=causal, causal_align="bottom_right", scale=scale,
                   window=window, softcap=softcap)
    return_lse = check_bool(return_lse, fn, "return_lse")
    alibi = resolve_alibi(call, alibi_slopes, B, H)
    out, od = call.result(out, (B, Sq, H, Dv), qd.dtype, qd)
    check_out_rows(od, fn)
    lse, lsed = call.empty((B, H, Sq), "float32") if return_lse else (None, None)
    t = lambda d: None if d is None else d.swap_seq_heads()
    # Aliasing (out with any input, new k/v with the caches, k_cache with v_cache) is checked
    # by the binding (attention_params, shared by both devices), still before any write; the
    # kernel then appends k/v (after its own allocations) and attends.
    ts = lambda d: None if d is None else d.transpose(0, 2, 1)  # scales (B, Hkv, S)
    call.backend.attention(call, t(call.contiguous(qd, "q")), t(kcd), t(vcd), t(od), lsed, None,
                           alibi, None, None, seqlens, table, t(kn), t(vn), opts,
                           k_scale=ts(ksd), v_scale=ts(vsd))
    return (out, lse) if return_lse else out


_CODE_NAMES = {"int8": "int8", "fp8_e4m3": "float8_e4m3fn", "float8_e4m3fn": "float8_e4m3fn"}


def quantize_kv(x, dtype="int8"):
    """Quantize keys or values to an 8-bit KV-cache format, one scale per row.

    Parameters
    ----------
    x : numpy.ndarray or CUDA device array
        (..., Hkv, D), float32 / float16 / bfloat16: each row of D values (one token of one
        kv head) is quantized on its own. A head dim with non-unit stride is copied first.
    dtype : {"int8", "fp8_e4m3"}
        ``"int8"``: symmetric int8, ``scale = max|row| / 127``, codes ``round(x / scale)`` (to
        nearest even) in [-127, 127]. ``"fp8_e4m3"`` (alias ``"float8_e4m3fn"``): float8 e4m3fn
        (``ml_dtypes.float8_e4m3fn``; ``torch.float8_e4m3fn`` on a GPU), ``scale = max|row| /
        448``, codes ``x / scale`` rounded to nearest even. A row of zeros gets scale 0; a row
        holding inf or NaN gets scale NaN (its attention output is then NaN, as with the float
        row).

    Returns
    -------
    (codes, scale): codes of x's shape and the 8-bit dtype, scale (...,  Hkv) float32;
    ``codes * scale[..., None]`` approximates x (int8: within half a step, ``scale / 2``, per
    element; e4m3: within 2^-4 of each value's magnitude, relative). These are the caches and
    scales :func:`attention_with_kvcache` takes (``k_scale`` / ``v_scale``); it quantizes rows it
    appends the same way, bit for bit.
    """
    fn = "quantize_kv"
    call = Call(fn, x, "x")
    xd = call.first
    if not isinstance(dtype, str) or dtype not in _CODE_NAMES:
        raise ValueError(f"{fn}: dtype must be 'int8' or 'fp8_e4m3', got {dtype!r}")
    if xd.dtype not in ("float32", "float16", "bfloat16"):
        raise TypeError(f"{fn}: x has dtype {xd.dtype}; expected float32, float16 or bfloat16")
    if xd.ndim < 2:
        raise ValueError(f"{fn}: x must be (..., Hkv, D), got shape {xd.shape}")
    if xd.shape[-1] == 0:
        raise ValueError(f"{fn}: the head dim must be at least 1, got shape {xd.shape}")
    xd = call.contiguous(xd, "x")
    codes, cd = call.empty(xd.shape, _CODE_NAMES[dtype])
    scale, sd = call.empty(xd.shape[:-1], "float32")
    call.backend.quantize_kv(call, xd, cd, sd)
    return codes, scale
