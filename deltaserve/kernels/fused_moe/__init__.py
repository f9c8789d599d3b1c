"""MoE dispatch: the torch reference for now; a Triton fused MoE will be picked on CUDA."""
from .reference import fused_moe, route_topk_softmax

__all__ = ["fused_moe", "route_topk_softmax"]
