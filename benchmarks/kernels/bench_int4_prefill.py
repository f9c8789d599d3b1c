"""int4 Linears from 8 tokens to prefill sizes on a CUDA device: the int4 GEMM and GEMV against dequantize-then-cuBLAS
(dequant.py), the figures behind int4_gemm.DEQUANT_MIN_T, mma.MMA_MAX_T and mma.token_blocks.

For Qwen3.5 Linear shapes (AWQ, group 128) and T from 8 to 2048, µs and TFLOP/s of:
- `kpack`: the Triton GEMM over the K-packed layout;
- `gemv-frag/NB` (T <= mma.MMA_MAX_T): the tensor-core GEMV over the fragment layout (the default layout), NB
  blocks of 8 tokens a program;
- `dq-kpack` / `dq-frag`: dequant_int4 of that layout then torch.mm;
- `bf16`: torch.mm on the already-dequantized weight (cuBLAS alone: the floor of the two above).
And the dequantization alone (µs, and GB/s of int4 read + 16-bit written).

    python benchmarks/kernels/bench_int4_prefill.py [--tokens 8,16,...]
Say which card gave the figures when you quote them.
"""
import argparse

import torch
from triton.testing import do_bench

from deltaserve.kernels.int4_gemm.dequant import LAYOUT_KPACK, LAYOUT_MMA, dequant_int4, int4_gemm_dequant
from deltaserve.kernels.int4_gemm.mma import MMA_MAX_T, mma_gemv
from deltaserve.kernels.int4_gemm.triton import int4_gemm_triton
from deltaserve.layers.quant import awq_to_kpack, awq_to_mma

from bench_int4 import GROUP, random_awq  # (python puts the script's folder on sys.path)

LINEARS = {  # name: (in, out)
    "27b mlp gate|up": (5120, 34816), "27b mlp down": (17408, 5120), "27b o_proj": (6144, 5120),
    "9b mlp gate|up": (4096, 24576), "35b-a3b out_proj": (4096, 2048),
}


def bench_shape(name: str, k: int, n: int, tokens: list[int]) -> None:
    awq = random_awq(None, k, n)
    z, s = awq["qzeros"], awq["scales"]
    kq, fq = awq_to_kpack(awq["qweight"]), awq_to_mma(awq["qweight"])
    w = dequant_int4(kq, z, s, GROUP, torch.bfloat16, LAYOUT_KPACK)
    dq_bytes = k * n // 2 + k * n * 2
    dq = {lay: do_bench(lambda q=q, lay=lay: dequant_int4(q, z, s, GROUP, torch.bfloat16, lay)) * 1e3
          for lay, q in ((LAYOUT_KPACK, kq), (LAYOUT_MMA, fq))}
    print(f"{name} {k} x {n}: dequant K-packed {dq[LAYOUT_KPACK]:.1f} µs ({dq_bytes / dq[LAYOUT_KPACK] * 1e-3:.0f} "
          f"GB/s), fragment {dq[LAYOUT_MMA]:.1f} µs ({dq_bytes / dq[LAYOUT_MMA] * 1e-3:.0f} GB/s)")
    for t in tokens:
        x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
        paths = {
            "kpack": lambda: int4_gemm_triton(x, kq, z, s, GROUP, kpack=True),
            "dq-kpack": lambda: int4_gemm_dequant(x, kq, z, s, GROUP, kpack=True),
            "dq-frag": lambda: int4_gemm_dequant(x, fq, z, s, GROUP, mma=True),
            "bf16": lambda: torch.mm(x, w),
        }
        for nb in (1, 2, 4, 8):
            if 8 * nb <= 2 * t and t <= MMA_MAX_T:
                paths[f"gemv-frag/{nb}"] = lambda nb=nb: mma_gemv(x, fq, z, s, GROUP, nb)
        ref = torch.mm(x, w).float()
        cells = []
        for path, fn in paths.items():
            err = (fn().float() - ref).abs().max().item() / ref.abs().max().item()
            us = do_bench(fn) * 1e3
            cells.append(f"{path} {us:8.1f} ({2 * t * k * n / us * 1e-6:4.0f})" + ("" if err < 0.02 else
                                                                                f" rel.err {err:.3f}!"))
        print(f"  T {t:5d}: " + "  ".join(cells), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", default="8,16,32,64,96,128,256,512,2048")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_int4_prefill.py needs a CUDA device")
    print(f"{torch.cuda.get_device_name()}: µs (TFLOP/s); dequant alone: µs (GB/s of int4 read + bf16 written)")
    for name, (k, n) in LINEARS.items():
        bench_shape(name, k, n, [int(t) for t in args.tokens.split(",")])
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
