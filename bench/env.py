"""Machine, versions and thread control for the benchmark header and the JSON file."""
from __future__ import annotations

import datetime
import os
import platform
import re
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


def cpuinfo_field(key: str) -> Optional[str]:
    """The first `key : value` of /proc/cpuinfo (None where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (else platform's guess)."""
    return cpuinfo_field("model name") or platform.processor() or platform.machine()


_SIZE_UNITS = {"": 1, "B": 1, "K": 1 << 10, "KB": 1 << 10, "KIB": 1 << 10, "M": 1 << 20,
               "MB": 1 << 20, "MIB": 1 << 20, "G": 1 << 30, "GB": 1 << 30, "GIB": 1 << 30}
ASSUMED_LLC_BYTES = 512 << 20  # when the OS does not say: larger than most CPUs' L3 (ceilings err high)


def parse_size(text: str) -> Optional[int]:
    """'266240K', '32 MiB', '260 MiB (1 instance)', '1024' -> bytes; None if unreadable."""
    m = re.match(r"\s*([0-9.]+)\s*([KMG]?I?B?)\b", text.strip().upper())
    if not m or m.group(2) not in _SIZE_UNITS:
        return None
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def _read(path: str) -> Optional[str]:
    """A small sysfs file's stripped text, or None."""
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def llc_from_sysfs(root: str = "/sys/devices/system/cpu") -> Optional[dict]:
    """Last-level cache from sysfs: the highest-level data/unified cache of any CPU, summed over
    its distinct instances (CPUs sharing one instance list the same shared_cpu_list)."""
    best_level, instances = 0, {}
    try:
        cpus = sorted(d for d in os.listdir(root) if re.fullmatch(r"cpu[0-9]+", d))
    except OSError:
        return None
    for cpu in cpus:
        cache_dir = os.path.join(root, cpu, "cache")
        try:
            entries = sorted(d for d in os.listdir(cache_dir) if d.startswith("index"))
        except OSError:
            continue
        for idx in entries:
            base = os.path.join(cache_dir, idx)
            level, kind = _read(os.path.join(base, "level")), _read(os.path.join(base, "type"))
            size = parse_size(_read(os.path.join(base, "size")) or "")
            if not level or not level.isdigit() or kind == "Instruction" or not size:
                continue
            level = int(level)
            if level > best_level:
                best_level, instances = level, {}
            if level == best_level:
                shared = _read(os.path.join(base, "shared_cpu_list")) or f"{cpu}/{idx}"
                instances[shared] = size
    if not instances:
        return None
    return {"bytes": sum(instances.values()), "level": best_level,
            "instances": len(instances), "source": "sysfs"}


def llc_from_lscpu() -> Optional[dict]:
    """Last-level cache from `lscpu` ('L3 cache: 260 MiB (1 instance)'); None if absent."""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, timeout=5,
                             env=dict(os.environ, LC_ALL="C")).stdout
    except Exception:
        return None
    found = {}
    for line in out.splitlines():
        m = re.match(r"\s*L([1-4])d? cache:\s*(.+)", line)
        if m and parse_size(m.group(2)):
            inst = re.search(r"\((\d+) instances?\)", m.group(2))
            found[int(m.group(1))] = (parse_size(m.group(2)), int(inst.group(1)) if inst else 1)
    if not found:
        return None
    level = max(found)
    return {"bytes": found[level][0], "level": level, "instances": found[level][1],
            "source": "lscpu"}


def llc_info() -> dict:
    """The CPU's last-level cache, total over its instances: {bytes, level, instances, source}.

    Tried in order: sysfs (/sys/devices/system/cpu/cpu*/cache/index*), `lscpu`, the C library's
    sysconf(_SC_LEVEL3_CACHE_SIZE); else ASSUMED_LLC_BYTES with source "assumed". Bandwidth
    ceilings are measured on buffers several times this size, and memory-bound rows whose data
    is smaller than twice this are reported as cache-resident instead of as a % of DRAM speed.
    """
    for probe in (llc_from_sysfs, llc_from_lscpu):
        info = probe()
        if info and info["bytes"] > 0:
            return info
    try:
        size = os.sysconf("SC_LEVEL3_CACHE_SIZE")
        if size and size > 0:
            return {"bytes": int(size), "level": 3, "instances": 1, "source": "sysconf"}
    except (ValueError, OSError, AttributeError):
        pass
    return {"bytes": ASSUMED_LLC_BYTES, "level": 3, "instances": 1, "source": "assumed"}


def mem_available_bytes() -> Optional[int]:
    """MemAvailable from /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


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
        "llc": llc_info(),  # last-level cache {bytes (all instances), level, instances, source}
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
