"""matmul: attnkit vs NumPy (OpenBLAS) vs torch (MKL), GFLOP/s vs the sgemm ceiling."""
import numpy as np

from harness import Case
from suites.common import close_enough, torch_or_none

SQUARE = [128, 256, 512, 1024, 2048]
SKINNY = [1, 4, 16]  # M, with K = N = 4096
BATCHED = [((64, 128, 64), (64, 64, 128))]


def shapes(cfg):
    out = [(f"{n}x{n}x{n}", (n, n), (n, n)) for n in SQUARE]
    out += [(f"{m}x4096x4096", (m, 4096), (4096, 4096)) for m in SKINNY]
    out += [("x".join(map(str, a)) + "@" + "x".join(map(str, b)[1:] if False else map(str, b)), a, b)
            for a, b in BATCHED]
    if cfg.full:
        out += [("4096x4096x4096", (4096, 4096), (4096, 4096)),
                ("1000x1000x1000", (1000, 1000), (1000, 1000)),
                ("64x4096x4096", (64, 4096), (4096, 4096))]
    return out


def cases(cfg):
    import attnkit

    torch = torch_or_none()
    res = []
    rng = np.random.default_rng(0)
    for label, sa, sb in shapes(cfg):
        if cfg.shape and label not in cfg.shape:
            continue
        a = rng.standard_normal(sa).astype(np.float32)
        b = rng.standard_normal(sb).astype(np.float32)
        out = np.empty(np.matmul(a[..., :1, :], b[..., :, :1]).shape[:-2] + (sa[-2], sb[-1]), np.float32)
        flops = 2.0 * out.size * sa[-1]
        contenders = {
            "attnkit": lambda a=a, b=b, out=out: attnkit.matmul(a, b, out=out),
            "numpy": lambda a=a, b=b, out=out: np.matmul(a, b, out=out),
        }
        if torch is not None:
            ta, tb, tout = torch.from_numpy(a), torch.from_numpy(b), torch.from_numpy(out.copy())
            contenders["torch"] = lambda ta=ta, tb=tb, tout=tout: torch.matmul(ta, tb, out=tout)

        def check(x, y, a=a, b=b):
            scale = float((np.abs(a) @ np.abs(b)).max())
            return close_enough(np.asarray(x), np.asarray(y), 1e-5, scale=scale)

        res.append(Case(suite="matmul", name=f"matmul f32 {label}", contenders=contenders,
                        work=flops, ceiling="sgemm", check=check,
                        params={"a": list(sa), "b": list(sb), "dtype": "float32"}))
    return res
