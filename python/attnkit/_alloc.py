"""Output allocation with a small cache of large buffers.

A freshly allocated large array costs the kernel a page fault and the OS zeroing every page on
first touch: for a 64 MB softmax output that was 4-20 ms on top of a 5.5 ms kernel (bench/notes/softmax.md).
Outputs of at least ``_MIN_BYTES`` are therefore carved from buffers that are kept, up to
``ATTNKIT_OUTPUT_CACHE_MB`` megabytes (default 256; 0 disables), after every array using them
is gone, and reused for the next output of the same size -- what PyTorch's caching allocator
does on GPUs. ``attnkit.empty_cache()`` returns the cached memory to the OS.

Safety: the returned array's memory is owned by a holder object, and every view of the array
keeps that holder alive (NumPy points views at the owner), so a buffer goes back to the cache
only when nothing can see it any more.
"""
import collections
import math
import os
import sys
import threading

import numpy as np

_MIN_BYTES = 4 << 20
_lock = threading.Lock()
_free = {}  # nbytes -> list of uint8 buffers
_cached_bytes = 0
# Buffers whose last array died. __del__ only appends here (deque.append is atomic and never
# blocks): garbage collection can run __del__ on a thread that already holds _lock, so
# taking the lock there could deadlock. The queue is drained under the lock by empty().
_released = collections.deque()


def _cap_bytes():
    try:
        return max(0, int(os.environ.get("ATTNKIT_OUTPUT_CACHE_MB", "256"))) << 20
    except ValueError:
        return 256 << 20


class _Holder:
    """Owns one cached buffer; exposes it to NumPy; returns it to the cache when collected."""

    __slots__ = ("buf", "fresh", "__array_interface__")

    def __init__(self, buf, shape, dtype, fresh):
        self.buf = buf
        self.fresh = fresh
        self.__array_interface__ = {
            "shape": tuple(shape),
            "typestr": np.dtype(dtype).str,
            "descr": np.dtype(dtype).descr,
            "data": (buf.ctypes.data, False),
            "version": 3,
        }

    def __del__(self):
        _released.append(self.buf)


def _drain_released():
    """Move released buffers into the cache (caller holds _lock), up to the cap."""
    global _cached_bytes
    cap = _cap_bytes()
    while True:
        try:
            buf = _released.popleft()
        except IndexError:
            return
        if _cached_bytes + buf.nbytes <= cap:
            _free.setdefault(buf.nbytes, []).append(buf)
            _cached_bytes += buf.nbytes


def empty(shape, dtype):
    """An uninitialized C-contiguous array, from the buffer cache when it is large."""
    global _cached_bytes
    dtype = np.dtype(dtype)
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: np.prod cost ~3 us per call
    if nbytes < _MIN_BYTES or _cap_bytes() == 0 or dtype.hasobject:
        return np.empty(shape, dtype)
    with _lock:
        _drain_released()
        bufs = _free.get(nbytes)
        buf = bufs.pop() if bufs else None
        if buf is not None:
            _cached_bytes -= nbytes
    fresh = buf is None
    if fresh:
        buf = np.empty(nbytes, np.uint8)
    arr = np.asarray(_Holder(buf, shape, dtype, fresh))
    if arr.dtype != dtype:  # extension dtypes (ml_dtypes.bfloat16) come back as raw void
        arr = arr.view(dtype)
    return arr


def is_fresh(arr):
    """Whether ``arr`` (from :func:`empty`) is new memory that has never been written -- its
    pages fault in, zeroed by the OS, on the first write -- rather than a reused cached buffer.
    Kernels that may use non-temporal stores use ordinary ones on fresh memory."""
    b = arr.base
    while b is not None and not isinstance(b, _Holder):
        b = getattr(b, "base", None)
    return True if b is None else b.fresh


def empty_cache():
    """Release the cached output buffers (see ATTNKIT_OUTPUT_CACHE_MB) and, if ring attention
    ran, its reused scratch buffers."""
    global _cached_bytes
    with _lock:
        _released.clear()
        _free.clear()
        _cached_bytes = 0
    ring = sys.modules.get("attnkit._ring")
    if ring is not None:
        ring.empty_cache()


def _after_fork_in_child():
    """A fork while another thread held _lock left the child's copy locked forever (its first
    large output then hung), and the cache half-updated: the child starts with a new lock and
    an empty cache (buffers still used by live arrays return to it as usual)."""
    global _lock, _free, _cached_bytes
    _lock = threading.Lock()
    _free = {}
    _cached_bytes = 0
    _released.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def cached_bytes():
    """Bytes currently held in the output cache."""
    with _lock:
        _drain_released()
        return _cached_bytes
