"""int4 MoE decode over K-packed experts in two launches: gate|up with the activation, then down with the combine.

The per-pair GEMVs of decode.py split K across programs (fp32 partials), so the activation and the sum over a
token's pairs are two more launches: at Qwen3.5-35B-A3B shapes and T = 1 (8 experts + the shared one) the four
launches ran 6.5 + 2.0 + 5.1 + 4.7 us on an H200 for ~14 MB of weights. Here K is split across the threads of ONE
program and reduced at its end, so each launch finishes its own sums (up to MAX_TOKENS tokens: past that the
per-pair GEMVs keep more loads in flight and win):
  1. `_gate_up_act_kernel`, program (pair, 2·CG columns of act): the pair's gate and up columns over the whole K
     (half the threads on gate, half on up), act = silu(gate) · up in fp32, rounded once to x's dtype (as the other
     paths round their activation);
  2. `_down_combine_kernel`, program (token, 4·CG columns): the down GEMV of all k pairs of the token (its
     (pair, span) slots), each slot's sum times the pair's routing weight, summed in fp32, one rounding. Its ids,
     routing weights and first weight rows are loaded before the PDL wait (the router wrote them two launches back;
     only act is the launch right before's): H200, 35B-A3B cut to 8 layers, AWQ, batch 1, this and the fragment
     GEMV's early weights (int4_gemm/mma.py) against the kernels before, one process, two rounds: 0.666 / 0.663 ->
     0.649 / 0.647 ms a step (batch 2 0.766 / 0.733 -> 0.727 / 0.725).

Threads are rows. Every tensor is [32·NW, 4]: thread i holds 4 adjacent columns (one 16-byte load of a K-packed
int32 row) of span slot i // CG, so the layout Triton picks for those loads (one row a thread, as in
int4_gemm/mma.py, whose check_rows_are_threads refuses a Triton that lays them out otherwise) is the only one in the
loop and nothing moves through shared memory until the final sum over the slots. The dequantization is kpack.py's
magic-number form (a shift, two LOP3 and two FMA per two weights); the activation of row r of a nibble is the same
for the thread's 4 columns, loaded 4 rows at a time ([32·NW, 4] bf16) and broadcast within the thread (`_bcast`:
register moves ptxas folds away; the interpreter selects and sums).
Per span: sum_k x_k (q_k - z) = 256 (acc - X_lo - X_hi/16) - z (X_lo + X_hi), times the group's scale. All sums
run in a fixed order: deterministic. Reference: reference.fused_moe_experts.

Not kept on the way (H200, Triton 3.6): [groups, rows, columns] and [rows, slots, columns] tiles, which Triton laid out
with the rows across threads and moved the activations and reductions through shared memory (40-147 barriers a
program, 20-30 us at T = 1 against the per-pair 14.8); the weight rows loaded where used, which ptxas spread over the
span's FMAs (their latencies added up; hence `_rows` and the next step's rows issued before this step's math)."""
import os

import torch
import triton
import triton.language as tl

from ...layers.quant import KPACK_SPAN
from ..int4_gemm.kpack import MASK_HI, MASK_LO, nibble_pair
from ..int4_gemm.mma import check_rows_are_threads
from ..int4_gemm.triton import awq_zeros_of_columns
from ..pdl import pdl_args, pdl_start
from .reference import ExpertWeights

_BCAST0, _BCAST1, _BCAST2, _BCAST3 = (tl.constexpr("".join(f"mov.f32 ${o}, ${4 + c};" for o in range(4)))
                                      for c in range(4))
_BCAST_IO = tl.constexpr("=f,=f,=f,=f,f,f,f,f")


@triton.jit
def _bcast(v, C: tl.constexpr, USE_ASM: tl.constexpr):
    """v [R, 4] fp32 -> [R, 4] holding v[:, C] in all 4 places of the row (the thread's own registers)."""
    if USE_ASM:
        if C == 0:
            return tl.inline_asm_elementwise(_BCAST0, _BCAST_IO, [v], dtype=tl.float32, is_pure=True, pack=4)
        elif C == 1:
            return tl.inline_asm_elementwise(_BCAST1, _BCAST_IO, [v], dtype=tl.float32, is_pure=True, pack=4)
        elif C == 2:
            return tl.inline_asm_elementwise(_BCAST2, _BCAST_IO, [v], dtype=tl.float32, is_pure=True, pack=4)
        else:
            return tl.inline_asm_elementwise(_BCAST3, _BCAST_IO, [v], dtype=tl.float32, is_pure=True, pack=4)
    else:
        o_c = tl.arange(0, 4)
        return tl.broadcast_to(tl.sum(tl.where(o_c[None, :] == C, v, 0.0), axis=1)[:, None], v.shape)


@triton.jit
def _row(acc, b_q, x0, x1, x2, x3, x4, x5, x6, x7, C: tl.constexpr, M_LO, M_HI, USE_ASM: tl.constexpr):
    """acc [R, 4] += the 8 nibbles of K-packed int32 row b_q [R, 4] times their activations: element C of each x_j
    (x_j [R, 4]: nibble j of 4 rows, odd j already / 16)."""
    acc = nibble_pair(acc, b_q, _bcast(x0, C, USE_ASM), _bcast(x1, C, USE_ASM), M_LO, M_HI, 15)
    acc = nibble_pair(acc, b_q, _bcast(x2, C, USE_ASM), _bcast(x3, C, USE_ASM), M_LO, M_HI, 7)
    acc = nibble_pair(acc, b_q, _bcast(x4, C, USE_ASM), _bcast(x5, C, USE_ASM), M_LO, M_HI, -1)
    return nibble_pair(acc, b_q, _bcast(x6, C, USE_ASM), _bcast(x7, C, USE_ASM), M_LO, M_HI, -9)


@triton.jit
def _rows(p_q, m_q, stride_qk):
    """The 8 K-packed int32 rows of a span ([R, 4] each, one 16-byte load a thread), all issued before any math:
    loaded where they are used, ptxas spread them over the span's FMAs and their latencies added up."""
    return (tl.load(p_q, mask=m_q, other=0), tl.load(p_q + stride_qk, mask=m_q, other=0),
            tl.load(p_q + 2 * stride_qk, mask=m_q, other=0), tl.load(p_q + 3 * stride_qk, mask=m_q, other=0),
            tl.load(p_q + 4 * stride_qk, mask=m_q, other=0), tl.load(p_q + 5 * stride_qk, mask=m_q, other=0),
            tl.load(p_q + 6 * stride_qk, mask=m_q, other=0), tl.load(p_q + 7 * stride_qk, mask=m_q, other=0))


@triton.jit
def _quad(acc, xs_lo, xs_hi, q0, q1, q2, q3, p_x, m_x, M_LO, M_HI, USE_ASM: tl.constexpr):
    """Four K-packed int32 rows of a span ([R, 4], columns along the 4) against their activations (p_x [R, 4] at
    x[8j + r] of the first of the 4 rows, nibble j at + 8j) -> (acc, and the x sums of even / odd nibbles (the odd
    ones / 16), [R, 4] each, summed over the row axis later)."""
    x0 = tl.load(p_x, mask=m_x, other=0.0).to(tl.float32)
    x1 = tl.load(p_x + 8, mask=m_x, other=0.0).to(tl.float32) * 0.0625
    x2 = tl.load(p_x + 16, mask=m_x, other=0.0).to(tl.float32)
    x3 = tl.load(p_x + 24, mask=m_x, other=0.0).to(tl.float32) * 0.0625
    x4 = tl.load(p_x + 32, mask=m_x, other=0.0).to(tl.float32)
    x5 = tl.load(p_x + 40, mask=m_x, other=0.0).to(tl.float32) * 0.0625
    x6 = tl.load(p_x + 48, mask=m_x, other=0.0).to(tl.float32)
    x7 = tl.load(p_x + 56, mask=m_x, other=0.0).to(tl.float32) * 0.0625
    acc = _row(acc, q0, x0, x1, x2, x3, x4, x5, x6, x7, 0, M_LO, M_HI, USE_ASM)
    acc = _row(acc, q1, x0, x1, x2, x3, x4, x5, x6, x7, 1, M_LO, M_HI, USE_ASM)
    acc = _row(acc, q2, x0, x1, x2, x3, x4, x5, x6, x7, 2, M_LO, M_HI, USE_ASM)
    acc = _row(acc, q3, x0, x1, x2, x3, x4, x5, x6, x7, 3, M_LO, M_HI, USE_ASM)
    return acc, xs_lo + (x0 + x2 + x4 + x6), xs_hi + (x1 + x3 + x5 + x7)


@triton.jit
def _span(q0, q1, q2, q3, q4, q5, q6, q7, p_x, p_z, p_s, col, m_q, m_x, M_LO, M_HI, USE_ASM: tl.constexpr):
    """One span (64 K rows: the 8 K-packed int32 rows q*, `_rows`) of each thread's 4 columns -> [R, 4] fp32
    x · (q - z) · s. p_x: the activation of row 0; p_z: the span's group's AWQ zero row; p_s its scales."""
    acc = tl.zeros(col.shape, dtype=tl.float32)
    xs_lo = tl.zeros(col.shape, dtype=tl.float32)
    xs_hi = tl.zeros(col.shape, dtype=tl.float32)
    acc, xs_lo, xs_hi = _quad(acc, xs_lo, xs_hi, q0, q1, q2, q3, p_x, m_x, M_LO, M_HI, USE_ASM)
    acc, xs_lo, xs_hi = _quad(acc, xs_lo, xs_hi, q4, q5, q6, q7, p_x + 4, m_x, M_LO, M_HI, USE_ASM)
    s_lo = tl.sum(xs_lo, axis=1)[:, None]  # in-thread: a row's 4 elements
    s_hi = tl.sum(xs_hi, axis=1)[:, None]
    b_z = awq_zeros_of_columns(p_z, col, m_q)
    b_s = tl.load(p_s, mask=m_q, other=0.0).to(tl.float32)
    return b_s * (256.0 * (acc - (s_lo + s_hi)) - b_z.to(tl.float32) * (s_lo + 16.0 * s_hi))


@triton.jit
def _slot_sum(b, NS: tl.constexpr, CG: tl.constexpr):
    """[NS·CG, 4] per-slot partials (thread i: slot i // CG, column group i % CG) -> [CG, 4] summed over the slots."""
    return tl.sum(tl.reshape(b, (NS, CG, 4)), axis=0)


@triton.jit
def _gate_up_act_kernel(x, qweight, qzeros, scales, act, ids, H, INTER, stride_xt, stride_qe, stride_qk, stride_ze,
                        stride_zk, stride_se, stride_sk, M_LO, M_HI, X_ROW_DIV: tl.constexpr, GROUP: tl.constexpr,
                        CG: tl.constexpr, NW: tl.constexpr, USE_ASM: tl.constexpr, USE_PDL: tl.constexpr = False):
    """x [T, H]; qweight [E, H/8, 2·INTER] K-packed (gate columns first); ids [R] (-1: another rank's expert, the row
    stays unwritten) -> act [R, INTER] = silu(x_r W_gate) · (x_r W_up), x_r = x[r // X_ROW_DIV]. Program (r, 2·CG
    columns of act): column groups 0..CG/2-1 of a slot are gate columns, the rest the same up columns (one weight
    row set a thread, so its 8 loads go out together); 32·NW / CG span slots a step."""
    NS: tl.constexpr = 32 * NW // CG
    HALF: tl.constexpr = CG // 2
    i_r, i_n = tl.program_id(0), tl.program_id(1)
    o_t = tl.arange(0, 32 * NW)
    o_c = tl.arange(0, 4)
    o_a = i_n * (4 * HALF) + (o_t % HALF)[:, None] * 4 + o_c[None, :]  # the act column
    m_n = o_a < INTER
    col = o_a + (o_t % CG // HALF)[:, None] * INTER
    pdl_start(USE_PDL)  # the router, the launch right before, wrote ids
    i_e = tl.load(ids + i_r).to(tl.int64)
    if i_e < 0:
        return
    p_q = qweight + i_e * stride_qe + col
    p_z = qzeros + i_e * stride_ze
    p_s = scales + i_e * stride_se + col
    p_x = x + (i_r // X_ROW_DIV).to(tl.int64) * stride_xt + o_c[None, :]
    b_acc = tl.zeros(col.shape, dtype=tl.float32)
    o_k = (64 * (o_t // CG))[:, None]  # the thread's span's first K row
    q0, q1, q2, q3, q4, q5, q6, q7 = _rows(p_q + (o_k // 8).to(tl.int64) * stride_qk, (o_k < H) & m_n, stride_qk)
    for k0 in range(0, H, 64 * NS):  # the next step's rows go out before this step's math (as in int4_gemm/mma.py)
        m_x = o_k < H
        o_kn = o_k + 64 * NS
        n0, n1, n2, n3, n4, n5, n6, n7 = _rows(p_q + (o_kn // 8).to(tl.int64) * stride_qk, (o_kn < H) & m_n,
                                               stride_qk)
        i_g = o_k // GROUP
        b_acc += _span(q0, q1, q2, q3, q4, q5, q6, q7, p_x + o_k, p_z + i_g * stride_zk, p_s + i_g * stride_sk,
                       col, m_x & m_n, m_x, M_LO, M_HI, USE_ASM)
        q0, q1, q2, q3, q4, q5, q6, q7, o_k = n0, n1, n2, n3, n4, n5, n6, n7, o_kn
    b_gu = tl.permute(tl.reshape(_slot_sum(b_acc, NS, CG), (2, HALF, 4)), (1, 2, 0))
    g, u = tl.split(b_gu)
    o_n = i_n * (4 * HALF) + tl.arange(0, HALF)[:, None] * 4 + o_c[None, :]
    tl.store(act + i_r.to(tl.int64) * INTER + o_n, (g / (1.0 + tl.exp(-g)) * u).to(act.dtype.element_ty),
             mask=o_n < INTER)


@triton.jit
def _down_step(c0, i_t, o_t, o_c, qweight, ids, weights, col, m_n, spans, stride_qe, stride_qk, TOP_K: tl.constexpr,
               CG: tl.constexpr):
    """The loads of the down step at slot c0 (none past the token's TOP_K · spans slots): each thread's slot ->
    (its pair's routing weight, the slot's masks (live pair; and column), its act row, its first K row, its expert,
    its 8 K-packed weight rows)."""
    o_sl = (c0 + o_t // CG)[:, None] + o_c[None, :] * 0  # slot -> (pair o_sl // spans, span o_sl % spans)
    o_r = i_t.to(tl.int64) * TOP_K + o_sl // spans
    b_e = tl.load(ids + o_r, mask=o_sl < TOP_K * spans, other=-1).to(tl.int64)
    m_x = b_e >= 0
    m_q = m_x & m_n
    b_w = tl.load(weights + o_r, mask=m_x, other=0.0)
    b_e = tl.maximum(b_e, 0)
    o_k = (o_sl % spans) * 64
    q0, q1, q2, q3, q4, q5, q6, q7 = _rows(qweight + b_e * stride_qe + (o_k // 8) * stride_qk + col, m_q, stride_qk)
    return b_w, m_x, m_q, o_r, o_k, b_e, q0, q1, q2, q3, q4, q5, q6, q7


@triton.jit
def _down_combine_kernel(act, qweight, qzeros, scales, out, ids, weights, H, INTER, stride_ot, stride_qe, stride_qk,
                         stride_ze, stride_zk, stride_se, stride_sk, M_LO, M_HI, TOP_K: tl.constexpr,
                         GROUP: tl.constexpr, CG: tl.constexpr, NW: tl.constexpr, USE_ASM: tl.constexpr,
                         USE_PDL: tl.constexpr = False):
    """act [T·TOP_K, INTER]; qweight [E, INTER/8, H] K-packed; ids [T·TOP_K] (-1: skipped), weights [T·TOP_K] fp32
    -> out[t] = sum_j weights[t·k + j] · (act[t·k + j] W_down[ids[t·k + j]]) in fp32, one rounding. Program (t, 4·CG
    columns); the token's (pair, span) slots, 32·NW / CG a step, the first step's weight rows loaded before the PDL
    wait."""
    NS: tl.constexpr = 32 * NW // CG
    i_t, i_n = tl.program_id(0), tl.program_id(1)
    o_t = tl.arange(0, 32 * NW)
    o_c = tl.arange(0, 4)
    col = i_n * (4 * CG) + (o_t % CG)[:, None] * 4 + o_c[None, :]
    m_n = col < H
    spans = INTER // 64
    # before the PDL wait: ids and routing weights (the router's, two launches back, so complete: kernels/pdl.py) and
    # the first step's weight rows, which depend on them alone; only act is the launch right before's
    b_w, m_x, m_q, o_r, o_k, b_e, q0, q1, q2, q3, q4, q5, q6, q7 = _down_step(
        0, i_t, o_t, o_c, qweight, ids, weights, col, m_n, spans, stride_qe, stride_qk, TOP_K, CG)
    pdl_start(USE_PDL)
    b_acc = tl.zeros(col.shape, dtype=tl.float32)
    for c0 in range(0, TOP_K * spans, NS):  # the next step's loads go out before this step's math
        nw, nm_x, nm_q, no_r, no_k, ne, n0, n1, n2, n3, n4, n5, n6, n7 = _down_step(
            c0 + NS, i_t, o_t, o_c, qweight, ids, weights, col, m_n, spans, stride_qe, stride_qk, TOP_K, CG)
        i_g = o_k // GROUP
        b_acc += b_w * _span(q0, q1, q2, q3, q4, q5, q6, q7, act + o_r * INTER + o_k + o_c[None, :],
                             qzeros + b_e * stride_ze + i_g * stride_zk, scales + b_e * stride_se + i_g * stride_sk
                             + col, col, m_q, m_x, M_LO, M_HI, USE_ASM)
        b_w, m_x, m_q, o_r, o_k, b_e, q0, q1, q2, q3, q4, q5, q6, q7 = \
            nw, nm_x, nm_q, no_r, no_k, ne, n0, n1, n2, n3, n4, n5, n6, n7
    o_n = i_n * (4 * CG) + tl.arange(0, CG)[:, None] * 4 + o_c[None, :]
    tl.store(out + i_t.to(tl.int64) * stride_ot + o_n, _slot_sum(b_acc, NS, CG).to(out.dtype.element_ty),
             mask=o_n < H)


def takes(gate_up: ExpertWeights, down: ExpertWeights) -> bool:
    """Whether these experts can run here: both K-packed (groups are then whole spans of 64 rows)."""
    return gate_up.kpack and down.kpack and gate_up.group_size % KPACK_SPAN == 0 and down.group_size % KPACK_SPAN == 0


# (CG column groups of 4 (gate|up: half gate, half up), warps); 32·warps / CG span slots. H200, 35B-A3B shapes, T = 1,
# CUDA-graph replays over 64 routings (2026-12-02): gate|up (8, 4) 15.1 us with down at (4, 4), down (2, 8) 15.1 with
# gate|up at (4, 4), both at (4, 4) 20.3. With down's first rows before the PDL wait, end to end (35B-A3B cut to 8
# layers, AWQ, context 1024, ms a step at batch 1 / 2, one process): (8, 4) / (2, 8) 0.647 / 0.725 (0.648 / 0.725
# again); down (4, 8) 0.672 / 0.716, (1, 8) 0.684 / 0.788, (2, 4) 0.671 / 0.720; gate|up (4, 4) 0.651 / 0.737, (8, 8)
# 0.739 / 0.743, (16, 4) 0.666 / 0.746
GATE_UP_TILE = (8, 4)
DOWN_TILE = (2, 8)
# Tokens up to this take these kernels; beyond, decode.py's per-pair GEMVs. H200, 35B-A3B shapes cut to 8 layers, AWQ,
# ms a decode step per-pair -> here, one process: batch 1 0.679 -> 0.663, batch 2 0.753 -> 0.738, batch 4 0.861 ->
# 0.876 (the kernels alone: T = 4 0.93x, T = 16 0.74x: a pair's whole K in one program leaves fewer loads in flight).
# DELTASERVE_MOE_TWO_LAUNCH=0: never.
MAX_TOKENS = 2 if os.environ.get("DELTASERVE_MOE_TWO_LAUNCH", "1") != "0" else 0


def fused_moe_kpack_decode(x: torch.Tensor, gate_up: ExpertWeights, down: ExpertWeights, topk_weights: torch.Tensor,
                           topk_ids: torch.Tensor, gate_up_tile: tuple[int, int] | None = None,
                           down_tile: tuple[int, int] | None = None) -> torch.Tensor:
    """x: [T, H]; K-packed gate_up (N = 2I, gate first, K = H) and down (N = H, K = I) ExpertWeights (`takes`);
    topk_weights [T, k] fp32; topk_ids [T, k] (-1: another rank's expert, adds nothing) -> [T, H] in x's dtype.
    Shapes are checked by the caller (triton.check_moe_shapes). *_tile: (column groups, warps) overrides."""
    t, h = x.shape
    top_k = topk_ids.shape[1]
    inter = down.dims()[1]
    cg1, warps1 = gate_up_tile or GATE_UP_TILE
    cg2, warps2 = down_tile or DOWN_TILE
    ids = topk_ids.reshape(-1).contiguous()
    weights = topk_weights.reshape(-1).float().contiguous()
    act = torch.empty(t * top_k, inter, dtype=x.dtype, device=x.device)
    out = torch.empty(t, h, dtype=x.dtype, device=x.device)
    if t == 0:
        return out
    x = x.contiguous()
    gu, dn = gate_up, down
    use_asm = x.is_cuda
    k1 = _gate_up_act_kernel[(t * top_k, triton.cdiv(inter, 2 * cg1))](
        x, gu.qweight, gu.qzeros, gu.scales, act, ids, h, inter, x.stride(0), gu.qweight.stride(0),
        gu.qweight.stride(1), gu.qzeros.stride(0), gu.qzeros.stride(1), gu.scales.stride(0), gu.scales.stride(1),
        MASK_LO, MASK_HI, X_ROW_DIV=top_k, GROUP=gu.group_size, CG=cg1, NW=warps1, USE_ASM=use_asm,
        num_warps=warps1, **pdl_args(x))
    k2 = _down_combine_kernel[(t, triton.cdiv(h, 4 * cg2))](
        act, dn.qweight, dn.qzeros, dn.scales, out, ids, weights, h, inter, out.stride(0), dn.qweight.stride(0),
        dn.qweight.stride(1), dn.qzeros.stride(0), dn.qzeros.stride(1), dn.scales.stride(0), dn.scales.stride(1),
        MASK_LO, MASK_HI, TOP_K=top_k, GROUP=dn.group_size, CG=cg2, NW=warps2, USE_ASM=use_asm, num_warps=warps2,
        **pdl_args(x))
    for kernel in (k1, k2):  # _bcast moves a row's 4 elements as one thread's registers
        check_rows_are_threads(kernel, "the two-launch int4 MoE decode",
                               "DELTASERVE_MOE_TWO_LAUNCH=0 to use the per-pair GEMVs")
    return out
