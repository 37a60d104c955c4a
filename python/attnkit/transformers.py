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
"""
from __future__ import annotations

import torch

from . import torch as _atorch

__all__ = ["register", "attention_forward"]


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
    under ``name``, so ``attn_implementation=name`` works. Returns ``name``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, attention_forward)
    # Without a mask function for the name, transformers would build no mask at all.
    AttentionMaskInterface.register(name, sdpa_mask)
    return name
