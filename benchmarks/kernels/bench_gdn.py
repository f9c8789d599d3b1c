"""Benchmark the Triton GDN kernels on CUDA: chunked varlen prefill and the fused decode step, against fla
(flash-linear-attention, optional) on identical inputs and against the HBM bandwidth bound for decode.

    python benchmarks/kernels/bench_gdn.py            # table
    python benchmarks/kernels/bench_gdn.py --sweep    # + launch-config sweeps (one parameter at a time)

Shapes: Qwen3.5-9B GDN (Hk=16, HV=32, K=V=128), bf16 inputs, fp32 state pool. fla takes q/k expanded to HV heads
(the same math), g/beta precomputed (its gating is not timed, ours is fused), the initial states as a dense
[N, HV, K, V] tensor and returns new ones (ours gathers from and scatters to the pool in place). fla's decode is its
fused_recurrent kernel without the conv (vLLM runs a separate causal_conv1d_update): ours includes the conv.
Decode is timed under CUDA graphs (triton.testing.do_bench_cudagraph) so launch overhead does not hide the kernel.
"""
import argparse
import dataclasses
import inspect
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import triton  # noqa: E402
from triton.testing import do_bench, do_bench_cudagraph  # noqa: E402

from deltaserve.kernels.gated_delta_rule.reference import gdn_gating  # noqa: E402
from deltaserve.kernels.gated_delta_rule.triton_chunk import (  # noqa: E402
    ChunkLaunchConfig, build_chunk_tables, chunk_gated_delta_rule_varlen)
from deltaserve.kernels.gated_delta_rule.triton_decode import (  # noqa: E402
    DecodeLaunchConfig, fused_recurrent_decode)

HK, HV, K, V, W = 16, 32, 128, 128, 4
DTYPE = torch.bfloat16

try:
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule as fla_chunk
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule as fla_recurrent
except Exception as exc:  # fla is optional: the peer we measure against, never a dependency
    fla_chunk = fla_recurrent = None
    print(f"fla not available ({type(exc).__name__}: {exc}); timing ours only")


def median_ms(fn, graph: bool = False) -> float:
    fn()  # warm-up outside any capture: compiles kernels, allocates cached buffers
    torch.cuda.synchronize()
    if graph:
        return do_bench_cudagraph(fn, rep=100, return_mode="median")
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 1 GiB: (read + write) bytes over the median time."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src))
    return 2 * src.numel() / ms / 1e6


def call_kwargs(fn, **kwargs):
    """Only the keyword arguments `fn` accepts (fla's signature moved between releases)."""
    names = inspect.signature(fn).parameters
    return {key: val for key, val in kwargs.items() if key in names}


def prefill_inputs(lengths: list[int]):
    T, N = sum(lengths), len(lengths)
    gen = torch.Generator(device="cuda").manual_seed(0)
    q = torch.randn(T, HK, K, device="cuda", dtype=DTYPE, generator=gen)
    k = torch.randn(T, HK, K, device="cuda", dtype=DTYPE, generator=gen)
    v = torch.randn(T, HV, V, device="cuda", dtype=DTYPE, generator=gen)
    a = torch.randn(T, HV, device="cuda", dtype=DTYPE, generator=gen)
    b = torch.randn(T, HV, device="cuda", dtype=DTYPE, generator=gen)
    A_log = torch.empty(HV, device="cuda").uniform_(0.05, 1.0).log()
    dt_bias = torch.randn(HV, device="cuda") * 0.5
    pool = torch.randn(N + 3, HV, K, V, device="cuda") * 0.1
    slots = torch.randperm(N + 3, device="cuda")[:N]
    cu = torch.tensor([0] + lengths, device="cuda").cumsum(0)
    return q, k, v, a, b, A_log, dt_bias, pool, cu, slots


def bench_prefill(name: str, lengths: list[int], config: ChunkLaunchConfig | None = None) -> dict:
    q, k, v, a, b, A_log, dt_bias, pool, cu, slots = prefill_inputs(lengths)
    ours = lambda: chunk_gated_delta_rule_varlen(q, k, v, a, b, A_log, dt_bias, pool, cu, slots, lengths,  # noqa
                                                 config=config)
    row = dict(kernel="chunk prefill", shape=name, ours=median_ms(ours))
    if fla_chunk is not None and config is None:
        g, beta = gdn_gating(a, b, A_log, dt_bias)
        groups = HV // HK
        qe, ke = (x.repeat_interleave(groups, dim=1)[None] for x in (q, k))
        init = pool[slots].clone()
        fla = lambda: fla_chunk(**call_kwargs(  # noqa: E731
            fla_chunk, q=qe, k=ke, v=v[None], g=g[None], beta=beta[None], scale=K ** -0.5, initial_state=init,
            output_final_state=True, cu_seqlens=cu, use_qk_l2norm_in_kernel=True))
        row["fla"] = median_ms(fla)
        # sanity: same outputs from the same initial states
        pool_check = pool.clone()
        pool_check[slots] = init
        o_ours = chunk_gated_delta_rule_varlen(q, k, v, a, b, A_log, dt_bias, pool_check, cu, slots, lengths)
        o_fla, final = fla()
        row["check"] = (f"o rel {rel_err(o_fla[0], o_ours):.1e}, "
                        f"state rel {rel_err(final, pool_check[slots]):.1e}")
    return row


def decode_inputs(B: int):
    C = 2 * HK * K + HV * V
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(B, C, device="cuda", dtype=DTYPE, generator=gen)
    weight = torch.randn(C, W, device="cuda", dtype=DTYPE, generator=gen) * 0.5
    conv_state = torch.randn(B + 8, C, W - 1, device="cuda", dtype=DTYPE, generator=gen)
    a = torch.randn(B, HV, device="cuda", dtype=DTYPE, generator=gen)
    b = torch.randn(B, HV, device="cuda", dtype=DTYPE, generator=gen)
    A_log = torch.empty(HV, device="cuda").uniform_(0.05, 1.0).log()
    dt_bias = torch.randn(HV, device="cuda") * 0.5
    state = torch.randn(B + 8, HV, K, V, device="cuda") * 0.1
    slots = torch.randperm(B + 8, device="cuda")[:B]
    return x, weight, conv_state, a, b, A_log, dt_bias, state, slots


def decode_bytes(B: int) -> int:
    """Compulsory HBM traffic of one fused decode step: the state read + written dominates."""
    C = 2 * HK * K + HV * V
    state = 2 * B * HV * K * V * 4
    conv = 2 * B * C * (W - 1) * 2 + C * W * 2
    io = B * C * 2 + 2 * B * HV * 2 + B * HV * V * 2 + B * 8
    return state + conv + io


def bench_decode(B: int, bound_gbs: float, config: DecodeLaunchConfig | None = None) -> dict:
    x, weight, conv_state, a, b, A_log, dt_bias, state, slots = decode_inputs(B)
    ours = lambda: fused_recurrent_decode(x, weight, conv_state, a, b, A_log, dt_bias, state, slots,  # noqa
                                          HK, K, V, config=config)
    ms = median_ms(ours, graph=True)
    gbs = decode_bytes(B) / ms / 1e6
    row = dict(kernel="fused decode", shape=f"B={B}", ours=ms, gbs=gbs, bound=gbs / bound_gbs)
    if fla_recurrent is not None and config is None:
        C = 2 * HK * K
        q = x[:, : HK * K].reshape(1, B, HK, K).repeat_interleave(HV // HK, dim=2)
        k = x[:, HK * K: C].reshape(1, B, HK, K).repeat_interleave(HV // HK, dim=2)
        v = x[:, C:].reshape(1, B, HV, V).contiguous()
        g, beta = gdn_gating(a, b, A_log, dt_bias)
        init = state[:B].clone()
        cu = torch.arange(B + 1, device="cuda")
        fla = lambda: fla_recurrent(**call_kwargs(  # noqa: E731
            fla_recurrent, q=q, k=k, v=v, g=g[None], beta=beta[None], scale=K ** -0.5, initial_state=init,
            output_final_state=True, cu_seqlens=cu, use_qk_l2norm_in_kernel=True))
        row["fla"] = median_ms(fla, graph=True)
    return row


def rel_err(ref: torch.Tensor, out: torch.Tensor) -> float:
    return ((out.float() - ref.float()).norm() / ref.float().norm()).item()


def print_table(rows: list[dict], bound_gbs: float) -> None:
    print(f"\n{torch.cuda.get_device_name()}  copy bandwidth (read+write) {bound_gbs:.0f} GB/s")
    head = f"{'kernel':<14} {'shape':<16} {'ours ms':>9} {'fla ms':>9} {'fla/ours':>9} {'GB/s':>7} {'of bound':>9}"
    print(head + "  check")
    print("-" * (len(head) + 8))
    for r in rows:
        fla = f"{r['fla']:9.4f}" if "fla" in r else f"{'-':>9}"
        ratio = f"{r['fla'] / r['ours']:9.2f}" if "fla" in r else f"{'-':>9}"
        gbs = f"{r['gbs']:7.0f}" if "gbs" in r else f"{'-':>7}"
        bound = f"{r['bound']:9.2f}" if "bound" in r else f"{'-':>9}"
        print(f"{r['kernel']:<14} {r['shape']:<16} {r['ours']:9.4f} {fla} {ratio} {gbs} {bound}  {r.get('check', '')}")


def sweep(bound_gbs: float, which: str) -> None:
    """One parameter at a time around the defaults; pick the best and set it as the dataclass default."""
    if which != "decode":
        sweep_prefill()
    if which != "prefill":
        sweep_decode(bound_gbs)


def sweep_prefill() -> None:
    print("\nprefill sweep (1x16k, 16x1k ms)")
    base = ChunkLaunchConfig()
    choices = dict(diag_sub=[4, 8, 16], diag_warps=[1, 2, 4], solve_warps=[1, 2, 4, 8], scores_warps=[2, 4, 8],
                   state_block_v=[16, 32, 64], state_warps=[2, 4, 8], state_stages=[1, 2, 3, 4],
                   merge_precision=["ieee", "tf32x3"])
    for field, values in choices.items():
        for value in values:
            cfg = dataclasses.replace(base, **{field: value})
            try:
                t1 = bench_prefill("1x16k", [16384], cfg)["ours"]
                t2 = bench_prefill("16x1k", [1024] * 16, cfg)["ours"]
                print(f"  {field}={value!s:<5} {t1:8.4f} {t2:8.4f}")
            except Exception as exc:  # e.g. out of shared memory for a config
                print(f"  {field}={value!s:<5} failed: {type(exc).__name__}: {str(exc)[:80]}")


def sweep_decode(bound_gbs: float) -> None:
    print("\ndecode sweep (B=1, 64, 256: ms and fraction of bound)")
    for block_v in (16, 32, 64, 128):
        for warps in (1, 2, 4, 8):
            cfg = DecodeLaunchConfig(block_v=block_v, num_warps=warps)
            cells = []
            for B in (1, 64, 256):
                r = bench_decode(B, bound_gbs, cfg)
                cells.append(f"{r['ours']:8.4f} ({r['bound']:.2f})")
            print(f"  block_v={block_v:<4} warps={warps}  " + "  ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweep", nargs="?", const="all", choices=["prefill", "decode", "all"],
                        help="also sweep the launch configs (prefill, decode or all)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_gdn needs a CUDA device")
    print(f"torch {torch.__version__}, triton {triton.__version__}")
    bound = copy_bandwidth_gbs()
    lens_16x1k = [1024] * 16
    start = time.perf_counter()
    for _ in range(100):
        build_chunk_tables(lens_16x1k, "cuda")
    torch.cuda.synchronize()
    print(f"host chunk-table build + H2D copy (16 sequences): {(time.perf_counter() - start) * 1e4:.1f} us")
    rows = [bench_prefill("1x16k", [16384]), bench_prefill("16x1k varlen", lens_16x1k)]
    rows += [bench_decode(B, bound) for B in (1, 64, 256)]
    print_table(rows, bound)
    if args.sweep:
        sweep(bound, args.sweep)


if __name__ == "__main__":
    main()
