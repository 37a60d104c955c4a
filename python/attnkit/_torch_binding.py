"""torch tensors for the binding: shared by attnkit.torch, its merge (``_torch_merge``) and
the ring (``_ring``). The binding reads CPU tensors itself once torch's types are registered
(below, at import): it refuses a tensor on another device, of another layout or dtype, before
anything is written. ``desc`` builds the raw descriptor tuple instead (the merge and the ring
use it). Nothing here copies data except ``rows`` (documented: a head dim with non-unit
stride)."""
import torch
from torch import Tensor

from . import _C

DTYPE_NAMES = {
    torch.float32: "float32",
    torch.float64: "float64",
    torch.float16: "float16",
    torch.bfloat16: "bfloat16",
    torch.bool: "bool",
}


_C._register_torch(torch.Tensor, torch.strided, DTYPE_NAMES)


def desc(t: Tensor, writeable: bool = False):
    """A raw (pointer, shape, strides, dtype, writeable) descriptor for the binding."""
    return (t.data_ptr(), t.shape, t.stride(), DTYPE_NAMES[t.dtype], writeable)


def rows(t: Tensor) -> Tensor:
    """The kernels read the head dim with unit stride; anything else is copied (documented).
    ``t`` has at least one dim."""
    if t.stride(-1) != 1 and t.shape[-1] > 1:
        return t.contiguous()
    return t


def threads() -> int:
    """The kernels' thread count for calls from torch: torch's intra-op setting."""
    return torch.get_num_threads()
