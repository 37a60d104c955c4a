"""Hugging Face transformers integration: ``attn_implementation="attnkit"``.

    import attnkit.transformers
    attnkit.transformers.register()            # once
    model = AutoModelForCausalLM.from_pretrained(path, attn_implementation="attnkit")
    # or: model.set_attn_implementation("attnkit")

The attention function runs on attnkit's kernels through ``attnkit.torch`` (autograd
included). It takes transformers' SDPA-style boolean masks (the mask function registered with
``AttentionMaskInterface`` is sdpa's), reads GQA k/v heads without ``repeat_kv`` copies, follows
the ``is_causal`` rules of transformers' sdpa path, supports ``sliding_window``, ``softcap`` (which
the sdpa path refuses), training dropout and additive ``position_bias`` / float masks, returns
(B, Sq, H, D), and uses the decode kernel during ``generate()`` (one query row per step).

:class:`QuantizedKVCache` keeps the KV cache in 8 bits (int8 or float8 e4m3fn, one float32
scale per token and kv head, see ``attnkit.quantize_kv``); with ``attn_implementation="attnkit"``
the kernels read the 8-bit cache directly::

    cache = attnkit.transformers.QuantizedKVCache("int8")
    model.generate(ids, past_key_values=cache, max_new_tokens=64)

Context parallelism (:func:`context_parallel`): a forward, or a training step, with the sequence
sharded over the ranks of a ``torch.distributed`` group, attention through
``attnkit.torch.ring_attention`` ("attnkit_ring"), positions kept global::

    batch = attnkit.transformers.shard_inputs(ids, labels=ids)   # this rank's shard
    with attnkit.transformers.context_parallel(model):
        out = model(**batch, use_cache=False)
    out.loss.backward()                                          # this rank's share of the loss
    for p in model.parameters():                                 # sum the shares' gradients
        torch.distributed.all_reduce(p.grad)
"""
from __future__ import annotations

import contextlib
import math

import torch

from . import _C
from . import torch as _atorch

__all__ = ["register", "attention_forward", "QuantizedKVCache", "QuantizedKVLayer",
           "context_parallel", "shard_inputs", "ring_attention_forward"]

_CODE_DTYPES = {"int8": torch.int8, "fp8_e4m3": torch.float8_e4m3fn,
                "float8_e4m3fn": torch.float8_e4m3fn}


def _desc(t: torch.Tensor, writeable: bool = False):
    """Raw (pointer, shape, strides, dtype, writeable) descriptor, 8-bit dtypes included."""
    return (t.data_ptr(), tuple(t.shape), t.stride(), str(t.dtype).replace("torch.", ""), writeable)


def _quantized_attention(module, query, key, value, attention_mask, scaling, is_causal,
                         sliding_window, softcap):
    """Attention over a QuantizedKVCache layer's codes: ``key`` / ``value`` are its (B, Hkv, L,
    D) code views, their scales ride along as ``_attnkit_scale``. Inference only (the cache is
    not differentiable). Returns (B, Sq, H, Dv) in query's dtype."""
    if torch.is_grad_enabled() and query.requires_grad:
        raise RuntimeError("attnkit QuantizedKVCache: attention over an 8-bit cache has no "
                           "backward; run generation under torch.no_grad()")
    B, H, Sq, D = query.shape
    L, Dv = key.shape[2], value.shape[3]
    out = torch.empty((B, Sq, H, Dv), dtype=query.dtype)
    mask = None
    if attention_mask is not None:
        if attention_mask.dtype not in (torch.bool, query.dtype):
            attention_mask = attention_mask.to(query.dtype)
        mask = _desc(attention_mask[..., :L].expand(B, H, Sq, L))
    q = query if query.stride(-1) == 1 else query.contiguous()
    wl, wr = (int(sliding_window) - 1, -1) if sliding_window else (-1, -1)
    scale = float(scaling) if scaling is not None else 1.0 / math.sqrt(D)
    _C.attention(_desc(q), _desc(key), _desc(value), _desc(out.transpose(1, 2), True), None, mask,
                 None, None, None, None, None, B, scale, float(softcap or 0.0), is_causal,
                 not is_causal, wl, wr, 0.0, 0, 0, torch.get_num_threads(), None, None,
                 "attnkit.transformers attention", _desc(key._attnkit_scale),
                 _desc(value._attnkit_scale))  # positional: cheaper than keywords (_cpu_backend)
    return out


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                      is_causal=None, sliding_window=None, softcap=None, position_bias=None,
                      **kwargs):
    """transformers attention function: query (B, H, Sq, D), key/value (B, Hkv, Sk, D)."""
    if kwargs.get("output_attentions", False):
        raise ValueError("attnkit attention does not return attention weights; use "
                         "attn_implementation='eager' for output_attentions=True")
    q_len = query.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # transformers' sdpa rule: the causal flag stands in for a mask only when there is none and
    # more than one query row (a single decode row sees every cached key).
    is_causal = q_len > 1 and attention_mask is None and bool(is_causal)
    if attention_mask is not None and attention_mask.dim() == 4:
        attention_mask = attention_mask[:, :, :, : key.shape[2]]
    if position_bias is not None:
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False
    if attention_mask is not None and attention_mask.dtype not in (torch.bool, query.dtype):
        attention_mask = attention_mask.to(query.dtype)
    if key.dtype in (torch.int8, torch.float8_e4m3fn) and hasattr(key, "_attnkit_scale"):
        return _quantized_attention(module, query, key, value, attention_mask, scaling, is_causal,
                                    sliding_window if sliding_window and sliding_window > 0 else None,
                                    softcap), None
    window = None
    if sliding_window is not None and sliding_window > 0:
        # transformers' window: a query sees itself and the sliding_window - 1 keys before it.
        window = (int(sliding_window) - 1, -1)
    out = _atorch.attention(query, key, value, attn_mask=attention_mask,
                            dropout_p=float(dropout) if module.training else 0.0,
                            is_causal=is_causal, scale=scaling, softcap=softcap, window=window,
                            bottom_right=not is_causal, bshd_out=True)
    return out, None


def register(name: str = "attnkit") -> str:
    """Register attnkit with transformers' ``AttentionInterface`` and ``AttentionMaskInterface``
    under ``name``, so ``attn_implementation=name`` works, and the context-parallel attention
    under ``RING_NAME`` ("attnkit_ring", see :func:`context_parallel`). Returns ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attention_forward)
    # Without a mask function for the name, transformers would build no mask at all.
    AttentionMaskInterface.register(name, sdpa_mask)
    AttentionInterface.register(RING_NAME, ring_attention_forward)
    AttentionMaskInterface.register(RING_NAME, _ring_mask)
    return name


# ---- context parallelism: the sequence sharded over ranks ---------------------------------------

RING_NAME = "attnkit_ring"
_cp_stack: list = []  # (group, sharding) of the active context_parallel blocks


def _ring_mask(*args, attention_mask=None, **kwargs):
    """The mask function of "attnkit_ring": no mask (ring_attention applies causality over
    global positions). A padding mask cannot be sharded with the keys it masks: refused on
    every rank (one all_reduce of a flag: left padding sits in one rank's shard only, and a
    rank that raised alone left the others waiting in ring_attention's collectives)."""
    if attention_mask is None:
        return None
    padded = torch.tensor([0 if bool(attention_mask.all()) else 1], dtype=torch.int64)
    if _cp_stack:
        import torch.distributed as dist

        from ._ring import _summary_device, group_info

        g, _, _ = group_info(_cp_stack[-1][0], "attnkit.transformers context_parallel")
        padded = padded.to(_summary_device(g))
        dist.all_reduce(padded, op=dist.ReduceOp.MAX, group=g)
    if int(padded.item()):
        raise ValueError("attnkit.transformers context_parallel: padding (an attention_mask with "
                         "zeros, on this rank or another) is not supported; pass sequences "
                         "without padding")
    return None


def ring_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                           is_causal=None, sliding_window=None, softcap=None, **kwargs):
    """transformers attention function of "attnkit_ring": this rank's query shard (B, H, S_r,
    D) against every rank's keys, through ``attnkit.torch.ring_attention`` with the group and
    sharding of the enclosing :func:`context_parallel`. Returns (B, S_r, H, Dv)."""
    fn = "attnkit.transformers context_parallel"
    if not _cp_stack:
        raise RuntimeError(f"{fn}: attn_implementation='{RING_NAME}' runs inside "
                           "attnkit.transformers.context_parallel(model, group=...)")
    group, sharding = _cp_stack[-1]
    if kwargs.get("output_attentions", False):
        raise ValueError(f"{fn}: attention weights are not returned (output_attentions=True)")
    if attention_mask is not None:
        raise ValueError(f"{fn}: the model passed an attention mask; ring attention takes only "
                         "causal or full attention (no padding, no custom masks)")
    if sliding_window is not None and sliding_window > 0:
        raise NotImplementedError(f"{fn}: sliding-window attention is not supported")
    if softcap:
        raise NotImplementedError(f"{fn}: attention logit softcapping is not supported")
    if dropout and module.training:
        raise NotImplementedError(f"{fn}: attention dropout is not supported (set the model's "
                                  "attention dropout to 0)")
    if key.shape[2] != query.shape[2]:
        raise NotImplementedError(f"{fn}: keys beyond the query shard (a KV cache, i.e. "
                                  "generation) are not supported; generation stays single-process")
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    out = _atorch.ring_attention(query, key, value, group=group, is_causal=bool(is_causal),
                                 scale=scaling, enable_gqa=query.shape[1] != key.shape[1],
                                 sharding=sharding)
    return out.transpose(1, 2), None


@contextlib.contextmanager
def context_parallel(model, group=None, *, sharding: str = "zigzag"):
    """Run ``model``'s forward with the sequence sharded over the ranks of ``group``.

    Inside the block the model's attention is ``attnkit.torch.ring_attention``
    (attn_implementation "attnkit_ring", restored on exit); every rank calls the model on its
    shard of the sequence -- ``input_ids`` and the **global** ``position_ids`` cut by
    :func:`shard_inputs` (or ``attnkit.torch.shard_sequence``) with the same ``sharding`` --
    and gets its shard of the hidden states / logits (``attnkit.torch.unshard_sequence``
    gathers them). Everything outside attention is per token, so only attention talks to
    other ranks. The backward (``loss.backward()``, also after the block) runs the ring
    backward on every rank; sum the parameters' gradients over the group afterwards
    (``all_reduce``), since each rank's loss is its share.

    Limits: causal or full self-attention without a padding mask, no sliding window, softcap
    or attention dropout (each refused with an error); no KV cache: ``generate()`` stays
    single-process. Pass ``use_cache=False``. Every rank must run the same model with the same
    weights. The CPU path is tested; CUDA (NCCL) follows ``ring_attention``.
    """
    from ._ring import _SHARDINGS, group_info

    fn = "attnkit.transformers.context_parallel"
    if sharding not in _SHARDINGS:
        raise ValueError(f"{fn}: sharding must be 'zigzag' or 'contiguous', got {sharding!r}")
    group_info(group, fn)
    if not hasattr(model, "set_attn_implementation"):
        raise TypeError(f"{fn}: model must be a transformers PreTrainedModel, got "
                        f"{type(model).__name__}")
    register()
    previous = model.config._attn_implementation
    model.set_attn_implementation(RING_NAME)
    _cp_stack.append((group, sharding))
    try:
        yield model
    finally:
        _cp_stack.pop()
        model.set_attn_implementation(previous)


def shard_inputs(input_ids, *, labels=None, group=None, sharding: str = "zigzag",
                 ignore_index: int = -100) -> dict:
    """This rank's shard of a causal-LM batch, as keyword arguments for the model.

    ``input_ids`` (B, S) is the whole batch (the same on every rank). Returns ``input_ids``
    and ``position_ids`` (global positions, so rotary embeddings see the true ones) cut with
    ``attnkit.torch.shard_sequence``. With ``labels`` (B, S): the targets shifted left by one
    over the **whole** sequence before sharding (so the target of a shard's last token, which
    lives on another rank, is not lost), as ``labels`` and ``shift_labels``, and
    ``num_items_in_batch``, the number of targets of the whole batch: transformers' loss is then
    this rank's sum over the global count, and the ranks' losses add up to the single-process
    mean.
    """
    fn = "attnkit.transformers.shard_inputs"
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        raise ValueError(f"{fn}: input_ids must be a (B, S) tensor")
    if labels is not None and (not isinstance(labels, torch.Tensor) or labels.shape != input_ids.shape):
        raise ValueError(f"{fn}: labels must be a tensor of input_ids' shape {tuple(input_ids.shape)}")
    B, S = input_ids.shape
    positions = torch.arange(S, device=input_ids.device).unsqueeze(0).expand(B, S)
    # contiguous: a contiguous shard of a (B >= 2, S) tensor is a strided view, and
    # transformers' loss views its labels flat
    shard = lambda t: _atorch.shard_sequence(t, 1, group, sharding=sharding).contiguous()  # noqa: E731
    out = {"input_ids": shard(input_ids), "position_ids": shard(positions)}
    if labels is not None:
        shifted = torch.nn.functional.pad(labels[:, 1:], (0, 1), value=ignore_index)
        out["labels"] = out["shift_labels"] = shard(shifted)
        out["num_items_in_batch"] = (shifted != ignore_index).sum()
    return out


# ---- an 8-bit KV cache for generate() ------------------------------------------------------------

try:
    from transformers.cache_utils import Cache as _Cache, CacheLayerMixin as _CacheLayerMixin
except ImportError:  # transformers not installed: the classes below still import, and refuse
    class _CacheLayerMixin:  # noqa: D101 - placeholder
        def __init__(self, *a, **k):
            raise ImportError("attnkit.transformers.QuantizedKVCache needs transformers")

    _Cache = _CacheLayerMixin


class QuantizedKVLayer(_CacheLayerMixin):
    """One layer of :class:`QuantizedKVCache`: keys and values as 8-bit codes (B, Hkv, capacity, D)
    with one float32 scale per (batch, kv head, position), grown by doubling.

    ``update`` quantizes the new rows straight into the cache (attnkit's quantize kernel writes
    the codes and scales in place; nothing float is kept) and returns (B, Hkv, L, D) views of the
    codes that carry their scales, which attnkit's attention reads in 8 bits. Other attention
    implementations cannot read them (they get int8 / float8 tensors and raise).
    """

    is_sliding = False
    is_compileable = False
    is_croppable = True

    def __init__(self, dtype: str = "int8", **kwargs):
        super().__init__()
        if dtype not in _CODE_DTYPES:
            raise ValueError(f"QuantizedKVCache: dtype must be 'int8' or 'fp8_e4m3', got {dtype!r}")
        self.code_dtype = _CODE_DTYPES[dtype]
        self.length = 0
        self.key_scale = self.value_scale = None

    def lazy_initialization(self, key_states, value_states):
        if key_states.device.type != "cpu":
            raise NotImplementedError("QuantizedKVCache keeps CPU tensors (attnkit's CPU kernels)")
        B, Hkv, _, D = key_states.shape
        Dv = value_states.shape[-1]
        self.device = key_states.device
        self.keys = torch.empty((B, Hkv, 0, D), dtype=self.code_dtype)
        self.values = torch.empty((B, Hkv, 0, Dv), dtype=self.code_dtype)
        self.key_scale = torch.empty((B, Hkv, 0), dtype=torch.float32)
        self.value_scale = torch.empty((B, Hkv, 0), dtype=torch.float32)
        self.length = 0
        self.is_initialized = True

    def _grow(self, need):
        cap = self.keys.shape[2]
        if need <= cap:
            return
        new_cap = max(need, 2 * cap, 256)
        new_cap = -(-new_cap // 256) * 256

        def grown(t):  # the 8-bit codes / scales copied as they are, never dequantized
            g = torch.empty(t.shape[:2] + (new_cap,) + t.shape[3:], dtype=t.dtype)
            g[:, :, :self.length] = t[:, :, :self.length]
            return g

        self.keys, self.values = grown(self.keys), grown(self.values)
        self.key_scale, self.value_scale = grown(self.key_scale), grown(self.value_scale)

    def _views(self):
        k, v = self.keys[:, :, :self.length], self.values[:, :, :self.length]
        k._attnkit_scale = self.key_scale[:, :, :self.length]
        v._attnkit_scale = self.value_scale[:, :, :self.length]
        return k, v

    def update(self, key_states, value_states, *args, **kwargs):
        """Quantize the new (B, Hkv, n, D) rows into the cache; return the code views."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[2]
        self._grow(self.length + n)
        sl = slice(self.length, self.length + n)
        for x, codes, scale in ((key_states, self.keys, self.key_scale),
                                (value_states, self.values, self.value_scale)):
            x = x.detach()
            if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
                x = x.float()
            if x.stride(-1) != 1:
                x = x.contiguous()
            _C.quantize_kv(_desc(x), _desc(codes[:, :, sl], True), _desc(scale[:, :, sl], True),
                           fn="QuantizedKVCache.update")
        self.length += n
        return self._views()

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        """Bytes of the filled part: codes plus scales (the cache object's memory per token)."""
        if not self.is_initialized:
            return 0
        B, Hkv = self.keys.shape[:2]
        return self.length * B * Hkv * (self.keys.shape[3] + self.values.shape[3] + 8)

    def allocated_bytes(self) -> int:
        """Bytes of the storage: codes plus scales at the current capacity (>= nbytes())."""
        if not self.is_initialized:
            return 0
        return sum(t.numel() * t.element_size()
                   for t in (self.keys, self.values, self.key_scale, self.value_scale))

    def reset(self):
        self.keys = self.values = self.key_scale = self.value_scale = None
        self.length = 0
        self.is_initialized = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError("crop takes a negative number of tokens to remove")
        self.length = max(0, self.length + tokens_to_remove)

    def reorder_cache(self, beam_idx):
        if self.is_initialized:
            idx = beam_idx.to("cpu")
            self.keys, self.values = self.keys.index_select(0, idx), self.values.index_select(0, idx)
            self.key_scale = self.key_scale.index_select(0, idx)
            self.value_scale = self.value_scale.index_select(0, idx)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.is_initialized:
            r = lambda t: t.repeat_interleave(repeats, dim=0)
            self.keys, self.values = r(self.keys), r(self.values)
            self.key_scale, self.value_scale = r(self.key_scale), r(self.value_scale)

    def batch_select_indices(self, indices) -> None:
        if self.is_initialized:
            self.keys, self.values = self.keys[indices], self.values[indices]
            self.key_scale, self.value_scale = self.key_scale[indices], self.value_scale[indices]


class QuantizedKVCache(_Cache):
    """A transformers ``Cache`` holding keys and values in 8 bits for attnkit's kernels.

    ``dtype``: ``"int8"`` (symmetric, scale = max|row| / 127) or ``"fp8_e4m3"`` (float8
    e4m3fn, scale = max|row| / 448), one float32 scale per token and kv head
    (``attnkit.quantize_kv``). Pass it to ``generate(..., past_key_values=cache)`` (or
    ``cache=``) of a model loaded with ``attn_implementation="attnkit"`` (after
    :func:`register`): new keys/values are quantized into the cache as they come, and attention
    (prefill and decode) reads the codes and scales directly, with no dequantized copy. The
    cached tokens take half the bytes of a float16 cache plus 8 bytes per token and kv head
    (:meth:`nbytes`); the storage grows by doubling, in steps of 256 positions, so it holds up to
    twice the tokens (at least 256) per layer (:meth:`allocated_bytes`). CPU tensors,
    inference only; layers are created as the model asks for them (``config`` is accepted for
    symmetry with transformers' caches and unused).
    """

    def __init__(self, dtype: str = "int8", config=None):
        if dtype not in _CODE_DTYPES:
            raise ValueError(f"QuantizedKVCache: dtype must be 'int8' or 'fp8_e4m3', got {dtype!r}")
        self.code_dtype_name = dtype
        super().__init__(layer_class_to_replicate=lambda: QuantizedKVLayer(dtype))

    def nbytes(self) -> int:
        """Bytes of the cached tokens over every layer: codes plus their float32 scales."""
        return sum(layer.nbytes() for layer in self.layers)

    def allocated_bytes(self) -> int:
        """Bytes of the storage over every layer (the capacity, not only the cached tokens)."""
        return sum(layer.allocated_bytes() for layer in self.layers)
