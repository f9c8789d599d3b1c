"""Fused q/k RMSNorm + partial RoPE dispatch: validates, then runs Triton on CUDA and the torch reference elsewhere.

The reference is bit-equal to `layers/attention.py`'s q_norm/k_norm + apply_rotary and is the kernel's oracle."""
import torch

from . import reference

__all__ = ["qk_norm_rope"]


def qk_norm_rope(
    q: torch.Tensor,
    k: torch.Tensor,
    q_weight: torch.Tensor,
    k_weight: torch.Tensor,
    positions: torch.Tensor,
    theta: float,
    rotary_dim: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-centred RMSNorm over head_dim (fp32), then neox RoPE on the first rotary_dim dims, for q and k.

    q: [T, H, D], k: [T, Hkv, D] in the model dtype (strided views allowed, e.g. the query half of q_proj's
    per-head [query | gate]); q_weight, k_weight: [D]; positions: [T] int32/int64 absolute positions.
    Returns (q_out [T, H, D], k_out [T, Hkv, D]) contiguous in the model dtype."""
    if q.dim() != 3 or k.dim() != 3:
        raise ValueError(f"q must be [T, H, D] and k [T, Hkv, D]; got q {tuple(q.shape)}, k {tuple(k.shape)}")
    T, _, D = q.shape
    if k.shape[0] != T or k.shape[2] != D:
        raise ValueError(f"k must be [T={T}, Hkv, D={D}]; got {tuple(k.shape)}")
    if k.dtype != q.dtype or not q.is_floating_point():
        raise ValueError(f"q and k must share one floating-point dtype; got {q.dtype} and {k.dtype}")
    for name, w in (("q_weight", q_weight), ("k_weight", k_weight)):
        if w.dim() != 1 or w.shape[0] != D:
            raise ValueError(f"{name} must be [D={D}]; got {tuple(w.shape)}")
    if positions.dim() != 1 or positions.shape[0] != T or positions.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"positions must be a [T={T}] int32/int64 tensor; got {positions.dtype} "
                         f"{tuple(positions.shape)}")
    if rotary_dim < 2 or rotary_dim % 2 or rotary_dim > D:
        raise ValueError(f"rotary_dim must be even and in [2, D={D}]; got {rotary_dim}")
    if any(t.device != q.device for t in (k, q_weight, k_weight, positions)):
        raise ValueError(f"q, k, q_weight, k_weight and positions must all be on {q.device}")
    if q.is_cuda:
        from .triton import qk_norm_rope_triton
        return qk_norm_rope_triton(q, k, q_weight, k_weight, positions, theta, rotary_dim, eps)
    return reference.qk_norm_rope(q, k, q_weight, k_weight, positions, theta, rotary_dim, eps)
