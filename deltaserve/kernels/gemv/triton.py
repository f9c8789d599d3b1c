"""Triton 16-bit GEMV for decode-sized batches: M <= MAX_ROWS rows of x times N weight rows ([N, K], nn.Linear's
layout), out in fp32 (the logits) or in x's dtype (the 16-bit Linears).

Program i_n owns BN weight rows and walks K in BK steps: a [BN, BK] tile of the weight (the only large read, 16-byte
loads, pipelined by num_stages) meets the [16, BK] x tile (rows past M masked to 0) on the tensor cores, fp32
accumulators; the [16, BN] result keeps its first M rows, rounded once to the output dtype. The padding to 16 rows is
free: the kernel is bound by the weight stream, not by the matrix units. Each row's sum runs in the same order
whatever M is, so a row's output does not depend on the rows batched with it."""
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ..int4_gemm.triton import dot_precision
from ..pdl import pdl_args, pdl_start

MAX_ROWS = 16  # decode batches up to this take the GEMV; larger ones go to cuBLAS


@dataclass(frozen=True)
class GemvTile:
    block_n: int
    block_k: int
    num_warps: int
    num_stages: int


# The vocab rows (V ~ 248k, thousands of programs): 64 x 256, 3 stages was best or within 1% of the best at M = 1..16
# and H = 2048..5120 (H200, bench_gemv.py --sweep)
LOGITS_TILE = GemvTile(64, 256, 4, 3)


def linear_tile(n: int, k: int) -> GemvTile | None:
    """Tiles of a 16-bit Linear's GEMV, or None where cuBLAS is as fast. H200, bench_gemv.py --sweep (weights never
    from L2), M = 1..16: N <= 4096 (one wave of 32-row programs) at 512-wide K steps, 1.16-1.31x cuBLAS (9B out_proj
    and down); 8192 <= N <= 16384 with K <= 4096 at 128-wide K steps and 4 warps, 1.03-1.17x (in_proj and q|k|v of
    9B and 35B-A3B). cuBLAS was as fast or faster at 9B gate|up (N = 24576: 1.00x), at N = 5120 (1.2 waves of
    programs) and at every 27B width with K = 5120 (0.68-0.94x) for that tile. At K = 5120 two warps and 3 stages
    take 27B's in_proj (N = 16480) 43.0 -> 39.8 us and q|k|v (N = 14336) 36.6 -> 35.6 at M = 1 (M = 4 alike; H200,
    .peer/gemv27.py, 2026-12-01); out_proj (N = 5120) stays on cuBLAS (17.9 against 18.5 at best), gate|up
    (N = 34816) too (84.1 against 82.0 at best: within the spread)."""
    if n <= 4096:
        return GemvTile(32, 512, 2, 4)
    if 8192 <= n <= 16384 and k <= 4096:
        return GemvTile(32, 128, 4, 4)
    if 8192 <= n <= 16896 and 4096 < k <= 5120:
        return GemvTile(32, 128, 2, 3)
    return None


@triton.jit
def _gemv_kernel(x, w, out, M, N, K, stride_xm, stride_wn, stride_om, BN: tl.constexpr, BK: tl.constexpr,
                 DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr = False):
    pdl_start(USE_PDL)
    i_n = tl.program_id(0)
    o_n = i_n * BN + tl.arange(0, BN)
    m_n = o_n < N
    o_m = tl.arange(0, 16)
    m_m = o_m < M
    o_k = tl.arange(0, BK)
    p_w = w + o_n[:, None].to(tl.int64) * stride_wn + o_k[None, :]
    p_x = x + o_m[:, None] * stride_xm + o_k[None, :]
    b_acc = tl.zeros([16, BN], dtype=tl.float32)
    for k0 in range(0, K, BK):
        m_k = k0 + o_k < K
        b_w = tl.load(p_w + k0, mask=m_n[:, None] & m_k[None, :], other=0.0)
        b_x = tl.load(p_x + k0, mask=m_m[:, None] & m_k[None, :], other=0.0)
        b_acc += tl.dot(b_x, tl.trans(b_w), input_precision=DOT_PRECISION)
    tl.store(out + o_m[:, None].to(tl.int64) * stride_om + o_n[None, :], b_acc.to(out.dtype.element_ty),
             mask=m_m[:, None] & m_n[None, :])


def gemv(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None,
         tile: GemvTile | None = None) -> torch.Tensor:
    """x [M <= MAX_ROWS, K] (any row stride); weight [N, K] with contiguous rows -> [M, N] in out_dtype (default x's
    dtype). tile: default linear_tile(N, K), else 32 rows x 256 of K a program."""
    m, k = x.shape
    n = weight.shape[0]
    if m > MAX_ROWS or weight.dim() != 2 or weight.shape[1] != k or weight.stride(1) != 1:
        raise ValueError(f"the GEMV takes up to {MAX_ROWS} rows and a [N, {k}] weight with contiguous rows; "
                         f"got x {tuple(x.shape)}, weight {tuple(weight.shape)} strides {weight.stride()}")
    if x.stride(1) != 1:
        x = x.contiguous()
    tile = tile or linear_tile(n, k) or GemvTile(32, 256, 2, 3)
    out = torch.empty(m, n, dtype=out_dtype or x.dtype, device=x.device)
    if m and n:
        _gemv_kernel[(triton.cdiv(n, tile.block_n),)](
            x, weight, out, m, n, k, x.stride(0), weight.stride(0), out.stride(0), BN=tile.block_n,
            BK=tile.block_k, DOT_PRECISION=dot_precision(x.dtype), num_warps=tile.num_warps,
            num_stages=tile.num_stages, **pdl_args(x))
    return out
