"""Torch reference for the MoE block's routing and expert computation (the CPU path and the kernels' oracle)."""
import torch
import torch.nn.functional as F


def route_topk_softmax(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [T, E] -> (weights [T, top_k] fp32 renormalised to sum 1, ids [T, top_k] int64).

    Softmax over all E experts in fp32, top-k, then renormalise (Qwen3.5's router)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids


def fused_moe(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """x: [T, H]; gate_up: [E, 2I, H] (first I rows gate); down: [E, H, I]; topk_weights: [T, k] fp32;
    topk_ids: [T, k] int64 -> [T, H] in x's dtype: sum over the k experts of w · down(silu(gate) · up)."""
    out = torch.zeros_like(x)
    weights = topk_weights.to(x.dtype)  # HF applies the routing weight in the model dtype
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=gate_up.shape[0]).tolist()
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        rows = order[start : start + n]
        start += n
        tok, slot = rows // topk_ids.shape[1], rows % topk_ids.shape[1]
        gate, up = F.linear(x[tok], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[e]) * weights[tok, slot, None]
        out.index_add_(0, tok, y)
    return out
