"""The logits GEMV (kernels/logits) against cuBLAS (torch.mm, fp32 out) at Qwen3.5 vocab x hidden shapes.

For each hidden size (2048: 35B-A3B, 4096: 9B, 5120: 27B) and M in 1, 4, 16 rows: the time of torch.mm and of the
Triton GEMV at its default tiles, each in µs and as weight bytes / time (TB/s; the bound at decode sizes), and the
best of a few tilings (--sweep). Times are CUDA-graph replays over two weight copies, so a copy never comes from
L2. Prints one table; say which card gave it when you quote it.

    python benchmarks/kernels/bench_logits.py [--sweep]
"""
import argparse

import torch
from triton.testing import do_bench_cudagraph

from deltaserve.kernels.logits import reference
from deltaserve.kernels.logits.triton import logits_triton

VOCAB, COPIES = 248320, 2
TILES = [(64, 128, 4, 4), (128, 128, 4, 4), (64, 256, 4, 3), (128, 64, 4, 6), (64, 128, 8, 4), (32, 256, 4, 4),
         (256, 64, 8, 4)]


def time_us(fn) -> float:
    return do_bench_cudagraph(fn, rep=50) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sweep", action="store_true", help="also time the tilings in TILES, print the best")
    args = p.parse_args()
    print(f"{torch.cuda.get_device_name()} | vocab {VOCAB} | bf16 | CUDA-graph replays over {COPIES} weight copies")
    print(f"{'hidden':>6} {'M':>3} {'cuBLAS us':>10} {'TB/s':>5} {'GEMV us':>8} {'TB/s':>5} {'ratio':>6}"
          + ("  best tiling (BV, BK, warps, stages)" if args.sweep else ""))
    for h in (2048, 4096, 5120):
        ws = [torch.randn(VOCAB, h, device="cuda", dtype=torch.bfloat16) / h**0.5 for _ in range(COPIES)]
        tb = VOCAB * h * 2 / 1e12
        for m in (1, 4, 16):
            x = torch.randn(m, h, device="cuda", dtype=torch.bfloat16)
            ref = time_us(lambda: [reference.logits(x, w) for w in ws]) / COPIES
            ours = time_us(lambda: [logits_triton(x, w) for w in ws]) / COPIES
            line = f"{h:>6} {m:>3} {ref:>10.1f} {tb / (ref * 1e-6):>5.2f} {ours:>8.1f} {tb / (ours * 1e-6):>5.2f} " \
                   f"{ref / ours:>6.2f}"
            if args.sweep:
                best = min((time_us(lambda: [logits_triton(x, w, *t) for w in ws]) / COPIES, t) for t in TILES)
                line += f"  {best[0]:.1f} us at {best[1]}"
            print(line, flush=True)


if __name__ == "__main__":
    main()
