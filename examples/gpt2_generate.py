"""Text generation with GPT-2 on attnkit's attention (attn_implementation="attnkit").

    python examples/gpt2_generate.py --model /path/to/gpt2 --prompt "The meaning of life is"
    python examples/gpt2_generate.py            # no weights: a random GPT-2, token ids only

With --model, weights and tokenizer load from that local directory (no download). Without it,
the script builds a small GPT-2 from its config with random weights, says so, and prints token
ids: the text would be noise. It also checks the tokens against the sdpa implementation.
"""
import argparse
import time

import torch
import transformers

import attnkit.transformers


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="local directory with GPT-2 weights (and tokenizer)")
    ap.add_argument("--prompt", default="The meaning of life is")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    args = ap.parse_args(argv)
    attnkit.transformers.register()
    torch.manual_seed(0)
    tokenizer = None
    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, attn_implementation="attnkit")
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model)
        ids = tokenizer(args.prompt, return_tensors="pt").input_ids
    else:
        print("no --model given: using a GPT-2 built from its config with RANDOM weights "
              "(the output is token ids of noise, not text)")
        cfg = transformers.GPT2Config(n_layer=4, n_head=4, n_embd=128, vocab_size=1000, n_positions=256,
                                      bos_token_id=999, eos_token_id=999)  # inside the vocab
        model = transformers.GPT2LMHeadModel(cfg)
        model.set_attn_implementation("attnkit")
        ids = torch.randint(0, cfg.vocab_size, (1, 8))
    model.eval()
    kw = dict(max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, do_sample=False,
              pad_token_id=model.config.eos_token_id)
    with torch.no_grad():
        t0 = time.perf_counter()
        out = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
        dt = time.perf_counter() - t0
        model.set_attn_implementation("sdpa")
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), **kw)
    new = out[0, ids.shape[1]:]
    print(f"{len(new)} new tokens in {dt:.2f} s ({len(new) / dt:.1f} tokens/s)")
    print(tokenizer.decode(out[0]) if tokenizer else f"tokens: {out[0].tolist()}")
    same = torch.equal(out, ref)
    print("same tokens as attn_implementation='sdpa':", same)
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
