"""Prefix caching end to end: requests sharing a long prompt prefix, with and without the cache, one process.

Each request is a shared prefix (a system prompt, a conversation so far) plus a few tokens of its own. Without the
cache every request prefills its whole prompt; with it, the first request's snapshots let the others start near
the end of the shared part. Prints the time to first token (requests sent one after another) and the throughput of
a batch sent at once, for both engines (each first runs the same shapes with another prefix, so compilation stays
out), plus how many prompt tokens the cache supplied, and how often the greedy tokens agree.

    python benchmarks/prefix_cache.py --preset qwen3.5-9b --shared 4096 --own 128 --requests 16
"""
from __future__ import annotations

import argparse
import random
import time

from deltaserve import LLM, SamplingParams
from deltaserve.bench import preset_config


def build(args, cached: bool) -> LLM:
    kw = dict(enable_prefix_caching=True) if cached else {}
    max_len = args.shared + args.own + args.output + 16
    # an explicit pool (twice what the requests need) so the two engines can live in one process side by side
    return LLM.from_config(preset_config(args.preset, args.layers), device="cuda", dtype="bfloat16",
                           max_num_seqs=args.requests, max_num_batched_tokens=args.budget, max_model_len=max_len,
                           num_kv_blocks=2 * args.requests * -(-max_len // 16), **kw)


def run(llm: LLM, prompts: list[dict], sp: SamplingParams) -> dict:
    llm.generate(prompts[:1], sp, use_tqdm=False)  # the first request of the shared prefix: fills the cache
    t = time.perf_counter()
    ttft = []
    for p in prompts[1:]:
        s = time.perf_counter()
        llm.generate([p], SamplingParams(max_tokens=1, temperature=0, ignore_eos=True), use_tqdm=False)
        ttft.append(time.perf_counter() - s)
    one_by_one = time.perf_counter() - t
    floor = []
    for p in prompts[1:4]:  # a prompt of the own part alone: what a request costs with nothing before it
        s = time.perf_counter()
        llm.generate([{"prompt_token_ids": p["prompt_token_ids"][-len_own(prompts):]}],
                     SamplingParams(max_tokens=1, temperature=0, ignore_eos=True), use_tqdm=False)
        floor.append(time.perf_counter() - s)
    t = time.perf_counter()
    outs = llm.generate(prompts[1:], sp, use_tqdm=False)
    batch = time.perf_counter() - t
    return dict(ttft_ms=1e3 * sum(ttft) / len(ttft), floor_ms=1e3 * min(floor), one_by_one_s=one_by_one,
                batch_s=batch,
                cached=sum(o.num_cached_tokens for o in outs), tokens=[o.outputs[0].token_ids for o in outs])


def len_own(prompts: list[dict]) -> int:
    """Tokens after the part all prompts share."""
    a, b = prompts[0]["prompt_token_ids"], prompts[1]["prompt_token_ids"]
    return len(a) - next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="qwen3.5-9b")
    p.add_argument("--layers", type=int, default=None, help="cut the preset to this many layers")
    p.add_argument("--shared", type=int, default=4096, help="shared prefix tokens")
    p.add_argument("--own", type=int, default=128, help="tokens of each request's own")
    p.add_argument("--output", type=int, default=16, help="tokens generated per request in the batch run")
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--budget", type=int, default=8192, help="max_num_batched_tokens")
    args = p.parse_args()
    rng = random.Random(0)

    def workload() -> list[dict]:
        shared = [rng.randrange(1000, 100000) for _ in range(args.shared)]
        return [{"prompt_token_ids": shared + [rng.randrange(1000, 100000) for _ in range(args.own)]}
                for _ in range(args.requests + 1)]

    warm, prompts = workload(), workload()
    sp = SamplingParams(max_tokens=args.output, temperature=0, ignore_eos=True)
    res = {}
    for cached in (False, True):
        llm = build(args, cached)
        run(llm, warm, sp)  # the same shapes with another prefix first: kernel compilation stays out of the timing
        res[cached] = run(llm, prompts, sp)
    n = args.requests
    total = n * (args.shared + args.own)
    print(f"{args.preset}{f' ({args.layers} layers)' if args.layers else ''}: {n} requests of {args.shared} shared + "
          f"{args.own} own tokens, {args.output} generated")
    for cached in (False, True):
        r = res[cached]
        print(f"  {'cache on ' if cached else 'cache off'}: TTFT {r['ttft_ms']:8.1f} ms (one at a time; a prompt of "
              f"the own part alone: {r['floor_ms']:.1f} ms), batch of {n} {r['batch_s']:.3f} s, prompt tokens from "
              f"the cache {r['cached']} of {total}")
    agree = sum(a == b for a, b in zip(res[False]["tokens"], res[True]["tokens"]))
    off, on = res[False], res[True]
    print(f"  TTFT {off['ttft_ms'] / on['ttft_ms']:.2f}x, batch {off['batch_s'] / on['batch_s']:.2f}x; greedy outputs "
          f"identical in {agree} of {n} requests (bf16: chunk boundaries move roundings)")


if __name__ == "__main__":
    main()
