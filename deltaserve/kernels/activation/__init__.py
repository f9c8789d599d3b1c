"""SiLU-and-mul dispatch for the gated MLPs: the Triton kernel on CUDA, the torch reference elsewhere."""
import torch

from . import reference

__all__ = ["silu_mul"]


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2·I] = gate | up (the stacked gate_up_proj output) -> [T, I] = silu(gate) · up in x.dtype, rounded
    where the reference MLP rounds: silu(gate) to x.dtype, then the product."""
    if x.dim() != 2 or x.shape[1] % 2:
        raise ValueError(f"x must be [T, 2*I]; got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor; got {x.dtype}")
    if x.is_cuda:
        from .triton import silu_mul_triton
        return silu_mul_triton(x)
    return reference.silu_mul(x)
