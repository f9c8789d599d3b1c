"""int4 (AWQ, group 128) kernels on a CUDA device, each figure next to its bound measured in the same run.

1. W4A16 GEMM (`int4_gemm_triton`) at the int4 Linears of Qwen3.5-9B and 27B (o_proj, GDN out_proj, MLP gate|up,
   down) for T = 1, 16, 64, 512: time, bf16 F.linear (cuBLAS) on the same shape, and the bytes bound (int4 weight +
   zeros + scales + activations in/out, over a device copy's bandwidth). For T=1 also a small sweep of tile plans
   (best one printed) to tune `plan`.
2. Fused MoE at Qwen3.5-35B-A3B shapes (256 experts, top-8, H=2048, I=512) for T = 1, 64, 2048: Triton int4, Triton
   bf16, and torch grouped_mm bf16 (today's bf16 path), with the int4 bytes bound of the experts actually routed to.

    python benchmarks/kernels/bench_int4.py
Say which card gave the figures when you quote them.
"""
import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

from deltaserve.kernels.fused_moe import ExpertWeights, _grouped_moe, route_topk_softmax
from deltaserve.kernels.fused_moe.triton import fused_moe_triton
from deltaserve.kernels.int4_gemm.triton import GemmPlan, int4_gemm_triton, plan

DEVICE, GROUP = "cuda", 128
LINEARS = {  # name: (in, out)
    "9b o_proj / out_proj": (4096, 4096), "9b mlp gate|up": (4096, 24576), "9b mlp down": (12288, 4096),
    "27b o_proj / out_proj": (6144, 5120), "27b mlp gate|up": (5120, 34816), "27b mlp down": (17408, 5120),
}
TOKENS = (1, 16, 64, 512)


def copy_bandwidth() -> float:
    """Bytes/s moved (read + write) by a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 29, dtype=torch.float16, device=DEVICE)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def random_awq(e: int | None, k: int, n: int) -> dict[str, torch.Tensor]:
    """Random int4 tensors in the AWQ layout (any bit pattern is a valid weight); scales ~ 1/(8·sqrt(k))."""
    lead = () if e is None else (e,)
    i32 = dict(dtype=torch.int32, device=DEVICE)
    return {"qweight": torch.randint(-2**31, 2**31 - 1, lead + (k, n // 8), **i32),
            "qzeros": torch.randint(-2**31, 2**31 - 1, lead + (k // GROUP, n // 8), **i32),
            "scales": (torch.rand(lead + (k // GROUP, n), device=DEVICE) / (8 * k**0.5)).half()}


def int4_bytes(k: int, n: int) -> int:
    return k * n // 2 + (k // GROUP) * n * 2 + (k // GROUP) * n // 2  # nibbles + fp16 scales + int4 zeros


def ms(fn) -> float:
    """Milliseconds per call replayed from a CUDA graph (as the engine runs decode): a kernel of a few microseconds
    is otherwise timed as its Python wrapper's launch overhead."""
    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=50)


def decode_sweep(x, ws) -> tuple[float, GemmPlan]:
    """Best time over a few decode plans (split-K scaled from `plan`'s for each tile width), over the weight copies."""
    t, k = x.shape
    n = ws[0]["scales"].shape[1]
    auto = plan(t, n, k, GROUP)
    best = (float("inf"), None)
    for bn in (64, 128, 256):
        for bk in sorted({min(64, GROUP), GROUP}):
            for warps, stages in ((4, 2), (4, 4), (8, 2)):
                cfg = GemmPlan(16, bn, bk, max(1, auto.split_k * auto.block_n // bn), warps, stages)
                try:
                    t_cfg = ms(lambda c=cfg: [int4_gemm_triton(x, *w.values(), GROUP, c) for w in ws]) / len(ws)
                    best = min(best, (t_cfg, cfg), key=lambda r: r[0])
                except Exception as e:  # a plan the card cannot hold (shared memory): skip it, say so
                    print(f"  plan {cfg} failed: {type(e).__name__}")
    return best


def bench_gemm(bw: float) -> None:
    print(f"{'linear':<24}{'T':>5}{'int4 us':>10}{'bf16 us':>10}{'bf16/int4':>10}{'bound us':>10}{'of bound':>10}"
          f"  plan (BM,BN,BK,split)")
    for name, (k, n) in LINEARS.items():
        # enough weight copies that one pass over them (> 2x the 50 MB L2) comes from HBM, as in a real step
        copies = max(1, -(-(100 << 20) // int4_bytes(k, n)))
        ws = [random_awq(None, k, n) for _ in range(copies)]
        wbs = [torch.randn(n, k, device=DEVICE).bfloat16() for _ in range(max(1, -(-(100 << 20) // (2 * k * n))))]
        for t in TOKENS:
            x = torch.randn(t, k, device=DEVICE).bfloat16()
            p = plan(t, n, k, GROUP, torch.cuda.get_device_properties(0).multi_processor_count)
            t4 = ms(lambda: [int4_gemm_triton(x, *wi.values(), GROUP) for wi in ws]) / len(ws)
            t16 = ms(lambda: [F.linear(x, wb) for wb in wbs]) / len(wbs)
            bound = (int4_bytes(k, n) + 2 * t * (k + n)) / bw * 1e3
            print(f"{name:<24}{t:>5}{t4 * 1e3:>10.1f}{t16 * 1e3:>10.1f}{t16 / t4:>10.2f}{bound * 1e3:>10.1f}"
                  f"{bound / t4:>10.2f}  {p.block_m},{p.block_n},{p.block_k},{p.split_k}")
            if t == 1:
                tb, cfg = decode_sweep(x, ws)
                print(f"{'  best T=1 plan':<24}{t:>5}{tb * 1e3:>10.1f}{'':>10}{'':>10}{'':>10}{bound / tb:>10.2f}  "
                      f"{cfg.block_m},{cfg.block_n},{cfg.block_k},{cfg.split_k} warps {cfg.num_warps} stages {cfg.num_stages}")


def bench_moe(bw: float) -> None:
    e, top_k, h, inter = 256, 8, 2048, 512
    gu, dn = random_awq(e, h, 2 * inter), random_awq(e, inter, h)
    gu4, dn4 = ExpertWeights(**gu, group_size=GROUP), ExpertWeights(**dn, group_size=GROUP)
    gub = torch.randn(e, 2 * inter, h, device=DEVICE).bfloat16() / h**0.5
    dnb = torch.randn(e, h, inter, device=DEVICE).bfloat16() / inter**0.5
    print(f"\nMoE E={e} top-{top_k} H={h} I={inter}")
    print(f"{'T':>6}{'active':>8}{'int4 us':>10}{'bf16 tri us':>13}{'grouped_mm us':>15}{'int4 bound us':>15}"
          f"{'of bound':>10}")
    for t in (1, 64, 2048):
        x = torch.randn(t, h, device=DEVICE).bfloat16()
        weights, ids = route_topk_softmax(torch.randn(t, e, device=DEVICE), top_k)
        active = int(ids.unique().numel())
        t4 = ms(lambda: fused_moe_triton(x, gu4, dn4, weights, ids))
        tb = ms(lambda: fused_moe_triton(x, ExpertWeights(weight=gub), ExpertWeights(weight=dnb), weights, ids))
        tg = ms(lambda: _grouped_moe(x, gub, dnb, weights, ids))
        bound = (active * (int4_bytes(h, 2 * inter) + int4_bytes(inter, h)) + 2 * t * h * 2) / bw * 1e3
        print(f"{t:>6}{active:>8}{t4 * 1e3:>10.1f}{tb * 1e3:>13.1f}{tg * 1e3:>15.1f}{bound * 1e3:>15.1f}"
              f"{bound / t4:>10.2f}")


def main() -> None:
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s (read + write); int4 group {GROUP}")
    bench_gemm(bw)
    bench_moe(bw)


if __name__ == "__main__":
    main()
