"""softmax: attnkit vs torch.softmax vs a NumPy softmax (memory-bound: GB/s vs copy)."""
import numpy as np

from harness import Case, Spec, softmax_bytes
from suites.common import SHORT, checker, randn, to_torch, torch_or_none

NAME = "softmax"
TINY = [(64, 1000), (8, 4096)]
QUICK = [(4096, 4096), (64, 65536), (1024, 1000), (8 * 12 * 128, 128)]
FULL = QUICK + [(16384, 4096), (4096, 32768), (1, 1 << 24)]
FULL_HALF = [(4096, 4096)]  # bf16 / fp16 rows in --full only


def missing():
    """The softmax API is part of attnkit from the start."""
    return None


def numpy_softmax(x):
    """The textbook three-pass softmax over the last axis."""
    m = x.max(axis=-1, keepdims=True)
    e = np.exp(x - m)
    e /= e.sum(axis=-1, keepdims=True)
    return e


def specs(cfg):
    """Row lengths from 128 to 16M; half types only in --full."""
    shapes = {"tiny": TINY, "quick": QUICK, "full": FULL}[cfg.mode]
    out = [(r, n, "float32") for r, n in shapes]
    if cfg.mode == "full":
        out += [(r, n, dt) for r, n in FULL_HALF for dt in ("bfloat16", "float16")]
    return [Spec(NAME, f"softmax {SHORT[dt]} {r}x{n}", f"{r}x{n}", dt,
                 {"rows": r, "n": n, "dtype": dt}) for r, n, dt in out]


def build(spec):
    """attnkit (allocating and out=), NumPy (fp32 only) and torch on the same array."""
    import attnkit

    torch = torch_or_none()
    p = spec.params
    x = randn(np.random.default_rng(0), (p["rows"], p["n"]), p["dtype"])
    dst = np.empty_like(x)
    contenders = {
        "attnkit": lambda: attnkit.softmax(x),
        "attnkit out=": lambda: attnkit.softmax(x, out=dst),
    }
    if p["dtype"] == "float32":
        contenders["numpy"] = lambda: numpy_softmax(x)
    if torch is not None:
        tx = to_torch(x)
        contenders["torch"] = lambda: torch.softmax(tx, -1)
    reference = "torch" if torch is not None else "numpy"
    return Case(suite=NAME, name=spec.name, contenders=contenders, reference=reference,
                work=softmax_bytes(x.nbytes), ceiling="copy", check=checker(p["dtype"]),
                params=p)
