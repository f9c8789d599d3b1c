"""Torch reference for the MoE block's routing and expert computation (the CPU path and the kernels' oracle)."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...layers.quant import dequant_awq, kpack_to_awq
from ..fp8_gemm.reference import dequant_blocks


def route_topk_softmax(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [T, E] -> (weights [T, top_k] fp32 renormalised to sum 1, ids [T, top_k] int64).

    Softmax over all E experts in fp32, top-k, then renormalise (Qwen3.5's router)."""
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)
    weights, ids = torch.topk(probs, top_k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), ids


def route_with_shared_expert(router_logits: torch.Tensor, top_k: int, x: torch.Tensor,
                             gate_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """route_topk_softmax plus the shared expert as one more pair: router_logits [T, E], x [T, H], gate_weight [1, H]
    (shared_expert_gate) -> (weights [T, top_k + 1] fp32, ids [T, top_k + 1] int64), the last pair id E with weight
    sigmoid(x . gate_weight) computed in x's dtype as HF computes it (a Linear, then torch.sigmoid). Experts stacked
    with the shared one as expert E (layers/moe.py fuse_shared_expert) then add it in the same fused MoE."""
    weights, ids = route_topk_softmax(router_logits, top_k)
    shared = torch.sigmoid(F.linear(x, gate_weight)).float()
    return torch.cat([weights, shared], 1), torch.cat([ids, torch.full_like(ids[:, :1], router_logits.shape[1])], 1)


def fused_moe(
    x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor
) -> torch.Tensor:
    """x: [T, H]; gate_up: [E, 2I, H] (first I rows gate); down: [E, H, I]; topk_weights: [T, k] fp32;
    topk_ids: [T, k] int64, -1 for a pair whose expert this rank does not hold (expert parallelism: skipped)
    -> [T, H] in x's dtype: sum over the token's k experts (those held) of w · down(silu(gate) · up)."""
    out = torch.zeros_like(x)
    weights = topk_weights.to(x.dtype)  # HF applies the routing weight in the model dtype
    flat_ids = topk_ids.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids + 1, minlength=gate_up.shape[0] + 1).tolist()
    start = counts[0]  # the -1 pairs sort first
    for e, n in enumerate(counts[1:]):
        if n == 0:
            continue
        rows = order[start : start + n]
        start += n
        tok, slot = rows // topk_ids.shape[1], rows % topk_ids.shape[1]
        gate, up = F.linear(x[tok], gate_up[e]).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down[e]) * weights[tok, slot, None]
        out.index_add_(0, tok, y)
    return out


@dataclass(frozen=True)
class ExpertWeights:
    """One expert projection of all E experts: int4 AWQ (qweight [E, K, N/8] int32, qzeros [E, K/G, N/8] int32,
    scales [E, K/G, N]), block FP8 (weight [E, N, K] float8_e4m3fn with scale_inv [E, ceil(N/BN), ceil(K/BK)] fp32,
    block (BN, BK)) or 16-bit (weight [E, N, K], the HF / F.linear layout)."""
    qweight: torch.Tensor | None = None
    qzeros: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    group_size: int = 0
    weight: torch.Tensor | None = None
    scale_inv: torch.Tensor | None = None  # FP8 only
    block: tuple[int, int] = (0, 0)  # FP8 only: the scale block (rows of N, columns of K)
    kpack: bool = False  # int4 only: qweight K-packed [E, K/8, N] (layers/quant.awq_to_kpack) instead of AWQ

    @property
    def int4(self) -> bool:
        return self.weight is None

    @property
    def fp8(self) -> bool:
        return self.scale_inv is not None

    def dims(self) -> tuple[int, int, int]:
        """-> (E, K, N) with N all output columns."""
        if self.int4:
            return self.scales.shape[0], self.qweight.shape[1] * (8 if self.kpack else 1), self.scales.shape[2]
        return self.weight.shape[0], self.weight.shape[2], self.weight.shape[1]

    def dense(self, dtype: torch.dtype) -> torch.Tensor:
        """-> [E, N, K] in dtype (int4, FP8: dequantized, one rounding)."""
        if self.int4:
            qweight = kpack_to_awq(self.qweight) if self.kpack else self.qweight
            return dequant_awq(qweight, self.qzeros, self.scales, self.group_size, dtype)
        if self.fp8:
            return dequant_blocks(self.weight, self.scale_inv, self.block, dtype)
        return self.weight.to(dtype)


def fused_moe_experts(x: torch.Tensor, gate_up: ExpertWeights, down: ExpertWeights, topk_weights: torch.Tensor,
                      topk_ids: torch.Tensor) -> torch.Tensor:
    """fused_moe over ExpertWeights (the int4 MoE's oracle): dequantize every expert, then the loop above."""
    return fused_moe(x, gate_up.dense(x.dtype), down.dense(x.dtype), topk_weights, topk_ids)
