"""W4A16 GEMM dispatch: int4 weights in the AWQ "gemm" layout (the one kernel layout: compressed-tensors weights
are converted to it once after loading, layers/quant.ct_to_awq), activations fp16/bf16.

CUDA with a kernel-supported group size, three weight layouts (QuantLinear.to_kernel_layout and to_mma_layout pick
once):
- fragment (`mma=True`: plain Linears with groups of 128·m and out_features % 16 == 0, layers/quant.awq_to_mma;
  DELTASERVE_INT4_MMA=0 turns it off): T <= MMA_MAX_T (128) the tensor-core GEMV of mma.py (one HMMA per 8 weights
  a lane, blocks of 8 tokens), larger T dequantize + cuBLAS (dequant.py);
- K-packed (`kpack=True`, groups of 64 or more, layers/quant.awq_to_kpack; experts, and what the fragment layout
  does not take): T = 1 the GEMV of kpack.py, T <= GEMV_MAX_T with groups of 128 or more its tensor-core twin,
  larger T the Triton GEMM reading 64-row spans;
- AWQ (smaller groups): T <= GEMV_MAX_T the GEMV of gemv.py (`int4_gemv_triton`), larger T the Triton GEMM.
The GEMMs dequantize inside the K loop (split-K for small T). From DEQUANT_MIN_T rows on, the K-packed and AWQ layouts
too dequantize the whole weight to x's dtype for one cuBLAS GEMM. No host syncs, so CUDA graphs capture every path.
Elsewhere the torch reference (dequantize, then F.linear), AWQ layout only.
triton.py is imported lazily: importing deltaserve must not import triton (see kernels/paged_attention)."""
import os

import torch

from ...layers.quant import KPACK_SPAN, MMA_SPAN, MMA_TILE_N
from .reference import int4_gemm as int4_gemm_reference

__all__ = ["int4_gemm", "int4_gemm_dequant", "int4_gemm_reference", "int4_gemm_triton", "int4_gemv_triton",
           "kernel_supports", "kpack_ok", "mma_ok"]

# The one switch between the decode paths: True sends T <= GEMV_MAX_T to the GEMV, False to the GEMM's split-K
# decode plan (benchmarks/kernels/bench_int4.py times both side by side).
DECODE_GEMV = True
GEMV_MAX_T = 16  # == gemv.GEMV_MAX_T (not imported from there: that would import triton with deltaserve)
# The switch between the weight layouts (benchmarks A/B it): True K-packs every weight kpack_ok allows.
USE_KPACK = True
# Plain (non-expert) K-packed Linears that mma_ok allows take the fragment layout (DELTASERVE_INT4_MMA=0: they stay
# K-packed). H200, Qwen3.5-27B shapes mixed AWQ cut to 16 layers, ms a decode step K-packed -> fragment: batch 1
# 2.655 -> 2.500, 8 3.444 -> 2.927, 32 6.725 -> 5.024, 64 8.917 -> 7.754; a 2 048-token prefill 47.0 -> 48.0
# (both through cuBLAS) (docs/performance.md)
USE_MMA = os.environ.get("DELTASERVE_INT4_MMA", "1") != "0"
# From this many rows on, K-packed and AWQ weights dequantize to x's dtype and multiply with cuBLAS (dequant.py): the
# int4 GEMMs reach about half of cuBLAS's tensor-core rate at prefill sizes (H200, a 2 048-token prefill of
# Qwen3.5-27B shapes cut to 16 layers: 75.0 -> 47.0 ms). None: the int4 GEMMs at every T.
DEQUANT_MIN_T: int | None = 128


def __getattr__(name: str):
    """PEP 562 lazy export of the Triton wrapper."""
    if name == "int4_gemm_triton":
        from .triton import int4_gemm_triton
        return int4_gemm_triton
    if name == "int4_gemm_dequant":
        from .dequant import int4_gemm_dequant
        return int4_gemm_dequant
    if name == "int4_gemv_triton":
        from .gemv import int4_gemv_triton
        return int4_gemv_triton
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def kpack_ok(in_features: int, group_size: int) -> bool:
    """Whether an int4 weight can take the K-packed layout: whole 64-row spans inside each (power-of-two) group."""
    return (USE_KPACK and group_size % KPACK_SPAN == 0 and group_size & (group_size - 1) == 0
            and in_features % group_size == 0)


def mma_ok(in_features: int, out_features: int, group_size: int) -> bool:
    """Whether an int4 weight can take the fragment layout: groups of whole 128-row units (mma.MMA_UNIT), whole
    64-row spans and 16-column warp tiles."""
    return (USE_MMA and group_size % 128 == 0 and group_size & (group_size - 1) == 0
            and in_features % group_size == 0 and in_features % MMA_SPAN == 0 and out_features % MMA_TILE_N == 0)


def kernel_supports(x: torch.Tensor, group_size: int) -> bool:
    """Whether the Triton kernel takes this input: a CUDA fp16/bf16 activation and a power-of-two group >= 16
    (a K tile never straddles two groups and is wide enough for tl.dot)."""
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and group_size >= 16
            and group_size & (group_size - 1) == 0)


def int4_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              group_size: int, kpack: bool = False, mma: bool = False) -> torch.Tensor:
    """x: [T, K]; qweight: [K, N/8] int32 (AWQ), [K/8, N] (kpack) or [N/16, K/64, 32, 4] (mma); qzeros: [K/G, N/8]
    int32; scales: [K/G, N] -> [T, N] in x's dtype."""
    if mma:
        if not kernel_supports(x, group_size):
            raise ValueError("a fragment-layout int4 weight runs only in the CUDA kernels (fp16/bf16 activations)")
        from .dequant import int4_gemm_dequant
        from .mma import MMA_MAX_T, mma_gemv

        if x.shape[0] <= MMA_MAX_T:
            return mma_gemv(x, qweight, qzeros, scales, group_size)
        return int4_gemm_dequant(x, qweight, qzeros, scales, group_size, mma=True)
    if kernel_supports(x, group_size) and DEQUANT_MIN_T is not None and x.shape[0] >= DEQUANT_MIN_T:
        from .dequant import int4_gemm_dequant

        return int4_gemm_dequant(x, qweight, qzeros, scales, group_size, kpack)
    if kpack:
        if not kernel_supports(x, group_size):
            raise ValueError("a K-packed int4 weight runs only in the CUDA kernels (fp16/bf16 activations)")
        from .kpack import kpack_gemv
        from .triton import int4_gemm_triton

        if x.shape[0] == 1 or x.shape[0] <= GEMV_MAX_T and group_size % 128 == 0:
            return kpack_gemv(x, qweight, qzeros, scales, group_size)
        return int4_gemm_triton(x, qweight, qzeros, scales, group_size, kpack=True)
    if kernel_supports(x, group_size):
        from .gemv import int4_gemv_triton
        from .triton import int4_gemm_triton

        if DECODE_GEMV and x.shape[0] <= GEMV_MAX_T:
            return int4_gemv_triton(x, qweight, qzeros, scales, group_size)
        return int4_gemm_triton(x, qweight, qzeros, scales, group_size)
    return int4_gemm_reference(x, qweight, qzeros, scales, group_size)
