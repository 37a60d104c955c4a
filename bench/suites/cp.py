"""Context parallelism: attnkit.torch.ring_attention on W = 1, 2, 4 local processes (gloo over
loopback) vs attnkit attention in one process on the whole sequence.

Each W gets a pool of W spawned worker processes (one process group, kept for every row of
that W). A row's "attnkit" contender asks every rank to run one ring forward (or forward and
backward) on its zigzag shard of a causal problem and waits for all of them: its time is the
slowest rank's. "one process" is attnkit.torch.attention on the whole tensors in the runner's
process. Before timing, rank 0 gathers the ring's output (and gradients) for the check against
the one-process result.

Threads: the pass's thread count n is shared, n // W threads per rank (at least 1). With W
ranks on fewer cores than W (W = 4 on 2 cores) the machine is oversubscribed: the row says so
(`oversubscribed=True`) and its time measures time-sharing, not scaling.

Derived numbers (row["extra"]), per call and rank, averaged over the timed calls:
  bytes_per_rank  bytes this rank sent (forward: (W-1) x its K/V shard; backward: (W-1) x K/V
                  + W x the fp32 dK/dV accumulator)
  compute_ms      block compute (kernels and merges)
  wait_ms         time blocked waiting for a transfer after the block was done
  comm_ms         the same transfers alone (no compute), measured right after timing
  hidden          1 - wait / comm, clamped to [0, 1]: the fraction of the transfer time that ran
                  under compute (1: fully hidden)
"""
from __future__ import annotations

import os
import socket
import time

from harness import Case, Spec, attention_bwd_flops, attention_flops
from suites.common import close_enough, find_api, torch_or_none

NAME = "cp"
WORLDS = {"tiny": [1, 2], "quick": [1, 2, 4], "full": [1, 2, 4]}
# (kind, B, H, Hkv, S, D, dtype)
ROWS = {
    "tiny": [("fwd", 1, 2, 2, 64, 16, "float32"), ("fwd+bwd", 1, 2, 2, 64, 16, "float32")],
    "quick": [("fwd", 1, 8, 8, 4096, 64, "float32"), ("fwd+bwd", 1, 8, 8, 2048, 64, "float32")],
    "full": [("fwd", 1, 8, 8, 4096, 64, "float32"), ("fwd+bwd", 1, 8, 8, 2048, 64, "float32"),
             ("fwd", 1, 8, 8, 8192, 64, "float32"), ("fwd+bwd", 1, 8, 8, 4096, 64, "float32"),
             ("fwd", 1, 32, 8, 4096, 128, "float32"), ("fwd", 1, 8, 8, 4096, 64, "bfloat16")],
}
TOL = {"float32": 2e-5, "bfloat16": 3e-2}
GRAD_TOL = 1e-4
START_TIMEOUT_S = 120
CALL_TIMEOUT_S = 600


def missing():
    """Why the suite cannot run here, else None."""
    torch = torch_or_none()
    if torch is None:
        return "torch is not installed"
    if find_api("attnkit.torch", "ring_attention") is None:
        return "attnkit.torch.ring_attention is missing"
    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        return "torch.distributed with gloo is not available"
    return None


def specs(cfg):
    """One row per (problem, W)."""
    out = []
    for kind, b, h, hkv, s, d, dtype in ROWS[cfg.mode]:
        for w in WORLDS[cfg.mode]:
            heads = f"H{h}" + (f" Hkv{hkv}" if hkv != h else "")
            label = f"B{b} {heads} S{s} D{d} causal W{w}"
            dt = {"float32": "f32", "bfloat16": "bf16"}[dtype]
            params = {"kind": kind, "B": b, "H": h, "Hkv": hkv, "S": s, "D": d, "W": w,
                      "dtype": dtype, "causal": True, "sharding": "zigzag"}
            out.append(Spec(NAME, f"cp {kind} {dt} {label}", label, dtype, params,
                            heavy=b * h * s * s * d >= 8 * 4096 * 4096 * 64))
    return out


# ---- the worker processes ------------------------------------------------------------------------


def _inputs(p):
    import torch

    g = torch.Generator().manual_seed(0)
    dt = getattr(torch, p["dtype"])
    B, H, Hkv, S, D = p["B"], p["H"], p["Hkv"], p["S"], p["D"]
    t = lambda *shape: torch.randn(*shape, generator=g).to(dt)  # noqa: E731
    return t(B, H, S, D), t(B, Hkv, S, D), t(B, Hkv, S, D), t(B, H, S, D)


def _comm_only(st, k, v, bufs):
    """The transfers of one ring call without its compute: forward W-1 K/V exchanges; with
    backward (``bufs``: two fp32 dK/dV buffers), W-1 more and W exchanges of the accumulator."""
    from attnkit import _ring

    def kv_pass():
        ring = _ring._KVRing(st, k, v)
        for t in range(st.world):
            ring.post(t)
            ring.finish(t)

    kv_pass()
    if bufs is not None:
        kv_pass()
        B, Hkv, _, D = k.shape
        shape = (B, Hkv, D, v.shape[3])
        cur = 0
        for t in range(st.world):
            n_send = _ring._kv_numel(st, st.source(t), *shape)
            n_recv = _ring._kv_numel(st, st.source(t + 1), *shape)
            _ring._Exchange(st, bufs[cur][:n_send], bufs[1 - cur][:n_recv], _ring._TAG_DKV).wait()
            cur = 1 - cur


def worker(rank, world, port, threads, conn):
    """One rank: join the group, then serve the parent's commands on conn until "exit"."""
    import datetime

    import torch
    import torch.distributed as dist

    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world, timeout=datetime.timedelta(seconds=CALL_TIMEOUT_S))
    import attnkit.torch as at
    from attnkit import _ring

    state = {}
    try:
        while True:
            cmd, arg = conn.recv()
            if cmd == "exit":
                break
            try:
                if cmd == "setup":
                    p = arg
                    q, k, v, dout = _inputs(p)
                    shard = lambda x: at.shard_sequence(x, 2)  # noqa: E731
                    grad = p["kind"] == "fwd+bwd"
                    qs, ks, vs = (shard(x).requires_grad_(grad) for x in (q, k, v))
                    state = dict(p=p, q=qs, k=ks, v=vs, dout=shard(dout), grad=grad,
                                 stats=_ring.RingStats(), calls=0)
                    conn.send(("ok", None))
                elif cmd == "run":
                    s = state
                    with _ring.profile() as stats:
                        out = at.ring_attention(s["q"], s["k"], s["v"], is_causal=True,
                                                enable_gqa=s["p"]["H"] != s["p"]["Hkv"])
                        grads = None
                        if s["grad"]:
                            grads = torch.autograd.grad(out, (s["q"], s["k"], s["v"]), s["dout"])
                    for f in ("bytes_sent", "compute_s", "wait_s", "steps"):
                        setattr(s["stats"], f, getattr(s["stats"], f) + getattr(stats, f))
                    s["calls"] += 1
                    result = None
                    if arg:  # the check call: gather the whole output (and gradients)
                        parts = [out.detach()] + (list(grads) if grads else [])
                        full = [at.unshard_sequence(x, 2) for x in parts]
                        result = [x.float().numpy() for x in full] if rank == 0 else None
                    conn.send(("ok", result))
                elif cmd == "stats":
                    s = state
                    n = max(1, s["calls"])
                    st = s["stats"]
                    res = dict(bytes=st.bytes_sent / n, compute_s=st.compute_s / n,
                               wait_s=st.wait_s / n)
                    s["stats"], s["calls"] = _ring.RingStats(), 0
                    conn.send(("ok", res))
                elif cmd == "comm":
                    s = state
                    st = _ring.setup("bench", s["q"], s["k"], s["v"], None, True, None,
                                     s["p"]["H"] != s["p"]["Hkv"], "bhsd", "zigzag")
                    k, v = s["k"].detach(), s["v"].detach()
                    bufs = None
                    if s["grad"]:
                        B, Hkv, _, D = k.shape
                        most = max(_ring._kv_numel(st, r, B, Hkv, D, v.shape[3])
                                   for r in range(world))
                        bufs = [torch.zeros(most) for _ in range(2)]
                    _comm_only(st, k, v, bufs)  # warm-up
                    t0 = time.perf_counter()
                    for _ in range(arg):
                        _comm_only(st, k, v, bufs)
                    conn.send(("ok", (time.perf_counter() - t0) / arg))
            except Exception as e:  # reported to the parent, which raises it
                conn.send(("error", f"rank {rank}: {type(e).__name__}: {e}"))
    finally:
        dist.destroy_process_group()


class _Pool:
    """W worker processes with one process group; commands go to all, replies are awaited."""

    def __init__(self, world, threads):
        import torch.multiprocessing as mp

        self.world, self.threads = world, threads
        ctx = mp.get_context("spawn")  # clean processes: the kernels' own thread counts
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.conns, self.procs = [], []
        for r in range(world):
            a, b = ctx.Pipe()
            p = ctx.Process(target=worker, args=(r, world, port, threads, b), daemon=True)
            p.start()
            self.conns.append(a)
            self.procs.append(p)

    def ask(self, cmd, arg=None, timeout=CALL_TIMEOUT_S):
        for c in self.conns:
            c.send((cmd, arg))
        replies = []
        for r, c in enumerate(self.conns):
            if not c.poll(timeout):
                self.close()
                raise TimeoutError(f"cp bench: rank {r} did not answer {cmd!r} in {timeout} s")
            status, value = c.recv()
            if status != "ok":
                raise RuntimeError(value)
            replies.append(value)
        return replies

    def close(self):
        for c in self.conns:
            try:
                c.send(("exit", None))
            except (OSError, BrokenPipeError):
                pass
        for p in self.procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()


_POOL = None


def _pool(world, threads):
    """The pool for (world, threads), closing any other (one pool alive at a time)."""
    global _POOL
    if _POOL is not None and (_POOL.world, _POOL.threads) != (world, threads):
        _POOL.close()
        _POOL = None
    if _POOL is None:
        _POOL = _Pool(world, threads)
        import atexit

        atexit.register(_POOL.close)
    return _POOL


def build(spec):
    """A row: the ring on W ranks vs one process; derive() adds bytes, compute, wait, overlap."""
    import torch

    import attnkit
    import attnkit.torch as at

    p = dict(spec.params)
    world = p["W"]
    n = attnkit.get_num_threads() or torch.get_num_threads()
    per_rank = max(1, n // world)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    p.update(threads_per_rank=per_rank, oversubscribed=world * per_rank > cores)
    pool = _pool(world, per_rank)
    pool.ask("setup", p, timeout=START_TIMEOUT_S)
    grad = p["kind"] == "fwd+bwd"
    first = [True]

    def ring():
        check = first[0]
        first[0] = False
        res = pool.ask("run", check)[0]
        return tuple(res) if check else None

    q, k, v, dout = _inputs(p)
    leaves = [x.clone().requires_grad_(grad) for x in (q, k, v)]

    def one_process():
        out = at.attention(*leaves, is_causal=True)
        if not grad:
            return (out.detach(),)
        return (out.detach(),) + torch.autograd.grad(out, leaves, dout)

    def check(x, ref):
        if x is None or ref is None or len(x) != len(ref):
            return "no result to check"
        msg = close_enough(x[0], ref[0], TOL[p["dtype"]])
        if msg:
            return "out " + msg
        for name, a, b in zip(("dq", "dk", "dv"), x[1:], ref[1:]):
            msg = close_enough(a, b, GRAD_TOL if p["dtype"] == "float32" else TOL[p["dtype"]])
            if msg:
                return name + " " + msg
        return None

    def derive(timings):
        stats = pool.ask("stats")
        comm = pool.ask("comm", 3 if spec.params["S"] >= 1024 else 10) if world > 1 else [0.0]
        wait = max(s["wait_s"] for s in stats)
        comm_s = max(comm)
        hidden = (min(1.0, max(0.0, 1.0 - wait / comm_s)) if comm_s > 0 else None)
        return {"W": world, "threads_per_rank": per_rank,
                "oversubscribed": p["oversubscribed"],
                "bytes_per_rank": int(max(s["bytes"] for s in stats)),
                "compute_ms": 1e3 * max(s["compute_s"] for s in stats),
                "wait_ms": 1e3 * wait, "comm_ms": 1e3 * comm_s,
                "hidden": hidden if world > 1 else None}

    B, H, S, D = p["B"], p["H"], p["S"], p["D"]
    work = attention_flops(B, H, S, S, D, causal=True)
    if grad:
        work += attention_bwd_flops(B, H, S, S, D, causal=True)
    return Case(suite=NAME, name=spec.name, contenders={"attnkit": ring, "one process": one_process},
                reference="one process", work=work, ceiling="sgemm", check=check, derive=derive,
                params=p)
