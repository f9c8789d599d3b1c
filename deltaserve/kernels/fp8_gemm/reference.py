"""Block-wise FP8 (e4m3) GEMM in torch: the oracle of triton.py and the CPU path.

Weights (the official Qwen FP8 layout): `w` float8_e4m3fn [..., N, K] with `scale_inv` fp32
[..., ceil(N/BN), ceil(K/BK)], W[n, k] = w[n, k] * scale_inv[n // BN, k // BK]. Activations (W8A8 path) are
quantized per token and per group of BK input channels: x[t, k] ≈ xq[t, k] * xs[t, k // BK], xs = amax / 448.
"""
import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn
SCALE_EPS = 1e-10  # floor of an activation group's amax: an all-zero group quantizes to zeros, not NaN


def dequant_blocks(w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                   dtype: torch.dtype) -> torch.Tensor:
    """w: [..., N, K] fp8; scale_inv: [..., ceil(N/BN), ceil(K/BK)] fp32; block: (BN, BK) -> W [..., N, K] in
    dtype (computed in fp32, rounded once)."""
    n, k = w.shape[-2:]
    s = scale_inv.float().repeat_interleave(block[0], dim=-2)[..., :n, :]
    s = s.repeat_interleave(block[1], dim=-1)[..., :k]
    return (w.float() * s).to(dtype)


def quant_act(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token, per-`group`-channel quantization. x: [T, K] float -> (xq [T, K] float8_e4m3fn,
    xs [T, ceil(K/group)] fp32) with x ≈ xq * xs per group; |x - xq·xs| <= 2^-4 |x| + xs·2^-10 (e4m3 rounding)."""
    t, k = x.shape
    groups = -(-k // group)
    xp = torch.nn.functional.pad(x.float(), (0, groups * group - k)).view(t, groups, group)
    xs = xp.abs().amax(-1).clamp(min=SCALE_EPS) / FP8_MAX
    xq = (xp / xs[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return xq.view(t, groups * group)[:, :k], xs


def w8a8_block_gemm(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor,
                    block: tuple[int, int], out_dtype: torch.dtype) -> torch.Tensor:
    """xq: [T, K] fp8, xs: [T, ceil(K/BK)] fp32 (from quant_act with group BK); w, scale_inv as dequant_blocks
    -> y = dequant(xq) dequant(w)ᵀ [T, N] in out_dtype, accumulated in fp32."""
    x = dequant_blocks(xq[None], xs[None], (1, block[1]), torch.float32)[0]
    return (x @ dequant_blocks(w, scale_inv, block, torch.float32).t()).to(out_dtype)


def fp8_linear(x: torch.Tensor, w: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """Weight-only reference: x [T, K] -> x Wᵀ [T, N] in x's dtype, W dequantized to x's dtype (no activation
    quantization: the CPU path, exactly the 16-bit model run with the dequantized weights)."""
    return torch.nn.functional.linear(x, dequant_blocks(w, scale_inv, block, x.dtype))
