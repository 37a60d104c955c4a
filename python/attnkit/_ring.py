"""Context-parallel (ring) attention on torch.distributed: the implementation behind
``attnkit.torch.ring_attention``, ``shard_sequence`` and ``unshard_sequence``.

The sequence is sharded over the W ranks of a process group. Each rank keeps its query shard
and passes K/V shards around the ring (rank r sends to r + 1 and receives from r - 1), so at
step t it holds the K/V of rank s = r - t. Every step is one or a few calls of attnkit's
kernels on a block (its query rows against the keys of rank s) and a merge of the block's
(out, lse) into a running fp32 state through the merge kernel; the K/V transfer of the next
step is posted before the block is computed (two buffers: one computed on and sent, one
received into), so communication runs under compute. The backward passes the K/V around again
and, beside them, one fp32 dK/dV accumulator per K/V shard: at step t rank r adds its
contribution for shard s (attnkit's backward against that shard with the *globally merged* out
and lse, which makes each contribution exact) and sends the accumulator on; after W steps every
accumulator has visited every rank and arrives home.

Masks: positions are global. A rank's shard is a list of "segments" (runs of consecutive
global positions, in local order): one for ``sharding="contiguous"``, two for ``"zigzag"``
(chunks r and 2W-1-r of 2W). For a query segment at global offset a and a key segment at b,
the block is fully visible (every key before every query), fully masked (skipped) or crossed
by the causal diagonal; then key j' is allowed for query i' (local offsets in the block) when
b + j' <= a + i', i.e. j' <= i' + (a - b): the kernels' window with right bound a - b in
top-left alignment (0 is plain causal). ``plan_blocks`` turns the segment pairs into as few
kernel calls as it can: with the two layouts here, one call per step.
"""
from __future__ import annotations

import contextlib
import math
import os
import struct
import threading
import time
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import _C
from ._ring_plan import _starts, chunk_sizes, plan_blocks, segments, shard_lengths, zigzag_chunks  # noqa: F401
from ._torch_binding import desc as _desc
from ._torch_binding import rows as _rows
from ._torch_binding import threads as _threads

_DTYPES = {torch.float32: 1, torch.float64: 2, torch.float16: 3, torch.bfloat16: 4}
_LAYOUTS = ("bhsd", "bshd")
_SHARDINGS = ("zigzag", "contiguous")
_TAG_KV, _TAG_DKV = 11, 12

# ---- profiling hook (the cp bench) --------------------------------------------------------------


class RingStats:
    """What the ring did while :func:`profile` was active (CPU tensors): bytes sent by this rank,
    seconds of block compute (kernels and merges), seconds blocked waiting for transfers, and
    the number of ring steps. Private: the cp bench reads it."""

    def __init__(self):
        self.bytes_sent = 0
        self.compute_s = 0.0
        self.wait_s = 0.0
        self.steps = 0

    def as_dict(self):
        return dict(bytes_sent=self.bytes_sent, compute_s=self.compute_s, wait_s=self.wait_s,
                    steps=self.steps)


_stats: Optional[RingStats] = None


@contextlib.contextmanager
def profile():
    """Collect :class:`RingStats` for the ring calls in the block (yields the stats)."""
    global _stats
    previous, _stats = _stats, RingStats()
    try:
        yield _stats
    finally:
        _stats = previous


class _Timer:
    """Adds the block's wall time to _stats.<field> when profiling (nothing otherwise)."""

    __slots__ = ("field", "t0")

    def __init__(self, field):
        self.field = field

    def __enter__(self):
        self.t0 = time.perf_counter() if _stats is not None else 0.0

    def __exit__(self, *exc):
        if _stats is not None:
            setattr(_stats, self.field, getattr(_stats, self.field) + time.perf_counter() - self.t0)
        return False


# ---- reused scratch -----------------------------------------------------------------------------

POOL_MAX_BYTES = 1 << 30


class _ScratchPool:
    """The internal buffers of ring calls (the two K/V ring buffers, the dK/dV accumulators, the
    running output state, dQ), reused across calls on the CPU: a fresh large tensor costs page
    faults on every call, ~40 MB of them per call of the cp bench's W = 2 forward (bench/notes/ring.md,
    "ring attention"). A call takes its buffers and gives them back once every transfer touching
    them is done; none of them escapes (results are new tensors). At most POOL_MAX_BYTES are
    kept; ``attnkit.empty_cache()`` releases them. CUDA tensors use torch's caching allocator."""

    def __init__(self):
        self.free, self.bytes, self.lock = {}, 0, threading.Lock()

    def take(self, numel, dtype, device):
        if device.type == "cpu":
            with self.lock:
                free = self.free.get((numel, dtype))
                if free:
                    t = free.pop()
                    self.bytes -= t.numel() * t.element_size()
                    return t
        return torch.empty(numel, dtype=dtype, device=device)

    def give(self, *tensors):
        with self.lock:
            for t in tensors:
                n = t.numel() * t.element_size()
                if t.device.type == "cpu" and self.bytes + n <= POOL_MAX_BYTES:
                    self.free.setdefault((t.numel(), t.dtype), []).append(t)
                    self.bytes += n

    def clear(self):
        with self.lock:
            self.free.clear()
            self.bytes = 0


_scratch = _ScratchPool()


def _new_pool_after_fork():  # a lock held by another thread at fork() would stay held
    global _scratch
    _scratch = _ScratchPool()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_pool_after_fork)


def empty_cache():
    """Release the ring's reused buffers (called by attnkit.empty_cache)."""
    _scratch.clear()


# ---- checks before the first collective ---------------------------------------------------------


def _float_bits(x: float) -> int:
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


_FIELDS = ("ok", "B", "H", "Hkv", "Sq", "Sk", "D", "Dv", "dtype", "is_causal", "enable_gqa",
           "layout", "sharding", "device", "scale", "grad")
_AGREE = {"B": "the batch size", "H": "the query heads", "Hkv": "the key/value heads",
          "D": "the head dim", "Dv": "v's head dim", "dtype": "the dtype", "is_causal": "is_causal",
          "enable_gqa": "enable_gqa", "layout": "layout", "sharding": "sharding",
          "device": "the device type", "scale": "scale",
          "grad": "whether a gradient is needed (requires_grad under grad mode)"}

# How a summary field's code reads in a message (the summaries travel as int64 vectors).
_DTYPE_OF_CODE = {c: t for t, c in _DTYPES.items()}
_SHOW = {"dtype": lambda x: _DTYPE_OF_CODE.get(x, x),
         "layout": lambda x: repr(_LAYOUTS[x]), "sharding": lambda x: repr(_SHARDINGS[x]),
         "device": lambda x: "cuda" if x else "cpu",
         "is_causal": bool, "enable_gqa": bool, "grad": bool,
         "scale": lambda x: struct.unpack("<d", struct.pack("<q", x))[0]}


def group_info(group, fn):
    """(group, world size, rank in group) of an initialized group this process belongs to."""
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(f"{fn}: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group first")
    if group is not None and not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"{fn}: group must be a torch.distributed ProcessGroup or None (the "
                        f"default group), got {type(group).__name__}")
    g = group if group is not None else dist.group.WORLD
    rank = dist.get_rank(g)
    if rank < 0:
        raise RuntimeError(f"{fn}: this process is not a member of the given group")
    return g, dist.get_world_size(g), rank


def _summary_device(group):
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def exchange_summaries(group, world, summary, device):
    """all_gather of one int64 vector per rank (the only collective before any data moves)."""
    t = torch.tensor(summary, dtype=torch.int64, device=device)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t, group=group)
    return [p.cpu().tolist() for p in parts]


def _canonical(t, layout):
    return t.transpose(1, 2) if layout == "bshd" else t


def _check_local(fn, q, k, v, is_causal, scale, enable_gqa, layout, sharding):
    """Everything one rank can check alone; returns its summary dict. Raises TypeError /
    ValueError naming the argument."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if t.is_nested:
            raise TypeError(f"{fn}: {name} is a nested tensor, which is not supported")
    if not isinstance(layout, str) or layout not in _LAYOUTS:
        raise ValueError(f"{fn}: layout must be 'bhsd' or 'bshd', got {layout!r}")
    if not isinstance(sharding, str) or sharding not in _SHARDINGS:
        raise ValueError(f"{fn}: sharding must be 'zigzag' or 'contiguous', got {sharding!r}")
    for name, x in (("is_causal", is_causal), ("enable_gqa", enable_gqa)):
        if not isinstance(x, bool):
            raise TypeError(f"{fn}: {name} must be a bool, got {type(x).__name__}")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{fn}: {name} must be 4-D ({layout}), got shape {tuple(t.shape)}")
        if t.dtype not in _DTYPES:
            raise TypeError(f"{fn}: {name} has dtype {t.dtype}; expected float32, float64, "
                            "float16 or bfloat16")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"{fn}: q, k and v must have one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"{fn}: q, k and v must be on one device, got {q.device}, {k.device}, "
                         f"{v.device}")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{fn}: tensors on {q.device.type} are not supported (CPU or CUDA)")
    if q.device.type == "cuda":
        from .torch import _cuda_ready

        if not _cuda_ready():
            raise RuntimeError(f"{fn}: CUDA tensors need attnkit's CUDA build and a visible GPU")
    from ._front import check_attention_shapes, resolve_scale

    qc, kc, vc = (_canonical(t, layout) for t in (q, k, v))
    B, H, Sq, D, Hkv, Sk, Dv = check_attention_shapes(fn, layout, q, k, v, qc, kc, vc)
    if H != Hkv and not enable_gqa:
        raise ValueError(f"{fn}: q has {H} heads but k/v have {Hkv}; pass enable_gqa=True for "
                         "grouped-query attention")
    if B == 0 or H == 0:
        raise ValueError(f"{fn}: B and H must be at least 1, got q {tuple(q.shape)}")
    if Sq == 0 or Sk == 0:
        raise ValueError(f"{fn}: every rank must hold at least one token, but this one has "
                         f"Sq={Sq}, Sk={Sk}")
    if is_causal and Sq != Sk:
        raise ValueError(f"{fn}: is_causal=True needs the same tokens for queries and keys on "
                         f"each rank, but q holds {Sq} and k {Sk}")
    scale = resolve_scale(scale, D, fn)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v))
    return dict(ok=1, B=B, H=H, Hkv=Hkv, Sq=Sq, Sk=Sk, D=D, Dv=Dv, dtype=_DTYPES[q.dtype],
                is_causal=int(is_causal), enable_gqa=int(enable_gqa), layout=_LAYOUTS.index(layout),
                sharding=_SHARDINGS.index(sharding), device=int(q.device.type == "cuda"),
                scale=_float_bits(scale), grad=int(grad)), scale


_PLANS: dict = {}  # (world, rank, q_lens, k_lens, causal, sharding) -> plans (a model's layers
                  # call the ring with the same lengths over and over)


def _plans(world, rank, q_lens, k_lens, causal, sharding):
    key = (world, rank, tuple(q_lens), tuple(k_lens), causal, sharding)
    plans = _PLANS.get(key)
    if plans is None:
        plans = []
        for t in range(world):
            s = (rank - t) % world
            if causal:
                plans.append(plan_blocks(segments(q_lens, rank, sharding),
                                         segments(k_lens, s, sharding)))
            else:
                plans.append([(0, q_lens[rank], 0, k_lens[s], None)])
        if len(_PLANS) > 256:
            _PLANS.clear()
        _PLANS[key] = plans
    return plans


class Setup:
    """A validated ring call: the group, this rank, every rank's lengths and the block plans."""

    def __init__(self, group, world, rank, q_lens, k_lens, causal, sharding, scale):
        self.group, self.world, self.rank = group, world, rank
        self.q_lens, self.k_lens = q_lens, k_lens
        self.causal, self.sharding, self.scale = causal, sharding, scale
        self.next = dist.get_global_rank(group, (rank + 1) % world) if world > 1 else None
        self.prev = dist.get_global_rank(group, (rank - 1) % world) if world > 1 else None
        self.plans = _plans(world, rank, q_lens, k_lens, causal, sharding)

    def source(self, t):
        """The rank whose K/V this rank holds at step t."""
        return (self.rank - t) % self.world


def setup(fn, q, k, v, group, is_causal, scale, enable_gqa, layout, sharding):
    """Checks (local, then one all_gather of every rank's summary, then across ranks) and the
    plans. Every rank raises, and none has sent any data, if any rank's inputs are refused."""
    g, world, rank = group_info(group, fn)
    problem, resolved = None, None
    try:
        summary, resolved = _check_local(fn, q, k, v, is_causal, scale, enable_gqa, layout, sharding)
    except Exception as e:  # any local refusal is shared before it is raised (no rank hangs)
        problem, summary = e, dict.fromkeys(_FIELDS, 0)
    rows = exchange_summaries(g, world, [summary[f] for f in _FIELDS], _summary_device(g))
    rows = [dict(zip(_FIELDS, r)) for r in rows]
    if problem is not None:
        raise problem
    bad = [j for j, r in enumerate(rows) if not r["ok"]]
    if bad:
        raise RuntimeError(f"{fn}: rank(s) {bad} of the group refused their inputs (their error "
                           "says why); nothing was sent")
    for f, what in _AGREE.items():
        vals = [r[f] for r in rows]
        if len(set(vals)) > 1:
            j = next(i for i, x in enumerate(vals) if x != vals[0])
            show = _SHOW.get(f, lambda x: x)
            raise ValueError(f"{fn}: the ranks disagree on {what}: rank 0 has {show(vals[0])}, "
                             f"rank {j} has {show(vals[j])}")
    q_lens = [r["Sq"] for r in rows]
    k_lens = [r["Sk"] for r in rows]
    if is_causal and sharding == "zigzag":
        want = shard_lengths(sum(q_lens), world, "zigzag")
        if want != q_lens:
            raise ValueError(f"{fn}: with sharding='zigzag' the ranks must hold {want} tokens "
                             f"(chunks r and 2W-1-r of the {sum(q_lens)} tokens split into 2W, as "
                             f"attnkit.torch.shard_sequence cuts them), but they hold {q_lens}")
    return Setup(g, world, rank, q_lens, k_lens, bool(is_causal), sharding, resolved)


# ---- one block on one device --------------------------------------------------------------------


def _mask_args(right):
    """(causal, window_right) of the kernels for a block's bound (None: no mask)."""
    if right is None:
        return False, -1
    if right == 0:
        return True, -1
    return False, int(right)


def block_forward_cpu(q, k, v, out, lse, scale, right):
    """attnkit's forward of one block into the given out / lse views (q's dtype, fp32)."""
    causal, wr = _mask_args(right)
    _C.attention(_desc(q), _desc(k), _desc(v), _desc(out, True), _desc(lse, True), None, None,
                 None, None, None, None, q.shape[0], scale, 0.0, causal, False, -1, wr, 0.0, 0, 0,
                 _threads(), fn="ring_attention")


def block_backward_cpu(dout, q, k, v, out, lse, scale, right):
    """attnkit's backward of one block against the merged out / lse: (dq, dk, dv) in q's dtype."""
    causal, wr = _mask_args(right)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    _C.attention_backward(_desc(dout), _desc(q), _desc(k), _desc(v), _desc(out), _desc(lse),
                          _desc(dq, True), _desc(dk, True), _desc(dv, True), None, None, None,
                          None, q.shape[0], scale, 0.0, causal, False, -1, wr, 0.0, 0, 0,
                          _threads())
    return dq, dk, dv


def _allowed(sq, sk, right, device):
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    return j <= i + right


def block_forward_math(q, k, v, scale, right):
    """The block forward in torch ops (fp32, or fp64 for float64 inputs): (out, lse), both in
    that precision. float64 rings run it (the kernels keep an fp32 lse, and their float64
    backward recomputes each row's lse from the block's own keys, not the merged one)."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    G = q.shape[1] // k.shape[1]
    qf, kf, vf = q.to(acc), k.to(acc).repeat_interleave(G, 1), v.to(acc).repeat_interleave(G, 1)
    s = (qf @ kf.transpose(-1, -2)) * scale
    if right is not None:
        s = s.masked_fill(~_allowed(q.shape[2], k.shape[2], right, q.device), float("-inf"))
    lse = torch.logsumexp(s, -1)
    p = torch.exp(s - torch.where(lse == float("-inf"), torch.zeros_like(lse), lse)[..., None])
    return p @ vf, lse


def block_backward_math(dout, q, k, v, out, lse, scale, right):
    """The block backward in torch ops against the merged out / lse (materializes the block's
    scores): the CUDA path (attnkit's CUDA backward is off by default, unverified on GPUs).
    (dq, dk, dv) in fp32 (fp64 for float64 inputs); dk/dv summed over each GQA group."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    B, H, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    G = H // Hkv
    qf, of, gf = q.to(acc), out.to(acc), dout.to(acc)
    kf, vf = k.to(acc).repeat_interleave(G, 1), v.to(acc).repeat_interleave(G, 1)
    s = (qf @ kf.transpose(-1, -2)) * scale
    lf = lse.to(acc)
    p = torch.exp(s - torch.where(lf == float("-inf"), torch.full_like(lf, math.inf), lf)[..., None])
    if right is not None:
        p = p.masked_fill(~_allowed(Sq, Sk, right, q.device), 0.0)
    dvf = p.transpose(-1, -2) @ gf
    dp = gf @ vf.transpose(-1, -2)
    delta = (gf * of).sum(-1, keepdim=True)
    ds = p * (dp - delta) * scale
    dq = ds @ kf
    dkf = ds.transpose(-1, -2) @ qf
    dk = dkf.view(B, Hkv, G, Sk, D).sum(2)
    dv = dvf.view(B, Hkv, G, Sk, dvf.shape[-1]).sum(2)
    return dq, dk, dv


# ---- the ring -----------------------------------------------------------------------------------


class _Exchange:
    """One posted send to the next rank and receive from the previous one."""

    def __init__(self, st, send, recv, tag):
        self.works = []
        if st.world < 2:
            return
        if _stats is not None:
            _stats.bytes_sent += send.numel() * send.element_size()
        ops = [dist.P2POp(dist.isend, send, st.next, st.group, tag),
               dist.P2POp(dist.irecv, recv, st.prev, st.group, tag)]
        self.works = dist.batch_isend_irecv(ops)

    def wait(self):
        with _Timer("wait_s"):
            for w in self.works:
                w.wait()
        self.works = []


def _kv_numel(st, s, B, Hkv, D, Dv):
    return B * Hkv * st.k_lens[s] * (D + Dv)


def _kv_views(buf, st, s, B, Hkv, D, Dv):
    """k (B, Hkv, Sk_s, D) and v (B, Hkv, Sk_s, Dv) views of a packed K/V buffer."""
    n = st.k_lens[s]
    nk = B * Hkv * n * D
    return buf[:nk].view(B, Hkv, n, D), buf[nk:nk + B * Hkv * n * Dv].view(B, Hkv, n, Dv)


class _KVRing:
    """The K/V shards going around: two packed buffers, one computed on (and sent), one received
    into. Per step t: ``post(t)`` starts the transfer for step t + 1, ``current(t)`` is this
    step's (k, v), ``finish(t)`` waits for the transfer and swaps the buffers."""

    def __init__(self, st, k, v):
        self.st, self.k, self.v = st, k, v
        B, Hkv, _, D = k.shape
        self.shape = (B, Hkv, D, v.shape[3])
        self.bufs = None
        if st.world > 1:
            most = max(_kv_numel(st, s, *self.shape) for s in range(st.world))
            self.bufs = [_scratch.take(most, k.dtype, k.device) for _ in range(2)]
            kb, vb = _kv_views(self.bufs[0], st, st.rank, *self.shape)
            kb.copy_(k)
            vb.copy_(v)
        self.cur = 0
        self.pending = None

    def post(self, t):
        """Send this step's K/V on and receive the next step's (nothing after the last step)."""
        st = self.st
        if t >= st.world - 1:
            return
        s, s_next = st.source(t), st.source(t + 1)
        send = self.bufs[self.cur][:_kv_numel(st, s, *self.shape)]
        recv = self.bufs[1 - self.cur][:_kv_numel(st, s_next, *self.shape)]
        self.pending = _Exchange(st, send, recv, _TAG_KV)

    def current(self, t):
        if t == 0:
            return self.k, self.v
        return _kv_views(self.bufs[self.cur], self.st, self.st.source(t), *self.shape)

    def finish(self, t):
        """Wait for the transfer posted at step t; the received buffer becomes current."""
        if self.pending is not None:
            self.pending.wait()
            self.pending = None
            self.cur = 1 - self.cur

    def release(self):
        """Give the buffers back (every transfer has been waited for)."""
        if self.bufs is not None:
            _scratch.give(*self.bufs)
            self.bufs = None


def _acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _path(q):
    """How blocks run: "kernels" (attnkit's CPU kernels), "cuda" (attnkit's CUDA forward, torch
    math backward) or "math" (float64: torch math for both, fp64 throughout)."""
    if q.dtype == torch.float64:
        return "math"
    return "kernels" if q.device.type == "cpu" else "cuda"


def ring_forward(st: Setup, q: Tensor, k: Tensor, v: Tensor, dtype, layout: str):
    """This rank's queries against every rank's keys: (out, lse), out a new tensor in ``dtype``
    and ``layout``, lse (B, H, Sq) fp32 (fp64 for float64 inputs); q/k/v are canonical
    (B, H, S, D) views."""
    B, H, Sq, _ = q.shape
    Dv = v.shape[3]
    path = _path(q)
    acc = _acc_dtype(q.dtype)
    # Half types on the CPU: a float32 q reads the float16/bfloat16 K/V in registers, so each
    # block's out comes out in fp32 and nothing is rounded before the final output.
    qk = q.to(acc) if path == "kernels" and q.dtype != acc else q
    obuf = _scratch.take(2 * B * H * Sq * Dv, acc, q.device)
    o2 = obuf.view(2, B, H, Sq, Dv)
    l2 = torch.empty((2, B, H, Sq), dtype=acc, device=q.device)
    ring = _KVRing(st, k, v)
    first = st.plans[0]
    direct = len(first) == 1 and first[0][0] == 0 and first[0][1] == Sq
    if not direct:
        o2[0].zero_()
        l2[0].fill_(float("-inf"))
    for t in range(st.world):
        ring.post(t)
        kt, vt = ring.current(t)
        with _Timer("compute_s"):
            for qlo, qhi, klo, khi, right in st.plans[t]:
                qs, ks, vs = qk[:, :, qlo:qhi], kt[:, :, klo:khi], vt[:, :, klo:khi]
                to_acc = t == 0 and direct
                slot = 0 if to_acc else 1
                if path == "kernels":
                    block_forward_cpu(qs, ks, vs, o2[slot, :, :, qlo:qhi], l2[slot, :, :, qlo:qhi],
                                      st.scale, right)
                else:
                    fwd = block_forward_math if path == "math" else _cuda_block_forward
                    ob, lb = fwd(qs, ks, vs, st.scale, right)
                    o2[slot, :, :, qlo:qhi].copy_(ob)
                    l2[slot, :, :, qlo:qhi].copy_(lb)
                if not to_acc:
                    _merge_rows(o2, l2, qlo, qhi)
        ring.finish(t)
        if _stats is not None:
            _stats.steps += 1
    ring.release()
    out = _finish(o2[0], dtype, layout)
    _scratch.give(obuf)
    return out, l2[0].clone()


def _merge_rows(o2, l2, lo, hi):
    """Merge slot 1 into slot 0 (the running state) for rows lo:hi, in place."""
    parts, lses = o2[:, :, :, lo:hi], l2[:, :, :, lo:hi]
    if o2.device.type == "cpu":
        _C.merge_attention_states(_desc(parts), _desc(lses), _desc(parts[0], True),
                                  _desc(lses[0], True), _threads(), fn="ring_attention")
    else:
        from ._torch_merge import _merge_math

        o, l = _merge_math(parts, lses)
        parts[0].copy_(o)
        lses[0].copy_(l)


def _cuda_block_forward(q, k, v, scale, right):
    """attnkit's CUDA forward of one block (tensor cores for half types): (out, lse)."""
    from ._attention import attention

    causal, wr = _mask_args(right)
    return attention(q, k, v, causal=causal, scale=scale, window=None if wr < 0 else (-1, wr),
                     return_lse=True)


def ring_backward(st: Setup, dout, q, k, v, out, lse, layout: str):
    """(dq, dk, dv) of this rank's shards as new tensors in q's dtype and ``layout``; canonical
    views in (out in q's dtype, lse the merged one). Accumulation in fp32 (fp64 for float64)."""
    B, H, Sq, D = q.shape
    Hkv, Dv = k.shape[1], v.shape[3]
    bwd = block_backward_cpu if _path(q) == "kernels" else block_backward_math
    acc = _acc_dtype(q.dtype)
    dqbuf = _scratch.take(B * H * Sq * D, acc, q.device)
    dq = dqbuf.view(B, H, Sq, D).zero_()
    ring = _KVRing(st, k, v)
    shape = (B, Hkv, D, Dv)
    most = max(_kv_numel(st, s, *shape) for s in range(st.world))
    dbufs = [_scratch.take(most, acc, q.device) for _ in range(2 if st.world > 1 else 1)]
    dcur, pending = 0, None
    for t in range(st.world):
        s = st.source(t)
        ring.post(t)
        kt, vt = ring.current(t)
        blocks = []
        with _Timer("compute_s"):
            for qlo, qhi, klo, khi, right in st.plans[t]:
                g = bwd(dout[:, :, qlo:qhi], q[:, :, qlo:qhi], kt[:, :, klo:khi], vt[:, :, klo:khi],
                        out[:, :, qlo:qhi], lse[:, :, qlo:qhi], st.scale, right)
                dq[:, :, qlo:qhi] += g[0]
                blocks.append((klo, khi, g[1], g[2]))
        # The dK/dV accumulator of shard s: zero at its home (t = 0), else received from the
        # previous rank, which added the contributions of ranks s .. r-1 (then it is dbufs[dcur]).
        if t == 0:
            dbufs[dcur][:_kv_numel(st, s, *shape)].zero_()
        else:
            pending.wait()
        dk_s, dv_s = _kv_views(dbufs[dcur], st, s, *shape)
        with _Timer("compute_s"):
            for klo, khi, dk_b, dv_b in blocks:
                dk_s[:, :, klo:khi] += dk_b
                dv_s[:, :, klo:khi] += dv_b
        if st.world > 1:
            # Send it on; receive the next one (at t = W-1: this rank's own, complete).
            pending = _Exchange(st, dbufs[dcur][:_kv_numel(st, s, *shape)],
                                dbufs[1 - dcur][:_kv_numel(st, st.source(t + 1), *shape)], _TAG_DKV)
            dcur = 1 - dcur
        ring.finish(t)
        if _stats is not None:
            _stats.steps += 1
    if pending is not None:
        pending.wait()
    ring.release()
    dk, dv = _kv_views(dbufs[dcur], st, st.rank, *shape)
    grads = (_finish(dq, q.dtype, layout), _finish(dk, k.dtype, layout), _finish(dv, v.dtype, layout))
    _scratch.give(dqbuf, *dbufs)
    return grads


# ---- autograd and the public entry points (documented in attnkit.torch) -------------------------


def _finish(o: Tensor, dtype, layout: str) -> Tensor:
    """The merged (B, H, S, Dv) state as a new tensor in the caller's dtype and layout."""
    if layout == "bshd":
        B, H, S, Dv = o.shape
        out = torch.empty((B, S, H, Dv), dtype=dtype, device=o.device)
        out.transpose(1, 2).copy_(o)
        return out
    return o.to(dtype, copy=True)


class _RingAttention(torch.autograd.Function):
    """Forward: the ring forward; backward: the ring backward against the merged out / lse.
    Every rank runs both (the backward's transfers are collective)."""

    @staticmethod
    def forward(ctx, q, k, v, st, layout):
        qc, kc, vc = (_canonical(_rows(t), layout) for t in (q, k, v))
        out, lse = ring_forward(st, qc, kc, vc, q.dtype, layout)
        ctx.st, ctx.layout = st, layout
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        layout = ctx.layout
        qc, kc, vc, oc, dc = (_canonical(_rows(t), layout) for t in (q, k, v, out, dout))
        dq, dk, dv = ring_backward(ctx.st, dc, qc, kc, vc, oc, lse, layout)
        return dq, dk, dv, None, None


def ring_attention(q, k, v, *, group=None, is_causal=False, scale=None, enable_gqa=False,
                   layout="bhsd", sharding="zigzag", fn="ring_attention"):
    """See attnkit.torch.ring_attention."""
    st = setup(fn, q, k, v, group, is_causal, scale, enable_gqa, layout, sharding)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        return _RingAttention.apply(q, k, v, st, layout)
    qc, kc, vc = (_canonical(_rows(t), layout) for t in (q, k, v))
    return ring_forward(st, qc, kc, vc, q.dtype, layout)[0]


def _check_shard_args(fn, x, dim, sharding):
    if not isinstance(x, Tensor):
        raise TypeError(f"{fn}: x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(dim, bool) or not isinstance(dim, int):
        raise TypeError(f"{fn}: dim must be an int, got {type(dim).__name__}")
    if not -x.dim() <= dim < x.dim():
        raise ValueError(f"{fn}: dim {dim} is out of range for x with {x.dim()} dims")
    if not isinstance(sharding, str) or sharding not in _SHARDINGS:
        raise ValueError(f"{fn}: sharding must be 'zigzag' or 'contiguous', got {sharding!r}")
    return dim % x.dim()


def shard_sequence(x, dim, group=None, *, sharding="zigzag"):
    """See attnkit.torch.shard_sequence."""
    fn = "shard_sequence"
    dim = _check_shard_args(fn, x, dim, sharding)
    _, world, rank = group_info(group, fn)
    S = x.shape[dim]
    if S < world:
        raise ValueError(f"{fn}: x has {S} positions along dim {dim}, fewer than the {world} ranks "
                         "(every rank needs at least one)")
    if sharding == "contiguous":
        sizes = chunk_sizes(S, world)
        return x.narrow(dim, sum(sizes[:rank]), sizes[rank])
    sizes = chunk_sizes(S, 2 * world)
    starts = _starts(sizes)
    a, b = zigzag_chunks(world, rank)
    return torch.cat([x.narrow(dim, starts[a], sizes[a]), x.narrow(dim, starts[b], sizes[b])], dim)


def _describe_shard(row, dim):
    """A rank's unshard_sequence summary [ok, ndim, dim, dtype code, sharding, shape...] in
    words."""
    ndim, d, code, sh = row[1:5]
    dtype = _DTYPE_OF_CODE.get(code) or (_INT_DTYPES[code - 10] if 10 <= code < 10 + len(
        _INT_DTYPES) else code)
    return (f"shape {tuple(row[5:5 + ndim])} (dim {d}), {dtype}, "
            f"sharding {_SHARDINGS[sh]!r}")


def unshard_sequence(x, dim, group=None, *, sharding="zigzag"):
    """See attnkit.torch.unshard_sequence."""
    fn = "unshard_sequence"
    g, world, rank = group_info(group, fn)
    problem, summary = None, None
    try:
        dim = _check_shard_args(fn, x, dim, sharding)
        if x.dtype not in _DTYPES and x.dtype not in _INT_DTYPES:
            raise TypeError(f"{fn}: x has dtype {x.dtype}; expected a float or integer dtype")
        if x.dim() > 8:
            raise ValueError(f"{fn}: x has {x.dim()} dims; at most 8 are supported")
        shape = list(x.shape) + [0] * (8 - x.dim())
        code = _DTYPES.get(x.dtype) or 10 + _INT_DTYPES.index(x.dtype)
        summary = [1, x.dim(), dim, code, _SHARDINGS.index(sharding)] + shape
    except Exception as e:  # shared with the other ranks before it is raised
        problem, summary = e, [0] * 13
    rows = exchange_summaries(g, world, summary, _summary_device(g))
    if problem is not None:
        raise problem
    bad = [j for j, r in enumerate(rows) if not r[0]]
    if bad:
        raise RuntimeError(f"{fn}: rank(s) {bad} of the group refused their inputs (their error "
                           "says why); nothing was sent")
    lens = [r[5 + dim] for r in rows]
    for r in rows:
        other = [n for i, n in enumerate(r[5:5 + r[1]]) if i != dim]
        mine = [n for i, n in enumerate(x.shape) if i != dim]
        if r[1:5] != rows[rank][1:5] or other != mine:
            raise ValueError(f"{fn}: the ranks' shards do not agree: "
                             + "; ".join(f"rank {j} has {_describe_shard(r, dim)}"
                                         for j, r in enumerate(rows)))
    if sharding == "zigzag" and shard_lengths(sum(lens), world, "zigzag") != lens:
        raise ValueError(f"{fn}: the shards hold {lens} positions, which is not the zigzag layout "
                         f"of {sum(lens)} positions over {world} ranks")
    with torch.no_grad():
        most = max(lens)
        pad = list(x.shape)
        pad[dim] = most
        buf = torch.zeros(pad, dtype=x.dtype, device=x.device)
        buf.narrow(dim, 0, x.shape[dim]).copy_(x)
        parts = [torch.empty_like(buf) for _ in range(world)]
        dist.all_gather(parts, buf, group=g)
        shards = [p.narrow(dim, 0, n) for p, n in zip(parts, lens)]
        if sharding == "contiguous":
            return torch.cat(shards, dim)
        sizes = chunk_sizes(sum(lens), 2 * world)
        chunks = [None] * (2 * world)
        for r, sh in enumerate(shards):
            a, b = zigzag_chunks(world, r)
            chunks[a] = sh.narrow(dim, 0, sizes[a])
            chunks[b] = sh.narrow(dim, sizes[a], sizes[b])
        return torch.cat(chunks, dim)


_INT_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool)
