"""Torch reference for the fused q/k norm + partial RoPE of gated attention (CPU path and kernel oracle).

Reproduces `layers/attention.py` step by step with the expressions of `layers/norm.py` (RMSNorm) and
`layers/rotary.py` (cos/sin, apply_rotary), so it is bit-equal to the layers (the tests check it): norm in fp32,
cast to the model dtype, then RoPE in the model dtype with cos/sin computed in fp32 and cast to it.
Input validation lives in the package's `__init__.py`.
"""
import torch


def inv_freq(theta: float, rotary_dim: int, device: torch.device) -> torch.Tensor:
    """-> [rotary_dim // 2] fp32 inverse frequencies, the same expression as RotaryEmbedding.cos_sin."""
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim
    return 1.0 / (theta ** exponent)


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
    """q: [T, H, D], k: [T, Hkv, D] model dtype (any strides); q_weight, k_weight: [D] zero-centred norm weights;
    positions: [T] int64. Returns (q_out [T, H, D], k_out [T, Hkv, D]) contiguous in the model dtype."""
    freqs = positions.float()[:, None] * inv_freq(theta, rotary_dim, positions.device)[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    cos, sin = emb.cos().to(q.dtype), emb.sin().to(q.dtype)
    return _rope(_norm(q, q_weight, eps), cos, sin), _rope(_norm(k, k_weight, eps), cos, sin)


def _norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (xf * (1.0 + weight.float())).to(x.dtype)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    rd = cos.shape[-1]
    rot, rest = x[..., :rd], x[..., rd:]
    x1, x2 = rot[..., : rd // 2], rot[..., rd // 2:]
    rotated = torch.cat([-x2, x1], dim=-1)
    rot = rot * cos[:, None, :] + rotated * sin[:, None, :]
    return torch.cat([rot, rest], dim=-1)
