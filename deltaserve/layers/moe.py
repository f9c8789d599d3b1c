"""Sparse MoE block of Qwen3.5-MoE: softmax top-k router, SiLU-gated experts, sigmoid-gated shared expert.

Under tensor parallelism the block returns this rank's partial sum (the model all-reduces it once): with experts
sliced by columns (TP inside experts) every rank adds part of every pair; under expert parallelism a rank holds whole
experts [first, first + num_local_experts) and adds only the pairs routed to them, the others marked -1 (skipped by
the fused MoE). Routing is the same full softmax over all E experts on every rank, so both give the same answer.

`fuse_shared_experts(model)` (once, after loading) stacks each layer's shared expert after its routed experts as
expert E when both have one format and size: the router then appends it as one more pair weighted by
sigmoid(shared_expert_gate(x)) (route_with_shared_expert), and one fused MoE computes all k + 1. At decode that is
the MoE's four launches instead of those plus the shared MLP's GEMVs and their split sums, its activation, the gate's
GEMV and the gated add (10 launches an MoE layer fewer on 35B-A3B shapes with int4 experts; H200, 8 layers: batch 1
870.5 -> 1 115.9 tok/s, batch 64 12 563 -> 13 536). 16-bit, int4 and block-FP8 experts (Fp8Experts.append_expert);
not under expert parallelism (the shared expert is column-cut there, the experts whole).

Routing starts from the hidden states (`route_hidden`): up to 16 tokens on CUDA the router's GEMV runs inside the
routing launch."""
import torch
from torch import nn

from ..config import ModelConfig
from ..kernels.fused_moe import fused_moe, route_hidden, route_logits
from .linear import Linear, ProjectionGroup
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

    def append_expert(self, gate_up: nn.Module, down: nn.Module) -> bool:
        """Stack one more expert after the E experts, in place: 16-bit Linears gate|up [2I, H] and down [H, I] of
        this dtype and device -> whether they were (as layers.linear.QuantExperts.append_expert)."""
        pairs = ((self.gate_up_proj, gate_up), (self.down_proj, down))
        if not all(isinstance(one, nn.Linear) and one.bias is None and one.weight.shape == many.shape[1:]
                   and one.weight.dtype == many.dtype and one.weight.device == many.device for many, one in pairs):
            return False
        self.gate_up_proj, self.down_proj = (nn.Parameter(torch.cat([many.data, one.weight.data[None]]),
                                                          many.requires_grad) for many, one in pairs)
        return True

    def forward(self, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        """x: [T, H]; topk_weights [T, k] fp32; topk_ids [T, k] -> [T, H] (as layers.linear.QuantExperts)."""
        return fused_moe(x, self.gate_up_proj, self.down_proj, topk_weights, topk_ids)


def local_expert_ids(ids: torch.Tensor, first: int, count: int) -> torch.Tensor:
    """ids: [T, k] router ids -> [T, k] ids into this rank's experts [first, first + count), -1 for the others."""
    local = ids - first
    return torch.where((local >= 0) & (local < count), local, -1)


_GATE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig, experts: tuple[int, int] | None = None):
        """cfg: this rank's shard_config; experts: the router ids [start, stop) this rank holds (None: all)."""
        super().__init__()
        self.top_k = cfg.num_experts_per_tok
        self.gate = Linear(cfg.hidden_size, cfg.num_experts, bias=False)  # the router scores all E experts
        self.first_expert, stop = experts or (0, cfg.num_experts)
        self.num_local_experts = stop - self.first_expert
        self.experts = Experts(self.num_local_experts, cfg.hidden_size, cfg.moe_intermediate_size)
        self.shared_expert = GatedMLP(cfg.hidden_size, cfg.shared_expert_intermediate_size)
        self.shared_expert_gate = Linear(cfg.hidden_size, 1, bias=False)

    def fuse_shared_expert(self) -> bool:
        """Stack the shared expert after the routed experts as expert E (module docstring) when the experts take it
        (same format, group size, layout and sizes; not expert parallel) -> whether it was."""
        if self.shared_expert is None or self.num_local_experts < self.gate.out_features:
            return False
        gate = self.shared_expert_gate  # the routing computes sigmoid(x . weight) from its 16-bit weight itself
        if not (isinstance(gate, nn.Linear) and gate.bias is None and gate.weight.dtype in _GATE_DTYPES):
            return False  # an int4 / FP8 gate (a checkpoint that quantized it): the unstacked path runs it
        gate_up, down = (_single(m) for m in (self.shared_expert.gate_up_proj, self.shared_expert.down_proj))
        if not hasattr(self.experts, "append_expert") or not self.experts.append_expert(gate_up, down):
            return False
        self.shared_expert = None
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [T, hidden] -> [T, hidden]."""
        if self.shared_expert is None:  # stacked as expert E: one more pair per token
            return self.experts(x, *self._route(x, self.shared_expert_gate.weight))
        weights, ids = self._route(x)
        if self.num_local_experts < self.gate.out_features:  # expert parallel
            ids = local_expert_ids(ids, self.first_expert, self.num_local_experts)
        routed = self.experts(x, weights, ids)
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return routed + shared

    def _route(self, x: torch.Tensor, gate_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, H] -> (weights, ids) [T, k] (+1 with gate_weight: the stacked shared expert's pair)."""
        if isinstance(self.gate, nn.Linear) and self.gate.bias is None:  # the router GEMV can join the routing launch
            return route_hidden(x, self.gate.weight, self.top_k, gate_weight)
        return route_logits(self.gate(x), self.top_k, x, gate_weight)


def _single(linear: nn.Module) -> nn.Module:
    """A fused projection left with one Linear (merge_projection_runs) -> that Linear; anything else as it is."""
    if isinstance(linear, ProjectionGroup) and len(linear._modules) == 1:
        return next(linear.children())
    return linear


def fuse_shared_experts(model: nn.Module) -> None:
    """Once, after loading and after merge_projection_runs (the shared gate|up must be one Linear): stack every MoE
    layer's shared expert with its routed experts where they take it (SparseMoE.fuse_shared_expert)."""
    for moe in [m for m in model.modules() if isinstance(m, SparseMoE)]:
        moe.fuse_shared_expert()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # the experts' old stacks, before the KV cache is sized from free memory
