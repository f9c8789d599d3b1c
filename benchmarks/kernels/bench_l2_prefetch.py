"""Does prefetching a GEMV's weights into L2 during a latency-bound stretch before it pay? (Not yet run on a GPU.)

Why: at batch 1 a 35B-A3B layer's MoE block (router, expert gate|up, expert down: ~19 µs on an H200) moves ~15 MB,
so HBM sits mostly idle, and then the next layer's 16-bit in-projection streams 50.6 MB at ~3.4-3.8 TB/s (~13-15
µs). Weights are written by no kernel, so the in-projection's first lines could be on their way to L2 while the MoE
block runs; L2 holds 50 MB. This times the pattern in isolation, as CUDA-graph replays with PDL of --copies chains
(distinct weights, so nothing is reused from L2 across chains):

    [prefetch kernel: the first MB of W into L2] -> --stretch RMSNorm launches (~2 µs each, dependent) -> GEMV(W)

against the same chain without the prefetch, with it issued right before the GEMV (no window: the control), and
with and without the `evict_last` priority (lines the stretch's own traffic should not push out). µs a chain.

    python benchmarks/kernels/bench_l2_prefetch.py --mb 8,16,24,32 --stretch 8
"""
import argparse

import torch
import triton
import triton.language as tl

from deltaserve.kernels.gemv.triton import gemv, linear_tile
from deltaserve.kernels.pdl import pdl_args, pdl_start
from deltaserve.kernels.rmsnorm.triton import rmsnorm_triton

_PF = tl.constexpr("prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;")
_PF_LAST = tl.constexpr("prefetch.global.L2::evict_last [$1];\n\tmov.u32 $0, 0;")


@triton.jit
def _prefetch_kernel(w, n_lines, LINES: tl.constexpr, EVICT_LAST: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Ask L2 for 128-byte lines 0..n_lines of w (16-bit elements), LINES a program; no data comes back."""
    pdl_start(USE_PDL)
    o = tl.program_id(0) * LINES + tl.arange(0, LINES)
    p = tl.where(o < n_lines, w + o.to(tl.int64) * 64, w)
    tl.inline_asm_elementwise(_PF_LAST if EVICT_LAST else _PF, "=r,l", [p], dtype=tl.int32, is_pure=False, pack=1)


def prefetch(w: torch.Tensor, nbytes: int, evict_last: bool) -> None:
    lines = min(nbytes, w.numel() * w.element_size()) // 128
    _prefetch_kernel[(triton.cdiv(lines, 1024),)](w, lines, LINES=1024, EVICT_LAST=evict_last, num_warps=4,
                                                   **pdl_args(w))


def chain_us(ws, xs, rs, norm_w, mb: int, where: str, evict_last: bool, stretch: int) -> float:
    """Best of 5 x 10 replays of one graph holding every chain, µs a chain."""
    tile = linear_tile(*ws[0].shape)

    def chains():
        for w, x, r in zip(ws, xs, rs):
            if mb and where == "early":
                prefetch(w, mb << 20, evict_last)
            for _ in range(stretch):
                x = rmsnorm_triton(x, norm_w, 1e-6, r)[0]
            if mb and where == "late":
                prefetch(w, mb << 20, evict_last)
            gemv(x, w, tile=tile)

    chains()  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chains()
    for _ in range(3):
        graph.replay()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    best = float("inf")
    for _ in range(5):
        start.record()
        for _ in range(10):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 10 / len(ws) * 1e3)
    return best


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="12352,2048", help="N,K of the GEMV (default: the 35B-A3B in-projection)")
    p.add_argument("--mb", default="8,16,24,32", help="MB of the weight prefetched, comma list")
    p.add_argument("--stretch", default="8,0", help="RMSNorm launches between the prefetch and the GEMV, comma list")
    p.add_argument("--copies", type=int, default=12)
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_l2_prefetch.py needs a CUDA device")
    n, k = (int(v) for v in args.shape.split(","))
    ws = [torch.randn(n, k, device="cuda").bfloat16() for _ in range(args.copies)]
    xs = [torch.randn(1, k, device="cuda").bfloat16() for _ in range(args.copies)]
    rs = [torch.randn(1, k, device="cuda").bfloat16() for _ in range(args.copies)]
    norm_w = torch.randn(k, device="cuda").bfloat16()
    print(f"{torch.cuda.get_device_name()}: GEMV {n} x {k} ({n * k * 2 / 2**20:.1f} MB), {args.copies} chains")
    for stretch in (int(s) for s in args.stretch.split(",")):
        row = [f"none {chain_us(ws, xs, rs, norm_w, 0, 'early', False, stretch):.2f}"]
        for mb in (int(m) for m in args.mb.split(",")):
            for last in (True, False):
                us = chain_us(ws, xs, rs, norm_w, mb, "early", last, stretch)
                row.append(f"{mb} MB{' evict_last' if last else ''} {us:.2f}")
            row.append(f"{mb} MB right before the GEMV {chain_us(ws, xs, rs, norm_w, mb, 'late', True, stretch):.2f}")
        print(f"{stretch} norms, then the GEMV (µs a chain): " + ", ".join(row), flush=True)


if __name__ == "__main__":
    main()
