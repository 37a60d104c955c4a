"""Hugging Face end to end: a tiny GPT-2 (random weights from a config, no downloads) with
attn_implementation="attnkit" vs "sdpa" vs "eager".

Rows: a forward over a prompt and a greedy `generate` (tokens/s; no ceiling), and the
per-call overhead of the attention adapters, in microseconds: the registered
"attnkit" attention function minus the bare `attnkit.attention` on the same tensors (and
"sdpa" minus the bare torch SDPA, for scale). Needs `attnkit.transformers.register()`,
which adds "attnkit" to transformers' AttentionInterface; skipped while it is missing.
"""
import numpy as np

from harness import Case, Spec
from suites.common import close_enough, find_api, torch_or_none

NAME = "hf"
IMPLS = ["attnkit", "sdpa", "eager"]
LOGIT_TOL = 1e-4  # fp32 logits through several layers
INIT_STD = 0.05  # weight init (GPT-2: 0.02); see models()
# model sizes: (layers, embed, heads, vocab); head dim 64 as in GPT-2
MODEL = {"tiny": (1, 64, 2, 128), "quick": (4, 256, 4, 1024), "full": (6, 768, 12, 4096)}
FORWARD = {"tiny": [(1, 16)], "quick": [(1, 128)], "full": [(1, 128), (1, 512), (4, 256)]}
GENERATE = {"tiny": [(1, 8, 4)], "quick": [(1, 32, 32)], "full": [(1, 32, 64), (4, 64, 64)]}
OVERHEAD = {"tiny": [(1, 16, 16)], "quick": [(1, 1, 128), (1, 128, 128)],
            "full": [(1, 1, 128), (1, 1, 1024), (1, 128, 128), (4, 512, 512)]}  # (B, Sq, Sk)


def register_api():
    """attnkit.transformers.register, or None while it is missing."""
    return find_api("attnkit.transformers", "register")


def missing():
    """Why the suite cannot run (torch/transformers absent, or no adapter yet), else None."""
    if torch_or_none() is None or find_api("transformers") is None:
        return "torch or transformers is not installed"
    if register_api() is None:
        return "attnkit.transformers.register() is missing"
    return None


def _model_label(mode):
    """Short name of the mode's GPT-2 config."""
    layers, embed, heads, vocab = MODEL[mode]
    return f"gpt2 L{layers} E{embed} H{heads} V{vocab}"


def specs(cfg):
    """Forward and generate rows for the mode's model, and adapter-overhead rows."""
    m, model = cfg.mode, _model_label(cfg.mode)
    base = {"model": model, "mode": m, "dtype": "float32"}
    out = [Spec(NAME, f"hf forward {model} B{b} S{s}", f"B{b} S{s}", "float32",
                dict(base, kind="forward", B=b, S=s)) for b, s in FORWARD[m]]
    out += [Spec(NAME, f"hf generate {model} B{b} P{p} +{n}", f"B{b} P{p} N{n}", "float32",
                 dict(base, kind="generate", B=b, P=p, N=n)) for b, p, n in GENERATE[m]]
    _, embed, heads, _ = MODEL[m]
    out += [Spec(NAME, f"hf adapter B{b} H{heads} Sq{sq} Sk{sk} D{embed // heads}",
                 f"B{b} Sq{sq} Sk{sk}", "float32",
                 dict(base, kind="overhead", B=b, Sq=sq, Sk=sk)) for b, sq, sk in OVERHEAD[m]]
    return out


_MODELS = {}


def models(mode):
    """One GPT-2 per attention implementation, all with the same random weights (cached).

    Each model gets its own copy of the config: `_from_config` writes the implementation into
    the config it is given, so with one shared config all three ran the last one ("eager").
    The weights are drawn with std 0.05 instead of GPT-2's 0.02: at 0.02 the attention output
    barely reaches the logits and greedy generation repeated one or two tokens; at 0.05 a 1%
    error in attention moves the logits 60x past LOGIT_TOL, attnkit and eager stay 100x under
    it (all three model sizes), and generation emits 5-19 distinct tokens.
    """
    if mode in _MODELS:
        return _MODELS[mode]
    import copy

    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    register_api()()
    layers, embed, heads, vocab = MODEL[mode]
    config = GPT2Config(vocab_size=vocab, n_positions=2048, n_embd=embed, n_layer=layers,
                        n_head=heads, bos_token_id=0, eos_token_id=None, pad_token_id=0,
                        initializer_range=INIT_STD)
    torch.manual_seed(0)
    base = GPT2LMHeadModel(copy.deepcopy(config)).eval()
    out = {}
    for impl in IMPLS:
        m = GPT2LMHeadModel._from_config(copy.deepcopy(config), attn_implementation=impl).eval()
        m.load_state_dict(base.state_dict())
        if m.config._attn_implementation != impl:
            raise RuntimeError(f"model built for {impl!r} runs {m.config._attn_implementation!r}")
        out[impl] = m
    _MODELS.clear()
    _MODELS[mode] = out
    return out


def _same_tokens(x, ref):
    """Generated ids must be identical (greedy decoding, fp32)."""
    x, ref = np.asarray(x), np.asarray(ref)
    if x.shape != ref.shape:
        return f"generated shape {x.shape} != {ref.shape}"
    diff = int((x != ref).sum())
    return f"{diff} generated token(s) differ" if diff else None


def _model_case(spec):
    """forward or generate with each implementation; work = tokens per call."""
    import torch

    p = spec.params
    ms = models(p["mode"])
    gen = torch.Generator().manual_seed(0)
    vocab = MODEL[p["mode"]][3]
    contenders = {}
    if p["kind"] == "forward":
        ids = torch.randint(1, vocab, (p["B"], p["S"]), generator=gen)
        for impl, m in ms.items():
            contenders[impl] = (lambda m=m: _no_grad(torch, lambda: m(ids).logits))
        work, check = p["B"] * p["S"], (lambda x, ref: close_enough(x, ref, LOGIT_TOL))
    else:
        ids = torch.randint(1, vocab, (p["B"], p["P"]), generator=gen)
        kw = dict(max_new_tokens=p["N"], min_new_tokens=p["N"], do_sample=False, pad_token_id=0)
        for impl, m in ms.items():
            contenders[impl] = (lambda m=m: _no_grad(torch, lambda: m.generate(ids, **kw)).numpy())
        work, check = p["B"] * p["N"], _same_tokens
    return Case(suite=NAME, name=spec.name, contenders=contenders, reference="sdpa",
                work=work, ceiling=None, unit="tok/s", check=check, params=p)


def _no_grad(torch, fn):
    """fn() under torch.inference_mode."""
    with torch.inference_mode():
        return fn()


def _overhead_case(spec):
    """Registered adapters vs the kernels they wrap, on GPT-2-like strided q/k/v views."""
    import attnkit
    import torch
    import torch.nn.functional as F
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    p = spec.params
    module = models(p["mode"])["attnkit"].transformer.h[0].attn
    _, embed, heads, _ = MODEL[p["mode"]]
    b, sq, sk, d = p["B"], p["Sq"], p["Sk"], embed // heads
    gen = torch.Generator().manual_seed(0)

    def heads_view(s):
        """(B, S, 3E) -> three (B, H, S, D) views, as GPT2Attention makes them."""
        parts = torch.randn(b, s, 3 * embed, generator=gen).split(embed, dim=2)
        return [x.view(b, s, heads, d).transpose(1, 2) for x in parts]

    q = heads_view(sq)[0]
    _, k, v = heads_view(sk)
    causal = sq > 1
    ak, sd = ALL_ATTENTION_FUNCTIONS["attnkit"], ALL_ATTENTION_FUNCTIONS["sdpa"]
    kw = dict(dropout=0.0, scaling=module.scaling)
    mask = None
    if causal and sq != sk:  # HF passes an explicit mask when the alignment is not top-left
        i, j = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
        mask = (j <= i + sk - sq)[None, None]
    # The kernel through the binding alone, on the same tensors and into a (B, Sq, H, D) output
    # as the adapter returns: what the adapter's Python adds is the difference. (It was the
    # NumPy front end, whose own Python made the difference negative.)
    import attnkit.torch  # noqa: F401  (registers torch's types with the binding)

    out_k = torch.empty(b, sq, heads, d)
    out_kv = out_k.transpose(1, 2)  # (B, H, Sq, D) view, made once
    mask_k = None if mask is None else mask.expand(b, heads, sq, sk)

    def kernel():
        """attnkit._C.attention on the tensors: the binding and the kernel, no Python layer."""
        attnkit._C.attention(q, k, v, out_kv, None, mask_k, None, None, None, None,
                             None, b, module.scaling, 0.0, causal and mask is None, True, -1, -1,
                             0.0, 0, 0, torch.get_num_threads())
        return out_k

    contenders = {
        "attnkit adapter": lambda: ak(module, q, k, v, mask, **kw)[0],
        "attnkit kernel": kernel,
        "sdpa adapter": lambda: sd(module, q, k, v, mask, **kw)[0],
        "torch sdpa": lambda: F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=causal and mask is None).transpose(1, 2),
    }

    def derive(t):
        """Adapter cost per call = adapter time - kernel time on the same tensors."""
        return {
            "attnkit_adapter_overhead_us": (t["attnkit adapter"].median_s
                                            - t["attnkit kernel"].median_s) * 1e6,
            "sdpa_adapter_overhead_us": (t["sdpa adapter"].median_s
                                         - t["torch sdpa"].median_s) * 1e6,
        }

    return Case(suite=NAME, name=spec.name, contenders=contenders, subject="attnkit adapter",
                reference="torch sdpa", ceiling=None, derive=derive, params=p,
                check=lambda x, ref: close_enough(x, ref, 2e-5))


def build(spec):
    """Model rows or adapter-overhead rows."""
    if spec.params["kind"] == "overhead":
        return _overhead_case(spec)
    return _model_case(spec)
