"""attn_implementation="attnkit" on tiny transformers models built from configs (no downloads)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")
import attnkit.transformers as akt  # noqa: E402

akt.register()


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=2, n_head=4, n_embd=64, vocab_size=128, n_positions=256, bos_token_id=0, eos_token_id=1))


def llama_gqa():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, hidden_size=64,
        intermediate_size=128, vocab_size=128, max_position_embeddings=256, bos_token_id=0,
        eos_token_id=1, pad_token_id=1))


def mistral_window():
    return transformers.MistralForCausalLM(transformers.MistralConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
        intermediate_size=128, vocab_size=128, max_position_embeddings=256, sliding_window=6,
        bos_token_id=0, eos_token_id=1, pad_token_id=1))


def gemma2_softcap():
    return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
        head_dim=16, intermediate_size=128, vocab_size=128, max_position_embeddings=256,
        sliding_window=8, attn_logit_softcapping=5.0, final_logit_softcapping=None,
        query_pre_attn_scalar=16, bos_token_id=0, eos_token_id=1, pad_token_id=1))


DECODERS = {"gpt2": (gpt2, "sdpa"), "llama": (llama_gqa, "sdpa"), "mistral": (mistral_window, "sdpa"),
            "gemma2": (gemma2_softcap, "eager")}


def batch(seed=0, B=3, S=24, vocab=128):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(2, vocab, (B, S), generator=g)
    mask = torch.ones(B, S, dtype=torch.long)
    mask[1, :7] = 0   # left padding, different prompt lengths
    mask[2, :15] = 0
    return ids, mask


def make(factory):
    torch.manual_seed(0)
    return factory().eval()


@pytest.mark.parametrize("name", list(DECODERS))
def test_logits_match_reference(name):
    factory, ref_impl = DECODERS[name]
    model = make(factory)
    ids, mask = batch()
    with torch.no_grad():
        model.set_attn_implementation(ref_impl)
        ref = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("attnkit")
        got = model(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert (got - ref)[keep].abs().max() < 1e-4


@pytest.mark.parametrize("name", list(DECODERS))
def test_greedy_generate_identical(name):
    factory, ref_impl = DECODERS[name]
    model = make(factory)
    ids, mask = batch(1)
    kw = dict(attention_mask=mask, max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=1)
    with torch.no_grad():
        model.set_attn_implementation(ref_impl)
        ref = model.generate(ids, **kw)
        model.set_attn_implementation("attnkit")
        got = model.generate(ids, **kw)
    assert got.shape[1] == ids.shape[1] + 32
    assert torch.equal(got, ref)


def train_grads(factory, impl, ids, mask):
    model = make(factory)
    model.train()
    for m in model.modules():  # no dropout: compare the deterministic gradient
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model.set_attn_implementation(impl)
    out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    out.loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(got, ref):
    for n, g in ref.items():
        assert (got[n] - g).abs().max() <= 1e-5 * max(1.0, g.abs().max().item()), n


@pytest.mark.parametrize("name", ["gpt2", "llama", "gemma2"])
def test_training_step_gradients_match_eager(name):
    factory, ref_impl = DECODERS[name]
    ids, mask = batch(2)
    full = torch.ones_like(mask)
    assert_grads_close(train_grads(factory, "attnkit", ids, full), train_grads(factory, "eager", ids, full))
    # With left padding, eager and sdpa themselves disagree on the fully masked padding rows
    # (eager averages them, sdpa/attnkit give 0); attnkit must match the sdpa path there.
    if ref_impl == "sdpa":
        assert_grads_close(train_grads(factory, "attnkit", ids, mask), train_grads(factory, "sdpa", ids, mask))


def test_bert_padding_mask():
    torch.manual_seed(0)
    cfg = transformers.BertConfig(num_hidden_layers=2, num_attention_heads=4, hidden_size=64,
                                  intermediate_size=128, vocab_size=128, max_position_embeddings=64)
    model = transformers.BertModel(cfg).eval()
    ids, mask = batch(3, S=20)
    mask = mask.flip(1)  # right padding, as BERT tokenizers do
    with torch.no_grad():
        model.set_attn_implementation("sdpa")
        ref = model(ids, attention_mask=mask).last_hidden_state
        model.set_attn_implementation("attnkit")
        got = model(ids, attention_mask=mask).last_hidden_state
    assert (got - ref)[mask.bool()].abs().max() < 1e-4


def test_gqa_without_repeat_kv_and_decode_kernel(monkeypatch):
    """The attention function sees Hkv < H heads and one query row per generate step."""
    seen = []
    real = akt.attention_forward

    def spy(module, query, key, value, *a, **kw):
        seen.append((query.shape[1], key.shape[1], query.shape[2]))
        return real(module, query, key, value, *a, **kw)

    from transformers import AttentionInterface

    AttentionInterface.register("attnkit_spy", spy)
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionMaskInterface.register("attnkit_spy", sdpa_mask)
    model = make(llama_gqa)
    model.set_attn_implementation("attnkit_spy")
    ids, mask = batch(4)
    with torch.no_grad():
        model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=1)
    assert all(h == 8 and hkv == 2 for h, hkv, _ in seen)
    assert any(sq == 1 for _, _, sq in seen)


def test_torch_compile_model_fullgraph():
    model = make(llama_gqa)
    model.set_attn_implementation("attnkit")
    ids = torch.randint(2, 128, (2, 16))
    with torch.no_grad():
        ref = model(ids).logits
        compiled = torch.compile(model, fullgraph=True, backend="eager")
        got = compiled(ids).logits
    assert (got - ref).abs().max() < 1e-5
