"""Triton W4A16 GEMM over AWQ-layout int4 weights, and the int4 tile dequantizer the fused MoE shares.

Layout (the one the kernels read): qweight int32 [K, N/8], logical column 8c + AWQ_ORDER[i] at bits 4i of int32 c;
qzeros int32 [K/G, N/8] packed the same way; scales [K/G, N] (fp16, bf16 or fp32, read as fp32).
W[k, n] = (q[k, n] - z[k // G, n]) · s[k // G, n], y = x W.

One kernel, two plans (`plan`): small T (decode) uses BM = 16 row tiles and splits K over programs so a handful of
tokens still spreads the weight stream over every SM (partial sums [S, T, N] fp32, summed by torch: deterministic,
no atomics); large T uses 64/128-row tiles and splits K only when the tiles alone cannot fill the GPU. The int4 tile
is dequantized in registers inside the K loop (fp32 math, rounded once to x's dtype, as the reference rounds W) and
fed to tl.dot; accumulation is fp32. A K tile never straddles two groups (BK divides G), so zeros and scales are one
[BN] row per tile. No host syncs: the plan depends on shapes only, so CUDA graphs capture it.
"""
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@triton.jit
def awq_unpack(b_packed, ROWS: tl.constexpr, COLS: tl.constexpr):
    """b_packed: [ROWS, COLS // 8] int32 in AWQ nibble order -> [ROWS, COLS] int32 values 0..15 in logical column
    order. Logical column 8c + j sits at nibble (j >> 1) + 4 (j & 1): AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7] inverted."""
    o_j = tl.arange(0, 8)
    b_shift = ((o_j >> 1) + (o_j & 1) * 4) * 4
    b_q = (b_packed[:, :, None] >> b_shift[None, None, :]) & 0xF
    return tl.reshape(b_q, (ROWS, COLS))


@triton.jit
def awq_zeros_of_columns(p_z, o_n, m_n):
    """Zero points (int32 0..15) of logical columns o_n from an AWQ-packed qzeros row p_z: column n sits at nibble
    (j >> 1) + 4 (j & 1) of int32 n // 8, j = n % 8 (AWQ_ORDER inverted)."""
    b_shift = (((o_n % 8) >> 1) + ((o_n % 8) & 1) * 4) * 4
    return (tl.load(p_z + o_n // 8, mask=m_n, other=0) >> b_shift) & 0xF


@triton.jit
def expert_row(expert_of_row, qweight, qzeros, scales, x, out, stride_qe, stride_ze, stride_se, stride_xt,
               stride_ot, X_ROW_DIV: tl.constexpr):
    """The per-row-expert GEMVs (MoE decode): program axis 2 is output row r; -> (its expert id, -1 for another
    rank's, and the weight, x row r // X_ROW_DIV and output row pointers moved to it)."""
    i_r = tl.program_id(2)
    i_e = tl.load(expert_of_row + i_r).to(tl.int64)
    i_w = tl.maximum(i_e, 0)
    return (i_e, qweight + i_w * stride_qe, qzeros + i_w * stride_ze, scales + i_w * stride_se,
            x + (i_r // X_ROW_DIV).to(tl.int64) * stride_xt, out + i_r.to(tl.int64) * stride_ot)


@triton.jit
def dequant_awq_tile(p_q, p_z, p_s, o_k, n0, n_end, stride_qk, BK: tl.constexpr, BN: tl.constexpr,
                     DTYPE: tl.constexpr):
    """The [BK, BN] weight tile W[o_k, n0 : n0 + BN] in DTYPE (n0 a multiple of 8). p_q: qweight at row 0, column 0;
    p_z, p_s: qzeros / scales at the row of this tile's group. Columns at or past n_end (a multiple of 8) read 0."""
    o_c = n0 // 8 + tl.arange(0, BN // 8)  # int32 columns
    m_c = o_c < n_end // 8
    b_q = tl.load(p_q + o_k[:, None] * stride_qk + o_c[None, :], mask=m_c[None, :], other=0)
    b_z = tl.load(p_z + o_c, mask=m_c, other=0)
    o_n = n0 + tl.arange(0, BN)
    b_s = tl.load(p_s + o_n, mask=o_n < n_end, other=0.0).to(tl.float32)
    b_q = awq_unpack(b_q, BK, BN)
    b_z = tl.reshape(awq_unpack(b_z[None, :], 1, BN), (BN,))
    return ((b_q - b_z[None, :]).to(tl.float32) * b_s[None, :]).to(DTYPE)


@triton.jit
def dequant_kpack_tile(p_q, p_z, p_s, k0, n0, n_end, stride_qk, BN: tl.constexpr, DTYPE: tl.constexpr):
    """The [64, BN] weight tile W[k0 : k0 + 64, n0 : n0 + BN] from the K-packed layout (kpack.py: int32 row
    k0/8 + r holds row k0 + 8j + r at nibble j; k0 a multiple of 64). p_z, p_s as in dequant_awq_tile."""
    o_n = n0 + tl.arange(0, BN)
    m_n = o_n < n_end
    o_r = tl.arange(0, 8)
    b_q = tl.load(p_q + (k0 // 8 + o_r)[:, None].to(tl.int64) * stride_qk + o_n[None, :], mask=m_n[None, :],
                  other=0)
    b_q = tl.reshape((b_q[None, :, :] >> (4 * o_r)[:, None, None]) & 0xF, (64, BN))  # [j, r, BN] -> row 8j + r
    b_z = awq_zeros_of_columns(p_z, o_n, m_n)
    b_s = tl.load(p_s + o_n, mask=m_n, other=0.0).to(tl.float32)
    return ((b_q - b_z[None, :]).to(tl.float32) * b_s[None, :]).to(DTYPE)


@triton.jit
def _int4_gemm_kernel(x, qweight, qzeros, scales, out,
                      T, N, K, K_PER_SPLIT,
                      stride_xt, stride_qk, stride_zk, stride_sk, stride_os, stride_ot,
                      GROUP: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, KPACK: tl.constexpr):
    """Program (i_m, i_n, i_s): rows i_m·BM.., columns i_n·BN.., K range i_s·K_PER_SPLIT.. -> out[i_s] tile.
    KPACK: qweight in the K-packed layout (BK == 64), else AWQ."""
    i_m, i_n, i_s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    o_m = i_m * BM + tl.arange(0, BM)
    o_n = i_n * BN + tl.arange(0, BN)
    m_m = o_m < T
    b_acc = tl.zeros([BM, BN], dtype=tl.float32)
    k_lo = i_s * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    for k0 in range(k_lo, k_hi, BK):
        o_k = k0 + tl.arange(0, BK)
        b_x = tl.load(x + o_m[:, None].to(tl.int64) * stride_xt + o_k[None, :], mask=m_m[:, None], other=0.0)
        i_g = k0 // GROUP
        if KPACK:
            b_w = dequant_kpack_tile(qweight, qzeros + i_g * stride_zk, scales + i_g * stride_sk, k0, i_n * BN, N,
                                     stride_qk, BN, b_x.dtype)
        else:
            b_w = dequant_awq_tile(qweight, qzeros + i_g * stride_zk, scales + i_g * stride_sk, o_k, i_n * BN, N,
                                   stride_qk, BK, BN, b_x.dtype)
        b_acc += tl.dot(b_x, b_w, input_precision=DOT_PRECISION)
    p_o = out + i_s * stride_os + o_m[:, None].to(tl.int64) * stride_ot + o_n[None, :]
    tl.store(p_o, b_acc.to(p_o.dtype.element_ty), mask=m_m[:, None] & (o_n < N)[None, :])


@dataclass(frozen=True)
class GemmPlan:
    block_m: int
    block_n: int
    block_k: int
    split_k: int  # programs along K; > 1 writes fp32 partial sums that torch adds up
    num_warps: int
    num_stages: int


SMALL_T = 16  # up to this many rows: the decode plan (one 16-row tile, split K)


def plan(t: int, n: int, k: int, group: int, num_sms: int = 132, kpack: bool = False) -> GemmPlan:
    """Tile sizes and split-K for x [t, k] times an int4 [k, n] weight (shapes only: no host sync). kpack: the
    weight is K-packed, whose tiles are one 64-row span."""
    if t <= SMALL_T:
        bm, bn, bk, warps, stages = 16, 128, min(group, 128), 4, 4
    else:
        bm, bn, bk = (64 if t <= 64 else 128), 128, min(group, 64)
        warps, stages = (4 if bm == 64 else 8), 3
    if kpack:
        bk = 64
    bn = min(bn, max(16, triton.next_power_of_2(n)))
    tiles = triton.cdiv(t, bm) * triton.cdiv(n, bn)
    iters = k // bk
    split = triton.cdiv(2 * num_sms, tiles)  # about two waves of programs
    # each split keeps >= 4 K steps to pipeline, and its fp32 partials stay under 1/8 of the int4 bytes read
    split = max(1, min(split, iters // 4, k // (64 * max(t, 1)), 32))
    return GemmPlan(bm, bn, bk, split, warps, stages)


def _check(x, qweight, qzeros, scales, group: int) -> tuple[int, int, int]:
    """-> (T, N, K) after checking the AWQ tensors against x."""
    if x.dim() != 2:
        raise ValueError(f"x {tuple(x.shape)} must be [T, K]")
    t, k = x.shape
    n = scales.shape[-1] if scales.dim() == 2 else -1
    if group < 16 or group & (group - 1) or k % group:
        raise ValueError(f"group_size {group} must be a power of two >= 16 dividing K={k} for the int4 kernel")
    want = {"qweight": (qweight, (k, n // 8), torch.int32), "qzeros": (qzeros, (k // group, n // 8), torch.int32),
            "scales": (scales, (k // group, n), None)}
    for name, (tensor, shape, dtype) in want.items():
        if tuple(tensor.shape) != shape or (dtype is not None and tensor.dtype != dtype) or tensor.stride(-1) != 1:
            raise ValueError(f"{name} {tuple(tensor.shape)} {tensor.dtype} must be {list(shape)}"
                             f"{' int32' if dtype else ''} with a contiguous last axis (AWQ layout, x is [{t}, {k}])")
        if tensor.device != x.device:
            raise ValueError(f"{name} is on {tensor.device} but x is on {x.device}")
    if n % 8:
        raise ValueError(f"N={n} output channels must be a multiple of 8 (AWQ packs 8 per int32)")
    return t, n, k


def dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"  # fp32 (CPU tests): exact products; 16-bit: ignored


def int4_gemm_triton(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                     group_size: int, config: GemmPlan | None = None, kpack: bool = False) -> torch.Tensor:
    """x: [T, K] fp16/bf16 (fp32 in the interpreter); qweight [K, N/8] int32 (AWQ) or [K/8, N] (kpack: the
    K-packed layout of kpack.py); qzeros [K/G, N/8] int32; scales [K/G, N] -> [T, N] in x's dtype. config: override
    the plan (benchmarks, tests)."""
    if kpack:
        from .kpack import check_kpack

        n, k = check_kpack(x, qweight, qzeros, scales, group_size)
        t = x.shape[0]
    else:
        t, n, k = _check(x, qweight, qzeros, scales, group_size)
    if x.stride(-1) != 1:
        x = x.contiguous()
    cfg = config or plan(t, n, k, group_size, device_sms(x.device), kpack)
    if group_size % cfg.block_k or cfg.block_k < 16 and x.is_cuda or kpack and cfg.block_k != 64:
        raise ValueError(f"block_k {cfg.block_k} must divide group_size {group_size} (and be >= 16 on a GPU; "
                         f"64 for a K-packed weight)")
    out, dst, k_per_split, split, stride_os = _split_k_outputs(x, t, n, k, cfg.block_k, cfg.split_k)
    if t == 0:
        return out
    grid = (triton.cdiv(t, cfg.block_m), triton.cdiv(n, cfg.block_n), split)
    _int4_gemm_kernel[grid](x, qweight, qzeros, scales, dst, t, n, k, k_per_split,
                            x.stride(0), qweight.stride(0), qzeros.stride(0), scales.stride(0), stride_os,
                            dst.stride(-2), GROUP=group_size, BM=cfg.block_m, BN=cfg.block_n, BK=cfg.block_k,
                            DOT_PRECISION=dot_precision(x.dtype), KPACK=kpack, num_warps=cfg.num_warps,
                            num_stages=cfg.num_stages)
    if split > 1:
        torch.sum(dst, dim=0, out=out) if x.dtype == torch.float32 else out.copy_(dst.sum(0))
    return out


def device_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 4  # the interpreter: a small number keeps split-K exercised on small CPU shapes
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count  # ~10 us a call: once per device


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
                      INDEXED: tl.constexpr):
    """Program (i_c, i_s[, i_r]): packed columns i_c·BNP.. (NP = N/8 in all), K range i_s·K_PER_SPLIT.. -> out[i_s].
    INDEXED (the MoE decode, T = 1 per row): program axis 2 is output row i_r, which multiplies x row
    i_r // X_ROW_DIV by the weight of expert expert_of_row[i_r] ([E] leading, strides stride_qe / _ze / _se);
    expert -1 (held by another rank) writes nothing."""
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


@triton.jit
def _sum_splits_kernel(part, out, S, M, BLOCK: tl.constexpr, BS: tl.constexpr):
    """out[m] = sum over s of part[s, m] (fp32, a fixed tree order: deterministic), cast to out's dtype. The splits
    are read BS at a time as one [BS, BLOCK] tile (a serial loop over S would wait out one load latency per split,
    which cost ~7 us on an H100 for S = 32)."""
    o_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m_m = o_m < M
    b_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s0 in range(0, S, BS):
        o_s = s0 + tl.arange(0, BS)
        b_p = tl.load(part + o_s[:, None].to(tl.int64) * M + o_m[None, :], mask=(o_s < S)[:, None] & m_m[None, :],
                      other=0.0)
        b_acc += tl.sum(b_p, axis=0)
    tl.store(out + o_m, b_acc.to(out.dtype.element_ty), mask=m_m)


def split_tile(s: int, cap: int = 64) -> int:
    """The splits one tile reads at a time (a power of two, 2..cap)."""
    return max(2, min(cap, triton.next_power_of_2(s)))


def sum_splits(part: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [...] (any float dtype) = part [S, ...] fp32 summed over S, deterministic."""
    m, bs = out.numel(), split_tile(part.shape[0])
    block = max(32, 4096 // bs)
    _sum_splits_kernel[(triton.cdiv(m, block),)](part, out, part.shape[0], m, BLOCK=block, BS=bs)
    return out


@dataclass(frozen=True)
class GemvPlan:
    block_np: int  # packed int32 columns per program (8x as many outputs)
    block_k: int  # K rows per tile; divides the group
    split_k: int  # programs along K; > 1 writes fp32 partials summed by _sum_splits_kernel
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
                            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
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
    k_per_split = triton.cdiv(k // cfg.block_k, cfg.split_k) * cfg.block_k
    split = triton.cdiv(k, k_per_split)
    part = torch.empty(split, rows, n, dtype=torch.float32, device=x.device)
    if rows == 0:
        return part
    grid = (triton.cdiv(n // 8, cfg.block_np), split, rows)
    _int4_gemv_kernel[grid](x, qweight, qzeros, scales, part, expert_of_row, 1, n // 8, k, k_per_split,
                            x.stride(0), qweight.stride(1), qzeros.stride(1), scales.stride(1), part.stride(0),
                            part.stride(1), qweight.stride(0), qzeros.stride(0), scales.stride(0),
                            GROUP=group_size, BM=1, BNP=cfg.block_np, BK=cfg.block_k, USE_DOT=False,
                            DOT_PRECISION=dot_precision(x.dtype), X_ROW_DIV=x_row_div, INDEXED=True,
                            num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return part


def _split_k_outputs(x: torch.Tensor, t: int, n: int, k: int, block_k: int, split_k: int):
    """-> (out [t, n] in x's dtype, where the kernel writes (out itself, or fp32 partials [split, t, n] that the
    caller sums), K rows per split (a multiple of block_k), the number of splits, the partials' split stride)."""
    out = torch.empty(t, n, dtype=x.dtype, device=x.device)
    k_per_split = triton.cdiv(k // block_k, split_k) * block_k
    split = triton.cdiv(k, k_per_split)
    dst = out if split == 1 else torch.empty(split, t, n, dtype=torch.float32, device=x.device)
    return out, dst, k_per_split, split, 0 if split == 1 else dst.stride(0)
