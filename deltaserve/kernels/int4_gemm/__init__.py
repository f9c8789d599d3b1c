"""W4A16 GEMM dispatch: int4 weights in the AWQ "gemm" layout (the one kernel layout: compressed-tensors weights
are converted to it once after loading, layers/quant.ct_to_awq), activations fp16/bf16.

CUDA with a kernel-supported group size: T <= GEMV_MAX_T (decode) the Triton GEMV built for the weight stream
(triton.py `int4_gemv_triton`), larger T the Triton GEMM (dequant inside the K loop, split-K for small T); neither
has a host sync, so CUDA graphs capture them. Elsewhere the torch reference (dequantize, then F.linear).
triton.py is imported lazily: importing deltaserve must not import triton (see kernels/paged_attention)."""
import torch

from .reference import int4_gemm as int4_gemm_reference

__all__ = ["int4_gemm", "int4_gemm_reference", "int4_gemm_triton", "int4_gemv_triton", "kernel_supports"]

# The one switch between the decode paths: True sends T <= GEMV_MAX_T to the GEMV, False to the GEMM's split-K
# decode plan (benchmarks/kernels/bench_int4.py times both side by side).
DECODE_GEMV = True
GEMV_MAX_T = 16  # == triton.GEMV_MAX_T (not imported from there: that would import triton with deltaserve)


def __getattr__(name: str):
    """PEP 562 lazy export of the Triton wrapper."""
    if name in ("int4_gemm_triton", "int4_gemv_triton"):
        from . import triton
        return getattr(triton, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def kernel_supports(x: torch.Tensor, group_size: int) -> bool:
    """Whether the Triton kernel takes this input: a CUDA fp16/bf16 activation and a power-of-two group >= 16
    (a K tile never straddles two groups and is wide enough for tl.dot)."""
    return (x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and group_size >= 16
            and group_size & (group_size - 1) == 0)


def int4_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              group_size: int) -> torch.Tensor:
    """x: [T, K]; qweight: [K, N/8] int32; qzeros: [K/G, N/8] int32; scales: [K/G, N] -> [T, N] in x's dtype."""
    if kernel_supports(x, group_size):
        from .triton import int4_gemm_triton, int4_gemv_triton

        if DECODE_GEMV and x.shape[0] <= GEMV_MAX_T:
            return int4_gemv_triton(x, qweight, qzeros, scales, group_size)
        return int4_gemm_triton(x, qweight, qzeros, scales, group_size)
    return int4_gemm_reference(x, qweight, qzeros, scales, group_size)
