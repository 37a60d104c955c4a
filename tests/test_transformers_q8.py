"""attnkit.transformers.QuantizedKVCache: an 8-bit KV cache for generate() (issue 15).

The cache is checked against a float cache holding exactly the dequantized values (same tokens,
same logits up to fp32 rounding: the kernels read the codes, the reference reads floats; for
int8 the reference also attends with q quantized where the decode kernel quantizes it), for
its memory, and for how it stores what it is given. The format's effect on greedy decoding is
measured on a tiny Llama trained for a few seconds on a synthetic task (slow; random-weight
models have near-tied logits everywhere, see bench/notes/decode.md).
"""
import os
import sys
import warnings

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
ml_dtypes = pytest.importorskip("ml_dtypes")
import attnkit  # noqa: E402
import attnkit.transformers as akt  # noqa: E402
from transformers.cache_utils import Cache, DynamicLayer  # noqa: E402

from test_transformers import batch, llama_gqa, make, mistral_window  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "bench"))
akt.register()
FORMATS = ["int8", "fp8_e4m3"]


def round_trip(x, fmt):
    """x quantized and dequantized, as float in x's dtype."""
    codes, scale = attnkit.quantize_kv(x.detach().float().numpy(), fmt)
    return torch.from_numpy(codes.astype(np.float32) * scale[..., None]).to(x.dtype)


def dequantized_cache(fmt):
    """A float cache that stores exactly what the 8-bit cache represents."""

    class Layer(DynamicLayer):
        def update(self, k, v, *a, **kw):
            return super().update(round_trip(k, fmt), round_trip(v, fmt), *a, **kw)

    return Cache(layer_class_to_replicate=Layer)


def quantizing_q(monkeypatch):
    """Make the float path attend with q quantized per row wherever the decode kernel runs (at
    most 16 query rows and 32 rows per kv head), as it does over an int8 cache (ARCHITECTURE.md,
    "int8 KV caches")."""
    real = akt._atorch.attention

    def attention(query, key, *a, **kw):
        sq, g = query.shape[2], query.shape[1] // key.shape[1]
        if sq <= 16 and g * sq <= 32:
            query = round_trip(query, "int8")
        return real(query, key, *a, **kw)

    monkeypatch.setattr(akt._atorch, "attention", attention)


def generate(model, ids, mask, cache, n=24):
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return model.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=1, past_key_values=cache,
                              return_dict_in_generate=True, output_logits=True)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("factory", [llama_gqa, mistral_window], ids=["llama_gqa", "mistral_window"])
def test_generate_equals_the_dequantized_float_cache(fmt, factory, monkeypatch):
    """Left-padded batch, GQA (and a sliding window): prefill over the codes (tile kernel),
    then decode steps (decode kernel), give the tokens and logits of a float cache holding
    codes * scale. Where the decode kernel over e4m3 rounds q and P to bf16 (avx512_bf16) the
    comparison runs on avx512_vnni, whose kernel does not: that rounding is held to its bound
    against float64 in test_quantized_kv.py, and may flip a near-tied token of these
    random-weight models."""
    from attnkit._runtime import _use_isa

    isa = attnkit._C._active_isa()
    if fmt == "fp8_e4m3" and isa == "avx512_bf16":
        isa = "avx512_vnni"
    model = make(factory)
    model.set_attn_implementation("attnkit")
    ids, mask = batch(2)
    cache = akt.QuantizedKVCache(fmt)
    with _use_isa(isa):
        got = generate(model, ids, mask, cache)
        if fmt == "int8":
            quantizing_q(monkeypatch)
        ref = generate(model, ids, mask, dequantized_cache(fmt))
    assert torch.equal(got.sequences, ref.sequences)
    for a, b in zip(got.logits, ref.logits):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())
    layer = cache.layers[0]
    assert layer.keys.dtype == akt._CODE_DTYPES[fmt] and layer.key_scale.dtype == torch.float32
    assert cache.get_seq_length() == ids.shape[1] + 24 - 1


def test_attention_reads_the_codes(monkeypatch):
    """Every attention call of a generate() with the cache gets the 8-bit codes and their
    scales (no dequantized copy), prefill and decode alike."""
    seen = []
    real = akt._quantized_attention

    def spy(module, query, key, value, *a, **kw):
        seen.append((key.dtype, value.dtype, tuple(key._attnkit_scale.shape), query.shape[2]))
        return real(module, query, key, value, *a, **kw)

    monkeypatch.setattr(akt, "_quantized_attention", spy)
    model = make(llama_gqa)
    model.set_attn_implementation("attnkit")
    ids, mask = batch(3)
    generate(model, ids, mask, akt.QuantizedKVCache("int8"), n=5)
    assert len(seen) == 2 * 5  # two layers, one prefill and four decode steps
    assert all(k == torch.int8 and v == torch.int8 for k, v, _, _ in seen)
    assert seen[0][3] == ids.shape[1] and all(s[3] == 1 for s in seen[2:])
    assert seen[-1][2] == (3, 2, ids.shape[1] + 4)


@pytest.mark.parametrize("fmt", FORMATS)
def test_layer_stores_codes_and_grows(fmt):
    """update() quantizes into the cache bit for bit as quantize_kv; growing past the first
    capacity keeps the earlier codes; crop and batch selection act on codes and scales."""
    layer = akt.QuantizedKVLayer(fmt)
    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(2, 3, n, 40, generator=g) for n in (7, 250, 1, 100)]
    for x in rows:
        k, v = layer.update(x, 2 * x)
    assert k.shape == (2, 3, 358, 40) and layer.keys.shape[2] >= 358
    full = torch.cat(rows, 2)
    codes, scale = attnkit.quantize_kv(full.numpy(), fmt)
    assert np.array_equal(k.contiguous().view(torch.uint8).numpy(), codes.view(np.uint8))
    assert np.array_equal(k._attnkit_scale.numpy(), scale)
    assert np.array_equal(v._attnkit_scale.numpy(), attnkit.quantize_kv((2 * full).numpy(), fmt)[1])
    layer.crop(-8)
    assert layer.get_seq_length() == 350 and layer.get_mask_sizes(1) == (351, 0)
    layer.batch_select_indices(torch.tensor([1]))
    assert layer.keys.shape[0] == 1 and layer.key_scale.shape[0] == 1
    with pytest.raises(ValueError, match="dtype must be 'int8' or 'fp8_e4m3'"):
        akt.QuantizedKVCache("int4")


def test_memory_is_half_of_fp16_plus_scales():
    """The cache's bytes per token: half of a float16 cache's, plus one float32 per token, kv
    head and K/V (measured on the tensors a float16 DynamicCache and this cache hold)."""
    model = make(llama_gqa).to(torch.float16)
    model.set_attn_implementation("attnkit")
    ids, mask = batch(2)
    dyn = transformers.DynamicCache()
    generate(model, ids, mask, dyn, n=8)
    q8 = akt.QuantizedKVCache("int8")
    generate(model, ids, mask, q8, n=8)
    fp16_bytes = sum(l.keys.nbytes + l.values.nbytes for l in dyn.layers)
    scale_bytes = sum(l.key_scale[:, :, :l.length].nbytes + l.value_scale[:, :, :l.length].nbytes
                      for l in q8.layers)
    code_bytes = sum(l.keys[:, :, :l.length].nbytes + l.values[:, :, :l.length].nbytes for l in q8.layers)
    assert code_bytes * 2 == fp16_bytes
    assert q8.nbytes() == code_bytes + scale_bytes == fp16_bytes // 2 + scale_bytes
    # the storage: whole tensors, grown by doubling in 256-position steps
    held = sum(t.nbytes for l in q8.layers for t in (l.keys, l.values, l.key_scale, l.value_scale))
    cap = q8.layers[0].keys.shape[2]
    assert q8.allocated_bytes() == held >= q8.nbytes() and cap % 256 == 0
    assert cap == max(256, -(-q8.get_seq_length() // 256) * 256) or cap < 2 * q8.get_seq_length()


# ---- the format's effect on greedy decoding (the issue's >= 95% of 64 tokens) ----

@pytest.mark.slow
def test_greedy_tokens_agree_with_the_fp32_cache():
    """bench/q8_accuracy.py's measurement: a tiny Llama trained ~40 s on a synthetic mix."""
    from q8_accuracy import agreement, train_tiny_llama

    res = agreement(train_tiny_llama(1000), prompts=16)
    assert res["int8"] >= 0.95, res
    assert res["fp8_e4m3"] >= 0.80, res
