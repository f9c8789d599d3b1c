"""Triton block-FP8 GEMM (the DeepSeek-V3 / vLLM `w8a8_block_fp8_matmul` algorithm) and its activation quantizer.

W8A8 (`fp8_gemm_triton(..., weight_only=False)`): activations are quantized per token and per BK-channel group
to e4m3 (`quant_act_triton`), then each program computes a [BLOCK_M, BLOCK_N] tile with the K loop stepping one
scale block (BLOCK_K = BK) at a time: acc += dot(a_fp8, w_fp8) * a_scale[m] * w_scale[n // BN], so the fp8 tensor
cores see raw e4m3 and the scales cost one multiply per block in fp32.
Weight-only (`weight_only=True`, for decode's few rows): a stays 16-bit, the fp8 weight tile is converted to a's
dtype in registers and the block scale applied after the dot; no activation quantization error, same bytes read.
Both split K across programs when the tile grid alone cannot fill the GPU (decode: T=1 gives N/BLOCK_N tiles):
fp32 partials [SPLIT, M, N] are summed by torch afterwards. No host syncs: everything is sized from shapes.
Shapes and dtypes are validated in __init__.py; these wrappers only check what the kernels themselves need.
"""
import functools
import os

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0
SCALE_EPS = 1e-10

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    @triton.jit
    def to_e4m3(x):
        """x (fp32, |x| <= 448) -> float8e4nv rounded to nearest even. The interpreter's own cast goes wrong when
        rounding carries into the exponent (7.75 -> 4.0), so round in fp32 first; the cast is then exact."""
        b_bits = x.to(tl.uint32, bitcast=True)
        b_normal = ((b_bits + 0x7FFFF + ((b_bits >> 20) & 1)) & 0xFFF00000).to(tl.float32, bitcast=True)
        b_subnormal = ((x * 512.0 + 12582912.0) - 12582912.0) / 512.0  # steps of 2^-9 below 2^-6
        return tl.where(tl.abs(x) < 0.015625, b_subnormal, b_normal).to(tl.float8e4nv)
else:
    @triton.jit
    def to_e4m3(x):
        """x (fp32, |x| <= 448) -> float8e4nv rounded to nearest even (the hardware cast)."""
        return x.to(tl.float8e4nv)


@triton.jit
def _quant_act_kernel(x, xq, xs, T, K, G, stride_x, stride_q, eps,
                      FP8_MAX: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr):
    i_t, i_g = tl.program_id(0), tl.program_id(1)
    o_t = (i_t * ROWS + tl.arange(0, ROWS)).to(tl.int64)
    o_k = i_g * BLOCK_K + tl.arange(0, BLOCK_K)
    m_t = o_t < T
    m = m_t[:, None] & (o_k < K)[None, :]
    b_x = tl.load(x + o_t[:, None] * stride_x + o_k[None, :], mask=m, other=0.0).to(tl.float32)
    b_s = tl.maximum(tl.max(tl.abs(b_x), 1), eps) / FP8_MAX
    b_q = tl.minimum(tl.maximum(b_x / b_s[:, None], -FP8_MAX), FP8_MAX)
    tl.store(xq + o_t[:, None] * stride_q + o_k[None, :], to_e4m3(b_q), mask=m)
    tl.store(xs + o_t * G + i_g, b_s, mask=m_t)


def quant_act_triton(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, K] 16/32-bit, unit stride along K -> (xq [T, K] float8_e4m3fn, xs [T, ceil(K/group)] fp32); the
    same numbers as reference.quant_act (up to the GPU's fp32 division, <= 1 e4m3 ulp in rare elements)."""
    t, k = x.shape
    g = triton.cdiv(k, group)
    xq = torch.empty(t, k, dtype=torch.float8_e4m3fn, device=x.device)
    xs = torch.empty(t, g, dtype=torch.float32, device=x.device)
    rows = 8
    _quant_act_kernel[(triton.cdiv(t, rows), g)](x, xq, xs, t, k, g, x.stride(0), xq.stride(0), SCALE_EPS,
                                                 FP8_MAX=FP8_MAX, ROWS=rows, BLOCK_K=group, num_warps=4)
    return xq, xs


@triton.jit
def _fp8_gemm_kernel(a, a_s, b, b_s, c,
                     M, N, K, K_BLOCKS_PER_SPLIT,
                     stride_am, stride_asm, stride_bn, stride_bsn, stride_cs, stride_cm,
                     SCALE_BN: tl.constexpr, W8A8: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    # grouped tile order: GROUP_M row tiles share each weight column tile while it is in L2
    i_p, i_split = tl.program_id(0), tl.program_id(1)
    num_m = (M + BLOCK_M - 1) // BLOCK_M
    num_n = (N + BLOCK_N - 1) // BLOCK_N
    i_group = i_p // (GROUP_M * num_n)
    first_m = i_group * GROUP_M
    size_m = tl.minimum(num_m - first_m, GROUP_M)
    i_m = first_m + (i_p % (GROUP_M * num_n)) % size_m
    i_n = (i_p % (GROUP_M * num_n)) // size_m

    o_m = (i_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    o_n = (i_n * BLOCK_N + tl.arange(0, BLOCK_N)).to(tl.int64)
    o_k = tl.arange(0, BLOCK_K)
    m_m, m_n = o_m < M, o_n < N
    p_a = a + o_m[:, None] * stride_am + o_k[None, :]
    p_b = b + o_n[None, :] * stride_bn + o_k[:, None]
    p_bs = b_s + (o_n // SCALE_BN) * stride_bsn
    p_as = a_s + o_m * stride_asm

    b_acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_first = i_split * K_BLOCKS_PER_SPLIT
    k_last = tl.minimum(k_first + K_BLOCKS_PER_SPLIT, (K + BLOCK_K - 1) // BLOCK_K)
    for i_k in range(k_first, k_last):
        m_k = o_k < K - i_k * BLOCK_K
        b_a = tl.load(p_a + i_k * BLOCK_K, mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_w = tl.load(p_b + i_k * BLOCK_K, mask=m_k[:, None] & m_n[None, :], other=0.0)
        b_ws = tl.load(p_bs + i_k, mask=m_n, other=0.0)
        if W8A8:
            b_as = tl.load(p_as + i_k, mask=m_m, other=0.0)
            b_acc += tl.dot(b_a, b_w) * b_as[:, None] * b_ws[None, :]
        else:
            b_acc += tl.dot(b_a, b_w.to(b_a.dtype)) * b_ws[None, :]
    p_c = c + i_split * stride_cs + o_m[:, None] * stride_cm + o_n[None, :]
    tl.store(p_c, b_acc.to(c.dtype.element_ty), mask=m_m[:, None] & m_n[None, :])


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # the interpreter: any small number exercises split-K
    return torch.cuda.get_device_properties(device).multi_processor_count


def _config(m: int, n: int, k_blocks: int, weight_only: bool, sms: int) -> tuple[int, int, int, int, int]:
    """-> (BLOCK_M, BLOCK_N, num_warps, num_stages, split). Tiles grow with M; split-K fills the GPU when the
    tile grid has fewer programs than SMs, each split keeping >= 4 K blocks so partials stay a small overhead."""
    if weight_only:
        bm, bn, warps, stages = 16, 64, 4, 4
    elif m <= 64:
        bm, bn, warps, stages = max(16, triton.next_power_of_2(m)), 128, 4, 3
    else:
        bm, bn, warps, stages = 128, 128, 8, 3
    tiles = triton.cdiv(m, bm) * triton.cdiv(n, bn)
    split = min(triton.cdiv(2 * sms, tiles), max(1, k_blocks // 4)) if tiles < sms else 1
    split = triton.cdiv(k_blocks, triton.cdiv(k_blocks, split))  # no empty splits
    return bm, bn, warps, stages, split


def fp8_gemm_triton(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                    weight_only: bool) -> torch.Tensor:
    """x: [T, K] bf16/fp16/fp32 (unit stride along K); w: [N, K] float8_e4m3fn contiguous; scale_inv:
    [ceil(N/BN), ceil(K/BK)] fp32 -> y [T, N] in x's dtype. weight_only: dequantize w in registers and keep x
    16-bit (else quantize x to e4m3 per token and BK group first: W8A8)."""
    (m, k), n = x.shape, w.shape[0]
    bk = block[1]
    if bk not in (32, 64, 128, 256):
        raise ValueError(f"the FP8 GEMM steps K one scale block at a time and needs a block of 32..256 (a power "
                         f"of two) input channels; got {bk}")
    if weight_only:
        a, a_s = x, scale_inv  # a_s is unused when W8A8 is off
    else:
        a, a_s = quant_act_triton(x, bk)
    k_blocks = triton.cdiv(k, bk)
    bm, bn, warps, stages, split = _config(m, n, k_blocks, weight_only, _num_sms(x.device))
    if split == 1:
        c = torch.empty(m, n, dtype=x.dtype, device=x.device)
    else:
        c = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn), split)
    _fp8_gemm_kernel[grid](a, a_s, w, scale_inv, c, m, n, k, triton.cdiv(k_blocks, split),
                           a.stride(0), a_s.stride(0), w.stride(0), scale_inv.stride(0), m * n if split > 1 else 0,
                           n, SCALE_BN=block[0], W8A8=not weight_only, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk,
                           GROUP_M=8, num_warps=warps, num_stages=stages)
    return c if split == 1 else c.sum(0).to(x.dtype)
