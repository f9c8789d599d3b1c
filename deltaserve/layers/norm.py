"""RMSNorm variants of Qwen3.5, computed in fp32 like the HF reference."""
import torch
from torch import nn


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: y = x̂ · (1 + w), in fp32, cast back to x's dtype.

    Used for the decoder norms, the final norm and the attention q/k norms (weights start at 0)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [..., dim] -> same shape and dtype."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * (1.0 + self.weight.float())).to(x.dtype)


class GatedRMSNorm(nn.Module):
    """The GDN output norm: plain RMSNorm (weight multiplies directly, no 1 + w) times silu(z)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x, z: [..., dim] -> [..., dim] in x's dtype."""
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        # HF rounds the normalised x to the model dtype before the weight; keep that for bf16 parity.
        y = self.weight * xf.to(x.dtype)
        return (y.float() * nn.functional.silu(z.float())).to(x.dtype)
