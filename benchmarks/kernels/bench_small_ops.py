"""Small bandwidth-bound kernels on a CUDA device at Qwen3.5-9B shapes (bf16): RMSNorm (plain and fused with the
residual add), the GDN gated RMSNorm, fused q/k norm + partial RoPE, and the varlen causal conv1d + SiLU.

For each op and shape: the torch reference's time, the Triton kernel's time, and the Triton kernel's achieved
bandwidth (bytes it must move / time) against a device-to-device copy measured in the same run. Prints one table
(say which card gave it when you quote it).

    python benchmarks/kernels/bench_small_ops.py
"""
import argparse
import sys
import torch
from triton.testing import do_bench

from deltaserve.kernels.causal_conv1d import reference as conv_ref
from deltaserve.kernels.causal_conv1d.triton import causal_conv1d_varlen_triton
from deltaserve.kernels.rmsnorm import reference as norm_ref
from deltaserve.kernels.rmsnorm.triton import gated_rmsnorm_triton, rmsnorm_triton
from deltaserve.kernels.rotary import reference as rope_ref
from deltaserve.kernels.rotary.triton import qk_norm_rope_triton

DEVICE, DTYPE, EPS = "cuda", torch.bfloat16, 1e-6
HIDDEN, HV, V, H, HKV, D, RD, THETA = 4096, 32, 128, 16, 4, 256, 64, 1e7
CONV_C, CONV_W = 8192, 4
E = 2  # bytes per bf16 element


def copy_bandwidth() -> float:
    """Bytes/s moved (read + write) by a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 29, dtype=torch.float16, device=DEVICE)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def randn(*shape, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(DTYPE)


def max_diff(a, b) -> float:
    a, b = (a, b) if isinstance(a, tuple) else ((a,), (b,))
    return max((x.float() - y.float()).abs().max().item() for x, y in zip(a, b))


def cases():
    """Yields (op, shape, torch fn, triton fn, bytes the op must move, max |triton - torch| or None: compare the
    fns' outputs)."""
    w = randn(HIDDEN, scale=0.3)
    for t in (1, 256, 8192):
        x, res = randn(t, HIDDEN), randn(t, HIDDEN, scale=4)
        yield ("rmsnorm", f"T={t} H={HIDDEN}", lambda x=x: norm_ref.rmsnorm(x, w, EPS),
               lambda x=x: rmsnorm_triton(x, w, EPS), 2 * t * HIDDEN * E, None)
        yield ("add+rmsnorm", f"T={t} H={HIDDEN}", lambda x=x, r=res: norm_ref.rmsnorm(x, w, EPS, r),
               lambda x=x, r=res: rmsnorm_triton(x, w, EPS, r), 4 * t * HIDDEN * E, None)
    gw = (1 + randn(V, scale=0.3))
    for t in (1, 256, 8192):
        x, z = randn(t, HV, V), randn(t, HV, V, scale=2)
        yield ("gated_rmsnorm", f"T={t} HV={HV} V={V}", lambda x=x, z=z: norm_ref.gated_rmsnorm(x, z, gw, EPS),
               lambda x=x, z=z: gated_rmsnorm_triton(x, z, gw, EPS), 3 * t * HV * V * E, None)
    qw, kw = randn(D, scale=0.3), randn(D, scale=0.3)
    for t in (1, 256, 8192):
        q = randn(t, H * 2 * D).view(t, H, 2 * D)[..., :D]  # the query half of q_proj's [query | gate]
        k = randn(t, HKV, D)
        pos = torch.randint(0, 100_000, (t,), device=DEVICE)
        args = (q, k, qw, kw, pos, THETA, RD, EPS)
        yield ("qk_norm_rope", f"T={t} H={H}/{HKV} D={D}", lambda a=args: rope_ref.qk_norm_rope(*a),
               lambda a=args: qk_norm_rope_triton(*a), 2 * t * (H + HKV) * D * E + 8 * t, None)
    weight = randn(CONV_C, CONV_W, scale=0.5)
    for name, lens in (("decode N=256", [1] * 256), ("prefill 16x512", [512] * 16), ("prefill 1x8192", [8192])):
        n, t = len(lens), sum(lens)
        x = randn(t, CONV_C)
        pool = randn(n + 1, CONV_C, CONV_W - 1)
        cu = torch.tensor([0] + lens, device=DEVICE).cumsum(0)
        slots = torch.randperm(n + 1, device=DEVICE)[:n]
        state_bytes = 2 * n * CONV_C * (CONV_W - 1) * E
        # the pool is updated in place: check once on copies, then time repeated calls on the shared pool
        diff = max_diff(conv_ref.causal_conv1d_varlen(x, weight, pool.clone(), cu, slots),
                        causal_conv1d_varlen_triton(x, weight, pool.clone(), cu, slots, lens))
        yield ("causal_conv1d", f"{name} C={CONV_C}",
               lambda x=x, p=pool, cu=cu, s=slots: conv_ref.causal_conv1d_varlen(x, weight, p, cu, s),
               lambda x=x, p=pool, cu=cu, s=slots, lens=lens: causal_conv1d_varlen_triton(x, weight, p, cu, s, lens),
               2 * t * CONV_C * E + state_bytes, diff)


def main():
    argparse.ArgumentParser(description=__doc__.split("\n")[0]).parse_args()  # --help: what it measures
    if not torch.cuda.is_available():
        sys.exit("bench_small_ops needs a CUDA device")
    torch.manual_seed(0)
    bw = copy_bandwidth()
    print(f"# {torch.cuda.get_device_name()}; device copy bandwidth {bw / 1e9:.0f} GB/s (read + write)")
    header = f"| {'op':<14} | {'shape':<26} | {'torch us':>9} | {'triton us':>9} | {'speedup':>7} | " \
             f"{'MB':>7} | {'triton GB/s':>11} | {'% copy':>6} | {'max|diff|':>9} |"
    print(header)
    print("|" + "|".join("-" * (len(c)) for c in header.split("|")[1:-1]) + "|")
    for op, shape, fn_ref, fn_tri, nbytes, diff in cases():
        diff = max_diff(fn_ref(), fn_tri()) if diff is None else diff
        ms_ref = do_bench(fn_ref, warmup=10, rep=100)
        ms_tri = do_bench(fn_tri, warmup=10, rep=100)
        gbs = nbytes / (ms_tri * 1e-3) / 1e9
        print(f"| {op:<14} | {shape:<26} | {ms_ref * 1e3:9.1f} | {ms_tri * 1e3:9.1f} | {ms_ref / ms_tri:6.2f}x | "
              f"{nbytes / 1e6:7.2f} | {gbs:11.0f} | {100 * gbs * 1e9 / bw:5.1f}% | {diff:9.2e} |")


if __name__ == "__main__":
    main()
