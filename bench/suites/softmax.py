"""softmax: attnkit vs torch.softmax vs a NumPy softmax (memory-bound: GB/s vs copy)."""
import numpy as np

from harness import Case
from suites.common import close_enough, torch_or_none

QUICK = [(4096, 4096), (64, 65536), (1024, 1000), (8 * 12 * 128, 128)]
FULL = QUICK + [(16384, 4096), (4096, 32768), (1, 1 << 24)]


def numpy_softmax(x):
    m = x.max(axis=-1, keepdims=True)
    e = np.exp(x - m)
    e /= e.sum(axis=-1, keepdims=True)
    return e


def cases(cfg):
    import attnkit

    torch = torch_or_none()
    out = []
    for rows, n in FULL if cfg.full else QUICK:
        if cfg.shape and f"{rows}x{n}" not in cfg.shape:
            continue
        x = np.random.default_rng(0).standard_normal((rows, n)).astype(np.float32)
        dst = np.empty_like(x)
        contenders = {
            "attnkit": lambda x=x: attnkit.softmax(x),
            "attnkit out=": lambda x=x, dst=dst: attnkit.softmax(x, out=dst),
            "numpy": lambda x=x: numpy_softmax(x),
        }
        if torch is not None:
            tx = torch.from_numpy(x)
            contenders["torch"] = lambda tx=tx: torch.softmax(tx, -1).numpy()
        out.append(
            Case(
                suite="softmax",
                name=f"softmax f32 {rows}x{n}",
                contenders=contenders,
                work=2 * x.nbytes,  # read x, write out
                ceiling="copy",
                check=lambda a, b: close_enough(a, b, 1e-5),
                params={"rows": rows, "n": n, "dtype": "float32"},
            )
        )
    return out
