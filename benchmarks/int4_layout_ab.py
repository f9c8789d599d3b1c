"""The two int4 weight layouts end to end, one process: K-packed (`DELTASERVE_INT4_MMA=0`) against the fragment layout
of the tensor-core GEMV (the default, kernels/int4_gemm/mma.py), alternating; each with the prefill threshold(s) of
--dequant-min-t (int4_gemm.DEQUANT_MIN_T: from that many tokens a K-packed Linear dequantizes, then cuBLAS; the
fragment layout does so beyond mma.MMA_MAX_T whatever the threshold).

For each layout and round: a random AWQ model of a bench preset (mixed like real checkpoints, or `--full`), decode
ms a step per batch size (`bench_decode`: every sequence at --context tokens) and, with --prefill N, the time to
prefill one N-token prompt. Prints how many Linears took the fragment layout, so a run that moved none says so.

    python benchmarks/int4_layout_ab.py --preset qwen3.5-27b --layers 16 --batch-sizes 1,8,32,64 --prefill 2048
"""
from __future__ import annotations

import argparse
import time

import torch

from deltaserve import LLM
from deltaserve.bench import bench_decode, bench_prefill, preset_config
from deltaserve.kernels import int4_gemm
from deltaserve.layers.linear import QuantLinear


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="qwen3.5-27b")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--batch-sizes", default="1,4")
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=48)
    p.add_argument("--prefill", type=int, default=0, help="also time one prompt of this many tokens")
    p.add_argument("--full", action="store_true", help="awq-full: every projection int4")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--dequant-min-t", default=str(int4_gemm.DEQUANT_MIN_T),
                   help="comma list of int4_gemm.DEQUANT_MIN_T values to run each layout with ('none': the int4 "
                        "GEMMs at every T)")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("int4_layout_ab.py needs a CUDA device")
    batches = [int(b) for b in args.batch_sizes.split(",")]
    min_ts = [None if v == "none" else int(v) for v in args.dequant_min_t.split(",")]
    for rnd in range(args.rounds):
        for fragment, min_t in ((f, m) for f in (False, True) for m in min_ts):
            int4_gemm.USE_MMA = fragment  # read once, when the model's Linears take their layouts
            int4_gemm.DEQUANT_MIN_T = min_t
            t0 = time.perf_counter()
            llm = LLM.from_config(preset_config(args.preset, args.layers), max_num_seqs=max(batches),
                                  max_model_len=max(args.context, args.prefill) + 3 * args.steps + 64,
                                  quantization="awq-full" if args.full else "awq")
            moved = sum(isinstance(m, QuantLinear) and m.mma for m in llm.model.modules())
            row = [f"batch {b} {bench_decode(llm, b, args.context, args.steps) * 1e3:.3f}" for b in batches]
            if args.prefill:
                row.append(f"prefill {args.prefill} {bench_prefill(llm, args.prefill) * 1e3:.2f}")
            name = "fragment" if fragment else "K-packed"
            print(f"{args.preset} {args.layers}L {name:<8} dequant from T={min_t} ({moved} fragment Linears, built in "
                  f"{time.perf_counter() - t0:.0f} s) round {rnd}: " + ", ".join(row) + " ms", flush=True)
            del llm
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
