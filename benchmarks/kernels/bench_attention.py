"""Paged attention kernels on a CUDA device, Qwen3.5 full-attention shapes (D=256, H=16, Hkv=4, block_size 16, bf16).

Prefill (fresh causal prompts, 1x8k and 16x1k): TFLOP/s of our paged kernel against torch SDPA's flash backend on
contiguous KV (K/V expanded to H heads), same run, same card. Decode (B = 1/64/256 at contexts 1k/8k/32k): time
against the bandwidth bound = KV bytes read / measured device copy bandwidth. Also store_kv_triton vs the torch
store. Prints one table; `--sweep` also tries tile configs so the defaults can be chosen from data.

`--kv-cache-dtype int8[,int4,fp8]` prints only the quantized-KV comparison instead: decode at context 32k, batch
1/16/64, each kind against the bf16 cache it was quantized from (time per call, KV bytes read with scales and zeros,
bandwidth, speed-up over bf16, max |difference| from the bf16 output; with `--sweep`, each kind under several tile
configs), plus a 2048-token prefill chunk at 32k and the quantizing store.
Decode is timed as CUDA-graph replays (`decode_us`): under plain do_bench a batch-1 call measured the Python
launch of two Triton kernels (55-190 us from process to process), not the GPU. Replays do not flush L2, so a cache
smaller than L2 (batch 1 at context 1k: 4 MiB) reads from it: that row's GB/s is not HBM's.

    python benchmarks/kernels/bench_attention.py [--sweep] [--heads 16 --kv-heads 4] [--kv-cache-dtype int8,int4,fp8]
"""
import argparse

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench, do_bench_cudagraph

from deltaserve.kernels.paged_attention import (allocate_kv, paged_attention_decode, paged_attention_prefill,
                                                store_kv, store_kv_triton)
from deltaserve.kernels.paged_attention.kv_quant import kv_bytes_per_token_head

D, BS, DTYPE = 256, 16, torch.bfloat16
DEVICE = "cuda"
PREFILL_SHAPES = [(1, 8192), (16, 1024)]  # (sequences, tokens each)
DECODE_SHAPES = [(b, c) for b in (1, 64, 256) for c in (1024, 8192, 32768)]


def copy_bandwidth() -> float:
    """Bytes/s moved (read + write) by a 1 GiB device-to-device copy."""
    src = torch.empty(1 << 29, dtype=torch.float16, device=DEVICE)
    dst = torch.empty_like(src)
    ms = do_bench(lambda: dst.copy_(src), warmup=25, rep=200)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3)


def decode_us(fn) -> float:
    """Device time of one decode call in µs, from CUDA-graph replays (the decode path has no host sync)."""
    fn()  # compile and warm the allocator outside the capture
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3


def paged_cache(context_lens: list[int], hkv: int, gen: torch.Generator):
    """-> (k_cache, v_cache [NB, BS, Hkv, D], block_tables [N, max_blocks] int32 over shuffled blocks)."""
    need = [triton.cdiv(c, BS) for c in context_lens]
    nb = sum(need)
    k_cache = torch.empty(nb, BS, hkv, D, dtype=DTYPE, device=DEVICE).normal_(generator=gen)
    v_cache = torch.empty_like(k_cache).normal_(generator=gen)
    perm = torch.randperm(nb, device=DEVICE, generator=gen).to(torch.int32)
    tables = torch.zeros(len(context_lens), max(need), dtype=torch.int32, device=DEVICE)
    start = 0
    for i, n in enumerate(need):
        tables[i, :n] = perm[start: start + n]
        start += n
    return k_cache, v_cache, tables


def gather_dense(cache: torch.Tensor, tables: torch.Tensor, length: int, h: int) -> torch.Tensor:
    """-> [N, H, L, D] contiguous copy of each sequence's KV, kv heads expanded to the H query heads."""
    dense = cache[tables[:, : length // BS].long()].flatten(1, 2)  # [N, L, Hkv, D]
    return dense.repeat_interleave(h // cache.shape[2], dim=2).transpose(1, 2).contiguous()


def bench_prefill(b: int, length: int, h: int, hkv: int, gen: torch.Generator, configs: list[dict]) -> list[str]:
    k_cache, v_cache, tables = paged_cache([length] * b, hkv, gen)
    q = torch.randn(b * length, h, D, dtype=DTYPE, device=DEVICE, generator=gen)
    gate = torch.randn(q.shape, dtype=DTYPE, device=DEVICE, generator=gen)
    lens = [length] * b
    cu = torch.arange(0, b + 1, dtype=torch.int32, device=DEVICE) * length
    ctx = torch.full((b,), length, dtype=torch.int32, device=DEVICE)
    flops = 2 * 2 * b * h * D * length * (length + 1) / 2  # two matmuls, causal half
    qd = q.view(b, length, h, D).transpose(1, 2)
    kd, vd = gather_dense(k_cache, tables, length, h), gather_dense(v_cache, tables, length, h)

    backends = [torch.nn.attention.SDPBackend.FLASH_ATTENTION]

    def sdpa():
        with torch.nn.attention.sdpa_kernel(backends):
            return F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=D ** -0.5)

    try:
        sdpa()
    except RuntimeError as e:  # no flash kernel for this card/shape: say so and time what torch picks
        print(f"# SDPA flash backend unavailable ({str(e).splitlines()[0][:80]}); timing SDPA's default choice")
        backends = [torch.nn.attention.SDPBackend.EFFICIENT_ATTENTION, torch.nn.attention.SDPBackend.MATH]
    ms_sdpa = do_bench(sdpa)
    ref = (sdpa().transpose(1, 2).reshape_as(q).float() * torch.sigmoid(gate.float()))
    rows = []
    for cfg in configs:
        def ours():
            return paged_attention_prefill(q, k_cache, v_cache, tables, cu, ctx, D ** -0.5, gate, lens, lens, **cfg)
        err = (ours().float() - ref).abs().max().item()
        ms = do_bench(ours)
        rows.append(f"prefill {b}x{length:<6} {_cfg(cfg):<28} {ms * 1e3:9.1f} {flops / ms * 1e-9:8.1f} "
                    f"{ms_sdpa * 1e3:9.1f} {flops / ms_sdpa * 1e-9:8.1f} {ms_sdpa / ms:6.2f}  err {err:.1e}")
    del k_cache, v_cache, kd, vd
    torch.cuda.empty_cache()
    return rows


def bench_decode(b: int, ctx_len: int, h: int, hkv: int, gen: torch.Generator, bandwidth: float,
                 configs: list[dict]) -> list[str]:
    kv_bytes = 2 * b * ctx_len * hkv * D * torch.finfo(DTYPE).bits // 8
    torch.cuda.empty_cache()
    if kv_bytes + (2 << 30) > torch.cuda.mem_get_info()[0]:  # + the partials and do_bench's L2-flush buffer
        return [f"decode  B={b:<3} ctx={ctx_len:<6} skipped: {kv_bytes / 2**30:.1f} GiB of KV does not fit"]
    k_cache, v_cache, tables = paged_cache([ctx_len] * b, hkv, gen)
    q = torch.randn(b, h, D, dtype=DTYPE, device=DEVICE, generator=gen)
    gate = torch.randn(q.shape, dtype=DTYPE, device=DEVICE, generator=gen)
    ctx = torch.full((b,), ctx_len, dtype=torch.int32, device=DEVICE)
    bound_us = kv_bytes / bandwidth * 1e6  # HBM moves `bandwidth` bytes/s in all (copy: read + write counted)
    rows = []
    for cfg in configs:
        ms = decode_us(lambda: paged_attention_decode(q, k_cache, v_cache, tables, ctx, D ** -0.5, gate, ctx_len,
                                                      **cfg)) * 1e-3
        rows.append(f"decode  B={b:<3} ctx={ctx_len:<6} {_cfg(cfg):<28} {ms * 1e3:9.1f} "
                    f"{kv_bytes / ms * 1e-6:8.0f} GB/s  bound {bound_us:8.1f} us  "
                    f"{bound_us / (ms * 1e3):5.2f} of bound")
    del k_cache, v_cache
    torch.cuda.empty_cache()
    return rows


def bench_store(t: int, hkv: int, gen: torch.Generator) -> list[str]:
    k_cache, v_cache, _ = paged_cache([t], hkv, gen)
    k, v = (torch.randn(t, hkv, D, dtype=DTYPE, device=DEVICE, generator=gen) for _ in range(2))
    slots = torch.randperm(t, device=DEVICE, generator=gen)
    slots[::7] = -1  # a -1 anywhere makes the torch store filter (and sync on .all())
    ms_t = do_bench(lambda: store_kv_triton(k, v, k_cache, v_cache, slots))
    ms_r = do_bench(lambda: store_kv(k, v, k_cache, v_cache, slots))
    return [f"store_kv T={t:<6} triton {ms_t * 1e3:8.1f} us   torch (index_copy_ + mask sync) {ms_r * 1e3:8.1f} us"]


def quantized_copy(k_cache: torch.Tensor, v_cache: torch.Tensor, kind: str):
    """-> (k, v) QuantizedKV of the same blocks, quantized by the Triton store (no fp32 copy of a 32k x 64 cache)."""
    nb, bs, hkv, d = k_cache.shape
    qk, qv = (allocate_kv(kind, nb, bs, hkv, d, DTYPE, k_cache.device) for _ in range(2))
    slots = torch.arange(nb * bs, device=k_cache.device)
    store_kv_triton(k_cache.view(nb * bs, hkv, d), v_cache.view(nb * bs, hkv, d), qk, qv, slots)
    return qk, qv


def bench_kv_quant_decode(b: int, ctx_len: int, h: int, hkv: int, kinds: list[str], gen: torch.Generator,
                          bandwidth: float, configs: list[dict]) -> list[str]:
    """Decode over a bf16 cache (default config) and over each quantized copy of it under each config: same queries,
    same block tables."""
    k_cache, v_cache, tables = paged_cache([ctx_len] * b, hkv, gen)
    q = torch.randn(b, h, D, dtype=DTYPE, device=DEVICE, generator=gen)
    gate = torch.randn(q.shape, dtype=DTYPE, device=DEVICE, generator=gen)
    ctx = torch.full((b,), ctx_len, dtype=torch.int32, device=DEVICE)
    rows, base_ms, base_out = [], None, None
    for kind in ["auto"] + kinds:
        kc, vc = (k_cache, v_cache) if kind == "auto" else quantized_copy(k_cache, v_cache, kind)
        kv_bytes = 2 * b * ctx_len * hkv * kv_bytes_per_token_head(kind, D, DTYPE)

        for cfg in configs[:1] if kind == "auto" else configs:
            def run():
                return paged_attention_decode(q, kc, vc, tables, ctx, D ** -0.5, gate, ctx_len, **cfg)

            out = run().float()
            ms = decode_us(run) * 1e-3
            if kind == "auto":
                base_ms, base_out = ms, out
            bound_us = kv_bytes / bandwidth * 1e6
            rows.append(f"decode  B={b:<3} ctx={ctx_len:<6} {'bf16' if kind == 'auto' else kind:<5} {_cfg(cfg):<24} "
                        f"{ms * 1e3:9.1f} us {kv_bytes / 2**20:9.1f} MiB {kv_bytes / ms * 1e-6:6.0f} GB/s  "
                        f"{bound_us / (ms * 1e3):5.2f} of bound  x{base_ms / ms:5.2f} vs bf16  "
                        f"max|d| vs bf16 {(out - base_out).abs().max().item():.1e}")
    del k_cache, v_cache
    torch.cuda.empty_cache()
    return rows


def bench_kv_quant_prefill(q_len: int, ctx_len: int, h: int, hkv: int, kinds: list[str], gen: torch.Generator
                           ) -> list[str]:
    k_cache, v_cache, tables = paged_cache([ctx_len], hkv, gen)
    q = torch.randn(q_len, h, D, dtype=DTYPE, device=DEVICE, generator=gen)
    gate = torch.randn(q.shape, dtype=DTYPE, device=DEVICE, generator=gen)
    cu = torch.tensor([0, q_len], dtype=torch.int32, device=DEVICE)
    ctx = torch.tensor([ctx_len], dtype=torch.int32, device=DEVICE)
    flops = 2 * 2 * h * D * q_len * (ctx_len - q_len / 2)
    rows, base_ms = [], None
    for kind in ["auto"] + kinds:
        kc, vc = (k_cache, v_cache) if kind == "auto" else quantized_copy(k_cache, v_cache, kind)
        ms = do_bench(lambda: paged_attention_prefill(q, kc, vc, tables, cu, ctx, D ** -0.5, gate, [q_len],
                                                      [ctx_len]))
        base_ms = base_ms or ms
        rows.append(f"prefill {q_len} of ctx={ctx_len:<6} {'bf16' if kind == 'auto' else kind:<5} {ms * 1e3:9.1f} us "
                    f"{flops / ms * 1e-9:7.1f} TFLOP/s  x{base_ms / ms:5.2f} vs bf16")
    return rows


def bench_kv_quant_store(t: int, hkv: int, kinds: list[str], gen: torch.Generator) -> list[str]:
    k, v = (torch.randn(t, hkv, D, dtype=DTYPE, device=DEVICE, generator=gen) for _ in range(2))
    slots = torch.randperm(t, device=DEVICE, generator=gen)
    rows = []
    for kind in ["auto"] + kinds:
        kc, vc = (allocate_kv(kind, triton.cdiv(t, BS), BS, hkv, D, DTYPE, torch.device(DEVICE)) for _ in range(2))
        ms = do_bench(lambda: store_kv_triton(k, v, kc, vc, slots))
        rows.append(f"store_kv T={t:<6} {'bf16' if kind == 'auto' else kind:<5} {ms * 1e3:8.1f} us")
    return rows


def main_kv_quant(kinds: list[str], h: int, hkv: int, gen: torch.Generator, bandwidth: float, sweep: bool) -> None:
    configs = [{}]
    if sweep:  # the quantized tiles hold 1 (or 1/2) byte an element: wider key tiles keep as many bytes in flight
        configs += [dict(block_n=bn, num_warps=w, num_stages=s) for bn, w, s in
                    [(32, 4, 2), (32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 8, 2), (64, 8, 3),
                     (128, 4, 2), (128, 8, 2), (128, 8, 3), (64, 4, 1)]]
        configs += [dict(partition_size=ps, block_n=bn) for ps, bn in [(64, 64), (128, 64), (256, 64), (128, 128)]]
    for b in (1, 16, 64):
        for row in bench_kv_quant_decode(b, 32768, h, hkv, kinds, gen, bandwidth, configs):
            print(row)
    for row in bench_kv_quant_prefill(2048, 32768, h, hkv, kinds, gen):
        print(row)
    for row in bench_kv_quant_store(8192, hkv, kinds, gen):
        print(row)


def _cfg(cfg: dict) -> str:
    return ",".join(f"{k.replace('num_', '').replace('block_', 'b')}={v}" for k, v in cfg.items()) or "default"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--kv-heads", type=int, default=4)
    ap.add_argument("--sweep", action="store_true", help="also time alternative tile configs")
    ap.add_argument("--kv-cache-dtype", default=None, type=lambda v: v.split(","), metavar="KINDS",
                    help="comma-separated int8,int4,fp8: print only the quantized-KV comparison against bf16")
    args = ap.parse_args()
    bad = [k for k in args.kv_cache_dtype or [] if k not in ("int8", "int4", "fp8")]
    if bad:
        raise SystemExit(f"--kv-cache-dtype takes int8, int4 and fp8 (comma-separated), got {bad[0]!r}")
    if not torch.cuda.is_available():
        raise SystemExit("bench_attention needs a CUDA device")
    h, hkv = args.heads, args.kv_heads
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"H={h} Hkv={hkv} D={D} block_size={BS} {DTYPE}; copy bandwidth {bandwidth / 1e12:.2f} TB/s (r+w)")
    if args.kv_cache_dtype:
        main_kv_quant(args.kv_cache_dtype, h, hkv, gen, bandwidth, args.sweep)
        return
    prefill_cfgs = [{}]
    decode_cfgs = [{}]
    if args.sweep:
        prefill_cfgs += [dict(block_m=bm, block_n=bn, num_warps=w, num_stages=s)
                         for bm, bn, w, s in [(64, 32, 4, 2), (64, 32, 8, 3), (64, 64, 4, 2), (128, 32, 8, 2),
                                              (128, 64, 8, 2), (64, 64, 8, 1)]]
        decode_cfgs += [dict(block_n=bn, num_warps=w, num_stages=s)
                        for bn, w, s in [(16, 4, 3), (64, 4, 2), (32, 8, 3), (32, 4, 4)]]
        decode_cfgs += [dict(partition_size=ps) for ps in (32, 64, 128, 256, 1024)]
    print(f"{'case':<20} {'config':<28} {'us':>9} {'TFLOP/s':>8} {'sdpa us':>9} {'TFLOP/s':>8} {'vs sdpa':>6}")
    for b, length in PREFILL_SHAPES:
        for row in bench_prefill(b, length, h, hkv, gen, prefill_cfgs):
            print(row)
    print(f"{'case':<20} {'config':<28} {'us':>9} {'KV read':>13}")
    for b, ctx_len in DECODE_SHAPES:
        for row in bench_decode(b, ctx_len, h, hkv, gen, bandwidth, decode_cfgs):
            print(row)
    for t in (256, 8192):
        for row in bench_store(t, hkv, gen):
            print(row)


if __name__ == "__main__":
    main()
