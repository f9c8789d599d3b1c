"""CUDA graphs for decode steps: one captured model forward per batch-size bucket, replayed with padded rows.

A decode batch of N sequences runs in the smallest bucket B >= N. Rows N..B-1 are padding: state slot -1 and KV
slot -1, which every kernel treats as "read zeros, write nothing", so a padded row never touches a real request's
caches. The captured forward reads its inputs from static buffers this class owns; `run` copies the step's values
in, replays, and returns the first N rows of the static hidden-state output.
"""
from __future__ import annotations

import logging

import torch

from .forward_batch import ForwardBatch

logger = logging.getLogger("deltaserve")


def graph_buckets(max_num_seqs: int) -> list[int]:
    """1, 2, 4, 8, then every 8 up to 64, every 16 up to 256, every 32 beyond; always including max_num_seqs."""
    sizes, b = [], 1
    while b <= max_num_seqs:
        sizes.append(b)
        b = b * 2 if b < 8 else b + (8 if b < 64 else 16 if b < 256 else 32)
    if sizes[-1] != max_num_seqs:
        sizes.append(max_num_seqs)
    return sizes


class CudaGraphRunner:
    def __init__(self, model: torch.nn.Module, caches, device: torch.device, max_num_seqs: int, max_blocks: int,
                 max_model_len: int):
        self.model, self.caches, self.device = model, caches, device
        self.max_model_len = max_model_len
        self.buckets = graph_buckets(max_num_seqs)
        n = self.buckets[-1]

        def buf(*shape, dtype=torch.int64, fill=0):
            return torch.full(shape, fill, dtype=dtype, device=device)

        self.input_ids, self.positions = buf(n), buf(n)
        self.slot_mapping, self.state_slots = buf(n, fill=-1), buf(n, fill=-1)
        self.context_lens, self.cu_seqlens = buf(n, fill=1), torch.arange(n + 1, device=device)
        self.block_tables = buf(n, max_blocks, dtype=torch.int32)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _batch(self, b: int) -> ForwardBatch:
        return ForwardBatch(
            input_ids=self.input_ids[:b], positions=self.positions[:b], cu_seqlens=self.cu_seqlens[: b + 1],
            context_lens=self.context_lens[:b], state_slots=self.state_slots[:b],
            block_tables=self.block_tables[:b], slot_mapping=self.slot_mapping[:b],
            logits_indices=self.cu_seqlens[:b], query_lens_cpu=[1] * b, context_lens_cpu=[self.max_model_len] * b,
            is_decode=True, max_context_len=self.max_model_len,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        for b in reversed(self.buckets):  # largest first: smaller graphs reuse its memory pool
            batch = self._batch(b)
            for _ in range(2):  # warm-up: Triton compiles and autotunes outside the capture
                self.model(batch, self.caches)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.outputs[b] = self.model(batch, self.caches)
            self.graphs[b] = graph
        torch.cuda.synchronize(self.device)
        logger.info("captured CUDA graphs for decode batch sizes %s", self.buckets)

    def release(self) -> None:
        """Destroy the captured graphs (decode runs eagerly after). Under NCCL this must come before the process
        group is destroyed: a communicator whose collectives sit in a live graph never finishes its teardown
        (pytorch/pytorch#115388; on two H200s rank 0 waited out its 10 s limit and the process ended in SIGABRT)."""
        if self.graphs:
            torch.cuda.synchronize(self.device)
        for graph in self.graphs.values():
            graph.reset()
        self.graphs.clear()
        self.outputs.clear()

    def can_run(self, batch: ForwardBatch) -> bool:
        return batch.is_decode and batch.num_seqs <= self.buckets[-1] and bool(self.graphs)

    @torch.inference_mode()
    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """batch: a decode ForwardBatch of N rows -> hidden states [N, hidden] (a view of a static buffer)."""
        n = batch.num_seqs
        b = next(s for s in self.buckets if s >= n)
        self.input_ids[:n].copy_(batch.input_ids)
        self.positions[:n].copy_(batch.positions)
        self.slot_mapping[:n].copy_(batch.slot_mapping)
        self.state_slots[:n].copy_(batch.state_slots)
        self.context_lens[:n].copy_(batch.context_lens)
        width = batch.block_tables.shape[1]
        self.block_tables[:n, :width].copy_(batch.block_tables)
        # padding rows: write nowhere, attend to one (arbitrary) cached token so no row divides by zero
        self.slot_mapping[n:b].fill_(-1)
        self.state_slots[n:b].fill_(-1)
        self.context_lens[n:b].fill_(1)
        self.graphs[b].replay()
        return self.outputs[b][:n]
