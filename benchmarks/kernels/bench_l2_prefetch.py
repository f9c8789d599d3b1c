"""Does asking L2 for a GEMV's weights during a latency-bound stretch before it pay? (H200: no; see below.)

Why: at batch 1 a 35B-A3B layer's MoE block (router, expert gate|up, expert down: ~19 µs on an H200) moves ~15 MB,
so HBM sits mostly idle, and then the next layer's 16-bit in-projection streams 50.6 MB. Weights are written by no
kernel, so the in-projection's first lines could be on their way to L2 while the MoE block runs. This times the
pattern in isolation, as CUDA-graph replays with PDL of --copies chains (distinct weights, so nothing is reused from
L2 across chains):

    [prefetch: the first MB of W into L2] -> --stretch RMSNorm launches (~2 µs each, dependent) -> GEMV(W)

against the same chain without it. --methods: `line` (prefetch.global.L2, one 128-byte line a thread), `bulk`
(Hopper's cp.async.bulk.prefetch.L2, 32 KB a thread), `load` (a kernel that really reads the lines and sums them).
--where: `early` (in line before the stretch), `side` (a graph branch of its own, forked there), `late` (right
before the GEMV). Each with and without the evict_last priority. µs a chain. --hot N,...: only the GEMV N x K alone,
from HBM (distinct weights) and from L2 (one weight over and over): the most any prefetch can give.

    python benchmarks/kernels/bench_l2_prefetch.py --mb 8,16,24,32 --stretch 8,0
    python benchmarks/kernels/bench_l2_prefetch.py --hot 2048,4096,8192,12352

H200, Triton 3.6 (2026-12-02), the 35B-A3B in-projection (12 352 x 2 048, 48 MB): the chain with 8 norms 22.6 µs
without any prefetch, and every prefetch slower (8-32 MB: line early 25.0-29.4, side 23.1-27.8; bulk early 51-64,
side 23.7-27.4; load side 23.7-29.5). --hot: 13.65 µs from HBM, 12.28 from L2 (where it fits: 8 192 rows 9.97 ->
7.51, 4 096 rows 6.43 -> 4.82, 2 048 rows 5.45 -> 4.85): the GEMV is latency-bound well before it is
bandwidth-bound, so lines in L2 save at most ~1.4 µs of an in-projection, less than the prefetch itself costs.
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
_BULK = tl.constexpr("cp.async.bulk.prefetch.L2.global [$1], $2;\n\tmov.u32 $0, 0;")
_BULK_LAST = tl.constexpr("{\n\t.reg .b64 pol;\n\tcreatepolicy.fractional.L2::evict_last.b64 pol, 1.0;\n\t"
                          "cp.async.bulk.prefetch.L2.global.L2::cache_hint [$1], $2, pol;\n\tmov.u32 $0, 0;\n\t}")
_CHUNK = tl.constexpr(32768)  # bytes one thread asks for with one bulk prefetch


@triton.jit
def _line_kernel(w, n_lines, LINES: tl.constexpr, EVICT_LAST: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Ask L2 for 128-byte lines 0..n_lines of w (16-bit elements), LINES a program; no data comes back."""
    pdl_start(USE_PDL)
    o = tl.program_id(0) * LINES + tl.arange(0, LINES)
    p = tl.where(o < n_lines, w + o.to(tl.int64) * 64, w)
    tl.inline_asm_elementwise(_PF_LAST if EVICT_LAST else _PF, "=r,l", [p], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _bulk_kernel(w, n_chunks, CHUNKS: tl.constexpr, EVICT_LAST: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Hopper's TMA bulk prefetch: each thread asks L2 for one _CHUNK-byte range of w; no data comes back."""
    pdl_start(USE_PDL)
    o = tl.program_id(0) * CHUNKS + tl.arange(0, CHUNKS)
    p = w + tl.minimum(o, n_chunks - 1).to(tl.int64) * (_CHUNK // 2)
    size = tl.where(o < n_chunks, _CHUNK, 16).to(tl.int32)
    tl.inline_asm_elementwise(_BULK_LAST if EVICT_LAST else _BULK, "=r,l,r", [p, size], dtype=tl.int32,
                              is_pure=False, pack=1)


@triton.jit
def _load_kernel(w, out, n, BLOCK: tl.constexpr, EVICT_LAST: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Really read w[:n] (a sum a program into out): the data surely passes through L2."""
    pdl_start(USE_PDL)
    o = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    v = tl.load(w + o, mask=o < n, other=0.0, eviction_policy="evict_last" if EVICT_LAST else "")
    tl.store(out + tl.program_id(0), tl.sum(v.to(tl.float32)))


def prefetch(w: torch.Tensor, nbytes: int, method: str, evict_last: bool, pdl: bool = True) -> None:
    nbytes = min(nbytes, w.numel() * w.element_size())
    kw = pdl_args(w) if pdl else {}
    if method == "line":
        lines = nbytes // 128
        _line_kernel[(triton.cdiv(lines, 1024),)](w, lines, LINES=1024, EVICT_LAST=evict_last, num_warps=4, **kw)
    elif method == "bulk":
        chunks = nbytes // _CHUNK.value
        _bulk_kernel[(triton.cdiv(chunks, 128),)](w, chunks, CHUNKS=128, EVICT_LAST=evict_last, num_warps=4, **kw)
    else:
        n = nbytes // 2
        out = torch.empty(triton.cdiv(n, 8192), device=w.device)
        _load_kernel[(out.numel(),)](w, out, n, BLOCK=8192, EVICT_LAST=evict_last, num_warps=8, **kw)


def chain_us(ws, xs, rs, norm_w, mb: int, where: str, method: str, evict_last: bool, stretch: int) -> float:
    """µs a chain (replay_us of one graph holding every chain). where: early (before the stretch, in line), late
    (right before the GEMV), side (a graph branch of its own, forked where early would be)."""
    tile = linear_tile(*ws[0].shape)
    side = torch.cuda.Stream()

    def chains():
        main = torch.cuda.current_stream()
        for w, x, r in zip(ws, xs, rs):
            if mb and where == "early":
                prefetch(w, mb << 20, method, evict_last)
            if mb and where == "side":
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    prefetch(w, mb << 20, method, evict_last, pdl=False)
            for _ in range(stretch):
                x = rmsnorm_triton(x, norm_w, 1e-6, r)[0]
            if mb and where == "late":
                prefetch(w, mb << 20, method, evict_last)
            gemv(x, w, tile=tile)
        if mb and where == "side":
            main.wait_stream(side)  # join the branch, or the capture cannot end

    return replay_us(chains, len(ws))


def replay_us(launches, per: int) -> float:
    """launches() run once (compiles), captured into a CUDA graph, replayed: the best of 5 x 10 replays, µs / per."""
    launches()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        launches()
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
        best = min(best, start.elapsed_time(end) / 10 / per * 1e3)
    return best


def hot_cold_us(n: int, k: int, copies: int) -> tuple[float, float]:
    """The GEMV alone over `copies` distinct weights (read from HBM) and over one weight `copies` times (from L2 where
    it fits): µs a GEMV, CUDA-graph replays with PDL. The upper bound of what any prefetch can give."""
    x = torch.randn(1, k, device="cuda").bfloat16()
    ws = [torch.randn(n, k, device="cuda").bfloat16() for _ in range(copies)]
    tile = linear_tile(n, k)
    cold = replay_us(lambda: [gemv(x, w, tile=tile) for w in ws], copies)
    return cold, replay_us(lambda: [gemv(x, ws[0], tile=tile) for _ in ws], copies)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", default="12352,2048", help="N,K of the GEMV (default: the 35B-A3B in-projection)")
    p.add_argument("--mb", default="8,16,24,32", help="MB of the weight prefetched, comma list")
    p.add_argument("--stretch", default="8,0", help="RMSNorm launches between the prefetch and the GEMV, comma list")
    p.add_argument("--methods", default="line,bulk,load", help="line prefetches, TMA bulk prefetches, real loads")
    p.add_argument("--where", default="early,side,late", help="early (in line), side (a graph branch), late")
    p.add_argument("--copies", type=int, default=12)
    p.add_argument("--hot", default="", help="N list: only time the GEMV N x K cold (HBM) and hot (L2), then stop")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench_l2_prefetch.py needs a CUDA device")
    n, k = (int(v) for v in args.shape.split(","))
    if args.hot:
        for n in (int(v) for v in args.hot.split(",")):
            cold, hot = hot_cold_us(n, k, args.copies)
            print(f"GEMV {n} x {k} ({n * k * 2 / 2**20:.0f} MB): from HBM {cold:.2f} µs ({n * k * 2 / cold / 1e6:.2f} "
                  f"TB/s), from L2 {hot:.2f} µs ({n * k * 2 / hot / 1e6:.2f} TB/s)", flush=True)
        return
    ws = [torch.randn(n, k, device="cuda").bfloat16() for _ in range(args.copies)]
    xs = [torch.randn(1, k, device="cuda").bfloat16() for _ in range(args.copies)]
    rs = [torch.randn(1, k, device="cuda").bfloat16() for _ in range(args.copies)]
    norm_w = torch.randn(k, device="cuda").bfloat16()
    print(f"{torch.cuda.get_device_name()}: GEMV {n} x {k} ({n * k * 2 / 2**20:.1f} MB), {args.copies} chains")
    for stretch in (int(s) for s in args.stretch.split(",")):
        print(f"{stretch} norms, then the GEMV (µs a chain): none "
              f"{chain_us(ws, xs, rs, norm_w, 0, 'early', 'line', False, stretch):.2f}", flush=True)
        for method in args.methods.split(","):
            for where in args.where.split(","):
                row = []
                for mb in (int(m) for m in args.mb.split(",")):
                    for last in (True, False):
                        us = chain_us(ws, xs, rs, norm_w, mb, where, method, last, stretch)
                        row.append(f"{mb} MB{' evict_last' if last else ''} {us:.2f}")
                print(f"  {method} {where}: " + ", ".join(row), flush=True)

if __name__ == "__main__":
    main()
