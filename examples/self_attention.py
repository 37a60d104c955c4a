"""The classic single-head self-attention module, corrected, running on attnkit.

The version that circulates has two bugs: the projections are sized (input_dim, input_dim) but
applied inconsistently, and the scale is computed as an integer tensor (sqrt of an int tensor)
instead of a float. Here q/k/v are learned (input_dim, input_dim) projections and the scores are
divided by the float sqrt(d). The attention itself runs through attnkit.torch (with autograd),
and the script checks it against plain torch.

    python examples/self_attention.py
"""
import math

import torch
from torch import nn

import attnkit.torch as at


class SelfAttention(nn.Module):
    """Single-head scaled dot-product self-attention over (batch, seq, input_dim)."""

    def __init__(self, input_dim: int, use_attnkit: bool = True):
        super().__init__()
        self.input_dim = input_dim
        self.query = nn.Linear(input_dim, input_dim)
        self.key = nn.Linear(input_dim, input_dim)
        self.value = nn.Linear(input_dim, input_dim)
        self.scale = 1.0 / math.sqrt(float(input_dim))  # a float, not an int tensor
        self.use_attnkit = use_attnkit

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.query(x), self.key(x), self.value(x)  # (B, S, d) each
        if self.use_attnkit:
            # (B, S, d) is 3-D SDPA input: one head.
            return at.scaled_dot_product_attention(q, k, v, scale=self.scale)
        scores = torch.bmm(q, k.transpose(1, 2)) * self.scale
        return torch.bmm(torch.softmax(scores, dim=-1), v)


def main():
    torch.manual_seed(0)
    x = torch.randn(4, 10, 32, requires_grad=True)
    model = SelfAttention(32)
    reference = SelfAttention(32, use_attnkit=False)
    reference.load_state_dict(model.state_dict())
    out, ref = model(x), reference(x)
    err = (out - ref).abs().max().item()
    out.sum().backward()
    g_attnkit = x.grad.clone()
    x.grad = None
    ref.sum().backward()
    gerr = (g_attnkit - x.grad).abs().max().item()
    print(f"output {tuple(out.shape)}: max |attnkit - torch| = {err:.2e}, gradient: {gerr:.2e}")
    assert err < 1e-5 and gerr < 1e-5, "attnkit disagrees with plain torch"
    print("OK")


if __name__ == "__main__":
    main()
