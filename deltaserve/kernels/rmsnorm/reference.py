"""Torch references for the RMSNorm kernels (CPU path and kernel oracle).

Numerics copy `layers/norm.py` expression by expression (the tests check bit-equality with the layers): the
statistics and the scaling in fp32, the casts back to the model dtype where the layers make them. Input validation
lives in the package's `__init__.py`.
"""
import torch
import torch.nn.functional as F


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-centred RMSNorm y = x̂ · (1 + w), optionally after the residual add of the decoder.

    x: [T, H] model dtype; weight: [H]; residual: [T, H] in x's dtype or None.
    Returns (y [T, H] in x.dtype, r) where r = x + residual (added in x's dtype, as the model does) or x itself
    when residual is None; r is the residual stream the next sublayer adds to."""
    if residual is not None:
        x = x + residual
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1.0 + weight.float())).to(x.dtype), x


def gated_rmsnorm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The GDN output norm: plain RMSNorm over the last dim (weight multiplies directly), times silu(z).

    x, z: [T, HV, V] model dtype; weight: [V]. Returns [T, HV, V] in x.dtype. x̂ is rounded to x's dtype before the
    weight multiplies it (in the promoted dtype of weight and x), as HF does."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    y = weight * xf.to(x.dtype)
    return (y.float() * F.silu(z.float())).to(x.dtype)
