"""int4 MoE for decode-sized batches as per-pair GEMVs: no sort / align at all, four launches per MoE block.

Each (token, expert) pair is its own GEMV over its expert's weight (int4_gemm.kpack.kpack_gemv_rows for K-packed
experts, else int4_gemm.gemv.int4_gemv_rows; split-K partials in fp32), so the weight stream is spread over (column
tiles x K splits x pairs) programs whatever the routing. Launches: GEMM1 gate|up -> _silu_mul_kernel (sums the K splits,
silu(gate) · up in fp32, rounded to x's dtype as the grouped path rounds its activation) -> GEMM2 down -> combine_kernel
(sums the K splits and the k pairs of each token, times the routing weights, one rounding). All sums run in a fixed
order: deterministic. A pair re-reads its expert even when another pair of the batch uses it too, so past a few tokens
the sorted grouped GEMM (triton.py) wins: the dispatch uses this up to DECODE_MAX_PAIRS pairs. Reference:
reference.fused_moe_experts."""
import torch
import triton
import triton.language as tl

from ..int4_gemm.kpack import kpack_gemv_rows
from ..int4_gemm.gemv import int4_gemv_rows
from ..int4_gemm.triton import split_sum, split_tile
from ..pdl import pdl_args, pdl_start
from .reference import ExpertWeights


@triton.jit
def _silu_mul_kernel(part, act, ids, S, M, INTER, BLOCK: tl.constexpr, BS: tl.constexpr, USE_PDL: tl.constexpr = False):
    """part [S, M, 2·INTER] fp32, ids [M] -> act [M, INTER] = silu(gate) · up of the split sums (rows of pairs with
    id -1, another rank's expert, are not written). Program (i_r, i_b)."""
    pdl_start(USE_PDL)
    i_r, i_b = tl.program_id(0), tl.program_id(1)
    if tl.load(ids + i_r) < 0:
        return
    o_i = i_b * BLOCK + tl.arange(0, BLOCK)
    m_i = o_i < INTER
    p_row = part + i_r.to(tl.int64) * (2 * INTER)
    b_gate = split_sum(p_row, M * 2 * INTER, S, o_i, m_i, BLOCK, BS)
    b_up = split_sum(p_row + INTER, M * 2 * INTER, S, o_i, m_i, BLOCK, BS)
    b_act = b_gate / (1.0 + tl.exp(-b_gate)) * b_up
    tl.store(act + i_r.to(tl.int64) * INTER + o_i, b_act.to(act.dtype.element_ty), mask=m_i)


@triton.jit
def combine_kernel(part, weights, ids, out, S, M, H, TOP_K: tl.constexpr, MUL_WEIGHT: tl.constexpr,
                   BLOCK: tl.constexpr, BS: tl.constexpr = 2, USE_PDL: tl.constexpr = False):
    """part [S, M = T·TOP_K, H] (fp32 split partials, or S = 1 rows in any dtype), weights [M] fp32, ids [M] ->
    out[t] = sum_j weights[t·k + j] · sum_s part[s, t·k + j] in fp32 (MUL_WEIGHT=False: no weights), one rounding.
    Pairs with id -1 (another rank's expert) are skipped: their part rows are never read. Program (i_t, i_b)."""
    pdl_start(USE_PDL)
    i_t, i_b = tl.program_id(0), tl.program_id(1)
    o_h = i_b * BLOCK + tl.arange(0, BLOCK)
    m_h = o_h < H
    b_out = tl.zeros([BLOCK], dtype=tl.float32)
    for j in tl.static_range(TOP_K):
        i_r = i_t * TOP_K + j
        m_r = m_h & (tl.load(ids + i_r) + tl.zeros([BLOCK], dtype=tl.int32) >= 0)  # a [BLOCK] mask, not a scalar
        b_row = split_sum(part + i_r.to(tl.int64) * H, M * H, S, o_h, m_r, BLOCK, BS)
        if MUL_WEIGHT:
            b_row *= tl.load(weights + i_r)
        b_out += b_row
    tl.store(out + i_t.to(tl.int64) * H + o_h, b_out.to(out.dtype.element_ty), mask=m_h)


def _gemv_rows(x: torch.Tensor, w: ExpertWeights, ids: torch.Tensor, x_row_div: int,
               ids_early: bool = False) -> torch.Tensor:
    """fp32 split-K partials [S, R, N] of the per-pair GEMVs, in the weight's layout (K-packed or AWQ). ids_early:
    the launch right before this one did not write ids (the K-packed GEMV may then prefetch the experts' weights)."""
    if w.kpack:
        return kpack_gemv_rows(x, w.qweight, w.qzeros, w.scales, w.group_size, ids, x_row_div, ids_early=ids_early)
    return int4_gemv_rows(x, w.qweight, w.qzeros, w.scales, w.group_size, ids, x_row_div)


DECODE_MAX_PAIRS = 128  # T · k up to this: per-pair GEMVs (T <= 16 at top-8); beyond: align + grouped GEMM


def fused_moe_int4_decode(x: torch.Tensor, gate_up: ExpertWeights, down: ExpertWeights, topk_weights: torch.Tensor,
                          topk_ids: torch.Tensor) -> torch.Tensor:
    """x: [T, H]; gate_up / down: int4 ExpertWeights (gate_up N = 2I, first I columns gate; down N = H, K = I);
    topk_weights [T, k] fp32; topk_ids [T, k] (-1: another rank's expert: its GEMV programs exit at once, nothing
    is added for it) -> [T, H] in x's dtype. Shapes are checked by the caller
    (triton.check_moe_shapes)."""
    t, h = x.shape
    top_k = topk_ids.shape[1]
    inter = down.dims()[1]
    ids = topk_ids.reshape(-1).contiguous()
    part1 = _gemv_rows(x, gate_up, ids, top_k)
    act = torch.empty(t * top_k, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(t, h, dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    # small tiles, one warp each: at T=1 (9 pairs) the launch is latency-bound (H200, 35B-A3B shapes: 256 columns x 4
    # warps 3.0 us, 64 x 1 2.2 us; the combine 5.7 -> 4.6 us at 128 x 1)
    _silu_mul_kernel[(t * top_k, triton.cdiv(inter, 64))](part1, act, ids, part1.shape[0], t * top_k, inter,
                                                           BLOCK=64, BS=split_tile(part1.shape[0], 16), num_warps=1,
                                                           **pdl_args(part1))
    part2 = _gemv_rows(act, down, ids, 1, ids_early=True)  # the activation launch sits between router and down
    weights = topk_weights.reshape(-1).float().contiguous()
    combine_kernel[(t, triton.cdiv(h, 128))](part2, weights, ids, out, part2.shape[0], t * top_k, h, TOP_K=top_k,
                                              MUL_WEIGHT=True, BLOCK=128, BS=split_tile(part2.shape[0], 16),
                                              num_warps=1, **pdl_args(part2))
    return out
