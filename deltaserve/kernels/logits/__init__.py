"""Logits dispatch: hidden [M, H] times the (rank's) vocab rows [V, H] -> fp32 logits [M, V].

CUDA, 16-bit, M <= gemv.triton.MAX_ROWS (decode): the Triton GEMV of kernels/gemv with fp32 out, which streams the
vocab rows at 4.4-4.56 TB/s where cuBLAS's GEMM runs at 4.1-4.2 (1.04-1.08x on an H200,
benchmarks/kernels/bench_gemv.py); the lm_head is the largest single read of a decode step (1.0 GB at 35B-A3B's
H = 2048, 2.5 GB at 27B's 5120). Elsewhere, and for more rows: the reference (torch.mm with fp32 output on CUDA,
linear then upcast on CPU)."""
import torch

from . import reference

__all__ = ["logits"]


def logits(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """hidden [M, H]; weight [V, H] in hidden's dtype -> [M, V] fp32, accumulated in fp32 (never rounded to 16 bits:
    one bf16 ulp of a logit of 8 is 0.03 nats)."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [M, H] and [V, H]")
    if hidden.is_cuda and hidden.dtype in (torch.float16, torch.bfloat16) and weight.dtype == hidden.dtype:
        from ..gemv.triton import LOGITS_TILE, MAX_ROWS, gemv

        if hidden.shape[0] <= MAX_ROWS and weight.stride(1) == 1:
            return gemv(hidden, weight, torch.float32, LOGITS_TILE)
    return reference.logits(hidden, weight)
