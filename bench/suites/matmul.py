"""matmul: attnkit vs NumPy (OpenBLAS) vs torch, GFLOP/s vs the sgemm ceiling."""
import numpy as np

from harness import Case, Spec, matmul_flops
from suites.common import SHORT, close_enough, np_dtype, randn, to_torch, torch_or_none

NAME = "matmul"
SQUARE = {"tiny": [32, 96], "quick": [128, 512, 1024, 2048],
          "full": [128, 256, 512, 1000, 1024, 2048, 4096]}
SKINNY = {"tiny": [], "quick": [1], "full": [1, 4, 16, 64]}  # M, with K = N = 4096
BATCHED = {"tiny": [], "quick": [], "full": [((64, 128, 64), (64, 64, 128))]}
# bf16 squares (issue 13: the avx512_bf16 variant, torch's oneDNN bf16); NumPy has no bf16 GEMM
BF16_SQUARE = {"tiny": [], "quick": [1024, 2048], "full": [1024, 2048]}


def missing():
    """attnkit.matmul is part of attnkit from the start."""
    return None


def _spec(a, b, sweep, dtype="float32"):
    """A Spec for a @ b; heavy from 2048^3 multiply-adds."""
    label = ("x".join(map(str, a)) + "@" + "x".join(map(str, b))) if len(a) > 2 \
        else f"{a[0]}x{a[1]}x{b[1]}"
    return Spec(NAME, f"matmul {SHORT[dtype]} {label}", label, dtype,
                {"a": list(a), "b": list(b), "dtype": dtype, "sweep": sweep},
                heavy=a[-2] * a[-1] * b[-1] >= 2048**3)


def specs(cfg):
    """Square N (the GFLOP/s-vs-N plot), skinny M (memory-bound) and batched products."""
    out = [_spec((n, n), (n, n), "square") for n in SQUARE[cfg.mode]]
    out += [_spec((m, 4096), (4096, 4096), "skinny") for m in SKINNY[cfg.mode]]
    out += [_spec(a, b, "batched") for a, b in BATCHED[cfg.mode]]
    out += [_spec((n, n), (n, n), None, "bfloat16") for n in BF16_SQUARE[cfg.mode]]
    return out


def build(spec):
    """attnkit, NumPy and torch writing into preallocated outputs."""
    import attnkit

    torch = torch_or_none()
    sa, sb = tuple(spec.params["a"]), tuple(spec.params["b"])
    rng = np.random.default_rng(0)
    dtype = spec.params.get("dtype", "float32")
    a, b = randn(rng, sa, dtype), randn(rng, sb, dtype)
    shape = np.broadcast_shapes(sa[:-2], sb[:-2]) + (sa[-2], sb[-1])
    flops = matmul_flops(sa[-2], sb[-1], sa[-1], batch=int(np.prod(shape[:-2], dtype=np.int64)))
    if dtype != "float32":  # half types: attnkit against torch (NumPy has no bf16 GEMM)
        out_ak = np.empty(shape, np_dtype(dtype))
        contenders = {"attnkit": lambda: attnkit.matmul(a, b, out=out_ak)}
        if torch is not None:
            ta, tb = to_torch(a), to_torch(b)
            tout = torch.empty(shape, dtype=ta.dtype)
            contenders["torch"] = lambda: torch.matmul(ta, tb, out=tout)
        a32, b32 = a.astype(np.float32), b.astype(np.float32)
        scale = float((np.abs(a32) @ np.abs(b32)).max())
        return Case(suite=NAME, name=spec.name, contenders=contenders,
                    reference="torch" if torch is not None else "attnkit", work=flops,
                    ceiling="bf16" if dtype == "bfloat16" else "sgemm",
                    check=lambda x, y: close_enough(x, y, 1e-2, scale=scale),
                    params=spec.params)
    # One output buffer each: a shared one would make the check compare a buffer with itself.
    out_ak, out_np = np.empty(shape, np.float32), np.empty(shape, np.float32)
    contenders = {
        "attnkit": lambda: attnkit.matmul(a, b, out=out_ak),
        "numpy": lambda: np.matmul(a, b, out=out_np),
    }
    if torch is not None:
        ta, tb, tout = torch.from_numpy(a), torch.from_numpy(b), torch.empty(shape)
        contenders["torch"] = lambda: torch.matmul(ta, tb, out=tout)

    def check(x, y):
        """fp32 products: error bound scales with sum |a||b| (K-long dot products)."""
        scale = float((np.abs(a) @ np.abs(b)).max())
        return close_enough(x, y, 1e-5, scale=scale)

    return Case(suite=NAME, name=spec.name, contenders=contenders, reference="numpy",
                work=flops, ceiling="sgemm", check=check, params=spec.params)
