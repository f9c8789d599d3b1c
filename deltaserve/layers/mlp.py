"""SiLU-gated MLP (dense layers and the MoE shared expert)."""
import torch
from torch import nn

from ..kernels.activation import silu_mul
from .linear import Linear


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        # gate_proj and up_proj of the checkpoint, stacked: one GEMM (the loader fills the halves)
        self.gate_up_proj = Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]."""
        return self.down_proj(silu_mul(self.gate_up_proj(x)))
