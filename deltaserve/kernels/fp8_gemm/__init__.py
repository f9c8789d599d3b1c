"""Block-FP8 linear dispatch: validates, then runs the Triton GEMM on CUDA and the torch reference elsewhere.

CPU (and any non-CUDA device): `reference.fp8_linear`, the weight dequantized to x's dtype and one F.linear: the
engine's tested reference path. CUDA: the Triton kernels of triton.py (imported lazily: importing deltaserve must
not import triton, see kernels/paged_attention) — weight-only for T <= WEIGHT_ONLY_MAX_T rows (decode: the weight
bytes dominate, and no activation rounding), W8A8 with dynamic per-token-group activation scales up to W8A8_MAX_T,
and above that (or for a scale block along K the kernel does not step by) the weight dequantized to x's dtype
plus one cuBLAS GEMM. Why the last: on an H100 (Triton 3.6,
2026-11-28) the W8A8 kernel's 128-row tiles (T > 64) missed its reference by more than one bf16 ulp at T = 512 and
4096, and measured no faster than dequantize + bf16 GEMM there (9B shapes: 0.83-0.90x of bf16 cuBLAS alone).
"""
import torch

from . import reference
from .reference import FP8_MAX, dequant_blocks, quant_act, w8a8_block_gemm

__all__ = ["fp8_linear", "dequant_blocks", "quant_act", "w8a8_block_gemm", "FP8_MAX", "WEIGHT_ONLY_MAX_T", "W8A8_MAX_T"]

# Rows up to which CUDA uses the weight-only kernel (benchmarks/kernels/bench_fp8.py measures both paths per T).
WEIGHT_ONLY_MAX_T = 16
# Rows up to which CUDA uses the W8A8 kernel (its 16/64-row tiles passed at full 9B shapes); above: dequant + cuBLAS.
W8A8_MAX_T = 64
# Scale blocks along K the Triton GEMM steps through (a tensor-parallel shard may refine 128 to 16 or less).
KERNEL_BLOCK_K = (32, 64, 128, 256)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """y = x Wᵀ with W = w * scale_inv per (BN, BK) block. x: [..., K] float; w: [N, K] float8_e4m3fn;
    scale_inv: [ceil(N/BN), ceil(K/BK)] fp32 -> [..., N] in x's dtype."""
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x has {x.shape[-1]} input channels but the FP8 weight is [{n}, {k}]")
    want = (-(-n // block[0]), -(-k // block[1]))
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"weight_scale_inv must be {list(want)} for a [{n}, {k}] weight in {list(block)} blocks; "
                         f"got {list(scale_inv.shape)}")
    if not x.is_cuda:
        return reference.fp8_linear(x, w, scale_inv, block)
    from .triton import fp8_gemm_triton

    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    t = x2.shape[0]
    if t == 0:
        return x.new_empty(*lead, n)
    if t > W8A8_MAX_T or x.dtype not in (torch.bfloat16, torch.float16) or block[1] not in KERNEL_BLOCK_K:
        return reference.fp8_linear(x2, w, scale_inv, block).view(*lead, n)
    weight_only = t <= WEIGHT_ONLY_MAX_T and x.dtype in (torch.bfloat16, torch.float16)
    return fp8_gemm_triton(x2, w, scale_inv, block, weight_only).view(*lead, n)
