"""Machine, versions and thread control for the benchmark header and the JSON file."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from typing import Optional

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))


def _git(*args) -> Optional[str]:
    """Output of a git command run in this checkout, or None."""
    try:
        r = subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, timeout=5)
        return r.stdout.strip() if r.returncode == 0 else None
    except Exception:
        return None


def git_commit() -> Optional[str]:
    """HEAD of the checkout the benchmarks run from."""
    return _git("rev-parse", "HEAD") or None


def git_dirty() -> Optional[bool]:
    """True when tracked files differ from HEAD (the numbers are then not of `git_commit`)."""
    out = _git("status", "--porcelain", "--untracked-files=no")
    return None if out is None else bool(out)


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (else platform's guess)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(mod_name) -> Optional[str]:
    """A module's __version__ if it imports, else None."""
    try:
        mod = __import__(mod_name)
        return getattr(mod, "__version__", "unknown")
    except Exception:
        return None


def loadavg():
    """1-, 5- and 15-minute load averages (None where the OS has none): other jobs on the machine."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine_info(threads: int) -> dict:
    """Everything needed to tell two runs' machines and builds apart."""
    import attnkit

    info = attnkit.info()
    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "machine": platform.machine(),
        "hostname": platform.node(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "torch": _version("torch"),
        "transformers": _version("transformers"),
        "attnkit": attnkit.__version__,
        "attnkit_isa": info["isa"],
        "attnkit_isas_compiled": info["isas_compiled"],
        "attnkit_openmp": info["openmp"],
        "git_commit": git_commit(),
        "git_dirty": git_dirty(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "loadavg": loadavg(),
    }


def blas_info() -> str:
    """Which BLAS NumPy uses (for the header), via threadpoolctl when present."""
    try:
        from threadpoolctl import threadpool_info

        libs = [f"{d.get('internal_api')}" for d in threadpool_info() if d.get("user_api") == "blas"]
        return ",".join(sorted(set(libs))) or "unknown"
    except Exception:
        return "unknown"


class ThreadLimit:
    """Fix every library's thread count to n (attnkit, torch, BLAS and OpenMP pools).

    Used as a context manager; restores the previous settings on exit.
    """

    def __init__(self, n: int):
        """Remember n; nothing changes before __enter__."""
        self.n = n
        self._limiter = None
        self._torch_prev = None

    def __enter__(self):
        """Apply n to threadpoolctl pools, attnkit and torch."""
        import attnkit

        try:
            from threadpoolctl import threadpool_limits

            self._limiter = threadpool_limits(self.n)
        except ImportError:
            self._limiter = None
        attnkit.set_num_threads(self.n)
        try:
            import torch

            self._torch_prev = torch.get_num_threads()
            torch.set_num_threads(self.n)
        except ImportError:
            pass
        return self

    def __exit__(self, *exc):
        """Restore the previous counts."""
        import attnkit

        attnkit.set_num_threads(None)
        if self._torch_prev is not None:
            import torch

            torch.set_num_threads(self._torch_prev)
        if self._limiter is not None:
            self._limiter.restore_original_limits()
        return False

    @staticmethod
    def describe() -> dict:
        """The thread counts each library will actually use now."""
        import attnkit

        d = {"attnkit": attnkit.get_num_threads()}
        try:
            import torch

            d["torch"] = torch.get_num_threads()
        except ImportError:
            pass
        try:
            from threadpoolctl import threadpool_info

            blas = [x["num_threads"] for x in threadpool_info() if x.get("user_api") == "blas"]
            if blas:
                d["blas"] = blas[0]
        except ImportError:
            pass
        return d
