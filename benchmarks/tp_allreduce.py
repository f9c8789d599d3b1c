"""The all-reduce cost of one tensor-parallel decode step, measured on this node's GPUs with NCCL.

A Qwen3.5 decode step under TP runs two all-reduces per decoder layer (after the token mixer's out/o projection and
after the MLP), each of [batch, hidden] in the model dtype, plus one all-gather of the vocab-parallel logits. This
times exactly that sequence, captured in a CUDA graph as the engine replays it, and prints microseconds per
collective and per step, so the TP=2 decode figure of `deltaserve bench --tp 2` can be split into compute and
communication.

    python benchmarks/tp_allreduce.py --preset qwen3.5-27b --tp 2 --batch-sizes 1,16,64
"""
import argparse
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deltaserve.bench import preset_config  # noqa: E402
from deltaserve.worker.distributed import _free_port  # noqa: E402


def step_collectives(batch: int, hidden: int, layers: int, vocab: int, world: int, dtype):
    """The buffers one decode step reduces / gathers, and a function that issues them in order."""
    xs = [torch.randn(batch, hidden, device="cuda", dtype=dtype) for _ in range(2 * layers)]
    width = -(-vocab // world)
    logits = torch.randn(batch, width, device="cuda", dtype=torch.float32)
    parts = [torch.empty_like(logits) for _ in range(world)]

    def run():
        for x in xs:
            dist.all_reduce(x)
        dist.all_gather(parts, logits)
    return run


def time_graph(fn, iters: int = 50) -> float:
    """Milliseconds per replay of fn captured in a CUDA graph."""
    for _ in range(3):
        fn()  # warm-up: NCCL communicators and buffers are set up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def worker(rank: int, world: int, port: int, args) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", rank=rank, world_size=world, device_id=torch.device("cuda", rank))
    cfg = preset_config(args.preset)
    layers = len(cfg.layer_types)
    rows = []
    for batch in args.batch_sizes:
        ms = time_graph(step_collectives(batch, cfg.hidden_size, layers, cfg.vocab_size, world, torch.bfloat16))
        rows.append((batch, ms))
    if rank == 0:
        print(f"{torch.cuda.get_device_name()} x{world}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}, "
              f"{args.preset}: {2 * layers} all-reduces of [B, {cfg.hidden_size}] bf16 + 1 logits all-gather "
              f"per decode step (CUDA graph)")
        print(f"{'batch':>6} {'ms/step':>9} {'us/all-reduce':>14}")
        for batch, ms in rows:
            print(f"{batch:>6} {ms:9.3f} {ms * 1e3 / (2 * layers + 1):14.1f}")
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="qwen3.5-27b")
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--batch-sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    args = parser.parse_args()
    if torch.cuda.device_count() < args.tp:
        sys.exit(f"--tp {args.tp} needs {args.tp} CUDA devices; this machine has {torch.cuda.device_count()}")
    mp.spawn(worker, args=(args.tp, _free_port(), args), nprocs=args.tp)


if __name__ == "__main__":
    main()
