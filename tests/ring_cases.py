"""Cases that run inside the ranks of tests/test_ring.py's process groups (gloo on loopback).

``run_job`` is the target of each rank's process: it joins a group of ``world`` ranks and runs
every case of the job, one after the other on the same group (starting torch processes costs
seconds; cases cost milliseconds). Each case returns plain numbers (errors relative to the
reference's magnitude, exception names and messages); the parent test asserts on them, so a
failure message shows the measured error. A case that raises unexpectedly records its
traceback. The group is created with a short timeout, so a rank left waiting raises instead of
hanging; the parent also kills the ranks past its own deadline.
"""
import datetime
import json
import math
import os
import traceback

import torch
import torch.distributed as dist

GLOO_TIMEOUT_S = 30
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
          "float64": torch.float64}


def rel_err(got, ref):
    """max |got - ref| / max |ref| (float64); inf when the shapes or NaN patterns differ."""
    got, ref = got.detach().double(), ref.detach().double()
    if got.shape != ref.shape or not torch.equal(torch.isnan(got), torch.isnan(ref)):
        return math.inf
    scale = ref.abs().max().item() or 1.0
    return (got - ref).abs().max().item() / scale


def _inputs(seed, B, H, Hkv, S, Sk, D, Dv, dtype):
    g = torch.Generator().manual_seed(seed)
    t = lambda *shape: torch.randn(*shape, generator=g).to(dtype)  # noqa: E731
    return t(B, H, S, D), t(B, Hkv, Sk, D), t(B, Hkv, Sk, Dv), t(B, H, S, Dv)


def _math_reference(q, k, v, dout, causal, scale):
    """Attention and its gradients in float64 torch ops (autograd) on the whole tensors."""
    q, k, v = (x.detach().double().requires_grad_(True) for x in (q, k, v))
    G = q.shape[1] // k.shape[1]
    s = (q @ k.repeat_interleave(G, 1).transpose(-1, -2)) * scale
    if causal:
        n = q.shape[2]
        s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    out = torch.softmax(s, -1) @ v.repeat_interleave(G, 1)
    out.backward(dout.double())
    return out.detach(), q.grad, k.grad, v.grad


def _single_process(q, k, v, dout, causal, scale):
    """attnkit.torch.attention (one process, the whole tensors) and its gradients."""
    import attnkit.torch as at

    q, k, v = (x.detach().clone().requires_grad_(True) for x in (q, k, v))
    out = at.attention(q, k, v, is_causal=causal, scale=scale)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def compare(rank, world, *, B=2, H=4, Hkv=2, S=24, Sk=None, D=16, Dv=None, causal=True,
            sharding="zigzag", layout="bhsd", dtype="float32", scale=None, grad=True,
            group=None, seed=0):
    """ring_attention (and its gradients) on this rank's shards vs single-process attnkit and
    float64 on the whole tensors, on this rank's shard. Returns relative errors."""
    import attnkit.torch as at

    Sk = S if Sk is None else Sk
    Dv = D if Dv is None else Dv
    dt = DTYPES[dtype]
    q, k, v, dout = _inputs(seed, B, H, Hkv, S, Sk, D, Dv, dt)
    sc = scale if scale is not None else 1.0 / math.sqrt(D)
    ref64 = _math_reference(q, k, v, dout, causal, sc)
    single = _single_process(q, k, v, dout, causal, sc) if dtype != "float64" else ref64

    def shard(x):  # bhsd -> this rank's shard in the case's layout
        x = at.shard_sequence(x, 2, group, sharding=sharding)
        return x.transpose(1, 2).contiguous() if layout == "bshd" else x

    def back(x):  # a result in the case's layout -> bhsd
        return x.transpose(1, 2) if layout == "bshd" else x

    qs, ks, vs = (shard(x).requires_grad_(grad) for x in (q, k, v))
    if grad:
        out = at.ring_attention(qs, ks, vs, group=group, is_causal=causal, scale=scale,
                                enable_gqa=H != Hkv, layout=layout, sharding=sharding)
        out.backward(shard(dout))
        got = [back(out), back(qs.grad), back(ks.grad), back(vs.grad)]
    else:
        with torch.no_grad():
            out = at.ring_attention(qs, ks, vs, group=group, is_causal=causal, scale=scale,
                                    enable_gqa=H != Hkv, layout=layout, sharding=sharding)
        got = [back(out)]
    res = {"dtype_out": str(out.dtype).replace("torch.", ""), "shape_out": list(out.shape)}
    for i, name in enumerate(("out", "dq", "dk", "dv")[:len(got)]):
        # errors relative to the whole reference tensor's magnitude, on this rank's shard
        scale_ref = ref64[i].abs().max().item()
        sh = lambda x: at.shard_sequence(x, 2, group, sharding=sharding)  # noqa: E731
        res[name] = (got[i].double() - sh(single[i]).double()).abs().max().item() / scale_ref
        res[name + "_vs_f64"] = (got[i].double() - sh(ref64[i])).abs().max().item() / scale_ref
        res[name + "_single_vs_f64"] = (single[i].double() - ref64[i]).abs().max().item() / scale_ref
    return res


def _raised(fn):
    try:
        fn()
    except Exception as e:  # what every rank raised, for the parent to check
        return {"raised": type(e).__name__, "message": str(e)}
    return {"raised": None}


def refused_on_one_rank(rank, world):
    """Rank 1 passes k with a head dim that does not match q: rank 1 raises its ValueError,
    every other rank RuntimeError, before anything is sent."""
    import attnkit.torch as at

    q = torch.randn(1, 2, 5, 8)
    k = torch.randn(1, 2, 5, 4 if rank == 1 else 8)
    return _raised(lambda: at.ring_attention(q, k, torch.randn(1, 2, 5, 8), is_causal=False))


def ranks_disagree(rank, world):
    """Each rank's inputs are fine alone, but the head counts differ between ranks."""
    import attnkit.torch as at

    H = 4 if rank == 0 else 2
    q, k, v = torch.randn(1, H, 6, 8), torch.randn(1, H, 6, 8), torch.randn(1, H, 6, 8)
    return _raised(lambda: at.ring_attention(q, k, v))


def dtypes_disagree(rank, world):
    """float32 on rank 0, float64 elsewhere: the message names the dtypes (it once printed
    their internal codes, 1 and 2)."""
    import attnkit.torch as at

    dt = torch.float32 if rank == 0 else torch.float64
    q = torch.randn(1, 2, 6, 8, dtype=dt)
    return _raised(lambda: at.ring_attention(q, q, q))


def _tiny_llama():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, hidden_size=32, intermediate_size=64,
                                   vocab_size=64, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).float()


def cp_padding_on_one_rank(rank, world):
    """Left padding sits in rank 0's zigzag shard only: every rank raises (one rank raising
    alone left the others waiting in ring_attention's collectives until the group's timeout)."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return {"skipped": "transformers is not installed"}
    import attnkit.torch as at
    import attnkit.transformers as akt

    akt.register()
    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 4 * world), generator=torch.Generator().manual_seed(1))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # zigzag: the first chunk is rank 0's
    batch = akt.shard_inputs(ids)
    local = at.shard_sequence(mask, 1)

    def run():
        with torch.no_grad(), akt.context_parallel(model):
            model(**batch, attention_mask=local, use_cache=False)
    return _raised(run)


def cp_contiguous_batch(rank, world):
    """shard_inputs(sharding="contiguous") with B = 2: the label shards were strided views and
    transformers' loss (labels.view(-1)) raised; the summed loss equals one process's."""
    try:
        import transformers  # noqa: F401
    except ImportError:
        return {"skipped": "transformers is not installed"}
    import attnkit.transformers as akt

    akt.register()
    model = _tiny_llama()
    model.set_attn_implementation("attnkit")
    ids = torch.randint(0, 64, (2, 4 * world + 3), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = model(input_ids=ids, labels=ids, use_cache=False).loss
        batch = akt.shard_inputs(ids, labels=ids, sharding="contiguous")
        with akt.context_parallel(model, sharding="contiguous"):
            loss = model(**batch, use_cache=False).loss
    dist.all_reduce(loss)
    return {"loss": abs(loss.item() - ref.item()) / abs(ref.item())}


def wrong_zigzag_lengths(rank, world):
    """Causal zigzag needs the zigzag layout's lengths; contiguous pieces of 7 tokens differ."""
    import attnkit.torch as at

    x = torch.randn(1, 2, 7, 8)
    s = at.shard_sequence(x, 2, sharding="contiguous")
    return _raised(lambda: at.ring_attention(s, s, s, is_causal=True, sharding="zigzag"))


def grad_mismatch(rank, world):
    """One rank needs gradients, the others do not: the backward could not run everywhere."""
    import attnkit.torch as at

    q = torch.randn(1, 2, 4, 8).requires_grad_(rank == 0)
    return _raised(lambda: at.ring_attention(q, torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)))


def bad_option_everywhere(rank, world):
    """A bad option on every rank: each raises its own error after the exchange."""
    import attnkit.torch as at

    q = torch.randn(1, 2, 4, 8)
    return _raised(lambda: at.ring_attention(q, q, q, layout="sbhd"))


def unshard_refused(rank, world):
    """unshard_sequence with a shard whose other dims differ on one rank."""
    import attnkit.torch as at

    x = torch.randn(2, 5, 3 if rank == 1 else 4)
    return _raised(lambda: at.unshard_sequence(x, 1))


def shard_round_trip(rank, world):
    """shard_sequence then unshard_sequence gives x back (both layouts, uneven lengths, an
    integer tensor), and the shards have the layouts' lengths and positions."""
    import attnkit.torch as at
    from attnkit._ring import shard_lengths

    out = {}
    for sharding in ("zigzag", "contiguous"):
        for S in (4 * world, 4 * world + 3, world):
            pos = torch.arange(S)
            x = torch.randn(3, S, 2, generator=torch.Generator().manual_seed(S))  # same on all ranks
            sx = at.shard_sequence(x, 1, sharding=sharding)
            sp = at.shard_sequence(pos, 0, sharding=sharding)
            lens = shard_lengths(S, world, sharding)
            key = f"{sharding} S{S}"
            out[key] = {
                "len_ok": sx.shape[1] == lens[rank] and sp.shape[0] == lens[rank],
                "values_ok": torch.equal(sx, x[:, sp]),
                "round_trip": torch.equal(at.unshard_sequence(sx, 1, sharding=sharding), x),
                "int_round_trip": torch.equal(at.unshard_sequence(sp, 0, sharding=sharding), pos),
            }
    return out


def singleton_groups(rank, world):
    """Every rank in a group of its own (W = 1 through a non-default group): plain attention."""
    groups = [dist.new_group([r]) for r in range(world)]  # every rank creates every group
    return compare(rank, 1, S=9, causal=True, group=groups[rank], seed=5)


def llama(rank, world):
    """A tiny Llama (random weights from a config, GQA): logits of a forward with the sequence
    sharded over the ranks vs one process, and one training step's loss and gradients."""
    try:
        import transformers
    except ImportError:
        return {"skipped": "transformers is not installed"}
    import attnkit.torch as at
    import attnkit.transformers as akt

    akt.register()
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, hidden_size=32, intermediate_size=64,
                                   vocab_size=64, max_position_embeddings=128)
    model = transformers.LlamaForCausalLM(cfg).float()
    model.set_attn_implementation("attnkit")
    ids = torch.randint(0, 64, (2, 4 * world + 5), generator=torch.Generator().manual_seed(1))
    ref = model(input_ids=ids, labels=ids, use_cache=False)
    ref.loss.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    batch = akt.shard_inputs(ids, labels=ids)
    with akt.context_parallel(model):
        out = model(**batch, use_cache=False)
    restored = model.config._attn_implementation
    out.loss.backward()
    for p in model.parameters():
        dist.all_reduce(p.grad)
    loss = out.loss.detach().clone()
    dist.all_reduce(loss)
    logits = at.unshard_sequence(out.logits.detach(), 1)
    with torch.no_grad(), akt.context_parallel(model):
        eval_logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                            use_cache=False).logits
    return {
        "logits": rel_err(logits, ref.logits),
        "eval_logits": rel_err(eval_logits, at.shard_sequence(ref.logits.detach(), 1)),
        "loss": abs(loss.item() - ref.loss.item()) / abs(ref.loss.item()),
        "grads": max(rel_err(model.get_parameter(n).grad, g) for n, g in ref_grads.items()),
        "restored": restored,
    }


def jobs(world):
    """The cases of a job of `world` ranks: (name, function(rank, world))."""
    c = []
    add = lambda name, **kw: c.append((name, lambda r, w: compare(r, w, **kw)))  # noqa: E731
    if world == 2:
        # the refusals first: the group must stay usable after them
        c += [("refused_on_one_rank", refused_on_one_rank), ("ranks_disagree", ranks_disagree),
              ("dtypes_disagree", dtypes_disagree), ("cp_padding_on_one_rank", cp_padding_on_one_rank),
              ("wrong_zigzag_lengths", wrong_zigzag_lengths), ("grad_mismatch", grad_mismatch),
              ("bad_option_everywhere", bad_option_everywhere),
              ("unshard_refused", unshard_refused)]
        for causal in (True, False):
            for sharding in ("zigzag", "contiguous"):
                for S in (24, 27):
                    add(f"f32 {'causal' if causal else 'full'} {sharding} S{S}", S=S,
                        causal=causal, sharding=sharding, seed=S + 100 * causal)
        add("f32 causal zigzag bshd MQA Dv12 scale0.3", B=1, H=2, Hkv=1, S=21, D=8, Dv=12,
            layout="bshd", scale=0.3, seed=3)
        add("f32 causal contiguous H=Hkv", H=3, Hkv=3, S=13, seed=4)
        add("f32 full cross-attention Sk!=Sq", S=10, Sk=17, causal=False, sharding="contiguous",
            seed=6)
        add("f32 causal zigzag no grad", S=19, grad=False, seed=7)
        add("f16 causal zigzag", S=26, dtype="float16", seed=8)
        add("bf16 causal zigzag", S=26, dtype="bfloat16", seed=9)
        add("bf16 full contiguous", S=22, causal=False, sharding="contiguous", dtype="bfloat16",
            seed=10)
        add("f64 causal zigzag", S=23, dtype="float64", seed=11)
        c += [("shard_round_trip", shard_round_trip), ("singleton_groups", singleton_groups),
              ("llama", llama), ("cp_contiguous_batch", cp_contiguous_batch)]
    else:
        c += [("refused_on_one_rank", refused_on_one_rank), ("shard_round_trip", shard_round_trip)]
        S = 8 * world + 3  # does not divide by W or 2W
        add(f"f32 causal zigzag S{S}", S=S, seed=20)
        add(f"f32 causal contiguous S{S}", S=S, sharding="contiguous", seed=21)
        add(f"f32 full zigzag S{S - 3}", S=S - 3, causal=False, seed=22)
        add(f"bf16 causal zigzag S{S}", S=S, dtype="bfloat16", seed=23)
    return c


def run_job(rank, world, port, outdir):
    """One rank: join the group, run the job's cases, write rank<r>.json into outdir."""
    results = {}
    try:
        torch.set_num_threads(1)  # W ranks share the machine's cores
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world,
                                timeout=datetime.timedelta(seconds=GLOO_TIMEOUT_S))
        for name, fn in jobs(world):
            try:
                results[name] = fn(rank, world)
            except Exception:
                results[name] = {"error": traceback.format_exc()}
        dist.destroy_process_group()
    except Exception:
        results["__job__"] = {"error": traceback.format_exc()}
    with open(os.path.join(outdir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
