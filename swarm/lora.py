"""LoRA-the-Explorer math for one linear layer: head products, merge deltas, semi-orthogonal init.

Tensors in, tensors out, so every identity here can be checked in float64. Per-head tensors are
stacked along a leading head dimension: A is (H, r, n), B is (H, m, r) for a weight of shape (m, n).
"""

from __future__ import annotations

import hashlib
from typing import Literal, Sequence

import torch
from torch import nn
from torch.nn import functional as F

from swarm.quant import QuantizedWeight


def head_seed(seed: int, head: int, layer: int) -> int:
    """A seed for head `head` of layer `layer`, the same on every peer that ever holds that head."""
    digest = hashlib.sha256(f"lte/{seed}/{head}/{layer}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & 0x7FFF_FFFF_FFFF_FFFF


InitScale = Literal["spectral", "reference"]


def semi_orthogonal(rank: int, fan_in: int, *, seed: int, dtype: torch.dtype = torch.float32,
                    scale: InitScale = "spectral") -> torch.Tensor:
    """A (rank, fan_in) matrix with orthonormal rows (or columns when rank > fan_in), scaled by
    sqrt(rank / fan_in) so its spectral norm matches its shape (`spectral`: Bernstein et al.'s
    spectral scaling, A maps fan_in to rank), or by sqrt(fan_in / rank) (`reference`: what the
    paper's public code does). Under Adam the scale of A sets how far B's steps move B A.

    Each head draws its own matrix: distinct random subspaces are what keep the heads exploring
    different directions.
    """
    generator = torch.Generator().manual_seed(seed)
    a = torch.empty(rank, fan_in, dtype=torch.float64)
    nn.init.orthogonal_(a, generator=generator)
    ratio = rank / fan_in if scale == "spectral" else fan_in / rank
    return (a * ratio ** 0.5).to(dtype)


def products(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B_i @ A_i for every head: (H, m, r) x (H, r, n) -> (H, m, n)."""
    return torch.bmm(b, a)


def delta_sum(
    a: torch.Tensor, b: torch.Tensor, a0: torch.Tensor | None, b0: torch.Tensor | None,
    heads: Sequence[int] | None = None,
) -> torch.Tensor:
    """Sum over `heads` of each head's unmerged change B_i A_i - B0_i A0_i, shape (m, n).

    B0 A0 is the product at the head's last merge (reset-less variant); with the reset variant B is
    zeroed at every merge, so there is no baseline and `a0`/`b0` are None. The heads are summed in
    the order given, which callers keep canonical so that every peer gets the same bits.
    """
    idx = list(range(a.shape[0])) if heads is None else list(heads)
    m, n = b.shape[1], a.shape[2]
    total = torch.zeros(m, n, dtype=a.dtype, device=a.device)
    for i in idx:
        total += b[i] @ a[i]
        if a0 is not None and b0 is not None:
            total -= b0[i] @ a0[i]
    return total


def merge_scale(scale: float, n_heads: int) -> float:
    """The LTE merge coefficient s / N, with N the run's fixed head count, not the heads present:
    an absent head then changes nothing, instead of inflating everyone else's step."""
    return scale / n_heads


class LTELinear(nn.Module):
    """y = W x + b + s (B A - B0 A0) x for the head whose factors are plugged in, else y = W x + b.

    W lives in a `QuantizedWeight` and is never trained by gradient. The head factors are not owned
    by this module: `swarm.lte_model.LTEModel` keeps them stacked over heads and plugs one head's
    slice in per call (through `torch.func.functional_call`, vectorised with `vmap` or in a loop).
    With no factors plugged in, the layer is the plain merged linear layer used for evaluation.
    """

    def __init__(self, weight: QuantizedWeight, bias: torch.Tensor | None, scale: float):
        super().__init__()
        self.weight_store = weight
        self.out_features, self.in_features = weight.shape
        self.scale = scale
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        for name in ("lora_A", "lora_B", "lora_A0", "lora_B0"):
            self.register_buffer(name, None, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight_store.weight(x.dtype), self.bias)
        if self.lora_A is None:
            return y
        z = F.linear(F.linear(x, self.lora_A), self.lora_B)
        if self.lora_A0 is not None:
            z = z - F.linear(F.linear(x, self.lora_A0), self.lora_B0)
        return y + self.scale * z

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"storage={self.weight_store.storage}, scale={self.scale}")
