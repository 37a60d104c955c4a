"""Context-parallel (ring) attention on CPU processes, checked against one process.

Each of W processes holds a zigzag shard of a causal GQA attention problem; ring_attention
passes the K/V shards around the ring (gloo over loopback here) and returns this rank's output
shard; the backward sends dK/dV home. Every rank checks its shards of the output and gradients
against attnkit attention on the whole tensors.

    python examples/ring_attention.py                 # 2 local processes
    python examples/ring_attention.py --world 4 --seq 4099
    torchrun --nproc-per-node 2 examples/ring_attention.py   # or under torchrun
"""
import argparse
import datetime
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import attnkit.torch as at


def run(rank, world, port, seq):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    torch.set_num_threads(max(1, cores // world))  # the ranks share this machine's cores
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world, timeout=datetime.timedelta(seconds=60))
    B, H, Hkv, D = 1, 8, 2, 64
    g = torch.Generator().manual_seed(0)  # the same whole tensors on every rank
    Q, K, V, dO = (torch.randn(B, h, seq, D, generator=g) for h in (H, Hkv, Hkv, H))

    # this rank's shard: chunks r and 2W-1-r of 2W (every rank gets the same causal work)
    q, k, v = (at.shard_sequence(x, 2).requires_grad_(True) for x in (Q, K, V))
    out = at.ring_attention(q, k, v, is_causal=True, enable_gqa=True)
    out.backward(at.shard_sequence(dO, 2))

    # one process on the whole tensors, for the check
    Qr, Kr, Vr = (x.clone().requires_grad_(True) for x in (Q, K, V))
    ref = at.attention(Qr, Kr, Vr, is_causal=True)
    ref.backward(dO)
    worst = 0.0
    for got, want in ((out, ref), (q.grad, Qr.grad), (k.grad, Kr.grad), (v.grad, Vr.grad)):
        err = (got.detach() - at.shard_sequence(want.detach(), 2)).abs().max() / want.abs().max()
        worst = max(worst, err.item())
    full = at.unshard_sequence(out.detach(), 2)  # the whole output, on every rank
    ok = worst < 1e-5 and full.shape == ref.shape
    print(f"rank {rank}/{world}: {q.shape[2]} of {seq} tokens, max error {worst:.2e} relative "
          f"-> {'OK' if ok else 'MISMATCH'}", flush=True)
    dist.destroy_process_group()
    if not ok:
        raise SystemExit(1)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--world", type=int, default=2, help="local processes (default 2)")
    ap.add_argument("--seq", type=int, default=1027, help="sequence length (need not divide)")
    args = ap.parse_args()
    if "RANK" in os.environ:  # under torchrun
        dist.init_process_group("gloo")
        run(dist.get_rank(), dist.get_world_size(), None, args.seq)
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(run, args=(args.world, port, args.seq), nprocs=args.world, join=True)


if __name__ == "__main__":
    main()
