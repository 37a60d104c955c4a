"""Accuracy of the 8-bit KV caches in generation (issue 15): greedy tokens with
attnkit.transformers.QuantizedKVCache (int8, fp8_e4m3) against the float32 cache.

No downloads: a tiny Llama (2 layers, GQA 4/2 heads, head dim 16) is trained for a few seconds
on a synthetic mix -- random segments repeated (continuing them needs attention to copy from
the cache: an induction task) and arithmetic progressions -- then each format generates 64
tokens greedily from several prompts; the figure is the share of the generated tokens equal to
the float32 cache's at the same position (a first divergence usually makes the rest differ).
Also reported for the untrained (random-weight) model, whose logits are near-ties everywhere.

    python bench/q8_accuracy.py [--steps 1000] [--prompts 16]
"""
import argparse
import time
import warnings

import torch

V, S = 128, 96  # vocabulary, training length (prompt 24 + 64 generated fits in it)


def synthetic_batch(n, g, copy_share=0.5):
    out = torch.empty(n, S, dtype=torch.long)
    for i in range(n):
        if torch.rand(1, generator=g).item() < copy_share:
            L = int(torch.randint(6, 17, (1,), generator=g))
            seg = torch.randint(2, V, (L,), generator=g)
            out[i] = seg.repeat(S // L + 1)[:S]
        else:
            a, d = torch.randint(0, 120, (1,), generator=g), torch.randint(1, 12, (1,), generator=g)
            out[i] = (a + d * torch.arange(S)) % 120 + 2
    return out


def tiny_llama(seed=0):
    import transformers

    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, hidden_size=64,
        intermediate_size=256, vocab_size=V, max_position_embeddings=256, bos_token_id=0,
        eos_token_id=1, pad_token_id=1))


def train_tiny_llama(steps=1000, seed=0, lr=2e-3, verbose=False):
    """The tiny Llama after `steps` AdamW steps (batch 32 x 96 tokens), in eval mode."""
    model = tiny_llama(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 1))
    t0 = time.time()
    for it in range(steps):
        x = synthetic_batch(32, g)
        loss = model(x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if verbose and (it % 200 == 0 or it == steps - 1):
            print(f"  step {it}: loss {loss.item():.3f} ({time.time() - t0:.0f} s)")
    return model.eval()


def agreement(model, prompts=8, new_tokens=64, seed=123):
    """Share of generated tokens equal to the float32 cache's, per format; plus how often the
    float32 model continues the synthetic sequence correctly ("task")."""
    import attnkit.transformers as akt

    akt.register()
    model.set_attn_implementation("attnkit")
    full = synthetic_batch(prompts, torch.Generator().manual_seed(seed))
    ids = full[:, :24]
    mask = torch.ones_like(ids)
    kw = dict(attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
              do_sample=False, pad_token_id=1)
    out = {}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = model.generate(ids, **kw)[:, 24:]
        out["task"] = (ref == full[:, 24:24 + new_tokens]).float().mean().item()
        for fmt in ("int8", "fp8_e4m3"):
            got = model.generate(ids, cache=akt.QuantizedKVCache(fmt), **kw)[:, 24:]
            out[fmt] = (got == ref).float().mean().item()
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--prompts", type=int, default=16)
    args = ap.parse_args()
    print("untrained (random weights):", agreement(tiny_llama(), args.prompts))
    model = train_tiny_llama(args.steps, verbose=True)
    print(f"trained {args.steps} steps:", agreement(model, args.prompts))


if __name__ == "__main__":
    main()
