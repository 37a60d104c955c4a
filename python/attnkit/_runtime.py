"""Loading the native module, ISA selection, threads and `info()`."""
import numbers
import os
import threading

from . import _C

_isa_lock = threading.Lock()

#: The most threads :func:`set_num_threads` accepts.
MAX_THREADS = max(256, 8 * (os.cpu_count() or 1))


# Variants ATTNKIT_CPU_ASSUME may claim (csrc/cpu/dispatch.cpp reads the variable itself).
_ASSUMABLE = ("avx512_vnni", "avx512_bf16")


def _check_assume_env():
    """ATTNKIT_CPU_ASSUME names variants to treat as supported although CPUID does not list
    their feature (a hypervisor that masks CPUID bits). Unsafe: a wrong claim is SIGILL."""
    raw = os.environ.get("ATTNKIT_CPU_ASSUME", "")
    names = [n for n in raw.replace(" ", ",").split(",") if n]
    bad = [n for n in names if n not in _ASSUMABLE]
    if bad:
        raise RuntimeError(
            f"attnkit: ATTNKIT_CPU_ASSUME={raw}: cannot assume {', '.join(bad)}; only "
            f"{', '.join(_ASSUMABLE)} can be assumed (variants whose CPUID bit a hypervisor "
            "may hide). Unset it to trust CPUID."
        )


def _select_from_env():
    _check_assume_env()
    name = os.environ.get("ATTNKIT_CPU", "auto").strip().lower() or "auto"
    try:
        _C._select_isa(name)
    except ValueError as e:
        raise RuntimeError(
            f"attnkit: cannot use the CPU kernel variant requested by {e}. "
            "Unset ATTNKIT_CPU to let attnkit choose."
        ) from None


_select_from_env()


def set_num_threads(n):
    """Set the number of threads attnkit's kernels use.

    ``n`` is a positive int up to ``max(256, 8 * os.cpu_count())`` (beyond that OpenMP would
    start more threads than any machine runs well, and aborts when the OS refuses them), and
    under an address-space limit (``ulimit -v``) whose half holds the threads' stacks;
    ``None`` or ``0`` removes the override, so the count
    follows OpenMP again (``OMP_NUM_THREADS``, ``omp_set_num_threads`` or threadpoolctl).
    The setting is process-wide and takes effect on the next call.
    """
    if n is None:
        n = 0
    if isinstance(n, bool) or not isinstance(n, numbers.Integral):
        raise TypeError(f"set_num_threads: n must be an int, got {type(n).__name__}")
    n = int(n)
    if n < 0:
        raise ValueError(f"set_num_threads: n must be >= 0, got {n}")
    if n > MAX_THREADS:
        raise ValueError(f"set_num_threads: n = {n} is more than {MAX_THREADS} threads "
                         f"(8 x the {os.cpu_count()} CPUs, at least 256)")
    room, stack = _address_space_room()
    if room is not None and n * stack > room // 2:
        raise ValueError(f"set_num_threads: {n} threads reserve ~{n * stack >> 20} MB of stacks, "
                         f"more than half of the {room >> 20} MB of address space this process "
                         f"has left under its limit (ulimit -v); OpenMP would abort the process "
                         f"starting them")
    _C._set_num_threads(n)


def _address_space_room():
    """(bytes of address space left under RLIMIT_AS, or None without a limit; bytes a new
    thread's stack reserves: the RLIMIT_STACK soft limit, 8 MB where that is unlimited)."""
    try:
        import resource
    except ImportError:  # not POSIX
        return None, 0
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft == resource.RLIM_INFINITY:
        return None, 0
    stack = resource.getrlimit(resource.RLIMIT_STACK)[0]
    if stack == resource.RLIM_INFINITY or stack <= 0:
        stack = 8 << 20
    used = 0
    try:
        with open("/proc/self/statm") as f:  # first field: the virtual size in pages
            used = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    return max(0, soft - used), stack


def get_num_threads():
    """The number of threads the next kernel call will use.

    That is the value given to :func:`set_num_threads`, else OpenMP's ``omp_get_max_threads()``
    (1 in a child process forked from a parent that ran kernels: OpenMP cannot be used there).
    """
    return _C._resolve_num_threads()


def _cuda_unverified(mod):
    """The CUDA paths that have not yet run on a GPU, each with whether it is switched on."""
    out = {}
    if hasattr(mod, "backward_kernel_enabled"):
        out["decode_kernel (ATTNKIT_CUDA_DECODE=1)"] = mod.decode_kernel_enabled()
        out["attention_backward (ATTNKIT_CUDA_BACKWARD=1)"] = mod.backward_kernel_enabled()
    if hasattr(mod, "cutlass_gemm_built") and mod.cutlass_gemm_built():
        out["cutlass_sm90_matmul (ATTNKIT_CUDA_CUTLASS_GEMM=1)"] = mod.cutlass_gemm_enabled()
    if hasattr(mod, "hopper_kernel_built") and mod.hopper_kernel_built():
        out["hopper_attention (ATTNKIT_CUDA_HOPPER=1)"] = mod.hopper_kernel_enabled()
    return out


def info():
    """A dict describing this build and machine.

    Keys: ``version``, ``isa`` (the variant in use), ``isas`` (every variant with its
    ``compiled``/``supported``/``verified``/``assumed`` flags, ``auto_skip`` (None, or why
    ``auto`` passes the variant over although it may be forced) and ``kernels``, the kernels it
    compiles itself: ``avx512_vnni`` has only ``attention_fwd``, whose int8 decode it replaces,
    and uses ``avx512``'s for the rest; ``avx512_bf16`` has ``gemm`` and ``attention_fwd``, its
    bf16 paths, and uses ``avx512_vnni``'s for the rest; ``amx`` and ``amx_emulated`` have
    ``gemm``, ``attention_fwd`` and ``attention_bwd``, their bf16 paths on AMX tiles or on a software model of
    them), and ``unsupported``
    (None, or why a compiled variant cannot run here), ``isas_compiled``,
    ``unverified_isas``, ``assumed_isas`` (variants supported only because
    ``ATTNKIT_CPU_ASSUME`` names them: CPUID does not list their feature; ``auto`` takes one
    only if it is also verified and has no ``auto_skip``), ``openmp``, ``threads``,
    ``cuda_built``, ``cuda_available``, ``cuda_devices`` (and, with the CUDA build,
    ``cuda_archs``, ``cuda_runtime``, ``cuda_device_names`` and ``cuda_unverified``: the CUDA
    paths that have not passed the GPU tests on a real GPU, each with whether it is on; they
    are off unless their environment variable turns them on: ``ATTNKIT_CUDA_DECODE=1`` for the
    decode kernel, ``ATTNKIT_CUDA_BACKWARD=1`` for attention_backward on device arrays,
    ``ATTNKIT_CUDA_CUTLASS_GEMM=1`` for fp16/bf16 matmul on CUTLASS's sm90 kernel and
    ``ATTNKIT_CUDA_HOPPER=1`` for the Hopper attention forward, in builds that have them).
    """
    isas = _C._isa_list()
    cuda_built, cuda_available, cuda_devices = False, False, 0
    cuda = {}
    try:  # the optional CUDA module
        from . import _cuda  # noqa: F401

        cuda_built = True
        cuda_devices = _cuda.device_count()
        cuda_available = cuda_devices > 0
        cuda = {
            "cuda_archs": getattr(_cuda, "compiled_archs", None),
            "cuda_runtime": _cuda.runtime_version() if hasattr(_cuda, "runtime_version") else None,
            "cuda_device_names": [_cuda.device_name(i) for i in range(cuda_devices)]
            if hasattr(_cuda, "device_name") else [],
            "cuda_unverified": _cuda_unverified(_cuda),
        }
    except ImportError:
        pass
    return {
        "version": _C.__version__,
        "isa": _C._active_isa(),
        "isas": isas,
        "isas_compiled": [i["name"] for i in isas if i["compiled"]],
        "unverified_isas": [i["name"] for i in isas if i["compiled"] and not i["verified"]],
        "assumed_isas": [i["name"] for i in isas if i["assumed"]],
        "openmp": _C._openmp(),
        "threads": get_num_threads(),
        "cuda_built": cuda_built,
        "cuda_available": cuda_available,
        "cuda_devices": cuda_devices,
        **cuda,
    }


class _use_isa:
    """Context manager (tests only): run kernels with another compiled ISA variant."""

    def __init__(self, name):
        self.name = name

    def __enter__(self):
        _isa_lock.acquire()
        self.prev = _C._active_isa()
        _C._select_isa(self.name)
        return self

    def __exit__(self, *exc):
        _C._select_isa(self.prev)
        _isa_lock.release()
        return False
