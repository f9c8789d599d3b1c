"""Triton fused MoE: two grouped GEMMs over the expert-sorted rows of align.moe_align, experts int4 (AWQ layout,
dequantized inside the K loop), block FP8 (FP8=True: [E, N, K] e4m3 times its block scale, dequantized inside the
K loop, one K tile per scale block) or 16-bit (INT4=False: the same kernel reads [E, N, K] weights).

GEMM1: rows gather token sorted_ids // k of x, multiply by expert e's gate and up halves (two accumulators) and
write silu(gate) · up for the pair ([T·k, I], x's dtype). GEMM2: rows gather those pairs, multiply by e's down
projection, scale by the routing weight and write [T·k, H]; decode.combine_kernel sums the k rows of each token
(fp32). Padding rows (sorted id == T·k) load zeros and store nothing; tiles past num_tokens_post_pad return at once.
Pairs with expert -1 (another rank's, expert parallelism) get no row from the align, so neither GEMM touches them,
and the combine skips their (unwritten) rows. Accumulation and the
epilogues are fp32. No host syncs (grid sizes depend on T, k and E only), so CUDA graphs capture it.
Decode-sized int4 batches skip all of this for per-pair GEMVs (decode.py); see fused_moe_triton's switches.
"""
import torch
import triton
import triton.language as tl

from ..int4_gemm.triton import dequant_awq_tile, dequant_kpack_tile, dot_precision
from .align import MoeAlignment, moe_align
from .align_triton import moe_align_triton
from .decode import DECODE_MAX_PAIRS, combine_pairs, fused_moe_int4_decode
from .reference import ExpertWeights


@triton.jit
def _weight_tile(p_w, p_z, p_s, k0, o_k, n0, n_end, stride_wk, stride_wn, stride_sn, BK: tl.constexpr,
                 BN: tl.constexpr, INT4: tl.constexpr, KPACK: tl.constexpr, FP8: tl.constexpr, SCALE_BN: tl.constexpr,
                 DTYPE: tl.constexpr):
    """[BK, BN] tile of one expert's weight at rows o_k = k0.., columns n0.. (< n_end): int4 AWQ [K, N/8] or K-packed
    [K/8, N] (KPACK, BK = 64), block FP8 [N, K] (p_s: the scale column of this K block, one scale per SCALE_BN rows
    of N) or 16-bit [N, K]."""
    if INT4:
        if KPACK:
            return dequant_kpack_tile(p_w, p_z, p_s, k0, n0, n_end, stride_wk, BN, DTYPE)
        else:
            return dequant_awq_tile(p_w, p_z, p_s, o_k, n0, n_end, stride_wk, BK, BN, DTYPE)
    else:
        o_n = n0 + tl.arange(0, BN)
        m_n = o_n < n_end
        b_w = tl.load(p_w + o_n[None, :] * stride_wn + o_k[:, None] * stride_wk, mask=m_n[None, :], other=0.0)
        if FP8:
            b_s = tl.load(p_s + (o_n // SCALE_BN) * stride_sn, mask=m_n, other=0.0)
            return (b_w.to(tl.float32) * b_s[None, :]).to(DTYPE)  # one rounding, as the reference's dequant
        else:
            return b_w.to(DTYPE)


@triton.jit
def _moe_gemm_kernel(a, w, w_zeros, w_scales, out, topk_weights, sorted_ids, expert_ids, num_post_pad,
                     N, K, num_pairs,
                     stride_am, stride_we, stride_wk, stride_wn, stride_ze, stride_zk, stride_se, stride_sk,
                     stride_sn, stride_om,
                     A_ROW_DIV: tl.constexpr, GROUP: tl.constexpr, INT4: tl.constexpr, KPACK: tl.constexpr,
                     FP8: tl.constexpr,
                     SCALE_BN: tl.constexpr, GATED: tl.constexpr,
                     MUL_WEIGHT: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     DOT_PRECISION: tl.constexpr):
    """Program (i_m, i_n): sorted rows i_m·BM.. (one expert), output columns i_n·BN.. (GATED: gate columns and the
    same columns + N of up). Weight column count: 2N when GATED, else N."""
    i_m, i_n = tl.program_id(0), tl.program_id(1)
    if i_m * BM < tl.load(num_post_pad):
        o_r = i_m * BM + tl.arange(0, BM)
        b_pair = tl.load(sorted_ids + o_r)
        m_r = b_pair < num_pairs
        o_a = (b_pair // A_ROW_DIV).to(tl.int64)
        i_e = tl.load(expert_ids + i_m).to(tl.int64)
        p_w, p_z, p_s = w + i_e * stride_we, w_zeros + i_e * stride_ze, w_scales + i_e * stride_se
        n0 = i_n * BN
        b_acc = tl.zeros([BM, BN], dtype=tl.float32)
        b_up = tl.zeros([BM, BN], dtype=tl.float32)
        for k0 in range(0, K, BK):
            o_k = k0 + tl.arange(0, BK)
            b_a = tl.load(a + o_a[:, None] * stride_am + o_k[None, :], mask=m_r[:, None], other=0.0)
            i_g = k0 // GROUP
            p_zg, p_sg = p_z + i_g * stride_zk, p_s + i_g * stride_sk
            b_w = _weight_tile(p_w, p_zg, p_sg, k0, o_k, n0, N, stride_wk, stride_wn, stride_sn, BK, BN, INT4, KPACK,
                               FP8, SCALE_BN, b_a.dtype)
            b_acc += tl.dot(b_a, b_w, input_precision=DOT_PRECISION)
            if GATED:
                b_wu = _weight_tile(p_w, p_zg, p_sg, k0, o_k, N + n0, 2 * N, stride_wk, stride_wn, stride_sn, BK,
                                    BN, INT4, KPACK, FP8, SCALE_BN, b_a.dtype)
                b_up += tl.dot(b_a, b_wu, input_precision=DOT_PRECISION)
        if GATED:
            b_acc = b_acc / (1.0 + tl.exp(-b_acc)) * b_up  # silu(gate) · up
        if MUL_WEIGHT:
            b_acc = b_acc * tl.load(topk_weights + b_pair, mask=m_r, other=0.0)[:, None]
        o_n = n0 + tl.arange(0, BN)
        p_o = out + b_pair[:, None].to(tl.int64) * stride_om + o_n[None, :]
        tl.store(p_o, b_acc.to(p_o.dtype.element_ty), mask=m_r[:, None] & (o_n < N)[None, :])


def block_k_for(w: ExpertWeights, k: int, block_m: int) -> int:
    """The K tile: within one quantization group (int4) or scale block (FP8), dividing K."""
    group = w.group_size if w.int4 else (w.block[1] if w.fp8 else 0)
    if w.int4:
        bk = 64 if w.kpack else min(group, 128 if block_m <= 16 else 64)
    else:
        bk = next((b for b in (64, 32, 16) if k % b == 0 and (not group or group % b == 0)), 0)
    if not bk or k % bk or (group and (group < 16 or group % bk)):
        raise ValueError(f"expert in-features {k} (group / scale block {group}) need a K tile of 16, 32 or 64 that "
                         f"divides both; this MoE must run on the grouped-GEMM / reference path")
    return bk


def _gemm(a, w: ExpertWeights, out, al: MoeAlignment, topk_weights, n: int, a_row_div: int, gated: bool,
          block_n: int) -> None:
    """out[pair] = a[pair // a_row_div] W_e (gated: silu(gate)·up; else times the pair's routing weight)."""
    _, k, _ = w.dims()
    bk = block_k_for(w, k, al.block_m)
    stride_sn, group, scale_bn = 0, w.group_size or bk, 1
    if w.int4:
        tensors = (w.qweight, w.qzeros, w.scales)
        strides = (w.qweight.stride(0), w.qweight.stride(1), 0, w.qzeros.stride(0), w.qzeros.stride(1),
                   w.scales.stride(0), w.scales.stride(1))
    elif w.fp8:  # zeros unused; the scales step one K block per `group` columns and one row per scale_bn rows
        tensors = (w.weight, w.weight, w.scale_inv)
        strides = (w.weight.stride(0), w.weight.stride(2), w.weight.stride(1), 0, 0, w.scale_inv.stride(0),
                   w.scale_inv.stride(2))
        stride_sn, (scale_bn, group) = w.scale_inv.stride(1), w.block
    else:  # zeros / scales unused: any tensor, zero strides
        tensors = (w.weight, w.weight, w.weight)
        strides = (w.weight.stride(0), w.weight.stride(2), w.weight.stride(1), 0, 0, 0, 0)
    grid = (al.sorted_ids.numel() // al.block_m, triton.cdiv(n, block_n))
    _moe_gemm_kernel[grid](a, *tensors, out, topk_weights, al.sorted_ids, al.expert_ids, al.num_tokens_post_pad,
                           n, k, al.num_pairs, a.stride(0), *strides, stride_sn, out.stride(0),
                           A_ROW_DIV=a_row_div, GROUP=group, INT4=w.int4, KPACK=w.kpack, FP8=w.fp8,
                           SCALE_BN=scale_bn,
                           GATED=gated, MUL_WEIGHT=not gated, BM=al.block_m, BN=block_n, BK=bk,
                           DOT_PRECISION=dot_precision(a.dtype), num_warps=4, num_stages=3)


# One-line switches between the decode paths (benchmarks/kernels/bench_int4.py times both sides): int4 experts with
# T·k <= decode.DECODE_MAX_PAIRS run as per-pair GEMVs (decode.py); up to TRITON_ALIGN_MAX_PAIRS pairs the sort /
# align is the one-launch Triton kernel (align_triton.py, identical output) instead of ~15 torch ops.
DECODE_GEMV = True
# 0: on an H100 (2026-11-28, 35B-A3B shapes) the one-launch Triton align was slower than the torch ops at every
# size measured (T=16: 327 vs 279 us per MoE call, T=64: 739 vs 586), so the torch align is used throughout
TRITON_ALIGN_MAX_PAIRS = 0


def check_moe_shapes(x, gate_up: ExpertWeights, down: ExpertWeights, topk_weights, topk_ids) -> None:
    t, h = x.shape
    e, k1, n1 = gate_up.dims()
    e2, k2, n2 = down.dims()
    if k1 != h or n2 != h or e2 != e or n1 != 2 * k2 or k2 % 8 or topk_ids.shape != topk_weights.shape:
        raise ValueError(f"expert shapes do not fit x [{t}, {h}]: gate_up K={k1} N={n1}, down K={k2} N={n2}, "
                         f"E={e}/{e2}, topk {tuple(topk_ids.shape)} / {tuple(topk_weights.shape)}")


def fused_moe_triton(x: torch.Tensor, gate_up: ExpertWeights, down: ExpertWeights, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor, block_m: int | None = None, decode_gemv: bool | None = None,
                     triton_align: bool | None = None, gemm1_block_n: int = 64,
                     two_launch: bool | None = None) -> torch.Tensor:
    """x: [T, H]; gate_up: N = 2I (first I columns gate), K = H; down: N = H, K = I (I % 8 == 0);
    topk_weights [T, k] fp32; topk_ids [T, k] (-1: another rank's expert, skipped) -> [T, H] in x's dtype: sum over
    the k experts of w · down(silu(gate) · up).
    block_m / decode_gemv / triton_align / gemm1_block_n / two_launch (decode.fused_moe_int4_decode's): override the
    path choice (tests, benchmarks); an explicit block_m means the grouped GEMM."""
    check_moe_shapes(x, gate_up, down, topk_weights, topk_ids)
    t, h = x.shape
    e, _, _ = gate_up.dims()
    k2 = down.dims()[1]
    top_k = topk_ids.shape[1]
    x = x.contiguous()
    if decode_gemv is None:
        decode_gemv = DECODE_GEMV and block_m is None and t * top_k <= DECODE_MAX_PAIRS
    if decode_gemv and gate_up.int4 and down.int4:
        return fused_moe_int4_decode(x, gate_up, down, topk_weights, topk_ids, two_launch)
    if block_m is None:  # decode / small batches: few rows per expert, keep tiles short
        block_m = 16 if t * top_k <= 16 * e else 64
    if triton_align is None:
        triton_align = t * top_k <= TRITON_ALIGN_MAX_PAIRS
    al = (moe_align_triton if triton_align else moe_align)(topk_ids, e, block_m)
    act = torch.empty(t * top_k, k2, dtype=x.dtype, device=x.device)
    _gemm(x, gate_up, act, al, x, k2, top_k, True, gemm1_block_n)  # x: a placeholder, GEMM1 applies no weight
    y = torch.empty(t * top_k, h, dtype=x.dtype, device=x.device)
    _gemm(act, down, y, al, topk_weights.reshape(-1).float().contiguous(), h, 1, False, 128 if block_m > 16 else 64)
    out = torch.empty(t, h, dtype=x.dtype, device=x.device)
    return combine_pairs(y, None, topk_ids.reshape(-1).contiguous(), out, top_k)  # y holds the weighted rows
