"""int4 MoE for decode-sized batches as per-pair GEMVs: no sort / align at all, four launches per MoE block.
K-packed experts at up to decode_kpack.MAX_TOKENS tokens take decode_kpack.py's two launches instead.

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
from ..int4_gemm.triton import split_tile
from ..pdl import pdl_args, pdl_start
from .decode_kpack import MAX_TOKENS, fused_moe_kpack_decode
from .decode_kpack import takes as takes_kpack
from .reference import ExpertWeights


@triton.jit
def _silu_mul_kernel(part, act, ids, S, M, INTER, BLOCK: tl.constexpr, BS: tl.constexpr, USE_PDL: tl.constexpr = False):
    """part [S, M, 2·INTER] fp32, ids [M] -> act [M, INTER] = silu(gate) · up of the split sums (rows of pairs with
    id -1, another rank's expert, are not written). Program (i_r, i_b). The id is read before the PDL wait (the
    router wrote it, two launches back); gate and up tiles of a split chunk load together (one latency, not two)."""
    i_r, i_b = tl.program_id(0), tl.program_id(1)
    i_e = tl.load(ids + i_r)
    pdl_start(USE_PDL)
    if i_e < 0:
        return
    o_i = i_b * BLOCK + tl.arange(0, BLOCK)
    m_i = o_i < INTER
    p_row = part + i_r.to(tl.int64) * (2 * INTER)
    b_gate = tl.zeros([BLOCK], dtype=tl.float32)
    b_up = tl.zeros([BLOCK], dtype=tl.float32)
    for s0 in range(0, S, BS):  # split_sum's order, both halves at once
        o_s = s0 + tl.arange(0, BS)
        p_s = p_row + o_s[:, None].to(tl.int64) * (M * 2 * INTER) + o_i[None, :]
        m_s = (o_s < S)[:, None] & m_i[None, :]
        b_gate += tl.sum(tl.load(p_s, mask=m_s, other=0.0), axis=0)
        b_up += tl.sum(tl.load(p_s + INTER, mask=m_s, other=0.0), axis=0)
    b_act = b_gate / (1.0 + tl.exp(-b_gate)) * b_up
    tl.store(act + i_r.to(tl.int64) * INTER + o_i, b_act.to(act.dtype.element_ty), mask=m_i)


@triton.jit
def combine_kernel(part, weights, ids, out, S, M, H, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr,
                   MUL_WEIGHT: tl.constexpr, BLOCK: tl.constexpr, BS: tl.constexpr = 2, IDS_EARLY: tl.constexpr = False,
                   USE_PDL: tl.constexpr = False):
    """part [S, M = T·TOP_K, H] (fp32 split partials, or S = 1 rows in any dtype), weights [M] fp32, ids [M] ->
    out[t] = sum_j weights[t·k + j] · sum_s part[s, t·k + j] in fp32 (MUL_WEIGHT=False: no weights), one rounding.
    Pairs with id -1 (another rank's expert) are skipped: their part rows are never read. Program (i_t, i_b);
    BLOCK_K = next_power_of_2(TOP_K). A token's k rows are read together, BS splits at a time, as one [BS, k, BLOCK]
    tile: row by row, each row's id and then its partials were dependent loads, ~9 latencies in a row at top-8 +
    shared (4.7 us at T = 1 on an H200). IDS_EARLY: no kernel launched right before this one writes ids or weights
    (they are read before the PDL wait)."""
    i_t, i_b = tl.program_id(0), tl.program_id(1)
    o_h = i_b * BLOCK + tl.arange(0, BLOCK)
    m_h = o_h < H
    o_j = tl.arange(0, BLOCK_K)
    o_r = i_t.to(tl.int64) * TOP_K + o_j
    if IDS_EARLY:
        m_r, b_w = _pair_rows(weights, ids, o_r, o_j, TOP_K, BLOCK_K, MUL_WEIGHT)
    pdl_start(USE_PDL)
    if not IDS_EARLY:
        m_r, b_w = _pair_rows(weights, ids, o_r, o_j, TOP_K, BLOCK_K, MUL_WEIGHT)
    b_acc = tl.zeros([BLOCK_K, BLOCK], dtype=tl.float32)
    for s0 in range(0, S, BS):
        o_s = s0 + tl.arange(0, BS)
        p_p = part + o_s[:, None, None].to(tl.int64) * (M * H) + o_r[None, :, None] * H + o_h[None, None, :]
        m_p = (o_s < S)[:, None, None] & m_r[None, :, None] & m_h[None, None, :]
        b_acc += tl.sum(tl.load(p_p, mask=m_p, other=0.0).to(tl.float32), axis=0)
    if MUL_WEIGHT:
        b_acc *= b_w[:, None]
    b_out = tl.sum(b_acc, axis=0)
    tl.store(out + i_t.to(tl.int64) * H + o_h, b_out.to(out.dtype.element_ty), mask=m_h)


@triton.jit
def _pair_rows(weights, ids, o_r, o_j, TOP_K: tl.constexpr, BLOCK_K: tl.constexpr, MUL_WEIGHT: tl.constexpr):
    """-> (mask of a token's live pair rows (id >= 0), their routing weights in fp32 or 1.0 without MUL_WEIGHT)."""
    m_r = (o_j < TOP_K) & (tl.load(ids + o_r, mask=o_j < TOP_K, other=-1) >= 0)
    if MUL_WEIGHT:
        b_w = tl.load(weights + o_r, mask=m_r, other=0.0)
    else:
        b_w = tl.full([BLOCK_K], 1.0, tl.float32)
    return m_r, b_w


def combine_pairs(part: torch.Tensor, weights: torch.Tensor | None, ids: torch.Tensor, out: torch.Tensor, top_k: int,
                  block: int = 1024, num_warps: int = 4, ids_early: bool = False) -> torch.Tensor:
    """out [T, H] = per token, the sum over its top_k pair rows of part ([S, T·k, H] fp32 split partials, or [T·k, H]
    rows in any dtype) summed over S, times weights ([T·k] fp32; None: unweighted), in fp32 with one rounding; ids
    [T·k]: rows of id -1 are skipped. ids_early: combine_kernel's IDS_EARLY."""
    part = part.unsqueeze(0) if part.dim() == 2 else part
    s, (t, h) = part.shape[0], out.shape
    if t:
        combine_kernel[(t, triton.cdiv(h, block))](
            part, part if weights is None else weights, ids, out, s, t * top_k, h, TOP_K=top_k,
            BLOCK_K=triton.next_power_of_2(top_k), MUL_WEIGHT=weights is not None, BLOCK=block,
            BS=1 if s == 1 else min(4, split_tile(s)), IDS_EARLY=ids_early, num_warps=num_warps, **pdl_args(part))
    return out


def _gemv_rows(x: torch.Tensor, w: ExpertWeights, ids: torch.Tensor, x_row_div: int,
               ids_early: bool = False) -> torch.Tensor:
    """fp32 split-K partials [S, R, N] of the per-pair GEMVs, in the weight's layout (K-packed or AWQ). ids_early:
    the launch right before this one did not write ids (the K-packed GEMV may then prefetch the experts' weights)."""
    if w.kpack:
        return kpack_gemv_rows(x, w.qweight, w.qzeros, w.scales, w.group_size, ids, x_row_div, ids_early=ids_early)
    return int4_gemv_rows(x, w.qweight, w.qzeros, w.scales, w.group_size, ids, x_row_div)


DECODE_MAX_PAIRS = 128  # T · k up to this: per-pair GEMVs (T <= 16 at top-8); beyond: align + grouped GEMM


def fused_moe_int4_decode(x: torch.Tensor, gate_up: ExpertWeights, down: ExpertWeights, topk_weights: torch.Tensor,
                          topk_ids: torch.Tensor, two_launch: bool | None = None) -> torch.Tensor:
    """x: [T, H]; gate_up / down: int4 ExpertWeights (gate_up N = 2I, first I columns gate; down N = H, K = I);
    topk_weights [T, k] fp32; topk_ids [T, k] (-1: another rank's expert: its GEMV programs exit at once, nothing
    is added for it) -> [T, H] in x's dtype. Shapes are checked by the caller
    (triton.check_moe_shapes). two_launch: decode_kpack's kernels (K-packed experts) or not; None: up to its
    MAX_TOKENS tokens."""
    if two_launch is None:
        two_launch = x.shape[0] <= MAX_TOKENS and takes_kpack(gate_up, down)
    elif two_launch and not takes_kpack(gate_up, down):
        raise ValueError("the two-launch MoE decode reads K-packed experts (groups in multiples of 64) only")
    if two_launch:
        return fused_moe_kpack_decode(x, gate_up, down, topk_weights, topk_ids)
    t, h = x.shape
    top_k = topk_ids.shape[1]
    inter = down.dims()[1]
    ids = topk_ids.reshape(-1).contiguous()
    weights = topk_weights.reshape(-1).float().contiguous()  # before the GEMVs: combine reads it before its wait
    part1 = _gemv_rows(x, gate_up, ids, top_k)
    act = torch.empty(t * top_k, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(t, h, dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    # small tiles, one warp each: at T=1 (9 pairs) the launch is latency-bound (H200, 35B-A3B shapes: 256 columns x 4
    # warps 3.0 us, 64 x 1 2.2 us)
    _silu_mul_kernel[(t * top_k, triton.cdiv(inter, 64))](part1, act, ids, part1.shape[0], t * top_k, inter,
                                                           BLOCK=64, BS=split_tile(part1.shape[0], 16), num_warps=1,
                                                           **pdl_args(part1))
    part2 = _gemv_rows(act, down, ids, 1, ids_early=True)  # the activation launch sits between router and down
    # 64 columns, 2 warps: the [splits, pairs, columns] tile is 4 x 16 x 64 at T = 1 (35B-A3B shapes: 4 splits)
    return combine_pairs(part2, weights, ids, out, top_k, block=64, num_warps=2, ids_early=True)
