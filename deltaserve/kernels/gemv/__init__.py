"""16-bit Linear dispatch: x [T, K] times an nn.Linear's weight [N, K] (+ bias) -> [T, N] in x's dtype.

CUDA, fp16/bf16, no bias, T <= triton.MAX_ROWS (decode), at the widths where triton.linear_tile has tiles: the Triton
GEMV of triton.py, which streams the weight at 1.03-1.31x cuBLAS's speed at the in_proj, q|k|v, out_proj / o_proj and
MLP down shapes of 9B and 35B-A3B (H200, benchmarks/kernels/bench_gemv.py). Elsewhere (prefill, CPU, fp32, other
widths): F.linear."""
import torch

from . import reference

__all__ = ["linear"]


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if (x.is_cuda and x.dim() == 2 and bias is None and x.dtype in (torch.float16, torch.bfloat16)
            and weight.dtype == x.dtype and weight.dim() == 2 and weight.stride(1) == 1):
        from .triton import MAX_ROWS, gemv, linear_tile

        if x.shape[0] <= MAX_ROWS and (tile := linear_tile(*weight.shape)) is not None:
            return gemv(x, weight, tile=tile)
    return reference.linear(x, weight, bias)
