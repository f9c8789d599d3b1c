"""Triton W4A16 GEMM over int4 weights, and what every int4 kernel shares: the tile dequantizers (also used by the
fused MoE), the AWQ zero-point lookup, the per-row-expert pointer setup and the deterministic split-K sum.

Layouts: AWQ qweight int32 [K, N/8], logical column 8c + AWQ_ORDER[i] at bits 4i of int32 c, or K-packed [K/8, N]
(kpack.py; the GEMM reads it in 64-row spans); qzeros int32 [K/G, N/8] packed as AWQ's; scales [K/G, N] (fp16, bf16
or fp32, read as fp32). W[k, n] = (q[k, n] - z[k // G, n]) · s[k // G, n], y = x W. Decode GEMVs: gemv.py (AWQ),
kpack.py (K-packed).

One kernel, two plans (`plan`): small T (decode) uses BM = 16 row tiles and splits K over programs so a handful of
tokens still spreads the weight stream over every SM (partial sums [S, T, N] fp32, summed by torch: deterministic,
no atomics); large T uses 64/128-row tiles and splits K only when the tiles alone cannot fill the GPU. The int4 tile
is dequantized in registers inside the K loop (fp32 math, rounded once to x's dtype, as the reference rounds W) and
fed to tl.dot; accumulation is fp32. A K tile never straddles two groups (BK divides G), so zeros and scales are one
[BN] row per tile. No host syncs: the plan depends on shapes only, so CUDA graphs capture it.
Measured and not kept (H200, 2026-11-29): codes entering fp32 as the bit pattern 2^23 + q (an OR and an exact
subtraction instead of the int->bf16 convert ptxas emits): +1-4% on the AWQ layout, -0-3% on the K-packed one at
T = 512..4096 on 27B / 9B MLP shapes; the int4 GEMM stays at ~300-350 TFLOP/s against cuBLAS bf16's ~650-800,
which is why prompts of int4_gemm.DEQUANT_MIN_T tokens and more dequantize and use cuBLAS instead (dequant.py).
"""
import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..pdl import pdl_args, pdl_start


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


@triton.jit
def split_sum(p_part, stride_s, S, o_c, m_c, BLOCK: tl.constexpr, BS: tl.constexpr):
    """sum over s < S of p_part[s · stride_s + o_c] in fp32, in a fixed tree order (deterministic). The splits are
    read BS at a time as one [BS, BLOCK] tile: a serial loop over S would wait out one load latency per split, which
    cost ~7 us on an H100 for S = 32."""
    b_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for s0 in range(0, S, BS):
        o_s = s0 + tl.arange(0, BS)
        b_p = tl.load(p_part + o_s[:, None].to(tl.int64) * stride_s + o_c[None, :],
                      mask=(o_s < S)[:, None] & m_c[None, :], other=0.0)
        b_acc += tl.sum(b_p.to(tl.float32), axis=0)
    return b_acc


@triton.jit
def _sum_splits_kernel(part, out, S, M, BLOCK: tl.constexpr, BS: tl.constexpr, USE_PDL: tl.constexpr = False):
    """out[m] = sum over s of part[s, m] (split_sum), cast to out's dtype."""
    pdl_start(USE_PDL)
    o_m = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    m_m = o_m < M
    b_acc = split_sum(part, M, S, o_m, m_m, BLOCK, BS)
    tl.store(out + o_m, b_acc.to(out.dtype.element_ty), mask=m_m)


def split_tile(s: int, cap: int = 64) -> int:
    """The splits one tile reads at a time (a power of two, 2..cap)."""
    return max(2, min(cap, triton.next_power_of_2(s)))


def sum_splits(part: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out [...] (any float dtype) = part [S, ...] fp32 summed over S, deterministic."""
    m, bs = out.numel(), split_tile(part.shape[0])
    block = max(32, 4096 // bs)
    _sum_splits_kernel[(triton.cdiv(m, block),)](part, out, part.shape[0], m, BLOCK=block, BS=bs, **pdl_args(part))
    return out


def split_k_ranges(k: int, unit: int, split_k: int) -> tuple[int, int]:
    """K rows per split (a whole number of `unit`-row steps: K tiles or groups) and the number of splits that
    covers K when about `split_k` are asked for (the last one may be short)."""
    k_per_split = triton.cdiv(k // unit, split_k) * unit
    return k_per_split, triton.cdiv(k, k_per_split)


def _split_k_outputs(x: torch.Tensor, t: int, n: int, k: int, block_k: int, split_k: int):
    """-> (out [t, n] in x's dtype, where the kernel writes (out itself, or fp32 partials [split, t, n] that the
    caller sums), K rows per split (a multiple of block_k), the number of splits, the partials' split stride)."""
    out = torch.empty(t, n, dtype=x.dtype, device=x.device)
    k_per_split, split = split_k_ranges(k, block_k, split_k)
    dst = out if split == 1 else torch.empty(split, t, n, dtype=torch.float32, device=x.device)
    return out, dst, k_per_split, split, 0 if split == 1 else dst.stride(0)
