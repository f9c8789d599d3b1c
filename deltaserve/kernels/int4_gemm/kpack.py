"""Triton int4 decode GEMV (T = 1) over the K-packed layout (layers/quant.awq_to_kpack), built for the ALU budget.

Why a second layout: at T = 1 an H100 streams ~6e12 int4 weights/s but issues only ~30e12 lane ops/s, so a GEMV
reaches the bandwidth bound only at about 3 ops per weight. The AWQ layout packs 8 output columns per int32, so
each nibble needs its own extract, int->float, multiply and a cross-thread reduction over K (~6-7 ops: 0.35 of the
bound measured). Here an int32 holds 8 input rows of one column, so a thread owns whole columns and reduces over K
in registers, and each weight costs ~2.5 ops:
  - one shift places two nibbles at mantissa bits 15..18 and 19..22 (0.5 op per weight);
  - one AND|OR (a LOP3) makes the fp32 1 + q·2^-8 or 1 + q·2^-4 (the 1.0 is the exponent, no int->float convert);
  - one FMA with the activation into ONE accumulator: the high nibble meets x/16, so both halves add q·x/256.
The 1.0 offsets are taken out once per group with the group's activation sums (which the zero point needs anyway):
  sum_k x_k (q_k - z) = 256 (acc - X_lo - X_hi/16) - z (X_lo + X_hi),   times the group's scale.
The fp32 cancellation costs ~8 of 24 mantissa bits: ~2^-16 relative (1-2e-6 measured), far below bf16's 2^-8.
The two nibble masks are kernel ARGUMENTS, not literals: a LOP3 takes one immediate, and with both constants literal
ptxas re-materialized a mask before every LOP3 (~0.5 extra op per weight, 160+ registers). As arguments they stay in
registers: 126 registers, and on an H200 (Triton 3.6) 27B gate|up 43.9 -> 36.2 us, down 23.7 -> 19.6, in_proj_qkv|z
22.2 -> 18.5, o_proj 10.8 -> 8.4 (CUDA-graph replays over 300 MB of weights, 2026-11-29). In all the loop issues
~3.9 SASS instructions a weight (benchmarks/kernels/sass_report.py): the ~2.5 above, ~0.6 preparing the activations
(bf16 -> fp32, the sums, x/16; shared by a thread's 4 columns) and addressing. Still issue-bound, at 2.3-2.6 TB/s.
8 columns a thread (BN 1024, 4 warps) halves the activation share but needs 168 registers: not faster (37.4 us).

Layout: P [K/8, N] int32; int32 row 8b + r of column n holds input row 64b + 8j + r at bits 4j (span b, j = 0..7),
so nibble j of a span's 8 rows meets the contiguous activations x[64b + 8j : 64b + 8j + 8]. Zeros stay in the AWQ
layout [K/G, N/8], scales [K/G, N]. Needs G % 64 == 0 (a span never straddles two groups).

2 <= T <= 16 (groups of 128 or more): `_kpack_dot_kernel`, the same tiles on the tensor cores (rows padded to 16).
Its nibbles become 16-bit floats in one asm block per int32 (`_nibble_tiles`: 4 LOP3 + 3 shifts per 8 weights, the
magic-number trick in 16 bits); before, each nibble took a shift, an AND|OR, an fp32 subtract and an fp32 -> bf16
convert (~6 instructions a weight). H200, Triton 3.6, CUDA-graph replays over 100 MB of weights, split sum included
(2026-11-30): 27B gate|up 87 -> 51 us at T = 2 and 96 -> 59 at T = 16, 27B down 50 -> 29 / 56 -> 34, 27B o_proj
22 -> 16 / 23 -> 18, 9B gate|up 51 -> 31 / 56 -> 35, 9B down 30 -> 20 / 37 -> 23 (1.25-1.75x). At T = 1 the same
tensor-core kernel measured 0.73-0.84x the FMA kernel above (0.61-0.75x with each group of K in its own
accumulator row), so T = 1 keeps the FMA kernel.

Program (i_n, i_s[, i_r]): columns i_n·BN.., groups of K range i_s (fp32 split-K partials [S, rows, N], summed in
split order by the caller: deterministic, no atomics). Summing in the GEMV's own launch instead (the program that
arrives last at a per-column-block counter reads the partials) was measured on an H200 (2026-11-29): the arrival
atomic alone added 1-3.6 us, about what the separate sum launch costs (27B gate|up 44.9 vs 44.9 us, down 27.3 vs
26.8), so the second launch stays. Variants probed then, none kept: activations pre-converted to fp32 with the group
sums precomputed (-2..4%), the next group's weights prefetched into registers (+5..15%), 1-2 columns a thread.
INDEXED (the MoE decode): axis 2 is the output row r, which multiplies x row r // X_ROW_DIV by the weight of expert
expert_of_row[r] (-1: another rank's, writes nothing).
"""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ...layers.quant import KPACK_SPAN
from ..pdl import pdl_args, pdl_start, prefetch_l2
from .triton import awq_zeros_of_columns, device_sms, dot_precision, expert_row, split_k_ranges, sum_splits


@triton.jit
def nibble_pair(acc, b_q, x_lo, x_hi16, M_LO, M_HI, SHIFT: tl.constexpr):
    """acc += (1 + q_lo/256) x_lo + (1 + q_hi/16) x_hi/16 for the two nibbles SHIFT brings to bits 15..22 (SHIFT > 0:
    left, < 0: right; the masks M_LO = 0x78000 and M_HI = 0x780000 drop whatever the arithmetic shift drags in);
    x_lo, x_hi16 broadcast against b_q."""
    if SHIFT > 0:
        b_v = b_q << SHIFT
    else:
        b_v = b_q >> (-SHIFT)
    b_lo = ((b_v & M_LO) | 0x3F800000).to(tl.float32, bitcast=True)
    b_hi = ((b_v & M_HI) | 0x3F800000).to(tl.float32, bitcast=True)
    return acc + b_lo * x_lo + b_hi * x_hi16


@triton.jit
def _kpack_gemv_kernel(x, qweight, qzeros, scales, out, expert_of_row, N, K, K_PER_SPLIT,
                       stride_xt, stride_qk, stride_zk, stride_sk, stride_os, stride_ot,
                       stride_qe, stride_ze, stride_se, M_LO, M_HI,
                       GROUP: tl.constexpr, BN: tl.constexpr, X_ROW_DIV: tl.constexpr, INDEXED: tl.constexpr,
                       PF_ROWS: tl.constexpr = 0, USE_PDL: tl.constexpr = False):
    i_n, i_s = tl.program_id(0), tl.program_id(1)
    if PF_ROWS > 0:  # ask L2 for this program's first PF_ROWS int32 rows before the wait (prefetch_rows)
        if INDEXED:
            i_e, qweight, qzeros, scales, x, out = expert_row(expert_of_row, qweight, qzeros, scales, x, out,
                                                              stride_qe, stride_ze, stride_se, stride_xt, stride_ot,
                                                              X_ROW_DIV)
        o_pf = tl.arange(0, PF_ROWS * (BN // 32))
        r_pf = tl.minimum(i_s * (K_PER_SPLIT // 8) + o_pf // (BN // 32), K // 8 - 1)
        c_pf = tl.minimum(i_n * BN + (o_pf % (BN // 32)) * 32, N - 1)
        prefetch_l2(qweight + r_pf.to(tl.int64) * stride_qk + c_pf, USE_PDL)
    pdl_start(USE_PDL)
    if INDEXED:
        if PF_ROWS == 0:
            i_e, qweight, qzeros, scales, x, out = expert_row(expert_of_row, qweight, qzeros, scales, x, out,
                                                              stride_qe, stride_ze, stride_se, stride_xt, stride_ot,
                                                              X_ROW_DIV)
        if i_e < 0:
            return
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    o_r = tl.arange(0, 8)
    b_out = tl.zeros([BN], dtype=tl.float32)
    k_lo = i_s * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    for g0 in range(k_lo, k_hi, GROUP):
        acc = tl.zeros([8, BN], dtype=tl.float32)
        x_lo = tl.zeros([8], dtype=tl.float32)
        x_hi = tl.zeros([8], dtype=tl.float32)  # sums of x / 16
        for h in tl.static_range(GROUP // 64):
            k0 = g0 + h * 64
            b_q = tl.load(qweight + (k0 // 8 + o_r)[:, None].to(tl.int64) * stride_qk + o_n[None, :],
                          mask=m_n[None, :], other=0)
            p_x = x + k0 + o_r
            x0 = tl.load(p_x).to(tl.float32)
            x1 = tl.load(p_x + 8).to(tl.float32) * 0.0625
            x2 = tl.load(p_x + 16).to(tl.float32)
            x3 = tl.load(p_x + 24).to(tl.float32) * 0.0625
            x4 = tl.load(p_x + 32).to(tl.float32)
            x5 = tl.load(p_x + 40).to(tl.float32) * 0.0625
            x6 = tl.load(p_x + 48).to(tl.float32)
            x7 = tl.load(p_x + 56).to(tl.float32) * 0.0625
            acc = nibble_pair(acc, b_q, x0[:, None], x1[:, None], M_LO, M_HI, 15)  # nibbles 0, 1 (bits 0..7)
            acc = nibble_pair(acc, b_q, x2[:, None], x3[:, None], M_LO, M_HI, 7)  # nibbles 2, 3
            acc = nibble_pair(acc, b_q, x4[:, None], x5[:, None], M_LO, M_HI, -1)  # nibbles 4, 5
            acc = nibble_pair(acc, b_q, x6[:, None], x7[:, None], M_LO, M_HI, -9)  # nibbles 6, 7
            x_lo += x0 + x2 + x4 + x6
            x_hi += x1 + x3 + x5 + x7
        i_g = g0 // GROUP
        b_z = awq_zeros_of_columns(qzeros + i_g * stride_zk, o_n, m_n)
        b_s = tl.load(scales + i_g * stride_sk + o_n, mask=m_n, other=0.0).to(tl.float32)
        s_lo = tl.sum(x_lo, axis=0)
        s_hi = tl.sum(x_hi, axis=0)
        b_xq = 256.0 * (tl.sum(acc, axis=0) - (s_lo + s_hi))
        b_out += b_s * (b_xq - b_z.to(tl.float32) * (s_lo + 16.0 * s_hi))
    tl.store(out + i_s * stride_os + o_n, b_out, mask=m_n)


def _nibbles_asm(magic: str) -> str:
    """PTX for one int32 -> its 8 nibbles as 16-bit floats `magic` + q: nibbles j and j + 4 (bits 4j, 16 + 4j) land in
    the low mantissa bits of the two halves of one register (one LOP3 (a & b) | c), then split into outputs j, j + 4."""
    return ("{ .reg .b32 t0, t1, t2, t3;"
            f" lop3.b32 t0, $8, 0x000f000f, 0x{magic}{magic}, 0xea;"
            + "".join(f" shr.b32 t{j}, $8, {4 * j}; lop3.b32 t{j}, t{j}, 0x000f000f, 0x{magic}{magic}, 0xea;"
                      for j in (1, 2, 3))
            + "".join(f" mov.b32 {{${j}, ${j + 4}}}, t{j};" for j in range(4)) + " }")


_NIBBLES_BF16 = tl.constexpr(_nibbles_asm("4300"))  # bf16 128.0: 7 mantissa bits, room for 0..15
_NIBBLES_FP16 = tl.constexpr(_nibbles_asm("6400"))  # fp16 1024.0


@triton.jit
def _nibble_tiles(b_q, MAGIC: tl.constexpr, USE_ASM: tl.constexpr):
    """int32 [16, BN] (nibble j at bits 4j) -> its 8 nibbles as [16, BN] tiles of the exact values MAGIC + q.
    USE_ASM (CUDA, 16-bit activations): one asm block per int32 makes them 16-bit floats with 4 LOP3s and 3 shifts
    (MAGIC = 128 in bf16, 1024 in fp16: the nibble fills the low mantissa bits of the magic number, no int->float
    convert); the tiles leave it in the 16-bit dtype the dot takes. Else fp32 (the interpreter, fp32 activations)."""
    if USE_ASM:
        if MAGIC == 128.0:
            return tl.inline_asm_elementwise(_NIBBLES_BF16, "=h,=h,=h,=h,=h,=h,=h,=h,r", [b_q],
                                             dtype=(tl.bfloat16,) * 8, is_pure=True, pack=1)
        else:
            return tl.inline_asm_elementwise(_NIBBLES_FP16, "=h,=h,=h,=h,=h,=h,=h,=h,r", [b_q],
                                             dtype=(tl.float16,) * 8, is_pure=True, pack=1)
    else:
        return (((b_q >> 0) & 0xF).to(tl.float32) + MAGIC, ((b_q >> 4) & 0xF).to(tl.float32) + MAGIC,
                ((b_q >> 8) & 0xF).to(tl.float32) + MAGIC, ((b_q >> 12) & 0xF).to(tl.float32) + MAGIC,
                ((b_q >> 16) & 0xF).to(tl.float32) + MAGIC, ((b_q >> 20) & 0xF).to(tl.float32) + MAGIC,
                ((b_q >> 24) & 0xF).to(tl.float32) + MAGIC, ((b_q >> 28) & 0xF).to(tl.float32) + MAGIC)


@triton.jit
def _kpack_dot_kernel(x, qweight, qzeros, scales, out, T, N, K, K_PER_SPLIT,
                      stride_xt, stride_qk, stride_zk, stride_sk, stride_os, stride_ot,
                      GROUP: tl.constexpr, BN: tl.constexpr, MAGIC: tl.constexpr, USE_ASM: tl.constexpr,
                      DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr = False):
    """2 <= T <= 16 rows (padded to 16) on the tensor cores, program (i_n, i_s) as above. One int32 tile [16, BN]
    covers two spans (128 rows); its nibble j is a [16, BN] matrix of rows {64a + 8j + r} that multiplies the 16
    activations of those rows (two runs of 8), so the tile is used as loaded, never reshaped. The nibbles enter
    tl.dot as the exact MAGIC + q (_nibble_tiles); offset, zero point and scale are applied once per column and
    group: s · (x·(MAGIC + q) - (MAGIC + z) · sum x)."""
    pdl_start(USE_PDL)
    i_n, i_s = tl.program_id(0), tl.program_id(1)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    o_m = tl.arange(0, 16)
    m_m = o_m < T
    o_i = tl.arange(0, 16)  # int32 row of the tile; activation row offset (i // 8)·64 + 8j + i % 8
    p_x = x + o_m[:, None].to(tl.int64) * stride_xt + ((o_i // 8) * 64 + o_i % 8)[None, :]
    b_out = tl.zeros([16, BN], dtype=tl.float32)
    k_lo = i_s * K_PER_SPLIT
    k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
    for g0 in range(k_lo, k_hi, GROUP):
        b_acc = tl.zeros([16, BN], dtype=tl.float32)
        b_xs = tl.zeros([16], dtype=tl.float32)
        for h in tl.static_range(GROUP // 128):
            k0 = g0 + h * 128
            b_q = tl.load(qweight + (k0 // 8 + o_i)[:, None].to(tl.int64) * stride_qk + o_n[None, :],
                          mask=m_n[None, :], other=0)
            b_w = _nibble_tiles(b_q, MAGIC, USE_ASM)
            b_xt = tl.zeros([16, 16], dtype=tl.float32)
            for j in tl.static_range(8):
                b_x = tl.load(p_x + k0 + 8 * j, mask=m_m[:, None], other=0.0)
                b_acc = tl.dot(b_x, b_w[j].to(b_x.dtype), acc=b_acc, input_precision=DOT_PRECISION)
                b_xt += b_x.to(tl.float32)
            b_xs += tl.sum(b_xt, axis=1)  # one reduction per tile (per nibble: spills on Triton 3.6)
        i_g = g0 // GROUP
        b_z = awq_zeros_of_columns(qzeros + i_g * stride_zk, o_n, m_n)
        b_s = tl.load(scales + i_g * stride_sk + o_n, mask=m_n, other=0.0).to(tl.float32)
        b_out += b_s[None, :] * (b_acc - b_xs[:, None] * (b_z.to(tl.float32) + MAGIC)[None, :])
    p_o = out + i_s * stride_os + o_m[:, None].to(tl.int64) * stride_ot + o_n[None, :]
    tl.store(p_o, b_out, mask=m_m[:, None] & m_n[None, :])


MASK_LO, MASK_HI = 0x00078000, 0x00780000  # mantissa bits 15..18 and 19..22, passed as arguments (docstring)


@dataclass(frozen=True)
class KpackPlan:
    block_n: int  # output columns per program
    split_k: int  # programs along K, each a whole number of groups
    num_warps: int = 4
    num_stages: int = 3


def kpack_plan(n: int, k: int, group: int, num_sms: int = 132, rows: int = 1, t: int = 1) -> KpackPlan:
    """Shapes only (no host sync). T = 1: 128 columns per warp (4 per thread, one 16-byte load per span row);
    2 <= T <= 16 (tensor cores): 256 columns per program. K splits into whole groups. rows: GEMVs launched
    together (the MoE decode's pairs)."""
    groups = k // group
    if t == 1:  # ~16 programs per SM (4 resident at 126 registers): H200, 27B down 19.6 us at 136 splits vs 21.5 at
        # 68, in_proj_qkv|z 18.5 at 40 vs 20.7 at 20 (the partials stay under 1/16 of the int4 bytes)
        bn = max(128, min(512, triton.next_power_of_2(n)))
        split = max(1, min(triton.cdiv(16 * num_sms, triton.cdiv(n, bn) * rows), groups))
        return KpackPlan(bn, split, num_warps=bn // 128)
    # T > 1: ~3 programs per SM, fp32 partials [S, T, N] at most 1/4 of the int4 bytes (H200 sweep of the asm
    # nibble kernel at T = 2..16, 27B / 9B MLP and o_proj shapes: 256 columns x 4 warps, 3 stages best throughout;
    # ~3 programs per SM best or within a few % of it)
    split = max(1, min(triton.cdiv(3 * num_sms, triton.cdiv(n, 256) * rows), groups, k // (32 * t)))
    return KpackPlan(256, split, num_warps=4)


def check_kpack(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                group: int) -> tuple[int, int]:
    """-> (N, K) after checking the K-packed tensors ([..., K/8, N], [..., K/G, N/8], [..., K/G, N]) against x."""
    if x.dim() != 2:
        raise ValueError(f"x {tuple(x.shape)} must be [T, K]")
    k = x.shape[-1]
    n = qweight.shape[-1]
    if group % KPACK_SPAN or k % group:
        raise ValueError(f"group_size {group} must be a multiple of {KPACK_SPAN} dividing K={k} for the K-packed "
                         f"kernel")
    lead = tuple(qweight.shape[:-2])
    want = {"qweight": (qweight, lead + (k // 8, n)), "qzeros": (qzeros, lead + (k // group, n // 8)),
            "scales": (scales, lead + (k // group, n))}
    for name, (tensor, shape) in want.items():
        if tuple(tensor.shape) != shape or tensor.stride(-1) != 1 or tensor.device != x.device:
            raise ValueError(f"{name} {tuple(tensor.shape)} on {tensor.device} must be {list(shape)} with a "
                             f"contiguous last axis on {x.device} (K-packed int4, x is {tuple(x.shape)})")
    if qweight.dtype != torch.int32 or qzeros.dtype != torch.int32 or n % 8:
        raise ValueError(f"qweight / qzeros must be int32 and N={n} a multiple of 8")
    return n, k


PREFETCH_MAX_BYTES = 65536  # weight bytes a program of a small launch asks L2 for before its PDL wait


def prefetch_rows(programs: int, k_per_split: int, block_n: int, num_sms: int, ids_early: bool,
                  indexed: bool) -> int:
    """int32 rows of its tile (a power of two, 0: none) a program asks L2 for before its PDL wait, while the kernel
    before it runs (pdl.prefetch_l2). Only launches of at most 2 programs an SM, whose time is mostly the first loads'
    latency, and per-row experts only when their ids were written two launches back or more (ids_early). H200,
    `.peer/pf_l2.py chain` (RMSNorm then the GEMV, CUDA-graph replays, 2026-12-01), µs without -> with 32 KB:
    35B-A3B out_proj (128 programs) 8.79 -> 8.10; but 27B o_proj (480 programs) 10.93 -> 12.46, 27B down
    25.5 -> 27.1 and gate|up 42.1 -> 44.4 (many programs: the prefetches only compete with the stream)."""
    if programs > 2 * num_sms or (indexed and not ids_early):
        return 0
    rows = min(k_per_split // 8, PREFETCH_MAX_BYTES // (4 * block_n))
    return 1 << (rows.bit_length() - 1) if rows > 0 else 0


def kpack_gemv_rows(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                    group_size: int, expert_of_row: torch.Tensor | None = None, x_row_div: int = 1,
                    config: KpackPlan | None = None, ids_early: bool = False) -> torch.Tensor:
    """fp32 split-K partials [S, R, N] of R independent GEMVs; the caller sums S.
    Plain (expert_of_row None): x [1, K]; qweight [K/8, N] int32 (K-packed); qzeros [K/G, N/8]; scales [K/G, N];
    R = 1. Per-row experts (the MoE decode): qweight [E, K/8, N], qzeros [E, ...], scales [E, ...]; row r is
    x[r // x_row_div] times expert expert_of_row[r] ([R] int; -1 leaves the row unwritten). ids_early: no kernel
    launched right before this one writes expert_of_row (prefetch_rows)."""
    indexed = expert_of_row is not None
    if indexed != (qweight.dim() == 3) or (not indexed and x.shape[0] != 1):
        raise ValueError(f"x {tuple(x.shape)} / qweight {tuple(qweight.shape)}: one row times [K/8, N], or "
                         f"expert_of_row with [E, K/8, N] stacks")
    n, k = check_kpack(x, qweight, qzeros, scales, group_size)
    rows = expert_of_row.numel() if indexed else 1
    x = x.contiguous()
    sms = device_sms(x.device)
    cfg = config or kpack_plan(n, k, group_size, sms, rows)
    k_per_split, split = split_k_ranges(k, group_size, cfg.split_k)
    part = torch.empty(split, rows, n, dtype=torch.float32, device=x.device)
    if rows == 0:
        return part
    lead = (qweight.stride(0), qzeros.stride(0), scales.stride(0)) if indexed else (0, 0, 0)
    grid = (triton.cdiv(n, cfg.block_n), split) + ((rows,) if indexed else ())
    pf_rows = prefetch_rows(grid[0] * split * rows, k_per_split, cfg.block_n, sms, ids_early, indexed)
    _kpack_gemv_kernel[grid](x, qweight, qzeros, scales, part, expert_of_row if indexed else x, n, k, k_per_split,
                             x.stride(0), qweight.stride(-2), qzeros.stride(-2), scales.stride(-2), part.stride(0),
                             part.stride(1), *lead, MASK_LO, MASK_HI, GROUP=group_size, BN=cfg.block_n,
                             X_ROW_DIV=x_row_div, INDEXED=indexed, PF_ROWS=pf_rows, num_warps=cfg.num_warps,
                             num_stages=cfg.num_stages, **pdl_args(x))
    return part


DOT_MAX_T = 16  # rows the tensor-core GEMV takes (padded to 16); more go to the GEMM
_DOT_MAGIC = {torch.bfloat16: 128.0, torch.float16: 1024.0}  # _nibble_tiles' offsets (fp32: none, no cancellation)


def kpack_gemv_dot(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
                   group_size: int, config: KpackPlan | None = None) -> torch.Tensor:
    """fp32 split-K partials [S, T, N] of x [2 <= T <= 16, K] times a K-packed weight (group a multiple of 128)."""
    n, k = check_kpack(x, qweight, qzeros, scales, group_size)
    t = x.shape[0]
    if t > DOT_MAX_T or group_size % 128:
        raise ValueError(f"the tensor-core K-packed GEMV takes T <= {DOT_MAX_T} rows and groups in multiples of "
                         f"128, got T={t}, group {group_size}")
    x = x.contiguous()
    cfg = config or kpack_plan(n, k, group_size, device_sms(x.device), t=t)
    k_per_split, split = split_k_ranges(k, group_size, cfg.split_k)
    part = torch.empty(split, t, n, dtype=torch.float32, device=x.device)
    _kpack_dot_kernel[(triton.cdiv(n, cfg.block_n), split)](
        x, qweight, qzeros, scales, part, t, n, k, k_per_split, x.stride(0), qweight.stride(0), qzeros.stride(0),
        scales.stride(0), part.stride(0), part.stride(1), GROUP=group_size, BN=cfg.block_n,
        MAGIC=_DOT_MAGIC.get(x.dtype, 0.0), USE_ASM=x.is_cuda and x.dtype in _DOT_MAGIC,
        DOT_PRECISION=dot_precision(x.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages, **pdl_args(x))
    return part


def kpack_gemv(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
               group_size: int, config: KpackPlan | None = None) -> torch.Tensor:
    """x: [T, K] fp16/bf16 (fp32 in the interpreter), T = 1 (FMA kernel) or 2..16 with groups in multiples of 128
    (tensor-core kernel); K-packed qweight [K/8, N] int32; qzeros [K/G, N/8] int32; scales [K/G, N] -> [T, N] in
    x's dtype."""
    if x.shape[0] == 1:
        part = kpack_gemv_rows(x, qweight, qzeros, scales, group_size, config=config)
    else:
        part = kpack_gemv_dot(x, qweight, qzeros, scales, group_size, config)
    if part.shape[0] == 1:
        return part[0].to(x.dtype)
    return sum_splits(part, torch.empty(part.shape[1:], dtype=x.dtype, device=x.device))
