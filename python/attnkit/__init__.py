"""attnkit: attention, softmax and matmul kernels for CPUs, with a NumPy API.

The hot paths are C++ kernels (SIMD intrinsics chosen at run time, OpenMP threads).
``attnkit.torch`` and ``attnkit.transformers`` make it a drop-in attention backend.
"""
from ._runtime import get_num_threads, info, set_num_threads
from ._attention import (
    attention,
    attention_backward,
    attention_varlen,
    attention_with_kvcache,
    dropout_mask,
    quantize_kv,
)
from ._merge import merge_attention_states
from ._alloc import empty_cache
from ._matmul import matmul
from ._softmax import softmax

__version__ = info()["version"]

__all__ = [
    "softmax",
    "matmul",
    "attention",
    "attention_varlen",
    "attention_with_kvcache",
    "quantize_kv",
    "attention_backward",
    "merge_attention_states",
    "dropout_mask",
    "set_num_threads",
    "get_num_threads",
    "info",
    "empty_cache",
    "__version__",
]
