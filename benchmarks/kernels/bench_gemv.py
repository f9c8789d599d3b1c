"""The 16-bit GEMV (kernels/gemv) against cuBLAS at Qwen3.5 decode shapes.

Two kinds of rows: the logits (vocab 248320 x hidden 2048 / 4096 / 5120, fp32 out, against torch.mm with fp32 out)
and the 16-bit Linears of the presets (out in bf16, against F.linear). For M in 1, 4, 16 rows: each time in µs and as
weight bytes / time (TB/s; the bound at decode sizes), and with --sweep the best of a few tilings. Times are CUDA-graph
replays over enough weight copies (at least 2, and 256 MB in all) that a copy never comes from L2. Prints one table;
say which card gave it when you quote it.

    python benchmarks/kernels/bench_gemv.py [--sweep] [--only logits|linear]
"""
import argparse
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench_cudagraph

from deltaserve.kernels.gemv.triton import LOGITS_TILE, GemvTile, gemv, linear_tile
from deltaserve.kernels.logits import reference

VOCAB = 248320
LINEARS = {  # name: (N, K) of one 16-bit Linear at each preset's shapes
    "35b-a3b in_proj": (12352, 2048), "35b-a3b qkv_proj": (9216, 2048),
    "9b in_proj": (12352, 4096), "9b qkv_proj": (10240, 4096), "9b out_proj": (4096, 4096),
    "9b gate_up": (24576, 4096), "9b down": (4096, 12288),
    "27b in_proj": (16480, 5120), "27b qkv_proj": (14336, 5120), "27b out_proj": (5120, 6144),
    "27b gate_up": (34816, 5120), "27b down": (5120, 17408),
}
TILES = [GemvTile(*t) for t in ((16, 256, 2, 3), (16, 512, 2, 4), (32, 128, 2, 3), (32, 256, 2, 3), (32, 512, 2, 4),
                                (32, 128, 4, 4), (32, 256, 4, 4), (64, 128, 2, 3), (64, 256, 4, 3))]


def time_us(fn) -> float:
    return do_bench_cudagraph(fn, rep=50) * 1e3


def row(name: str, n: int, k: int, m: int, ws: list, ref, ours, tile_of, sweep: bool) -> str:
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    copies = len(ws)
    tb = n * k * 2 / 1e12
    t_ref = time_us(lambda: [ref(x, w) for w in ws]) / copies
    t_ours = time_us(lambda: [ours(x, w, tile_of(n, k)) for w in ws]) / copies
    line = (f"{name:>18} {m:>3} {t_ref:>10.1f} {tb / (t_ref * 1e-6):>5.2f} {t_ours:>8.1f} {tb / (t_ours * 1e-6):>5.2f} "
            f"{t_ref / t_ours:>6.2f}")
    if sweep:
        best = min((time_us(lambda: [ours(x, w, t) for w in ws]) / copies, str(t)) for t in TILES)
        line += f"  {best[0]:.1f} us at {best[1]}"
    return line


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sweep", action="store_true", help="also time the tilings in TILES, print the best")
    p.add_argument("--only", choices=["logits", "linear"])
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gemv needs a CUDA device")
    print(f"{torch.cuda.get_device_name()} | bf16 | CUDA-graph replays over weight copies")
    print(f"{'shape':>18} {'M':>3} {'cuBLAS us':>10} {'TB/s':>5} {'GEMV us':>8} {'TB/s':>5} {'ratio':>6}"
          + ("  best tiling" if args.sweep else ""))
    shapes = []
    if args.only != "linear":
        shapes += [(f"logits h={h}", VOCAB, h, reference.logits, lambda x, w, t: gemv(x, w, torch.float32, t),
                    lambda n, k: LOGITS_TILE) for h in (2048, 4096, 5120)]
    if args.only != "logits":
        shapes += [(name, n, k, F.linear, lambda x, w, t: gemv(x, w, None, t), linear_tile)
                   for name, (n, k) in LINEARS.items()]
    for name, n, k, ref, ours, tile_of in shapes:
        copies = max(2, -(-(256 << 20) // (n * k * 2)))
        ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(copies)]
        for m in (1, 4, 16):
            print(row(name, n, k, m, ws, ref, ours, tile_of, args.sweep), flush=True)
        del ws


if __name__ == "__main__":
    main()
