"""MoE dispatch. CPU: the torch reference (a loop over the experts that received tokens). CUDA: sort the (token,
expert) pairs by expert and run both expert GEMMs as torch grouped GEMMs over the sorted rows: no host sync, so the
MoE layers can be captured in CUDA graphs. (A Triton fused MoE with quantized experts is issue 5's.)"""
import torch
import torch.nn.functional as F

from .reference import fused_moe as fused_moe_reference
from .reference import route_topk_softmax

__all__ = ["fused_moe", "route_topk_softmax"]


def fused_moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """x: [T, H]; gate_up: [E, 2I, H]; down: [E, H, I]; topk_weights: [T, k] fp32; topk_ids: [T, k] -> [T, H]."""
    if x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16:
        return _grouped_moe(x, gate_up, down, topk_weights, topk_ids)
    return fused_moe_reference(x, gate_up, down, topk_weights, topk_ids)


def _grouped_moe(x, gate_up, down, topk_weights, topk_ids) -> torch.Tensor:
    t, k = topk_ids.shape
    flat = topk_ids.reshape(-1)
    order = torch.argsort(flat, stable=True)
    offs = torch.cumsum(torch.bincount(flat, minlength=gate_up.shape[0]), 0).to(torch.int32)
    token = order // k
    h = torch._grouped_mm(x[token], gate_up.transpose(-2, -1), offs=offs)  # [T*k, 2I]
    gate, up = h.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, down.transpose(-2, -1), offs=offs)  # [T*k, H]
    y = y * topk_weights.to(x.dtype).reshape(-1)[order, None]
    return torch.zeros_like(x).index_add_(0, token, y)
