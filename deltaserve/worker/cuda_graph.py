"""CUDA graphs: whole decode steps (CudaGraphRunner) and the token-wise pieces of small prefill and mixed steps
(PiecewiseGraphRunner).

A decode batch of N sequences runs in the smallest bucket B >= N. Rows N..B-1 are padding: state slot -1 and KV
slot -1, which every kernel treats as "read zeros, write nothing", so a padded row never touches a real request's
caches. The captured forward reads its inputs from static buffers this class owns: `stage` copies the step's
per-row values, padding included, into them with one host-to-device copy, `run` the block tables, replays, and
returns the first N rows of the static hidden-state output. (Before, the values went through the staging buffers and
then five device copies and three fills a step: H200, 35B-A3B shapes cut to 8 layers, AWQ, batch 1, 0.752 -> 0.718 ms
a step, the 99th percentile of 400 steps 1.1-3.4 -> 0.74 ms; 9B shapes, 8 layers, 1.50 -> 1.47 ms.)

A step that prefills runs eagerly except for its pieces: the mixers' grids follow the step's sequences, but
everything between them is row-wise, so it can be captured per token count. Without it a short prefill step costs
its ~300 Triton launches and ~130 GEMM calls of host time (~30 ms on the H200 host, for ~7 ms of GPU work at 128
tokens of 9B shapes); with it the mixers' launches remain (a GDN layer's conv and five delta-rule kernels, an
attention layer's one) and a copy a layer.

No garbage collection while graphs are captured (`collected_first`): an LLM dropped while a reference cycle held it
is destroyed whenever the collector next runs, and its graphs' reset during another capture invalidated that capture
(H200: tests/e2e/test_gpu_graphs.py, whose hook on the runner made such a cycle, failed on the MoE checkpoint).
"""
from __future__ import annotations

import contextlib
import functools
import gc
import logging
from typing import Callable

import torch

from .forward_batch import ForwardBatch

logger = logging.getLogger("deltaserve")


@contextlib.contextmanager
def collected_first():
    """Collect garbage now, then none until the block ends: objects a cycle kept (an old LLM's graphs, whose reset is
    illegal mid-capture) go before the capture, not during it."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


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

        # each bucket's per-row inputs in one buffer of 5 rows of B (input ids, positions, KV slots, state slots,
        # context lengths), so a step stages them, padding included, with one host-to-device copy from `host_ints`
        self.ints = {b: torch.tensor(_PADDING, device=device).unsqueeze(1).repeat(1, b) for b in self.buckets}
        self.host_ints = torch.zeros(len(_INT_ROWS) * n, dtype=torch.int64, pin_memory=device.type == "cuda")
        self.cu_seqlens = torch.arange(n + 1, device=device)
        self.block_tables = buf(n, max_blocks, dtype=torch.int32)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[int, torch.Tensor] = {}

    def _batch(self, b: int) -> ForwardBatch:
        input_ids, positions, slot_mapping, state_slots, context_lens = self.ints[b].unbind(0)
        return ForwardBatch(
            input_ids=input_ids, positions=positions, cu_seqlens=self.cu_seqlens[: b + 1],
            context_lens=context_lens, state_slots=state_slots,
            block_tables=self.block_tables[:b], slot_mapping=slot_mapping,
            logits_indices=self.cu_seqlens[:b], query_lens_cpu=[1] * b, context_lens_cpu=[self.max_model_len] * b,
            is_decode=True, max_context_len=self.max_model_len,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        pool = torch.cuda.graph_pool_handle()
        with collected_first():
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

    def can_run(self, num_tokens: int, num_seqs: int) -> bool:
        """Whether a step of these sizes is a decode step that a captured bucket holds."""
        return num_tokens == num_seqs <= self.buckets[-1] and bool(self.graphs)

    def bucket(self, n: int) -> int:
        return next(s for s in self.buckets if s >= n)

    def stage(self, rows: tuple[list[int], list[int], list[int], list[int], list[int]]) -> torch.Tensor:
        """Queue the copy of a decode step's per-row inputs (input ids, positions, KV slots, state slots, context
        lengths; N each) into its bucket's buffer, the padding rows' values after them -> the step's input ids [N]
        (a view the caller may fill further on the device: tokens still in flight). The caller keeps `host_ints`
        from being rewritten before the copy has left it (StagingBuffers.begin / end)."""
        n = len(rows[0])
        b = self.bucket(n)
        host = self.host_ints.numpy()[: len(_INT_ROWS) * b].reshape(len(_INT_ROWS), b)
        for i, (values, pad) in enumerate(zip(rows, _PADDING)):
            host[i, :n] = values
            host[i, n:] = pad
        dst = self.ints[b].view(-1)
        dst.copy_(self.host_ints[: dst.numel()], non_blocking=True)
        return self.ints[b][0, :n]

    @torch.inference_mode()
    def run(self, n: int, block_tables: torch.Tensor) -> torch.Tensor:
        """Replay the bucket of a decode step of N rows staged by `stage` -> hidden states [N, hidden] (a view of a
        static buffer). block_tables: the step's [N, width] int32 on the device."""
        b = self.bucket(n)
        self.block_tables[:n, : block_tables.shape[1]].copy_(block_tables)
        self.graphs[b].replay()
        return self.outputs[b][:n]


# a decode graph's per-row inputs (CudaGraphRunner.ints) and their padding rows' values: a padding row writes nowhere
# (KV slot and state slot -1) and attends to one cached token (context 1, an arbitrary block) so it divides by no zero
_INT_ROWS = ("input_ids", "positions", "slot_mapping", "state_slots", "context_lens")
_PADDING = (0, 0, -1, -1, 1)


# the largest step whose pieces run from graphs. H200, 9B shapes, TTFT of one prompt with pieces up to 1 024 tokens
# against none, one device call: 512 tokens 15.0 / 24.4 ms, 1 024 tokens 28.0 / 27.0 (device-bound by then)
PIECEWISE_MAX_TOKENS = 512


def piece_buckets(max_tokens: int) -> list[int]:
    """16, 32, 64, ... up to max_tokens (which is always one of them)."""
    sizes, b = [], 16
    while b < max_tokens:
        sizes.append(b)
        b *= 2
    return sizes + [max_tokens]


class PiecewiseGraphRunner:
    """Prefill and mixed steps of up to max_tokens tokens: the model's pieces (Qwen3_5ForCausalLM.piece: projections,
    norms, MLP or MoE, RoPE and the KV store, all row-wise) are captured per token-count bucket, one graph per piece,
    and the layers' mixers (GDN conv and delta rule, paged attention) run eagerly between the replays, on the step's
    own batch. A step of T tokens replays the smallest bucket B >= T. The pieces read and write static buffers this
    class owns ([max_tokens, ...] each, shared by the buckets); rows T..B-1 hold whatever an earlier step left there
    (finite values: the buffers start at zero), are computed and dropped (no row reads another), and store their keys
    and values at KV slot -1, nowhere. The mixers see only the first T rows."""

    def __init__(self, model: torch.nn.Module, caches, device: torch.device, max_tokens: int, block_size: int):
        self.model, self.caches, self.device, self.block_size = model, caches, device, block_size
        self.buckets = piece_buckets(max_tokens)
        self.num_layers = len(model.layers)
        self.input_ids = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.positions = torch.zeros(max_tokens, dtype=torch.int64, device=device)
        self.slot_mapping = torch.full((max_tokens,), -1, dtype=torch.int64, device=device)
        self.static: dict[tuple, torch.Tensor] = {}  # (what, index) -> [max_tokens, ...] buffer
        self.keys: list[list[tuple]] = []  # per piece: the static buffers of its results
        self.graphs: dict[int, list[torch.cuda.CUDAGraph]] = {}

    def _kind(self, i: int) -> str:
        return "gdn" if self.model.layers[i].is_linear else "attn"

    def _batch(self, b: int) -> ForwardBatch:
        """One sequence of b tokens over the static token buffers, state slot -1 (its mixers read zero states and
        write none; its attention reads block 0): what the pieces read, and the mixers' input for the warm-up."""
        def dev(values, dtype=torch.int64):
            return torch.tensor(values, dtype=dtype, device=self.device)

        return ForwardBatch(
            input_ids=self.input_ids[:b], positions=self.positions[:b], cu_seqlens=dev([0, b]),
            context_lens=dev([b]), state_slots=dev([-1]),
            block_tables=torch.zeros(1, -(-b // self.block_size), dtype=torch.int32, device=self.device),
            slot_mapping=self.slot_mapping[:b], logits_indices=dev([b - 1]), query_lens_cpu=[b],
            context_lens_cpu=[b], max_context_len=b)

    def _views(self, keys: list[tuple], n: int) -> tuple[torch.Tensor, ...]:
        return tuple(self.static[k][:n] for k in keys)

    def _piece(self, i: int, b: int, batch: ForwardBatch) -> None:
        """Piece i over the first b rows of the static buffers, its results copied into theirs (made on its first run,
        the warm-up's)."""
        mixed = self.static[("mix", self._kind(i - 1))][:b] if i else None
        carry = self._views(self.keys[i - 1], b) if i else ()
        out = self.model.piece(i, mixed, carry, batch, self.caches)
        if len(self.keys) == i:
            self.keys.append([("hidden", 0)] if i == self.num_layers else
                             [("residual", 0)] + [(self._kind(i), j) for j in range(1, len(out))])
        for key, t in zip(self.keys[i], out):
            self._store(key, t, b)

    def _store(self, key: tuple, t: torch.Tensor, n: int) -> None:
        if key not in self.static:
            self.static[key] = t.new_zeros(self.buckets[-1], *t.shape[1:])
        self.static[key][:n].copy_(t)

    def _warm_up(self, b: int) -> None:
        """One eager forward through the static buffers (making them on the first call), so every kernel of the
        bucket is compiled before its capture."""
        batch = self._batch(b)
        for i in range(self.num_layers + 1):
            self._piece(i, b, batch)
            if i < self.num_layers:
                mixed = self.model.mix(i, self._views(self.keys[i], b), batch, self.caches)
                self._store(("mix", self._kind(i)), mixed, b)

    @torch.inference_mode()
    def capture(self) -> None:
        for b in reversed(self.buckets):  # the largest first: it makes the static buffers
            self._warm_up(b)
        for buf in self.static.values():  # the warm-up read block 0 of a cache that may hold anything
            buf.zero_()
        cuda = self.device.type == "cuda"
        pool = torch.cuda.graph_pool_handle() if cuda else None  # one pool: the pieces replay one at a time
        with collected_first():
            for b in reversed(self.buckets):
                batch = self._batch(b)
                self.graphs[b] = [self._record(functools.partial(self._piece, i, b, batch), pool)
                                  for i in range(self.num_layers + 1)]
        if cuda:
            torch.cuda.synchronize(self.device)
        logger.info("captured CUDA graphs of the token-wise pieces for prefill steps of up to %s tokens",
                    self.buckets)

    def _record(self, fn: Callable[[], None], pool) -> torch.cuda.CUDAGraph:
        """fn's launches as a graph (the CPU tests swap in a recorder that replays fn itself)."""
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            fn()
        return graph

    def release(self) -> None:
        if self.graphs and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        for graphs in self.graphs.values():
            for graph in graphs:
                graph.reset()
        self.graphs.clear()

    def can_run(self, batch: ForwardBatch) -> bool:
        return not batch.is_decode and batch.num_tokens <= self.buckets[-1] and bool(self.graphs)

    @torch.inference_mode()
    def run(self, batch: ForwardBatch) -> torch.Tensor:
        """batch: a prefill or mixed ForwardBatch of T tokens -> final-norm hidden states [T, hidden] (a view of a
        static buffer, valid until the next step)."""
        t = batch.num_tokens
        b = next(s for s in self.buckets if s >= t)
        self.input_ids[:t].copy_(batch.input_ids)
        self.positions[:t].copy_(batch.positions)
        self.slot_mapping[:t].copy_(batch.slot_mapping)
        self.slot_mapping[t:b].fill_(-1)
        graphs = self.graphs[b]
        graphs[0].replay()
        for i in range(self.num_layers):
            mixed = self.model.mix(i, self._views(self.keys[i], t), batch, self.caches)
            self._store(("mix", self._kind(i)), mixed, t)
            graphs[i + 1].replay()
        return self.static[("hidden", 0)][:t]
