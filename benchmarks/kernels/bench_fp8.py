"""Block-FP8 GEMM (kernels/fp8_gemm) against bf16 F.linear (cuBLAS) at Qwen3.5-9B and 27B projection shapes.

For each shape (in -> out) and T in 1, 16, 64, 512, 4096: the time of bf16 F.linear, of the W8A8 Triton path
(activation quantization included), of the weight-only path (T <= 64) and of `fp8_linear` (the dispatch the layers
use: weight-only up to WEIGHT_ONLY_MAX_T rows, W8A8 above), each as µs and TFLOP/s (2·T·in·out / time), the ratio
bf16 time / dispatch time, the dispatch's weight bandwidth (fp8 bytes + scales / time; the bound at small T), and
its relative RMS error against x·Ŵᵀ in fp32 (Ŵ: the dequantized weight; W8A8 adds activation rounding, ~2.6%).
Times are CUDA-graph replays (what decode runs) over COPIES distinct weights per call, so a weight is never served
from L2. Prints one table; say which card gave it when you quote it.

    python benchmarks/kernels/bench_fp8.py
"""
import argparse
import sys
import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

from deltaserve.kernels.fp8_gemm import WEIGHT_ONLY_MAX_T, dequant_blocks, fp8_linear
from deltaserve.kernels.fp8_gemm.triton import fp8_gemm_triton
from deltaserve.layers.fp8 import quantize_blocks

DEVICE, BLOCK, COPIES = "cuda", (128, 128), 4
SHAPES = {  # name -> (in_features, out_features)
    "9b gate/up": (4096, 12288),
    "9b down": (12288, 4096),
    "9b in_proj_qkv": (4096, 8192),
    "27b gate/up": (5120, 17408),
    "27b down": (17408, 5120),
}
TOKENS = (1, 16, 64, 512, 4096)


def bench(fn) -> float:
    """µs per call of fn (which runs COPIES GEMMs), replayed from a CUDA graph."""
    fn()  # compile / autotune outside the capture
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=50) * 1e3 / COPIES


def row(name: str, k: int, n: int, t: int, weights) -> str:
    x = torch.randn(t, k, device=DEVICE, dtype=torch.bfloat16)
    bf16 = [w.to(torch.bfloat16) for w, _, _ in weights]
    fp8 = [(q, s) for _, q, s in weights]
    flops = 2 * t * k * n
    t_bf16 = bench(lambda: [F.linear(x, w) for w in bf16])
    t_w8a8 = bench(lambda: [fp8_gemm_triton(x, q, s, BLOCK, weight_only=False) for q, s in fp8])
    t_wo = bench(lambda: [fp8_gemm_triton(x, q, s, BLOCK, weight_only=True) for q, s in fp8]) if t <= 64 else None
    t_disp = bench(lambda: [fp8_linear(x, q, s, BLOCK) for q, s in fp8])
    q, s = fp8[0]
    exact = x.float() @ dequant_blocks(q, s, BLOCK, torch.float32).t()
    err = ((fp8_linear(x, q, s, BLOCK).float() - exact).norm() / exact.norm()).item()
    w_bytes = q.numel() + s.numel() * 4
    wo = f"{t_wo:9.1f} {flops / t_wo / 1e6:7.1f}" if t_wo is not None else f"{'-':>9} {'-':>7}"
    return (f"{name:15s} {k:>6}->{n:<6} {t:>5} | {t_bf16:9.1f} {flops / t_bf16 / 1e6:7.1f} | "
            f"{t_w8a8:9.1f} {flops / t_w8a8 / 1e6:7.1f} | {wo} | {t_disp:9.1f} {flops / t_disp / 1e6:7.1f} "
            f"{t_bf16 / t_disp:6.2f}x {w_bytes / t_disp / 1e6:7.2f} {err:8.1e}")


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()  # --help: what it measures
    if not torch.cuda.is_available():
        sys.exit("bench_fp8 needs a CUDA device")
    torch.manual_seed(0)
    print(f"device: {torch.cuda.get_device_name()}; dispatch: weight-only for T <= {WEIGHT_ONLY_MAX_T}, W8A8 above")
    print(f"{'shape':15s} {'in->out':>13} {'T':>5} | {'bf16 µs':>9} {'TFLOP/s':>7} | {'w8a8 µs':>9} {'TFLOP/s':>7} | "
          f"{'w-only µs':>9} {'TFLOP/s':>7} | {'fp8 µs':>9} {'TFLOP/s':>7} {'vs bf16':>7} {'W TB/s':>7} "
          f"{'rel err':>8}")
    for name, (k, n) in SHAPES.items():
        weights = []
        for _ in range(COPIES):
            w = torch.randn(n, k, device=DEVICE) * 0.02
            weights.append((w, *quantize_blocks(w, BLOCK)))
        for t in TOKENS:
            print(row(name, k, n, t, weights), flush=True)
        del weights
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
