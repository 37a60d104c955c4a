import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(script, *args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "examples", script), *args],
                          capture_output=True, text=True, timeout=300)


def test_self_attention_example():
    r = run("self_attention.py")
    assert r.returncode == 0, r.stderr
    assert "OK" in r.stdout


def test_gpt2_generate_example_without_weights():
    pytest.importorskip("transformers")
    r = run("gpt2_generate.py", "--max-new-tokens", "12")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "RANDOM weights" in r.stdout
    assert "same tokens as attn_implementation='sdpa': True" in r.stdout


def test_ring_attention_example():
    """Two local processes over gloo: every rank's output and gradients match one process."""
    r = run("ring_attention.py", "--world", "2", "--seq", "203")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.count("-> OK") == 2, r.stdout
