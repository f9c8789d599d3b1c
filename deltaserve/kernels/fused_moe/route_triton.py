"""Triton router: softmax over all E experts (fp32), top-k, renormalise, in ONE launch (one program per token).

Same math as reference.route_topk_softmax, which on CUDA costs five launches per MoE layer (softmax, the two kernels
of torch.topk, the sum and the division: ~15 us at batch 1 on an H200, this kernel 2.4 us). The k experts are picked
by k rounds of max over the probabilities, each taking the lowest expert id among equal maxima, so the ids come out
in descending weight order as torch.topk's do (torch leaves the order of equal values open). Padded lanes
(E < BLOCK_E) hold -1 and are never picked. HAS_SHARED: the shared expert joins as pair TOP_K (id E, weight
sigmoid(x . w_gate)), its gate computed in the same program (reference.route_with_shared_expert)."""
import torch
import triton
import triton.language as tl

MAX_EXPERTS = 4096  # one program holds a token's whole row of router logits


@triton.jit
def _route_kernel(logits, weights, ids, x, w_gate, E, H, stride_lt, stride_xt, TOP_K: tl.constexpr,
                  BLOCK_E: tl.constexpr, BLOCK_K: tl.constexpr, HAS_SHARED: tl.constexpr, BLOCK_H: tl.constexpr):
    """logits [T, E] (any float dtype) -> weights [T, TOP_K] fp32 (summing to 1), ids [T, TOP_K] int64.
    HAS_SHARED: x [T, H], w_gate [H] (16-bit); rows of TOP_K + 1, the last the shared expert's (id E)."""
    i_t = tl.program_id(0).to(tl.int64)
    o_e = tl.arange(0, BLOCK_E)
    m_e = o_e < E
    b_x = tl.load(logits + i_t * stride_lt + o_e, mask=m_e, other=float("-inf")).to(tl.float32)
    b_p = tl.exp(b_x - tl.max(b_x, axis=0))
    b_p = b_p / tl.sum(b_p, axis=0)
    b_live = tl.where(m_e, b_p, -1.0)
    o_k = tl.arange(0, BLOCK_K)
    b_w = tl.zeros([BLOCK_K], dtype=tl.float32)
    b_id = tl.zeros([BLOCK_K], dtype=tl.int32)
    for j in tl.static_range(TOP_K):
        b_max = tl.max(b_live, axis=0)
        # a NaN row matches nothing: clamp so a garbage row still names a real expert (no out-of-range reads later)
        b_arg = tl.minimum(tl.min(tl.where(b_live == b_max, o_e, BLOCK_E), axis=0), E - 1)
        b_w = tl.where(o_k == j, b_max, b_w)
        b_id = tl.where(o_k == j, b_arg, b_id)
        b_live = tl.where(o_e == b_arg, -1.0, b_live)
    b_w = b_w / tl.sum(b_w, axis=0)
    if HAS_SHARED:
        o_h = tl.arange(0, BLOCK_H)
        b_acc = tl.zeros([BLOCK_H], dtype=tl.float32)
        for h in range(0, H, BLOCK_H):
            m_h = h + o_h < H
            b_acc += (tl.load(x + i_t * stride_xt + h + o_h, mask=m_h, other=0.0).to(tl.float32)
                      * tl.load(w_gate + h + o_h, mask=m_h, other=0.0).to(tl.float32))
        # rounded to x's dtype after the dot and after the sigmoid, as the 16-bit Linear and torch.sigmoid round
        b_g = tl.sum(b_acc, axis=0).to(x.dtype.element_ty).to(tl.float32)
        b_g = (1.0 / (1.0 + tl.exp(-b_g))).to(x.dtype.element_ty).to(tl.float32)
        b_w = tl.where(o_k == TOP_K, b_g, b_w)
        b_id = tl.where(o_k == TOP_K, E, b_id)
    width: tl.constexpr = TOP_K + HAS_SHARED
    m_k = o_k < width
    tl.store(weights + i_t * width + o_k, b_w, mask=m_k)
    tl.store(ids + i_t * width + o_k, b_id.to(tl.int64), mask=m_k)


def route_topk_softmax_triton(router_logits: torch.Tensor, top_k: int, x: torch.Tensor | None = None,
                              gate_weight: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """router_logits [T, E] -> (weights [T, top_k] fp32, ids [T, top_k] int64), as reference.route_topk_softmax.
    With x [T, H] and gate_weight [1, H] (the shared expert's gate): [T, top_k + 1], as
    reference.route_with_shared_expert."""
    t, e = router_logits.shape
    if not 0 < top_k <= e or e > MAX_EXPERTS or router_logits.stride(-1) != 1:
        raise ValueError(f"router logits {tuple(router_logits.shape)} (stride {router_logits.stride()}): the Triton "
                         f"router takes top_k in [1, E], E <= {MAX_EXPERTS} and a contiguous expert axis")
    shared = x is not None
    if shared and (x.shape[0] != t or x.stride(-1) != 1 or gate_weight.shape != (1, x.shape[1])
                   or not gate_weight.is_contiguous()):
        raise ValueError(f"x {tuple(x.shape)} and the shared expert gate {tuple(gate_weight.shape)} must be "
                         f"[T={t}, H] and [1, H], contiguous along H")
    width = top_k + shared
    weights = torch.empty(t, width, dtype=torch.float32, device=router_logits.device)
    ids = torch.empty(t, width, dtype=torch.int64, device=router_logits.device)
    if t:
        block_e = max(16, triton.next_power_of_2(e))
        x_arg, w_arg = (x, gate_weight) if shared else (router_logits, router_logits)  # unused without shared
        _route_kernel[(t,)](router_logits, weights, ids, x_arg, w_arg, e, x_arg.shape[-1], router_logits.stride(0),
                            x_arg.stride(0), TOP_K=top_k, BLOCK_E=block_e,
                            BLOCK_K=max(2, triton.next_power_of_2(width)), HAS_SHARED=shared, BLOCK_H=1024,
                            num_warps=4 if block_e >= 1024 else 1)
    return weights, ids
