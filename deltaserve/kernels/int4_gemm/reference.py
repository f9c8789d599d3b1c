"""Torch reference of the W4A16 GEMM: dequantize the whole AWQ weight to x's dtype, then one F.linear (the CPU path
and the Triton kernel's oracle)."""
import torch
import torch.nn.functional as F

from ...layers.quant import dequant_awq


def int4_gemm(x: torch.Tensor, qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor,
              group_size: int) -> torch.Tensor:
    """x: [T, K] float; qweight: [K, N/8] int32 (AWQ nibble order); qzeros: [K/G, N/8] int32; scales: [K/G, N]
    fp16/bf16/fp32 -> [T, N] in x's dtype: x · W with W[k, n] = (q[k, n] - z[k // G, n]) · s[k // G, n], W rounded
    once to x's dtype."""
    return F.linear(x, dequant_awq(qweight, qzeros, scales, group_size, x.dtype))
