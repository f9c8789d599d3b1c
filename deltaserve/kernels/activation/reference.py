"""Torch reference of silu_mul (CPU path and kernel oracle): HF's Qwen3.5 MLP expression, act(gate) * up."""
import torch
import torch.nn.functional as F


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2·I] = gate | up -> silu(gate) · up, [T, I] in x.dtype (silu rounds to x.dtype, then the product)."""
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
