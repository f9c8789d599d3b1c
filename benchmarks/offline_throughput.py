"""Offline throughput: N random-token prompts, all submitted at t=0, through LLM.generate.

Reports requests/s, input / output / total tokens/s, and TTFT / TPOT percentiles from each RequestOutput's
metrics (TTFT: arrival to the end of the step that sampled the first token; TPOT: time per output token after
the first, per request). Runs on CPU with the embedded tiny checkpoint and on GPU with any checkpoint:

    python benchmarks/offline_throughput.py --num-prompts 64 --input-len 128 --output-len 32
    python benchmarks/offline_throughput.py --preset qwen3.5-9b --num-prompts 1000 --input-len 1024 \
        --output-len 128 --max-num-seqs 512 --max-num-batched-tokens 16384 --step-stats

--step-stats also splits the wall time by step kind (decode-only, prefill-only, mixed): steps, time, and the
prefill tokens and decode rows they carried, to show where a run's time goes. --kernels N profiles steps 20-29 of the
run (torch.profiler; in the profile above those are mixed prefill+decode steps) and prints the N kernels with the most
device time.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np

from deltaserve.bench import PRESETS
from deltaserve.cli import positive_int


def sample_lengths(rng: np.random.Generator, n: int, mean: int, ratio: float) -> list[int]:
    lo, hi = max(1, int(mean * (1 - ratio))), max(1, int(mean * (1 + ratio)))
    return rng.integers(lo, hi + 1, size=n).tolist()


class StepStats:
    """Wraps the engine's `step` and the model runner's `launch` and accumulates wall time, prefill tokens and decode
    rows per kind of the step each `step()` call launched. Under async scheduling a call reads the previous step's
    samples, so its wall time is the device time of the step before it: the split is exact in steady runs of one
    kind and off by a step at each change of kind."""

    def __init__(self, engine):
        self.rows: dict[str, list[float]] = {}  # kind -> [steps, seconds, prefill tokens, decode rows]
        self._launched: tuple[str, int, int] | None = None
        runner, step, launch = engine.runner, engine.step, engine.runner.launch

        def launch_and_note(sched):
            decode = sum(1 for s in sched.seqs if s.num_new_tokens == 1 and s.start >= s.request.num_prompt_tokens)
            prefill = sched.num_tokens - decode
            self._launched = ("mixed" if prefill and decode else ("prefill" if prefill else "decode"), prefill, decode)
            return launch(sched)

        def timed_step(*args, **kwargs):
            self._launched = None
            t = time.perf_counter()
            out = step(*args, **kwargs)
            dt = time.perf_counter() - t
            if self._launched is not None:
                kind, prefill, decode = self._launched
                row = self.rows.setdefault(kind, [0, 0.0, 0, 0])
                row[0] += 1
                row[1] += dt
                row[2] += prefill
                row[3] += decode
            return out
        runner.launch, engine.step = launch_and_note, timed_step
        self._engine, self._step = engine, timed_step

    def profile_window(self, first: int, count: int, top: int) -> None:
        """Run torch.profiler over `count` step() calls starting at call `first`; print the top kernels after them."""
        from torch.profiler import ProfilerActivity, profile

        step, calls = self._step, [0]

        def profiled_step(*args, **kwargs):
            calls[0] += 1
            if calls[0] == first:
                self._prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                self._prof.__enter__()
            out = step(*args, **kwargs)
            if calls[0] == first + count - 1:
                self._prof.__exit__(None, None, None)
                print(f"kernels over step() calls {first}-{first + count - 1}:")
                print(self._prof.key_averages().table(sort_by="self_device_time_total", row_limit=top,
                                                      max_name_column_width=70))
            return out
        self._engine.step = profiled_step

    def table(self) -> str:
        lines = [f"{'step kind':>10} {'steps':>6} {'seconds':>8} {'ms/step':>8} {'prefill tok':>12} "
                 f"{'decode rows':>12} {'prefill tok/s':>14}"]
        for kind, (n, sec, pre, dec) in sorted(self.rows.items()):
            lines.append(f"{kind:>10} {n:6d} {sec:8.2f} {sec / n * 1e3:8.1f} {pre:12d} {dec:12d} "
                         f"{pre / sec if sec else 0:14.0f}")
        return "\n".join(lines)


def run(args) -> dict:
    from deltaserve import LLM, SamplingParams
    from deltaserve.cli import resolve_model

    kw = dict(device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs, async_scheduling=args.async_scheduling,
              max_num_batched_tokens=args.max_num_batched_tokens, state_dtype=args.state_dtype,
              kv_cache_dtype=args.kv_cache_dtype,
              max_model_len=int((args.input_len + args.output_len) * (1 + args.range_ratio)) + 8)
    if args.preset:
        from deltaserve.bench import preset_config

        llm = LLM.from_config(preset_config(args.preset), **kw)
    else:
        llm = LLM(model=resolve_model(args.model), **kw)
    rng = np.random.default_rng(args.seed)
    vocab = llm.tokenizer.vocab_size if llm.tokenizer else llm.config.vocab_size
    in_lens = sample_lengths(rng, args.num_prompts, args.input_len, args.range_ratio)
    out_lens = sample_lengths(rng, args.num_prompts, args.output_len, args.range_ratio)
    prompts = [{"prompt_token_ids": rng.integers(0, min(vocab, llm.config.vocab_size), size=n).tolist()}
               for n in in_lens]
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True) for m in out_lens]
    # warm-up: one short request so first-call overheads stay out of the numbers
    llm.generate([{"prompt_token_ids": [1, 2, 3]}], SamplingParams(max_tokens=2), use_tqdm=False)

    stats = StepStats(llm.engine) if args.step_stats or args.kernels else None
    if args.kernels:
        stats.profile_window(20, 10, args.kernels)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    ms = [o.metrics for o in outs]
    ntok = [len(o.outputs[0].token_ids) for o in outs]
    ttft = np.array([m.first_token_time - m.arrival_time for m in ms]) * 1e3
    tpot = np.array([(m.finished_time - m.first_token_time) / (n - 1) for m, n in zip(ms, ntok) if n > 1]) * 1e3
    n_in, n_out = sum(in_lens), sum(ntok)
    if args.step_stats:
        print(stats.table())
    return {
        "device": str(llm.device), "dtype": str(llm.dtype).replace("torch.", ""), "num_prompts": args.num_prompts,
        "elapsed_s": elapsed, "requests_per_s": args.num_prompts / elapsed, "input_tok_per_s": n_in / elapsed,
        "output_tok_per_s": n_out / elapsed, "total_tok_per_s": (n_in + n_out) / elapsed,
        "ttft_ms_p50": float(np.percentile(ttft, 50)), "ttft_ms_p99": float(np.percentile(ttft, 99)),
        "tpot_ms_p50": float(np.percentile(tpot, 50)) if tpot.size else float("nan"),
        "tpot_ms_p99": float(np.percentile(tpot, 99)) if tpot.size else float("nan"),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint dir (default: the embedded tiny checkpoint)")
    p.add_argument("--preset", default=None, choices=list(PRESETS),
                   help="random weights of a published shape (see deltaserve bench)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-prompts", type=positive_int, default=64)
    p.add_argument("--input-len", type=positive_int, default=128)
    p.add_argument("--output-len", type=positive_int, default=32)
    p.add_argument("--range-ratio", type=float, default=0.0, help="lengths uniform in mean*(1±ratio)")
    p.add_argument("--max-num-seqs", type=positive_int, default=64)
    p.add_argument("--max-num-batched-tokens", type=positive_int, default=2048)
    p.add_argument("--state-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="GDN recurrent state between steps (default: the checkpoint's mamba_ssm_dtype)")
    p.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "int8", "int4", "fp8"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--step-stats", action="store_true", help="also print wall time per step kind")
    p.add_argument("--kernels", type=int, default=0, help="profile steps 20-29; print the top N kernels")
    p.add_argument("--async-scheduling", default=None, action=argparse.BooleanOptionalAction,
                   help="overlap host and device work (default: the engine's, on for CUDA)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    args = p.parse_args()
    try:
        r = run(args)
    except ValueError as e:  # a bad checkpoint, device or size: one line, as the deltaserve CLI says it
        p.exit(2, f"error: {e}\n")
    if args.json:
        print(json.dumps(r))
        return
    for k, v in r.items():
        print(f"{k:>18}: {v:.2f}" if isinstance(v, float) else f"{k:>18}: {v}")


if __name__ == "__main__":
    main()
