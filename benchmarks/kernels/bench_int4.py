"""int4 (AWQ, group 128) decode kernels on a CUDA device: the old path next to the new one, each against the bytes
bound measured in the same run (~1 min of GPU time, most of it Triton compiles).

1. Linears of Qwen3.5-9B and 27B (o_proj / out_proj, MLP gate|up, down) at T = 1 and 16, AWQ layout: the GEMM's
   split-K decode plan (`int4_gemm_triton`), the GEMV (`int4_gemv_triton`); K-packed layout (the engine's default
   for groups >= 64): the dispatch (`int4_gemm(..., kpack=True)`: the kpack GEMV at T=1, its tensor-core twin at
   T=16); bf16 F.linear (cuBLAS). Bound: int4 weight + zeros + scales + activations in/out over a device copy's
   bandwidth. For three shapes also a few kpack GEMV plans (best printed) to tune `kpack_plan`.
2. Fused MoE at Qwen3.5-35B-A3B shapes (256 experts, top-8, H=2048, I=512) for T = 1, 2, 4, 16, 64: AWQ experts
   through torch align + grouped Triton GEMM ("grouped") and through the dispatch's default ("awq": per-pair GEMVs up
   to 128 pairs, else align + GEMM), K-packed experts through the default ("kpack") and, up to 128 pairs, forced
   through the per-pair GEMVs ("kp pairs") or the two-launch decode ("kp 2-lnch", fused_moe/decode_kpack.py), and
   torch grouped_mm bf16. Bound: int4 bytes of the experts actually routed to.

Everything is replayed from CUDA graphs (as the engine decodes) over enough weight copies / routings that one pass
touches > 100 MB, more than twice the 50 MB L2, so weights stream from HBM.

    python benchmarks/kernels/bench_int4.py
Say which card gave the figures when you quote them.
"""
import argparse
import dataclasses
import sys

import torch
import torch.nn.functional as F
from triton.testing import do_bench, do_bench_cudagraph

from deltaserve.kernels.fused_moe import ExpertWeights, _grouped_moe, route_topk_softmax
from deltaserve.kernels.fused_moe.decode import DECODE_MAX_PAIRS
from deltaserve.kernels.fused_moe.triton import fused_moe_triton
from deltaserve.kernels.int4_gemm import int4_gemm
from deltaserve.kernels.int4_gemm.kpack import KpackPlan, kpack_gemv, kpack_plan
from deltaserve.kernels.int4_gemm.gemv import int4_gemv_triton
from deltaserve.kernels.int4_gemm.triton import int4_gemm_triton
from deltaserve.layers.quant import awq_to_kpack

DEVICE, GROUP, STREAM_BYTES = "cuda", 128, 100 << 20
LINEARS = {  # name: (in, out)
    "9b o_proj / out_proj": (4096, 4096), "9b mlp gate|up": (4096, 24576), "9b mlp down": (12288, 4096),
    "27b o_proj / out_proj": (6144, 5120), "27b mlp gate|up": (5120, 34816), "27b mlp down": (17408, 5120),
}
SWEEP = ("9b o_proj / out_proj", "27b mlp gate|up", "27b mlp down")


def copy_bandwidth() -> float:
    """Bytes/s moved (read + write) by a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 29, dtype=torch.float16, device=DEVICE)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def random_awq(e: int | None, k: int, n: int) -> dict[str, torch.Tensor]:
    """Random int4 tensors in the AWQ layout (any bit pattern is a valid weight); scales ~ 1/(8·sqrt(k))."""
    lead = () if e is None else (e,)
    i32 = {"dtype": torch.int32, "device": DEVICE}
    return {"qweight": torch.randint(-2**31, 2**31 - 1, lead + (k, n // 8), **i32),
            "qzeros": torch.randint(-2**31, 2**31 - 1, lead + (k // GROUP, n // 8), **i32),
            "scales": (torch.rand(lead + (k // GROUP, n), device=DEVICE) / (8 * k**0.5)).half()}


def int4_bytes(k: int, n: int) -> int:
    return k * n // 2 + (k // GROUP) * n * 2 + (k // GROUP) * n // 2  # nibbles + fp16 scales + int4 zeros


def us(fn, calls: int) -> float:
    """Microseconds per call of fn (which makes `calls` calls) replayed from a CUDA graph; NaN (and the error
    printed) if it fails, so one broken path does not hide the others' figures."""
    try:
        fn()
        torch.cuda.synchronize()
        return do_bench_cudagraph(fn, rep=30) * 1e3 / calls
    except Exception as e:  # noqa: BLE001 - report and go on
        print(f"  FAILED: {type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}")
        torch.cuda.synchronize()
        return float("nan")


def kpack_sweep(x, kws) -> tuple[float, KpackPlan | None]:
    k = x.shape[1]
    n = kws[0]["scales"].shape[1]
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    best = (float("inf"), None)
    plans = ((128, 2), (256, 2), (256, 4), (512, 4), (1024, 8)) if x.shape[0] == 1 else ((64, 4), (128, 4),
                                                                                          (128, 8), (256, 8))
    for bn, warps in plans:
        base = max(1, min(k // GROUP, -(-4 * sms // -(-n // bn))))
        for split in sorted({max(1, base // 2), base, min(k // GROUP, 2 * base)}):
            cfg = KpackPlan(bn, split, warps, 3)
            t_cfg = us(lambda c=cfg: [kpack_gemv(x, *w.values(), GROUP, c) for w in kws], len(kws))
            best = min(best, (t_cfg, cfg), key=lambda r: r[0] if r[0] == r[0] else float("inf"))
    return best


def bench_linears(bw: float) -> None:
    print(f"{'linear':<24}{'T':>4}{'gemm us':>9}{'gemv us':>9}{'kpack us':>10}{'bf16 us':>9}{'bound us':>10}"
          f"{'gemv/bd':>9}{'kpack/bd':>10}{'kp/gemv':>9}  kpack plan (BN,split,warps)")
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for name, (k, n) in LINEARS.items():
        ws = [random_awq(None, k, n) for _ in range(-(-STREAM_BYTES // int4_bytes(k, n)))]
        kws = [dict(w, qweight=awq_to_kpack(w["qweight"])) for w in ws]
        wbs = [torch.randn(n, k, device=DEVICE).bfloat16() for _ in range(-(-STREAM_BYTES // (2 * k * n)))]
        for t in (1, 16):
            x = torch.randn(t, k, device=DEVICE).bfloat16()
            t_gemm = us(lambda x=x, ws=ws: [int4_gemm_triton(x, *w.values(), GROUP) for w in ws], len(ws))
            t_gemv = us(lambda x=x, ws=ws: [int4_gemv_triton(x, *w.values(), GROUP) for w in ws], len(ws))
            t_kp = us(lambda x=x, kws=kws: [int4_gemm(x, *w.values(), GROUP, kpack=True) for w in kws], len(kws))
            t16 = us(lambda x=x, wbs=wbs: [F.linear(x, wb) for wb in wbs], len(wbs))
            bound = (int4_bytes(k, n) + 2 * t * (k + n)) / bw * 1e6
            p = kpack_plan(n, k, GROUP, sms)
            if t > 1:
                p = kpack_plan(n, k, GROUP, sms, t=t)
            how = f"{p.block_n},{p.split_k},{p.num_warps}"
            print(f"{name:<24}{t:>4}{t_gemm:>9.1f}{t_gemv:>9.1f}{t_kp:>10.1f}{t16:>9.1f}{bound:>10.1f}"
                  f"{bound / t_gemv:>9.2f}{bound / t_kp:>10.2f}{t_gemv / t_kp:>9.2f}  {how}")
            if name in SWEEP:
                tb, cfg = kpack_sweep(x, kws)
                if cfg is not None:
                    print(f"{'  best swept kpack':<24}{t:>4}{'':>18}{tb:>10.1f}{'':>28}{bound / tb:>10.2f}{'':>9}  "
                          f"{cfg.block_n},{cfg.split_k},{cfg.num_warps}")


def bench_moe(bw: float, e: int = 256, top_k: int = 8, h: int = 2048, inter: int = 512) -> None:
    gu4 = ExpertWeights(**random_awq(e, h, 2 * inter), group_size=GROUP)
    dn4 = ExpertWeights(**random_awq(e, inter, h), group_size=GROUP)
    gub = torch.randn(e, 2 * inter, h, device=DEVICE).bfloat16() / h**0.5
    dnb = torch.randn(e, h, inter, device=DEVICE).bfloat16() / inter**0.5
    per_expert = int4_bytes(h, 2 * inter) + int4_bytes(inter, h)
    print(f"\nMoE E={e} top-{top_k} H={h} I={inter}, int4 experts unless said (us per call)")
    gu_kp = ExpertWeights(gu4.qweight.new_empty(0), gu4.qzeros, gu4.scales, GROUP, kpack=True)
    dn_kp = ExpertWeights(dn4.qweight.new_empty(0), dn4.qzeros, dn4.scales, GROUP, kpack=True)
    gu_kp = dataclasses.replace(gu_kp, qweight=torch.stack([awq_to_kpack(q) for q in gu4.qweight]))
    dn_kp = dataclasses.replace(dn_kp, qweight=torch.stack([awq_to_kpack(q) for q in dn4.qweight]))
    print(f"{'T':>4}{'active':>8}{'grouped':>9}{'awq':>8}{'kpack':>8}{'kp pairs':>10}{'kp 2-lnch':>11}{'bf16 gmm':>10}"
          f"{'bound':>8}{'awq/bd':>8}{'kpack/bd':>10}{'kp/awq':>8}")
    for t in (1, 2, 4, 16, 64):
        # distinct routings per replay so the touched experts exceed L2 (one T=1 routing touches only ~16 MB)
        routes = []
        while not routes or sum(int(r[2].unique().numel()) for r in routes) * per_expert < STREAM_BYTES:
            w, ids = route_topk_softmax(torch.randn(t, e, device=DEVICE), top_k)
            routes.append((torch.randn(t, h, device=DEVICE).bfloat16(), w, ids))
        active = sum(int(r[2].unique().numel()) for r in routes) / len(routes)

        def run(gu, dn, routes=routes, **kw):
            return us(lambda: [fused_moe_triton(x, gu, dn, w, ids, **kw) for x, w, ids in routes], len(routes))

        t_grouped = run(gu4, dn4, decode_gemv=False)
        t_awq = run(gu4, dn4)
        t_kp = run(gu_kp, dn_kp)
        t_pairs, t_two = (run(gu_kp, dn_kp, two_launch=v) if t * top_k <= DECODE_MAX_PAIRS else float("nan")
                          for v in (False, True))
        t_gmm = us(lambda routes=routes: [_grouped_moe(x, gub, dnb, w, ids) for x, w, ids in routes], len(routes))
        bound = (active * per_expert + 2 * t * h * 2) / bw * 1e6
        print(f"{t:>4}{active:>8.0f}{t_grouped:>9.1f}{t_awq:>8.1f}{t_kp:>8.1f}{t_pairs:>10.1f}{t_two:>11.1f}"
              f"{t_gmm:>10.1f}{bound:>8.1f}"
              f"{bound / t_awq:>8.2f}{bound / t_kp:>10.2f}{t_awq / t_kp:>8.2f}")


def main() -> None:
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()  # --help: what it measures
    if not torch.cuda.is_available():
        sys.exit("bench_int4 needs a CUDA device")
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bw / 1e12:.2f} TB/s (read + write); int4 group {GROUP}")
    bench_linears(bw)
    bench_moe(bw)


if __name__ == "__main__":
    main()
