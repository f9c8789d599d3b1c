"""RMSNorm dispatch: validates, then runs the Triton kernels on CUDA and the torch reference elsewhere.

The reference stays the CPU path and the kernels' oracle; both return the same dtypes and shapes."""
import torch

from . import reference

__all__ = ["rmsnorm", "gated_rmsnorm"]


def rmsnorm(
    x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-centred RMSNorm y = x̂ · (1 + w) in fp32, optionally fused with the decoder's residual add.

    x: [T, H] model dtype (rows may be strided); weight: [H]; residual: [T, H] in x's dtype or None.
    Returns (y [T, H] in x.dtype, r) with r = x + residual (added in x's dtype) or x itself when residual is None:
    `h, x = rmsnorm(h, w, eps, residual=x)` replaces `x = x + h; h = norm(x)`."""
    if x.dim() != 2:
        raise ValueError(f"x must be [T, H]; got {tuple(x.shape)}")
    _check_common(x, weight, x.shape[1], "H")
    if residual is not None:
        if residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device:
            raise ValueError(f"residual must match x ({tuple(x.shape)}, {x.dtype}, {x.device}); got "
                             f"{tuple(residual.shape)}, {residual.dtype}, {residual.device}")
    if x.is_cuda:
        from .triton import rmsnorm_triton
        return rmsnorm_triton(x, weight, eps, residual)
    return reference.rmsnorm(x, weight, eps, residual)


def gated_rmsnorm(x: torch.Tensor, z: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """The GDN output norm: plain RMSNorm per head (weight multiplies directly, no 1 + w) times silu(z).

    x, z: [T, HV, V] model dtype; weight: [V]. Returns [T, HV, V] in x.dtype."""
    if x.dim() != 3 or z.shape != x.shape:
        raise ValueError(f"x and z must both be [T, HV, V]; got x {tuple(x.shape)}, z {tuple(z.shape)}")
    if z.device != x.device or not z.is_floating_point():
        raise ValueError(f"z must be a floating-point tensor on {x.device}; got {z.dtype} on {z.device}")
    _check_common(x, weight, x.shape[2], "V")
    if x.is_cuda:
        from .triton import gated_rmsnorm_triton
        return gated_rmsnorm_triton(x, z, weight, eps)
    return reference.gated_rmsnorm(x, z, weight, eps)


def _check_common(x: torch.Tensor, weight: torch.Tensor, width: int, name: str) -> None:
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor; got {x.dtype}")
    if weight.dim() != 1 or weight.shape[0] != width:
        raise ValueError(f"weight must be [{name}={width}]; got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError(f"weight is on {weight.device} but x is on {x.device}")
