"""MoE dispatch. CPU: the torch reference (a loop over the experts that received tokens).

CUDA, 16-bit experts (`fused_moe`): sort the (token, expert) pairs by expert and run both expert GEMMs as torch
grouped GEMMs over the sorted rows, then decode.combine_kernel sums each token's pairs in fp32 (deterministic). The
Triton fused MoE (triton.py, INT4=False) runs the same math; grouped_mm stays the bf16 path until
benchmarks/kernels/bench_int4.py shows the Triton one faster on the card (not measured yet).
CUDA, int4 experts (`fused_moe_int4`): the Triton fused MoE with the dequant in its main loop; decode-sized batches
(T·k <= decode.DECODE_MAX_PAIRS) run as per-pair int4 GEMVs instead (decode.py; K-packed experts at a few tokens
as two launches that finish their own K sums, decode_kpack.py), and up to
triton.TRITON_ALIGN_MAX_PAIRS pairs the sort / align is one Triton launch (align_triton.py).
CUDA, block-FP8 experts (`fused_moe_fp8`): the same Triton fused MoE, each K tile times its block scale in the loop.
Routing (`route_topk_softmax`): on CUDA one Triton launch (route_triton.py), elsewhere the torch reference.
`route_hidden` starts from the hidden states and the router's weight: up to route_triton.FUSED_MAX_T tokens on CUDA
the router's GEMV joins the same launch; otherwise F.linear, then the above.
`route_with_shared_expert` also appends the shared expert as one more pair (its sigmoid gate computed in the same
launch), for layers whose shared expert is stacked with the routed ones (layers/moe.py).
All CUDA paths are free of host syncs, so MoE layers are captured in CUDA graphs. triton.py is imported lazily
(importing deltaserve must not import triton, see kernels/paged_attention).
Expert parallelism: a topk id of -1 marks a pair whose expert another rank holds; every path (reference, grouped
GEMM, Triton GEMMs and decode GEMVs) skips it: no GEMM row or GEMV work is spent on it and it adds nothing."""
import torch
import torch.nn.functional as F

from .reference import ExpertWeights, fused_moe_experts
from .reference import fused_moe as fused_moe_reference
from .reference import route_topk_softmax as route_topk_softmax_reference
from .reference import route_with_shared_expert as route_with_shared_expert_reference

__all__ = [
    "ExpertWeights",
    "fused_moe",
    "fused_moe_fp8",
    "fused_moe_int4",
    "fused_moe_reference",
    "fused_moe_triton",
    "route_hidden",
    "route_logits",
    "route_topk_softmax",
    "route_topk_softmax_reference",
    "route_with_shared_expert",
    "route_with_shared_expert_reference",
]


def __getattr__(name: str):
    """PEP 562 lazy export of the Triton fused MoE."""
    if name == "fused_moe_triton":
        from .triton import fused_moe_triton
        return fused_moe_triton
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _triton_routes(router_logits: torch.Tensor) -> bool:
    """Whether route_triton's one-launch router takes these logits (CUDA, E <= its MAX_EXPERTS)."""
    if not router_logits.is_cuda:
        return False
    from .route_triton import MAX_EXPERTS

    return router_logits.shape[-1] <= MAX_EXPERTS


def route_topk_softmax(router_logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits: [T, E] -> (weights [T, top_k] fp32 renormalised to sum 1, ids [T, top_k] int64), Qwen3.5's
    router: softmax over all E experts in fp32, top-k, renormalise."""
    if _triton_routes(router_logits):
        from .route_triton import route_topk_softmax_triton

        return route_topk_softmax_triton(router_logits.contiguous(), top_k)
    return route_topk_softmax_reference(router_logits, top_k)


def route_with_shared_expert(router_logits: torch.Tensor, top_k: int, x: torch.Tensor,
                             gate_weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """route_topk_softmax plus the shared expert as pair top_k (id E, weight sigmoid(x . gate_weight)): x [T, H],
    gate_weight [1, H] -> (weights, ids) [T, top_k + 1]. On CUDA the same single Triton launch computes the gate."""
    if _triton_routes(router_logits) and x.dtype in (torch.float16, torch.bfloat16):
        from .route_triton import route_topk_softmax_triton

        return route_topk_softmax_triton(router_logits.contiguous(), top_k, x.contiguous(), gate_weight.contiguous())
    return route_with_shared_expert_reference(router_logits, top_k, x, gate_weight)


def route_hidden(x: torch.Tensor, router_weight: torch.Tensor, top_k: int,
                 gate_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, H]; router_weight: [E, H] (the router Linear's weight); gate_weight: [1, H] (the shared expert's gate,
    None when the shared expert is not stacked) -> route_topk_softmax(F.linear(x, router_weight), top_k), or
    route_with_shared_expert(..., x, gate_weight) with it."""
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and router_weight.dtype == x.dtype:
        from .route_triton import FUSED_MAX_T, MAX_EXPERTS, arrival_counters, route_hidden_triton

        counter = arrival_counters(x.device) if x.shape[0] <= FUSED_MAX_T else None
        if counter is not None and router_weight.shape[0] <= MAX_EXPERTS:
            return route_hidden_triton(x.contiguous(), router_weight.contiguous(), top_k, counter,
                                       None if gate_weight is None else gate_weight.contiguous())
    return route_logits(F.linear(x, router_weight), top_k, x, gate_weight)


def route_logits(router_logits: torch.Tensor, top_k: int, x: torch.Tensor,
                 gate_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """route_hidden from router logits [T, E] already computed: route_topk_softmax, or route_with_shared_expert
    when gate_weight is given."""
    if gate_weight is None:
        return route_topk_softmax(router_logits, top_k)
    return route_with_shared_expert(router_logits, top_k, x, gate_weight)


def fused_moe_int4(x: torch.Tensor, gate_up: ExpertWeights, down: ExpertWeights, topk_weights: torch.Tensor,
                   topk_ids: torch.Tensor) -> torch.Tensor:
    """x: [T, H]; gate_up / down: int4 ExpertWeights (AWQ layout, [E] leading); topk_weights [T, k] fp32;
    topk_ids [T, k] -> [T, H] in x's dtype. CUDA fp16/bf16 with power-of-two groups >= 16: the Triton fused MoE;
    elsewhere every expert dequantized, then the reference loop."""
    groups_ok = all(g >= 16 and g & (g - 1) == 0 for g in (gate_up.group_size, down.group_size))
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and groups_ok and down.dims()[1] % 8 == 0:
        from .triton import fused_moe_triton

        return fused_moe_triton(x, gate_up, down, topk_weights, topk_ids)
    return fused_moe_experts(x, gate_up, down, topk_weights, topk_ids)


def fused_moe_fp8(x: torch.Tensor, gate_up: ExpertWeights, down: ExpertWeights, topk_weights: torch.Tensor,
                  topk_ids: torch.Tensor) -> torch.Tensor:
    """x: [T, H]; gate_up / down: block-FP8 ExpertWeights (gate_up one [E, 2I, H] stack, I a whole number of scale
    blocks); topk_weights [T, k] fp32; topk_ids [T, k] -> [T, H] in x's dtype. CUDA fp16/bf16 with K and the scale
    blocks' K in multiples of 16: the Triton fused MoE, dequantizing inside its K loop; elsewhere every expert
    dequantized, then the reference loop."""
    tiles_ok = all(w.dims()[1] % 16 == 0 and w.block[1] % 16 == 0 for w in (gate_up, down))
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and tiles_ok and down.dims()[1] % 8 == 0:
        from .triton import fused_moe_triton

        return fused_moe_triton(x, gate_up, down, topk_weights, topk_ids)
    return fused_moe_experts(x, gate_up, down, topk_weights, topk_ids)


def fused_moe(x: torch.Tensor, gate_up: torch.Tensor, down: torch.Tensor, topk_weights: torch.Tensor,
              topk_ids: torch.Tensor) -> torch.Tensor:
    """x: [T, H]; gate_up: [E, 2I, H]; down: [E, H, I]; topk_weights: [T, k] fp32; topk_ids: [T, k] (-1: expert held
    by another rank, skipped) -> [T, H]."""
    if x.is_cuda and hasattr(torch, "_grouped_mm") and x.dtype == torch.bfloat16:
        return _grouped_moe(x, gate_up, down, topk_weights, topk_ids)
    return fused_moe_reference(x, gate_up, down, topk_weights, topk_ids)


def _grouped_moe(x, gate_up, down, topk_weights, topk_ids) -> torch.Tensor:
    t, k = topk_ids.shape
    e = gate_up.shape[0]
    flat = topk_ids.reshape(-1)
    # -1 (expert on another rank) -> bucket e: sorted after every expert, past offs[-1], so no group's GEMM reaches
    # those rows; the combine skips them
    key = torch.where(flat < 0, e, flat)
    order = torch.argsort(key, stable=True)
    # counts by scatter_add, not bincount: CUDA bincount reads its max back to the host, which a graph cannot hold
    counts = torch.zeros(e + 1, dtype=torch.int64, device=x.device).scatter_add_(0, key, torch.ones_like(key))
    offs = torch.cumsum(counts[:e], 0).to(torch.int32)
    h = torch._grouped_mm(x[order // k], gate_up.transpose(-2, -1), offs=offs)  # [T*k, 2I]
    gate, up = h.chunk(2, dim=-1)
    y = torch._grouped_mm(F.silu(gate) * up, down.transpose(-2, -1), offs=offs)  # [T*k, H], by expert
    # back to pair order (pair t·k + j at row t·k + j), then each token's k rows times their routing weights summed in
    # fp32 in a fixed order, one rounding (combine_kernel). An index_add_ of the weighted rows did this with atomic
    # adds, in whatever order they landed and rounding to bf16 at each: two runs of one batch differed.
    pos = torch.empty_like(order).scatter_(0, order, torch.arange(order.numel(), device=x.device))
    pairs = y.index_select(0, pos)
    from .decode import combine_pairs

    out = torch.empty(t, x.shape[1], dtype=x.dtype, device=x.device)
    return combine_pairs(pairs, topk_weights.reshape(-1).float().contiguous(), flat.contiguous(), out, k)
