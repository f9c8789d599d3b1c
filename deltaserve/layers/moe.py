"""Sparse MoE block of Qwen3.5-MoE: softmax top-k router, SiLU-gated experts, sigmoid-gated shared expert.

Under tensor parallelism the block returns this rank's partial sum (the model all-reduces it once): with experts
sliced by columns (TP inside experts) every rank adds part of every pair; under expert parallelism a rank holds whole
experts [first, first + num_local_experts) and adds only the pairs routed to them, the others marked -1 (skipped by
the fused MoE). Routing is the same full softmax over all E experts on every rank, so both give the same answer."""
import torch
from torch import nn

from ..config import ModelConfig
from ..kernels.fused_moe import fused_moe, route_topk_softmax
from .mlp import GatedMLP


class Experts(nn.Module):
    """All experts of one layer, packed like HF's `experts.gate_up_proj` / `experts.down_proj`."""

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def dense(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (gate_up [E, 2I, H], down [E, H, I]); the same interface as layers.linear.QuantExperts."""
        return self.gate_up_proj, self.down_proj

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x: [T, H]; topk_weights [T, k] fp32; topk_ids [T, k] -> [T, H] (as layers.linear.QuantExperts)."""
        return fused_moe(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)


def local_expert_ids(ids: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """ids: [T, k] router ids -> [T, k] ids into this rank's experts [first, first + count), -1 for the others."""
    local = ids - first
    return torch.where((local >= 0) & (local < count), local, -1)


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, experts: tuple[int, int] | None = None):
        """cfg: this rank's shard_config; experts: the router ids [start, stop) this rank holds (None: all)."""
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = nn.Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router scores all E experts
        self.first_expert, stop = experts or (0, cfg.num_experts)
        self.num_local_experts = stop - self.first_expert
        self.experts = Experts(self.num_local_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_expert = GatedMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = nn.Linear(cfg.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]."""
        weights, ids = route_topk_softmax(self.gate(x), self.top_k)
        if self.num_local_experts < self.gate.out_features:  # expert parallel
            ids = local_expert_ids(ids, self.first_expert, self.num_local_experts)
        routed = self.experts(x, weights, ids)
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return routed + shared
