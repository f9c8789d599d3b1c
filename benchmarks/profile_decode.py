"""Where a decode step's time goes: host work, the captured forward, logits + sampling, and the top kernels.

    python benchmarks/profile_decode.py --preset qwen3.5-9b --batch 1
    python benchmarks/profile_decode.py --preset qwen3.5-35b-a3b --layers 8 --quantization awq --batch 1 --kernels 25

Prints, per decode step (median over --steps), with async scheduling off and then on (the engine's default on CUDA):
  - the wall time of `EngineCore.step()`;
  - the device time of the CUDA-graph replay alone and of logits + sampling alone (replayed back to back, so
    their sum is the step's device floor as the engine launches it);
  - the host time of each engine phase (schedule, plan, staging, launches, reading the samples (which waits for the
    device), bookkeeping), measured around the engine's own methods;
  - with --kernels N, the N kernels with the most device time over the profiled steps (torch.profiler);
  - with --timeline N, one graph replay's kernels in launch order (offset, duration, gap since the kernel before
    ended; a negative gap is overlap under PDL) for the first N, and per kernel name its launches, device time and
    gaps. Run it with DELTASERVE_PDL=0 for each kernel's own time (with PDL a kernel's span includes its wait).
The difference between the step's wall time and its device floor is host time the device waited for.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch


class PhaseTimers:
    """Wraps bound methods of live engine objects and accumulates their host wall time per call."""

    def __init__(self):
        self.seconds: dict[str, list[float]] = {}
        self.on = True

    def wrap(self, obj, attr: str, label: str) -> None:
        inner = getattr(obj, attr)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                if self.on:
                    self.seconds.setdefault(label, []).append(time.perf_counter() - t)
        setattr(obj, attr, timed)

    def medians_ms(self) -> dict[str, float]:
        return {k: statistics.median(v) * 1e3 for k, v in self.seconds.items()}


def start_decoding(llm, batch: int, context: int) -> None:
    from deltaserve.sampling_params import SamplingParams

    eng = llm.engine
    g = torch.Generator().manual_seed(batch)
    params = SamplingParams(temperature=0, max_tokens=100_000, ignore_eos=True)
    for _ in range(batch):
        eng.add_request(torch.randint(0, llm.config.vocab_size, (context,), generator=g).tolist(), params)
    while eng.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in eng.scheduler.running):
        eng.step()
    for _ in range(3):
        eng.step()
    torch.cuda.synchronize()


def replay_timeline(kernels: list[tuple[str, float, float]], split_us: float = 50.0
                    ) -> list[tuple[str, float, float, float]]:
    """kernels: (name, start, end) in µs of back-to-back graph replays, in any order -> the last replay's (a run of
    kernels with no idle gap over split_us) as (name, offset from its first start, duration, gap since the latest
    end before it), in launch order."""
    replays: list[list[tuple[str, float, float]]] = []
    for k in sorted(kernels, key=lambda k: k[1]):
        if not replays or k[1] - max(e for _, _, e in replays[-1]) > split_us:
            replays.append([])
        replays[-1].append(k)
    rows, t0, prev_end = [], None, None
    for name, start, end in replays[-1] if replays else []:
        t0 = start if t0 is None else t0
        rows.append((name, start - t0, end - start, 0.0 if prev_end is None else start - prev_end))
        prev_end = end if prev_end is None else max(prev_end, end)
    return rows


def timeline_totals(rows: list[tuple[str, float, float, float]]) -> list[tuple[str, int, float, float]]:
    """-> per kernel name (launches, summed duration, summed positive gaps before it), most device time first."""
    totals: dict[str, list] = {}
    for name, _, dur, gap in rows:
        t = totals.setdefault(name, [0, 0.0, 0.0])
        t[0], t[1], t[2] = t[0] + 1, t[1] + dur, t[2] + max(gap, 0.0)
    return sorted(((n, c, d, g) for n, (c, d, g) in totals.items()), key=lambda r: -r[2])


def print_timeline(graph: torch.cuda.CUDAGraph, first: int) -> None:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            graph.replay()
            torch.cuda.synchronize()
    kernels = [(e.name, e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    rows = replay_timeline(kernels)
    if not rows:
        print("  timeline: the profiler recorded no kernels")
        return
    span = rows[-1][1] + rows[-1][2]
    print(f"  timeline of one graph replay: {len(rows)} kernels over {span:.1f} µs (offset, duration, gap, µs)")
    for name, offset, dur, gap in rows[:first]:
        print(f"    {offset:8.1f} {dur:7.2f} {gap:+7.2f}  {name[:90]}")
    for name, count, dur, gap in timeline_totals(rows):
        print(f"    {count:4d} x {dur / count:7.2f} = {dur:8.1f} µs (gaps before: {gap:6.1f})  {name[:70]}")


def main() -> None:
    from deltaserve import LLM
    from deltaserve.bench import preset_config, time_cuda
    from deltaserve.worker.model_runner import PendingOutput
    from deltaserve.worker.sampler import SamplingBatch

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="qwen3.5-9b")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--quantization", choices=["awq", "awq-full"], default=None)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--context", type=int, default=1024)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--kernels", type=int, default=0, help="print the top N kernels by device time")
    p.add_argument("--timeline", type=int, default=0, help="print the first N kernels of one graph replay in order")
    args = p.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("profile_decode.py needs a CUDA device")

    llm = LLM.from_config(preset_config(args.preset, args.layers), max_num_seqs=max(args.batch, 1),
                          max_model_len=args.context + args.steps * 3 + 64, quantization=args.quantization)
    eng, runner = llm.engine, llm.runner
    start_decoding(llm, args.batch, args.context)

    timers = PhaseTimers()
    timers.wrap(eng, "step", "step (wall)")
    timers.wrap(eng.scheduler, "schedule", "schedule")
    timers.wrap(runner, "plan", "plan")
    timers.wrap(runner.graphs, "stage", "staging copies")
    timers.wrap(runner.graphs, "run", "graph launch")
    timers.wrap(runner.model, "compute_logits", "logits launch")
    timers.wrap(runner, "_sample", "sample launch")
    timers.wrap(PendingOutput, "result", "read samples")
    timers.wrap(eng.scheduler, "update_after_step", "update")
    host = {}
    for mode in (False, True):
        eng.async_scheduling = mode
        timers.on = False
        for _ in range(3):
            eng.step()
        timers.seconds, timers.on = {}, True
        for _ in range(args.steps):
            eng.step()
        torch.cuda.synchronize()
        host[mode] = timers.medians_ms()
    timers.on = False

    # device-only replays of the step's two halves, on the buffers the last step left behind
    b = next(s for s in runner.graphs.buckets if s >= args.batch)
    graph_ms = time_cuda(runner.graphs.graphs[b].replay, iters=50) * 1e3
    reqs = list(eng.scheduler.running)
    if len(reqs) != args.batch:
        print(f"  note: {len(reqs)} of {args.batch} requests are running (the KV cache holds no more)")
    hidden = runner.graphs.outputs[b][: len(reqs)]
    sbatch = SamplingBatch.from_requests([r.params for r in reqs], [r.prompt_token_ids for r in reqs],
                                         [r.output_token_ids for r in reqs], [None] * len(reqs),
                                         llm.config.vocab_size, llm.device)
    tail_ms = time_cuda(lambda: runner.sampler(llm.model.compute_logits(hidden), sbatch), iters=50) * 1e3

    name = " ".join(part for part in (args.preset, f"{args.layers}L" if args.layers else "", args.quantization) if part)
    print(f"{name} | {torch.cuda.get_device_name()} | decode batch {args.batch}, context {args.context}")
    floor = graph_ms + tail_ms
    print(f"  device: graph replay {graph_ms:.3f} ms + logits/sampling {tail_ms:.3f} ms = {floor:.3f} ms floor")
    for mode, phases in host.items():
        wall = phases.pop("step (wall)")
        print(f"  async scheduling {'on ' if mode else 'off'}: step wall {wall:.3f} ms ({args.batch / wall * 1e3:.1f} "
              f"tok/s, {wall - floor:+.3f} ms over the device floor); host per step (median ms): "
              + ", ".join(f"{k} {v:.3f}" for k, v in phases.items()))

    if args.timeline:
        print_timeline(runner.graphs.graphs[b], args.timeline)
    if args.kernels:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(10):
                eng.step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=args.kernels, max_name_column_width=70))


if __name__ == "__main__":
    main()
