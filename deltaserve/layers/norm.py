"""RMSNorm variants of Qwen3.5, computed in fp32 like the HF reference."""
import torch
from torch import nn

from ..kernels.rmsnorm import gated_rmsnorm, rmsnorm


class RMSNorm(nn.Module):
    """Zero-centred RMSNorm: y = x̂ · (1 + w), in fp32, cast back to x's dtype.

    Used for the decoder norms, the final norm and the attention q/k norms (weights start at 0)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [T, dim]; residual: [T, dim] or None -> (norm(x + residual), x + residual), fused on CUDA."""
        return rmsnorm(x, self.weight, self.eps, residual)


class GatedRMSNorm(nn.Module):
    """The GDN output norm: plain RMSNorm (weight multiplies directly, no 1 + w) times silu(z)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """x, z: [T, HV, dim] -> [T, HV, dim] in x's dtype."""
        return gated_rmsnorm(x, z, self.weight, self.eps)
