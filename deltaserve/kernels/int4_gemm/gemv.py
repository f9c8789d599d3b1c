"""Triton int4 decode GEMV over the AWQ layout (T <= GEMV_MAX_T): the decode path for weights that cannot take the
K-packed layout (groups below 64; kpack.py is the faster one), and the per-row-expert GEMVs of the MoE decode for
such experts. Layout and dequantization as in triton.py.
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..pdl import pdl_args, pdl_start
from .triton import _check, _split_k_outputs, device_sms, dot_precision, expert_row, split_k_ranges, sum_splits

# ---- decode GEMV (T <= GEMV_MAX_T): built for the weight stream, no unpack reshape, no fp32 dequant of W ----
# Program (i_c, i_s) owns BNP packed columns (8·BNP outputs) and one K range. Each int32 tile [BK, BNP] is loaded
# once, row-coalesced; nibble p of it (static_range) holds logical columns 8c + AWQ_ORDER[p] for all c of the tile,
# so 8 accumulators [BM, BNP] stay in the packed order and are stored to their stride-8 column sets at the end.
# Per tile (one group, BK | G) the zero point and scale are applied once per column instead of once per weight:
#   sum_k x_k (q_kn - z_n) s_n = s_n · (sum_k x_k q_k n - z_n · sum_k x_k)
# T = 1: products and tl.sum over K on the FMA units; 2 <= T <= 16: tl.dot with the rows padded to 16 (the tensor
# cores have compute to spare). Split-K partials [S, T, N] fp32 are summed by a second tiny kernel in split order:
# deterministic, no atomics. The plan depends on shapes only (CUDA graphs).
GEMV_MAX_T = 16


@triton.jit
def _nibble(b_q, P: tl.constexpr):
    """int32 tensor -> fp32 value (0..15) of nibble P: OR the nibble into the mantissa of 2^23 and subtract 2^23,
    two full-rate ops where an int->float convert runs at quarter rate."""
    b_bits = ((b_q >> (4 * P)) & 0xF) | 0x4B000000
    return b_bits.to(tl.float32, bitcast=True) - 8388608.0


@triton.jit
def _gemv_nibble(b_acc, b_q, b_zp, p_s, o_c, m_c, b_x, b_xs, P: tl.constexpr, USE_DOT: tl.constexpr,
                 DOT_PRECISION: tl.constexpr):
    """b_acc [BM, BNP] += the tile's contribution to logical columns 8·o_c + AWQ_ORDER[P]. b_q: [BK, BNP] int32;
    b_zp: [BNP] packed zeros; p_s: scales at this group's row; b_x: [BM, BK] (USE_DOT) or [BK] fp32; b_xs: sum of
    b_x over K ([BM] or scalar)."""
    b_w = _nibble(b_q, P)
    b_z = _nibble(b_zp, P)
    b_s = tl.load(p_s + o_c * 8 + ((P % 4) * 2 + P // 4), mask=m_c, other=0.0).to(tl.float32)
    if USE_DOT:
        b_p = tl.dot(b_x, b_w.to(b_x.dtype), input_precision=DOT_PRECISION)
        return b_acc + b_s[None, :] * (b_p - b_xs[:, None] * b_z[None, :])
    else:
        b_p = tl.sum(b_w * b_x[:, None], axis=0)
        return b_acc + (b_s * (b_p - b_xs * b_z))[None, :]


@triton.jit
def _gemv_store(out, b_acc, o_m, m_m, o_c, m_c, P: tl.constexpr, stride_ot, USE_DOT: tl.constexpr):
    """Store accumulator P ([BM, BNP]) to out[o_m, 8·o_c + AWQ_ORDER[P]] (T = 1 without USE_DOT: row 0)."""
    o_n = o_c * 8 + ((P % 4) * 2 + P // 4)
    if USE_DOT:
        p_o = out + o_m[:, None].to(tl.int64) * stride_ot + o_n[None, :]
        tl.store(p_o, b_acc.to(p_o.dtype.element_ty), mask=m_m[:, None] & m_c[None, :])
    else:
        p_o = out + o_n[None, :]
        tl.store(p_o, b_acc.to(p_o.dtype.element_ty), mask=m_c[None, :])


@triton.jit
def _int4_gemv_kernel(x, qweight, qzeros, scales, out, expert_of_row, T, NP, K, K_PER_SPLIT,
                      stride_xt, stride_qk, stride_zk, stride_sk, stride_os, stride_ot,
                      stride_qe, stride_ze, stride_se,
                      GROUP: tl.constexpr, BM: tl.constexpr, BNP: tl.constexpr, BK: tl.constexpr,
                      USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, X_ROW_DIV: tl.constexpr,
                      INDEXED: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Program (i_c, i_s[, i_r]): packed columns i_c·BNP.. (NP = N/8 in all), K range i_s·K_PER_SPLIT.. -> out[i_s].
    INDEXED (the MoE decode, T = 1 per row): program axis 2 is output row i_r, which multiplies x row
    i_r // X_ROW_DIV by the weight of expert expert_of_row[i_r] ([E] leading, strides stride_qe / _ze / _se);
    expert -1 (held by another rank) writes nothing."""
    pdl_start(USE_PDL)
    i_c, i_s = tl.program_id(0), tl.program_id(1)
    if INDEXED:
        i_e, qweight, qzeros, scales, x, out = expert_row(expert_of_row, qweight, qzeros, scales, x, out, stride_qe,
                                                          stride_ze, stride_se, stride_xt, stride_ot, X_ROW_DIV)
        if i_e < 0:
            return
    o_c = i_c * BNP + tl.arange(0, BNP)
    m_c = o_c < NP
    o_m = tl.arange(0, BM)
    m_m = o_m < T
    a0 = tl.zeros([BM, BNP], dtype=tl.float32)
    a1, a2, a3, a4, a5, a6, a7 = a0, a0, a0, a0, a0, a0, a0
    k_lo = i_s * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    for k0 in range(k_lo, k_hi, BK):
        o_k = k0 + tl.arange(0, BK)
        b_q = tl.load(qweight + o_k[:, None].to(tl.int64) * stride_qk + o_c[None, :], mask=m_c[None, :], other=0)
        i_g = k0 // GROUP
        b_zp = tl.load(qzeros + i_g * stride_zk + o_c, mask=m_c, other=0)
        p_s = scales + i_g * stride_sk
        if USE_DOT:
            b_x = tl.load(x + o_m[:, None] * stride_xt + o_k[None, :], mask=m_m[:, None], other=0.0)
            b_xs = tl.sum(b_x.to(tl.float32), axis=1)
        else:
            b_x = tl.load(x + o_k).to(tl.float32)
            b_xs = tl.sum(b_x, axis=0)
        a0 = _gemv_nibble(a0, b_q, b_zp, p_s, o_c, m_c, b_x, b_xs, 0, USE_DOT, DOT_PRECISION)
        a1 = _gemv_nibble(a1, b_q, b_zp, p_s, o_c, m_c, b_x, b_xs, 1, USE_DOT, DOT_PRECISION)
        a2 = _gemv_nibble(a2, b_q, b_zp, p_s, o_c, m_c, b_x, b_xs, 2, USE_DOT, DOT_PRECISION)
        a3 = _gemv_nibble(a3, b_q, b_zp, p_s, o_c, m_c, b_x, b_xs, 3, USE_DOT, DOT_PRECISION)
        a4 = _gemv_nibble(a4, b_q, b_zp, p_s, o_c, m_c, b_x, b_xs, 4, USE_DOT, DOT_PRECISION)
        a5 = _gemv_nibble(a5, b_q, b_zp, p_s, o_c, m_c, b_x, b_xs, 5, USE_DOT, DOT_PRECISION)
        a6 = _gemv_nibble(a6, b_q, b_zp, p_s, o_c, m_c, b_x, b_xs, 6, USE_DOT, DOT_PRECISION)
        a7 = _gemv_nibble(a7, b_q, b_zp, p_s, o_c, m_c, b_x, b_xs, 7, USE_DOT, DOT_PRECISION)
    p_o = out + i_s * stride_os
    _gemv_store(p_o, a0, o_m, m_m, o_c, m_c, 0, stride_ot, USE_DOT)
    _gemv_store(p_o, a1, o_m, m_m, o_c, m_c, 1, stride_ot, USE_DOT)
    _gemv_store(p_o, a2, o_m, m_m, o_c, m_c, 2, stride_ot, USE_DOT)
    _gemv_store(p_o, a3, o_m, m_m, o_c, m_c, 3, stride_ot, USE_DOT)
    _gemv_store(p_o, a4, o_m, m_m, o_c, m_c, 4, stride_ot, USE_DOT)
    _gemv_store(p_o, a5, o_m, m_m, o_c, m_c, 5, stride_ot, USE_DOT)
    _gemv_store(p_o, a6, o_m, m_m, o_c, m_c, 6, stride_ot, USE_DOT)
    _gemv_store(p_o, a7, o_m, m_m, o_c, m_c, 7, stride_ot, USE_DOT)


@dataclass(frozen=True)
class GemvPlan:
    block_np: int  # packed int32 columns per program (8x as many outputs)
    block_k: int  # K rows per tile; divides the group
    split_k: int  # programs along K; > 1 writes fp32 partials summed by triton.sum_splits
    use_dot: bool  # tl.dot on rows padded to 16 (T > 1) or FMA + tl.sum (T = 1)
    num_warps: int = 4
    num_stages: int = 3


def gemv_plan(t: int, n: int, k: int, group: int, num_sms: int = 132, rows: int = 1) -> GemvPlan:
    """The decode plan for x [t <= 16, k] times an int4 [k, n] weight (shapes only: no host sync). Tiles of about
    16 KB of int32 (BK x BNP = 4096); split K until about 4 programs per SM, keeping the fp32 partials under
    1/8 of the int4 bytes. rows: independent GEMVs launched together (the MoE decode's pairs)."""
    use_dot = t > 1
    bnp = max(16 if use_dot else 1, min(32, triton.next_power_of_2(n // 8)))
    bk = min(group, max(16, 4096 // bnp))
    steps = k // bk
    split = triton.cdiv(4 * num_sms, triton.cdiv(n // 8, bnp) * rows)
    split = max(1, min(split, steps, k // (64 * t)))
    return GemvPlan(bnp, bk, split, use_dot)


def int4_gemv_triton(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                     group_size: int, config: GemvPlan | None = None) -> torch.Tensor:
    """x: [T <= 16, K] fp16/bf16 (fp32 in the interpreter); qweight [K, N/8] int32; qzeros [K/G, N/8] int32;
    scales [K/G, N] -> [T, N] in x's dtype. config: override the plan (benchmarks, tests)."""
    t, n, k = _check(x, qweight, qzeros, scales, group_size)
    if t > GEMV_MAX_T:
        raise ValueError(f"the int4 GEMV takes at most {GEMV_MAX_T} rows, got T={t}; use int4_gemm_triton")
    x = x.contiguous()
    cfg = config or gemv_plan(t, n, k, group_size, device_sms(x.device))
    if group_size % cfg.block_k or (t > 1 and not cfg.use_dot) or (cfg.use_dot and min(cfg.block_k,
                                                                                         cfg.block_np) < 16):
        raise ValueError(f"GEMV plan {cfg} does not fit T={t}, group {group_size}: block_k must divide the group, "
                         f"T > 1 needs use_dot, and use_dot needs block_k and block_np >= 16")
    out, dst, k_per_split, split, stride_os = _split_k_outputs(x, t, n, k, cfg.block_k, cfg.split_k)
    if t == 0:
        return out
    grid = (triton.cdiv(n // 8, cfg.block_np), split)
    _int4_gemv_kernel[grid](x, qweight, qzeros, scales, dst, x, t, n // 8, k, k_per_split,
                            x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), stride_os,
                            dst.stride(-2), 0, 0, 0, GROUP=group_size, BM=16 if cfg.use_dot else 1,
                            BNP=cfg.block_np, BK=cfg.block_k, USE_DOT=cfg.use_dot,
                            DOT_PRECISION=dot_precision(x.dtype), X_ROW_DIV=1, INDEXED=False,
                            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(x))
    if split > 1:
        sum_splits(dst, out)
    return out


def int4_gemv_rows(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   group_size: int, expert_of_row: torch.Tensor, x_row_div: int = 1,
                   config: GemvPlan | None = None) -> torch.Tensor:
    """Independent GEMVs on per-row experts (the MoE decode): row r = x[r // x_row_div] times expert
    expert_of_row[r]'s weight. x: [X, K]; qweight [E, K, N/8] int32; qzeros [E, K/G, N/8]; scales [E, K/G, N];
    expert_of_row: [R] int (-1: a row left unwritten) -> fp32 split-K partials [S, R, N] (the caller sums S in its
    epilogue)."""
    if qweight.dim() != 3 or qzeros.dim() != 3 or scales.dim() != 3 or expert_of_row.dim() != 1:
        raise ValueError(f"expert weights must be [E, ...] stacks and expert_of_row [R], got qweight "
                         f"{tuple(qweight.shape)}, expert_of_row {tuple(expert_of_row.shape)}")
    _, n, k = _check(x[:1], qweight[0], qzeros[0], scales[0], group_size)
    rows = expert_of_row.numel()
    x = x.contiguous()
    cfg = config or gemv_plan(1, n, k, group_size, device_sms(x.device), rows)
    if group_size % cfg.block_k or cfg.use_dot:
        raise ValueError(f"GEMV plan {cfg} does not fit per-row experts: block_k must divide group {group_size} "
                         f"and use_dot must be off (one x row per output row)")
    k_per_split, split = split_k_ranges(k, cfg.block_k, cfg.split_k)
    part = torch.empty(split, rows, n, dtype=torch.float32, device=x.device)
    if rows == 0:
        return part
    grid = (triton.cdiv(n // 8, cfg.block_np), split, rows)
    _int4_gemv_kernel[grid](x, qweight, qzeros, scales, part, expert_of_row, 1, n // 8, k, k_per_split,
                            x.stride(0), qweight.stride(1), qzeros.stride(1), scales.stride(1), part.stride(0),
                            part.stride(1), qweight.stride(0), qzeros.stride(0), scales.stride(0),
                            GROUP=group_size, BM=1, BNP=cfg.block_np, BK=cfg.block_k, USE_DOT=False,
                            DOT_PRECISION=dot_precision(x.dtype), X_ROW_DIV=x_row_div, INDEXED=True,
                            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(x))
    return part
