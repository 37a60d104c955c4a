"""Determinism, thread safety, memory leaks and 64-bit sizes, across every kernel."""
import gc
import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import attnkit
from reference import attention_ref, softmax_ref, to64


def kernel_calls(rng):
    """name -> (zero-arg call returning arrays, reference check or None). Sizes are chosen so
    every kernel runs threaded (the work is above the serial threshold)."""
    x = rng.standard_normal((300, 2000)).astype(np.float32)
    a = rng.standard_normal((300, 400)).astype(np.float32)
    b = rng.standard_normal((400, 500)).astype(np.float32)
    q = rng.standard_normal((2, 8, 200, 64)).astype(np.float32)
    k = rng.standard_normal((2, 2, 300, 64)).astype(np.float32)
    v = rng.standard_normal((2, 2, 300, 64)).astype(np.float32)
    o, lse = attnkit.attention(q, k, v, causal=True, return_lse=True)
    do = rng.standard_normal(o.shape).astype(np.float32)
    cu = np.array([0, 70, 70, 200], np.int32)
    qv = rng.standard_normal((200, 4, 32)).astype(np.float32)
    kv = rng.standard_normal((200, 2, 32)).astype(np.float32)
    qd = rng.standard_normal((2, 1, 32, 128)).astype(np.float32)
    kc = rng.standard_normal((2, 3000, 8, 128)).astype(np.float16)
    vc = rng.standard_normal((2, 3000, 8, 128)).astype(np.float16)
    lens = np.array([2999, 1500], np.int32)
    return {
        "softmax": (lambda: (attnkit.softmax(x),), lambda r: np.abs(r[0] - softmax_ref(x, -1)).max() < 1e-5),
        "matmul": (lambda: (attnkit.matmul(a, b),), lambda r: np.abs(r[0] - to64(a) @ to64(b)).max() < 1e-3),
        "attention": (lambda: attnkit.attention(q, k, v, causal=True, return_lse=True),
                      lambda r: np.abs(r[0] - attention_ref(q, k, v, causal=True)[0]).max() < 1e-5),
        "attention_varlen": (lambda: (attnkit.attention_varlen(qv, kv, kv, cu, cu, causal=True),), None),
        "attention_with_kvcache": (lambda: (attnkit.attention_with_kvcache(qd, kc, vc, cache_seqlens=lens),), None),
        "attention_backward": (lambda: attnkit.attention_backward(do, q, k, v, o, lse, causal=True), None),
    }


def test_bit_identical_across_threads_and_calls(threads, rng):
    calls = kernel_calls(rng)
    for name, (call, _) in calls.items():
        results = []
        for nt in (1, 2, 3, 2):
            attnkit.set_num_threads(nt)
            results.append(call())
        for r in results[1:]:
            for x, y in zip(r, results[0]):
                assert np.array_equal(x, y), f"{name}: results differ across threads/calls"


def test_torch_adapter_deterministic(threads):
    torch = pytest.importorskip("torch")
    import attnkit.torch as at

    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 150, 64, requires_grad=True) for _ in range(3))
    outs = []
    for nt in (1, 2, 3):
        torch.set_num_threads(nt)
        o = at.scaled_dot_product_attention(q, k, v, is_causal=True)
        grads = torch.autograd.grad(o.sum(), (q, k, v))
        outs.append((o.detach(),) + grads)
    torch.set_num_threads(2)
    for r in outs[1:]:
        for x, y in zip(r, outs[0]):
            assert torch.equal(x, y)


def test_eight_python_threads_concurrently(rng):
    calls = kernel_calls(rng)
    expected = {name: call() for name, (call, _) in calls.items()}
    for name, (_, ref_ok) in calls.items():
        if ref_ok is not None:
            assert ref_ok(expected[name]), name
    names = list(calls) * 2  # 12 jobs over 8 threads
    errors = []

    def worker(idx):
        try:
            for j in range(3):
                name = names[(idx + j) % len(names)]
                got = calls[name][0]()
                for x, y in zip(got, expected[name]):
                    if not np.array_equal(x, y):
                        errors.append(f"{name} differs in thread {idx}")
        except Exception as e:  # pragma: no cover - reported below
            errors.append(repr(e))

    ths = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in ths:
        t.start()
    for t in ths:
        t.join(300)
    assert not any(t.is_alive() for t in ths), "a thread hung"
    assert not errors, errors


def test_no_leak_over_10000_calls(rng):
    psutil = pytest.importorskip("psutil")
    x = rng.standard_normal((8, 64)).astype(np.float32)
    a = rng.standard_normal((8, 16)).astype(np.float32)
    q = rng.standard_normal((1, 2, 4, 16)).astype(np.float32)
    kc = rng.standard_normal((1, 32, 2, 16)).astype(np.float32)
    o, lse = attnkit.attention(q, q, q, return_lse=True)
    lens = np.array([20], np.int32)
    cu = np.array([0, 4], np.int32)
    q3 = q[0].transpose(1, 0, 2).copy()
    calls = [
        lambda: attnkit.softmax(x),
        lambda: attnkit.matmul(a, a.T),
        lambda: attnkit.attention(q, q, q, return_lse=True),
        lambda: attnkit.attention_varlen(q3, q3, q3, cu, cu),
        lambda: attnkit.attention_with_kvcache(q.transpose(0, 2, 1, 3), kc, kc, cache_seqlens=lens),
        lambda: attnkit.attention_backward(o, q, q, q, o, lse),
    ]
    proc = psutil.Process()
    for f in calls:  # warm up allocator pools and caches
        for _ in range(200):
            f()
    gc.collect()
    before = proc.memory_info().rss
    for f in calls:
        for _ in range(10000):
            f()
    gc.collect()
    grown = (proc.memory_info().rss - before) / 2**20
    assert grown < 8, f"RSS grew by {grown:.1f} MB over 60,000 calls"


@pytest.mark.slow
def test_more_than_2_31_elements():
    """softmax over (2^16, 2^15 + 1) float32: 2^31 + 2^16 elements, 8.6 GB in, 8.6 GB out."""
    rows, n = 1 << 16, (1 << 15) + 1
    x = np.empty((rows, n), np.float32)
    x[:] = np.arange(n, dtype=np.float32)[None, :] * 1e-4
    x[-1, -1] = 50.0  # the very last element, past 2^31: must be read and written
    out = attnkit.softmax(x)
    ref_row = softmax_ref(x[0:1], -1)[0]
    assert np.abs(out[0] - ref_row).max() < 1e-6
    assert np.abs(out[rows // 2] - ref_row).max() < 1e-6
    last = softmax_ref(x[-1:], -1)[0]
    assert np.abs(out[-1] - last).max() < 1e-6 and out[-1, -1] > 0.99


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_fork_while_another_thread_holds_the_output_cache_lock():
    """A fork while another thread was inside the output cache (empty_cache, or allocating a
    large output) left the child's copy of the cache's lock held: the child's first large
    output hung forever (13 of 30 children). The child now starts with a new lock."""
    stop = threading.Event()

    def churn():
        while not stop.is_set():
            attnkit.empty_cache()

    t = threading.Thread(target=churn)
    t.start()
    x = np.ones((1024, 1024), np.float32)  # a 4 MB output: from the cache
    hung = 0
    try:
        for _ in range(30):
            pid = os.fork()
            if pid == 0:  # child: one large output, then leave at once
                os._exit(0 if attnkit.softmax(x)[0, 0] > 0 else 3)
            deadline = time.monotonic() + 20
            while True:
                done, status = os.waitpid(pid, os.WNOHANG)
                if done:
                    assert os.waitstatus_to_exitcode(status) == 0
                    break
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    os.waitpid(pid, 0)
                    hung += 1
                    break
                time.sleep(0.005)
    finally:
        stop.set()
        t.join()
    assert hung == 0


def test_empty_attention_allocates_nothing():
    """No query rows: the decode kernel sized its scratch by the head dim first (D = 2^34 of an
    empty array raised MemoryError, 2^31 reserved 8.5 GB)."""
    e = np.empty((1, 1, 0, 2**34), np.float32)
    out = attnkit.attention(e, e, e)
    assert out.shape == (1, 1, 0, 2**34)


def test_thread_count_past_the_address_space_limit_is_refused():
    """Under `ulimit -v`, set_num_threads(256) passed and OpenMP then exited the process when
    it could not reserve the threads' stacks; it is refused while stacks exceed half the
    limit, and counts that fit still run."""
    code = ("import resource, attnkit, numpy as np\n"
            "resource.setrlimit(resource.RLIMIT_AS, (4 << 30, resource.getrlimit(resource.RLIMIT_AS)[1]))\n"
            "try:\n    attnkit.set_num_threads(256)\nexcept ValueError as e:\n    print('refused:', e)\n"
            "attnkit.set_num_threads(8)\na = np.ones((256, 256), np.float32)\n"
            "print('ok', float(attnkit.matmul(a, a)[0, 0]))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "refused: set_num_threads: 256 threads reserve" in r.stdout and "ok 256.0" in r.stdout
