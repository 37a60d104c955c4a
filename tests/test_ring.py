"""Context-parallel (ring) attention: attnkit.torch.ring_attention, shard_sequence,
unshard_sequence and the transformers integration, on 2, 3 and 4 gloo ranks over loopback.

Starting torch processes costs seconds, so each world size is one job: its ranks join one
process group and run every case of tests/ring_cases.py on it (the refusals first: the group
must stay usable after them). The ranks are forked from a forkserver that has imported torch
once. Every rank writes its results; the tests below assert on them. Nothing can hang: the
group has a 30 s timeout and the parent kills the ranks after JOB_DEADLINE_S.

In-process tests cover the block planner (every causal (query, key) pair covered exactly once,
one kernel call per step for both layouts) and the torch-math block forward/backward that the
CUDA path runs (against the CPU kernels here).
"""
import json
import math
import os
import random
import socket
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

import attnkit.torch as at
from attnkit import _ring

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)
import ring_cases  # noqa: E402
from reference import TOLERANCE  # noqa: E402

JOB_DEADLINE_S = 240
FP32_TOL = 1e-5  # the bound: fp32 within 1e-5 of the output's magnitude
HALF_TOL = {"float16": TOLERANCE[np.dtype(np.float16)], "bfloat16": 1.2e-2}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(),
                                reason="torch.distributed is not available")


# ---- running a job of W ranks -------------------------------------------------------------------

def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_CTX = None


def _context():
    """A forkserver context whose server has imported torch (and transformers) once."""
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["torch", "torch.distributed", "attnkit.torch",
                                     "ring_cases", "transformers"])
    return _CTX


def run_world(world, tmp_path):
    """Run ring_cases.jobs(world) on `world` ranks; returns one result dict per rank."""
    ctx = _context()
    port = _free_port()
    procs = [ctx.Process(target=ring_cases.run_job, args=(r, world, port, str(tmp_path)))
             for r in range(world)]
    for p in procs:
        p.start()
    deadline = time.monotonic() + JOB_DEADLINE_S
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
    hung = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, f"ranks {hung} of {world} were still running after {JOB_DEADLINE_S} s"
    results = []
    for r, p in enumerate(procs):
        path = tmp_path / f"rank{r}.json"
        assert path.exists(), f"rank {r} of {world} wrote no results (exit code {p.exitcode})"
        res = json.loads(path.read_text())
        assert "__job__" not in res, f"rank {r} of {world}: {res['__job__']['error']}"
        results.append(res)
    return results


_RESULTS = {}


@pytest.fixture(scope="module")
def world_results(tmp_path_factory):
    """world -> per-rank results, each world's job run once for the module."""
    def get(world):
        if world not in _RESULTS:
            _RESULTS[world] = run_world(world, tmp_path_factory.mktemp(f"ring{world}"))
        return _RESULTS[world]
    return get


def _case(results, name):
    per_rank = [res[name] for res in results]
    for r, res in enumerate(per_rank):
        assert "error" not in res, f"case {name!r} raised on rank {r}:\n{res['error']}"
    return per_rank


def _comparisons(results):
    return [n for n in results[0] if isinstance(results[0][n], dict) and "out" in results[0][n]]


# ---- outputs and gradients against one process ---------------------------------------------------

@pytest.mark.parametrize("world", [2, 3, 4])
def test_outputs_and_gradients_match_one_process(world, world_results):
    """Every comparison case: ring_attention's output shard and the gradient shards equal the
    single-process attnkit attention on the unsharded tensors (fp32: within 1e-5 of the
    reference's magnitude; half types: within max(2x the single-process error, the dtype's
    tolerance) against float64; float64: 1e-10 against float64)."""
    results = world_results(world)
    names = _comparisons(results)
    assert len(names) >= 4
    failures = []
    for name in names:
        for r, res in enumerate(_case(results, name)):
            grads = [g for g in ("out", "dq", "dk", "dv") if g in res]
            for g in grads:
                if name.startswith("f32"):
                    bad = res[g] > FP32_TOL or res[g + "_vs_f64"] > FP32_TOL
                elif name.startswith("f64"):
                    bad = res[g + "_vs_f64"] > 1e-10
                else:
                    dt = "float16" if name.startswith("f16") else "bfloat16"
                    bound = max(2 * res[g + "_single_vs_f64"], HALF_TOL[dt])
                    bad = res[g + "_vs_f64"] > bound
                if bad or not math.isfinite(res[g]):
                    failures.append(f"{name} rank {r} {g}: {res[g]:.3g} vs attnkit, "
                                    f"{res[g + '_vs_f64']:.3g} vs float64 (attnkit alone "
                                    f"{res[g + '_single_vs_f64']:.3g})")
    assert not failures, "\n".join(failures)


def test_case_details(world_results):
    """Layouts, dtypes and the no-grad path come back as asked (W = 2)."""
    results = world_results(2)
    bshd = _case(results, "f32 causal zigzag bshd MQA Dv12 scale0.3")
    assert bshd[0]["shape_out"][1:] == [11, 2, 12] and bshd[1]["shape_out"][1:] == [10, 2, 12]
    assert {r["dtype_out"] for r in _case(results, "bf16 causal zigzag")} == {"bfloat16"}
    assert all("dq" not in r for r in _case(results, "f32 causal zigzag no grad"))
    single = _case(results, "singleton_groups")  # a group of one rank: no ring at all
    assert all(r["out"] <= FP32_TOL and r["dq"] <= FP32_TOL for r in single)


# ---- refusals: every rank raises, nothing hangs, the group stays usable --------------------------

@pytest.mark.parametrize("world", [2, 3])
def test_bad_shapes_on_one_rank_raise_everywhere(world, world_results):
    res = _case(world_results(world), "refused_on_one_rank")
    assert res[1]["raised"] == "ValueError" and "k has head_dim 4 but q has 8" in res[1]["message"]
    for r in [0] + list(range(2, world)):
        assert res[r]["raised"] == "RuntimeError", res[r]
        assert "rank(s) [1] of the group refused" in res[r]["message"]


def test_disagreements_raise_on_every_rank(world_results):
    results = world_results(2)
    for name, kind, words in [
            ("ranks_disagree", "ValueError", "disagree on the query heads: rank 0 has 4, rank 1 has 2"),
            ("dtypes_disagree", "ValueError",
             "disagree on the dtype: rank 0 has torch.float32, rank 1 has torch.float64"),
            ("cp_padding_on_one_rank", "ValueError", "padding (an attention_mask with zeros, on "
             "this rank or another) is not supported"),
            ("wrong_zigzag_lengths", "ValueError", "with sharding='zigzag' the ranks must hold [3, 4]"),
            ("grad_mismatch", "ValueError", "disagree on whether a gradient is needed"),
            ("bad_option_everywhere", "ValueError", "ring_attention: layout must be 'bhsd' or 'bshd'"),
            ("unshard_refused", "ValueError", "unshard_sequence: the ranks' shards do not agree")]:
        for r, res in enumerate(_case(results, name)):
            assert res["raised"] == kind and words in res["message"], (name, r, res)


# ---- sharding helpers and transformers ----------------------------------------------------------

@pytest.mark.parametrize("world", [2, 3])
def test_shard_and_unshard_round_trip(world, world_results):
    for r, res in enumerate(_case(world_results(world), "shard_round_trip")):
        for key, checks in res.items():
            assert all(checks.values()), (r, key, checks)


def test_llama_sharded_forward_and_training_step(world_results):
    """A tiny Llama: sharded logits (gathered) equal the single-process logits; one training
    step's summed loss and all-reduced gradients equal the single-process ones."""
    res = _case(world_results(2), "llama")
    if "skipped" in res[0]:
        pytest.skip(res[0]["skipped"])
    for r in res:
        assert r["logits"] <= FP32_TOL and r["eval_logits"] <= FP32_TOL, r
        assert r["loss"] <= FP32_TOL and r["grads"] <= 1e-4, r
        assert r["restored"] == "attnkit"
    for r in _case(world_results(2), "cp_contiguous_batch"):
        assert r["loss"] <= FP32_TOL, r


# ---- in-process: the block planner and the torch-math blocks ------------------------------------

def _coverage(q_segs, k_segs, calls):
    """(allowed, covered): allowed[i, j] = key j's global position <= query i's; covered counts
    how many calls include (i, j)."""
    qpos = np.concatenate([np.arange(g, g + n) for g, n in q_segs]) if q_segs else np.zeros(0)
    kpos = np.concatenate([np.arange(g, g + n) for g, n in k_segs]) if k_segs else np.zeros(0)
    allowed = kpos[None, :] <= qpos[:, None]
    covered = np.zeros(allowed.shape, np.int64)
    for qlo, qhi, klo, khi, right in calls:
        assert 0 <= qlo < qhi <= len(qpos) and 0 <= klo < khi <= len(kpos)
        i = np.arange(qhi - qlo)[:, None]
        j = np.arange(khi - klo)[None, :]
        if right is None:
            m = np.ones((qhi - qlo, khi - klo), bool)
        else:
            assert right >= 0
            m = j <= i + right
        covered[qlo:qhi, klo:khi] += m
    return allowed, covered


@pytest.mark.parametrize("sharding", ["zigzag", "contiguous"])
def test_planner_covers_every_causal_pair_once_in_one_call(sharding):
    for world in range(1, 6):
        for S in range(world, 4 * world + 6):
            lens = _ring.shard_lengths(S, world, sharding)
            assert sum(lens) == S and min(lens) >= 1
            for r in range(world):
                for s in range(world):
                    qs, ks = _ring.segments(lens, r, sharding), _ring.segments(lens, s, sharding)
                    calls = _ring.plan_blocks(qs, ks)
                    allowed, covered = _coverage(qs, ks, calls)
                    assert np.array_equal(covered, allowed.astype(np.int64)), (world, S, r, s, calls)
                    assert len(calls) <= 1, (world, S, r, s, calls)
                    if S % (2 * world) == 0 and sharding == "zigzag" and r != s:
                        # zigzag balance: half of the block's pairs, for every pair of ranks
                        assert allowed.sum() == allowed.size // 2


def test_planner_on_arbitrary_segments():
    """Any segments (runs of global positions in local order, ascending or not): each causal
    pair covered exactly once, by one call when a single bound fits, else one call per pair."""
    rnd = random.Random(0)
    for _ in range(400):
        positions = list(range(rnd.randint(2, 40)))
        rnd.shuffle(positions)

        def segs():
            out, n = [], rnd.randint(1, 3)
            for _ in range(n):
                g, length = rnd.randint(0, 30), rnd.randint(1, 6)
                out.append((g, length))
            return out

        qs, ks = segs(), segs()
        # a shard's own runs do not overlap
        if any(a != b and not (a[0] + a[1] <= b[0] or b[0] + b[1] <= a[0])
               for x in (qs, ks) for a in x for b in x):
            continue
        calls = _ring.plan_blocks(qs, ks)
        allowed, covered = _coverage(qs, ks, calls)
        assert np.array_equal(covered, allowed.astype(np.int64)), (qs, ks, calls)


def test_chunk_sizes_match_tensor_split():
    for total in range(0, 30):
        for parts in range(1, 9):
            want = [len(c) for c in torch.tensor_split(torch.arange(total), parts)]
            assert _ring.chunk_sizes(total, parts) == want


@pytest.mark.parametrize("right", [None, 0, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_math_blocks_match_the_kernels(right, dtype):
    """The CUDA path's torch-math block forward and backward (against a merged lse from more
    keys than the block holds) agree with attnkit's CPU kernels on the same block."""
    g = torch.Generator().manual_seed(1)
    B, H, Hkv, Sq, Sk, D = 2, 4, 2, 7, 12, 8
    q = torch.randn(B, H, Sq, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, Sk, D, generator=g).to(dtype)
    dout = torch.randn(B, H, Sq, D, generator=g).to(dtype)
    scale = 0.35
    o32 = torch.empty(B, H, Sq, D)
    l32 = torch.empty(B, H, Sq)
    _ring.block_forward_cpu(q.float(), k, v, o32, l32, scale, right)
    om, lm = _ring.block_forward_math(q, k, v, scale, right)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    assert (om - o32).abs().max() <= tol * o32.abs().max()
    assert (lm - l32).abs().max() <= 1e-5 * l32.abs().max()
    # the merged state of this block with more keys: backward against a global out / lse
    lse = torch.logaddexp(l32, torch.full_like(l32, 0.5))
    out = (o32 * torch.exp(l32 - lse)[..., None]).to(dtype)
    gk = _ring.block_backward_cpu(dout, q, k, v, out, lse, scale, right)
    gm = _ring.block_backward_math(dout, q, k, v, out, lse, scale, right)
    for a, b, name in zip(gk, gm, ("dq", "dk", "dv")):
        assert (a.float() - b).abs().max() <= 4 * tol * b.abs().max(), name


def test_ring_needs_an_initialized_process_group():
    if torch.distributed.is_initialized():
        pytest.skip("a process group is initialized in this process")
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(RuntimeError, match="ring_attention: torch.distributed is not initialized"):
        at.ring_attention(q, q, q)
    with pytest.raises(RuntimeError, match="shard_sequence: torch.distributed is not initialized"):
        at.shard_sequence(q, 2)
