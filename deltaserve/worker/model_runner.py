"""ModelRunner: owns the model and its caches; turns a SchedulerOutput into a StepPlan (host lists), the plan into a
ForwardBatch, runs the forward, samples.

Caches: per full-attention layer a (k, v) pair [num_blocks, block_size, Hkv, D] in the model dtype, or (kv_cache_dtype
int8 / int4 / fp8) a pair of QuantizedKV (codes + per-token-per-head scales and zeros, kernels/paged_attention/
kv_quant.py); per GDN layer a
conv state [num_slots, conv_dim, W-1] (model dtype) and a recurrent state [num_slots, HV, K, V] (state dtype). Under
tensor parallelism `cfg` is the rank's shard_config, so each rank's caches hold only its own heads.

Tensor parallelism: rank 0's runner plans each step and hands the plan to `peers` (the other ranks' processes, which
call `run_plan` with it) as it runs it itself (`TPWorkers.run_step`); only rank 0 samples.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..config import ModelConfig
from ..kernels.gated_delta_rule import build_step_tables
from ..kernels.paged_attention import allocate_kv, block_tensors
from ..kernels.paged_attention.kv_quant import PREFILL_DEQUANT_BYTES, kv_bytes_per_token_head
from ..models.qwen3_5 import ModelCaches
from ..outputs import Logprob, Logprobs
from ..runtime.request import Request
from ..runtime.scheduler_output import SchedulerOutput
from .cuda_graph import PIECEWISE_MAX_TOKENS, CudaGraphRunner, PiecewiseGraphRunner
from .forward_batch import ForwardBatch, GdnPrefill
from .sampler import Sampler, SamplingBatch, compute_topk_logprobs


@dataclass
class StepPlan:
    """One step's forward as plain host lists: all a rank needs to run it (what rank 0 sends the other ranks)."""
    input_ids: list[int]  # T token ids
    positions: list[int]  # T positions
    slot_mapping: list[int]  # T flat KV-cache positions
    cu_seqlens: list[int]  # N+1 token offsets
    context_lens: list[int]  # N tokens in the KV cache after this step
    state_slots: list[int]  # N GDN state slots
    block_tables: list[list[int]]  # N lists of KV block ids
    logits_rows: list[int]  # M rows of the hidden states that need logits
    query_lens: list[int]  # N tokens fed per sequence
    slots_to_zero: list[int] = field(default_factory=list)  # state slots to zero before the forward
    copies: list[tuple[int, int, list[int], list[int]]] = field(default_factory=list)  # after the forward, in
    # order: (src slot, dst slot, src blocks, dst blocks) of each n > 1 fork
    restores: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) state slots copied before the forward
    snapshots: list[tuple[int, int]] = field(default_factory=list)  # (src, dst) state slots copied after the forward
    # prefix-cache snapshots the GDN prefill takes inside a chunk: (sequence, token offset in this step's tokens of
    # it, a multiple of 64, dst state slot)
    gdn_snapshots: list[tuple[int, int, int]] = field(default_factory=list)
    # async scheduling: token rows whose id the step still in flight sampled (a placeholder in input_ids), and for
    # each the row of that step's sampled ids holding it; the ids are copied on the device
    inflight_rows: list[int] = field(default_factory=list)
    inflight_src: list[int] = field(default_factory=list)


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)  # request id -> new token
    logprobs: dict[str, Logprobs] = field(default_factory=dict)  # request id -> logprobs of the new token
    sampled_logprob: dict[str, float] = field(default_factory=dict)  # request id -> logprob of the new token
    prompt_logprobs: dict[str, list[Logprobs]] = field(default_factory=dict)  # request id -> next prompt positions

@dataclass
class PendingOutput:
    """A launched step's samples, read on the host by `result()` (async scheduling reads them a step later, while
    the next step runs). Tensors are host copies that are complete once `ready` has fired."""
    out: RunnerOutput  # prompt logprobs, already read
    requests: list  # the Request of each sampled row, in row order
    want_logprobs: list[int | None]  # per row: its params.logprobs
    token_ids: torch.Tensor | None  # [R] int64 sampled ids; None: nothing sampled
    logprobs: torch.Tensor | None  # [R, 1 + k] fp32, or None when no row asked
    logprob_ids: torch.Tensor | None  # [R, 1 + k] int64
    logprob_ranks: torch.Tensor | None  # [R] int64 the sampled token's rank
    ready: torch.cuda.Event | None  # recorded after the device-to-host copies; None on the CPU
    check: Callable[[], None] | None = None  # rank 0 under TP: raises if a worker died during the step
    # (TPWorkers.check_step: its aborted all-reduces left garbage)

    def result(self) -> RunnerOutput:
        """Wait for the samples and return them per request id."""
        out = self.out
        if self.ready is not None:
            self.ready.synchronize()
        if self.check is not None:
            self.check()
        if self.token_ids is None:
            return out
        tokens = self.token_ids.tolist()
        lp_vals = self.logprobs.tolist() if self.logprobs is not None else None
        lp_ids = self.logprob_ids.tolist() if self.logprob_ids is not None else None
        ranks = self.logprob_ranks.tolist() if self.logprob_ranks is not None else None
        for j, req in enumerate(self.requests):
            out.sampled[req.request_id] = tokens[j]
            if lp_vals is not None:
                out.sampled_logprob[req.request_id] = lp_vals[j][0]
                k = self.want_logprobs[j]
                if k is not None:
                    out.logprobs[req.request_id] = _logprob_dict(lp_vals[j][: 1 + k], lp_ids[j][: 1 + k], ranks[j])
        return out


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    """Bytes one KV block takes over all full-attention layers, K and V, scales and zeros included."""
    per_token_head = kv_bytes_per_token_head(kv_cache_dtype, cfg.head_dim, dtype)
    return 2 * len(cfg.full_attention_layers) * block_size * cfg.num_key_value_heads * per_token_head


def state_bytes_per_slot(cfg: ModelConfig, dtype: torch.dtype, state_dtype: torch.dtype) -> int:
    conv = cfg.conv_dim * (cfg.linear_conv_kernel_dim - 1) * torch.empty((), dtype=dtype).element_size()
    rec = (cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim
           * torch.empty((), dtype=state_dtype).element_size())
    return len(cfg.linear_attention_layers) * (conv + rec)


# prompt positions whose log-softmax, ranks and top-k are computed at once: their [rows, V] temporaries (~250 MB at
# Qwen3.5's 248k vocabulary) are what a prompt-logprob step needs beyond the logits, which the memory profile counts;
# all of an 8k-token chunk's rows at once would need 8 GB of fp32 log-softmax and a 2 GB bool on top of them
PROMPT_LOGPROB_ROWS = 256


@torch.inference_mode()
def profile_activation_bytes(model: torch.nn.Module, cfg: ModelConfig, device: torch.device, dtype: torch.dtype,
                             state_dtype: torch.dtype, num_tokens: int, block_size: int,
                             kv_cache_dtype: str = "auto") -> int:
    """Peak CUDA memory of one full step (num_tokens in one sequence, logits for every row, as a prompt-logprobs
    step may need) beyond what is allocated now."""
    n_blocks = -(-num_tokens // block_size)
    caches = _allocate_caches(cfg, device, dtype, state_dtype, n_blocks, block_size, 1, kv_cache_dtype)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    # a quantized cache's prefill may also hold a dequantized copy of its contexts (paged_attention.triton_quant)
    copy = torch.empty(PREFILL_DEQUANT_BYTES if kv_cache_dtype != "auto" else 0, dtype=torch.uint8, device=device)
    ar = torch.arange(num_tokens, device=device)
    batch = ForwardBatch(
        input_ids=ar % cfg.vocab_size, positions=ar, cu_seqlens=torch.tensor([0, num_tokens], device=device),
        context_lens=torch.tensor([num_tokens], device=device), state_slots=torch.zeros(1, dtype=torch.int64,
                                                                                        device=device),
        block_tables=torch.arange(n_blocks, dtype=torch.int32, device=device)[None], slot_mapping=ar,
        logits_indices=ar, query_lens_cpu=[num_tokens], context_lens_cpu=[num_tokens])
    model.compute_logits(model(batch, caches)[batch.logits_indices])
    torch.cuda.synchronize(device)
    peak = torch.cuda.max_memory_allocated(device) - before
    del caches, batch, copy
    torch.cuda.empty_cache()
    return peak


def _allocate_caches(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, state_dtype: torch.dtype,
                     num_kv_blocks: int, block_size: int, num_slots: int, kv_cache_dtype: str = "auto") -> ModelCaches:
    def kv_side():
        return allocate_kv(kv_cache_dtype, num_kv_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim, dtype,
                           device)

    conv_shape = (num_slots, cfg.conv_dim, cfg.linear_conv_kernel_dim - 1)
    rec_shape = (num_slots, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim)
    return ModelCaches(
        kv=[(kv_side(), kv_side()) for _ in cfg.full_attention_layers],
        conv=[torch.zeros(conv_shape, dtype=dtype, device=device) for _ in cfg.linear_attention_layers],
        recurrent=[torch.zeros(rec_shape, dtype=state_dtype, device=device) for _ in cfg.linear_attention_layers],
    )


def _in_order(rows: list[int]) -> bool:
    """Whether rows are 0, 1, ..., len(rows) - 1: a view of the first rows then does what a gather would."""
    return rows == list(range(len(rows)))


def to_device(values: list[int], device: torch.device) -> torch.Tensor:
    """A host list as an int64 device tensor without a device sync (`torch.tensor(..., device=cuda)` waits for the
    stream; a pinned staging copy does not, and the caching host allocator keeps it alive until the copy is done)."""
    t = torch.tensor(values, dtype=torch.int64)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t


class StagingBuffers:
    """Persistent host (pinned on CUDA) and device buffers for the step's index tensors, sized for the largest step,
    so building a batch allocates nothing: values are written into a host slice and copied to the device slice.
    The returned tensors are views that the next step overwrites. On CUDA, `begin()` waits until the previous step's
    copies have left the host buffers (under async scheduling the host runs a step ahead of the device)."""

    def __init__(self, device: torch.device, max_tokens: int, max_seqs: int, max_blocks: int):
        self.device = device
        pin = device.type == "cuda"
        sizes = {"input_ids": max_tokens, "positions": max_tokens, "slot_mapping": max_tokens,
                 "logits_indices": max_tokens + max_seqs, "cu_seqlens": max_seqs + 1, "context_lens": max_seqs,
                 "state_slots": max_seqs, "gdn_cu_seqlens": max_seqs + 1, "inflight_rows": max_seqs,
                 "inflight_src": max_seqs}
        self.host = {k: torch.zeros(n, dtype=torch.int64, pin_memory=pin) for k, n in sizes.items()}
        self.host_tables = torch.zeros((max_seqs, max_blocks), dtype=torch.int32, pin_memory=pin)
        on_host = device.type == "cpu"
        self.dev = self.host if on_host else {k: torch.zeros_like(v, device=device) for k, v in self.host.items()}
        self.dev_tables = self.host_tables if on_host else torch.zeros_like(self.host_tables, device=device)
        self.copied: torch.cuda.Event | None = None  # recorded after the last step's copies (CUDA)

    def begin(self) -> None:
        if self.copied is not None:
            self.copied.synchronize()

    def end(self) -> None:
        if self.device.type == "cuda":
            self.copied = torch.cuda.Event()
            self.copied.record()

    def put(self, name: str, values: list[int]) -> torch.Tensor:
        n = len(values)
        self.host[name].numpy()[:n] = values
        dst = self.dev[name][:n]
        if dst.data_ptr() != self.host[name].data_ptr():
            dst.copy_(self.host[name][:n], non_blocking=True)
        return dst

    def put_tables(self, tables: list[list[int]]) -> torch.Tensor:
        width = max(len(t) for t in tables)
        host = self.host_tables.numpy()
        for i, t in enumerate(tables):
            host[i, : len(t)] = t
        dst = self.dev_tables[: len(tables), :width]
        if self.dev_tables.data_ptr() != self.host_tables.data_ptr():
            dst.copy_(self.host_tables[: len(tables), :width], non_blocking=True)
        return dst


class ModelRunner:
    def __init__(self, cfg: ModelConfig, model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                 num_kv_blocks: int, block_size: int, num_slots: int, state_dtype: torch.dtype,
                 max_num_batched_tokens: int, max_model_len: int, kv_cache_dtype: str = "auto", cache_slots: int = 0):
        """num_slots: state slots of running requests; cache_slots: more after them, for the prefix cache."""
        self.cfg, self.model, self.device, self.dtype = cfg, model, device, dtype
        self.kv_cache_dtype = kv_cache_dtype
        self.block_size, self.num_kv_blocks, self.max_model_len = block_size, num_kv_blocks, max_model_len
        self.staging = StagingBuffers(device, max_num_batched_tokens, num_slots, -(-max_model_len // block_size))
        self.caches = _allocate_caches(cfg, device, dtype, state_dtype, num_kv_blocks, block_size,
                                       num_slots + cache_slots, kv_cache_dtype)
        self.max_num_batched_tokens = max_num_batched_tokens
        self.graphs: CudaGraphRunner | None = None
        self.piecewise: PiecewiseGraphRunner | None = None
        self.sampler = Sampler()
        self.peers = None  # rank 0 under tensor parallelism: TPWorkers, sent every StepPlan
        self.eos_token_ids = cfg.eos_token_ids  # what min_tokens bans: the engine's EOS set (LLM adds the tokenizer's)
        # the last launched step's sampled ids [R] int64 on the device, and the row of each request id in it: the
        # next step reads a token still in flight from here (async scheduling)
        self.last_sampled: torch.Tensor | None = None
        self.last_sampled_rows: dict[str, int] = {}
        # the last SamplingBatch that depends only on its requests' parameters, with (request, params, generator)
        # per row: _sampling_batch reuses it while those stay the same objects
        self._kept_sampling: tuple[list, SamplingBatch] | None = None

    def capture_cuda_graphs(self, max_num_seqs: int, max_model_len: int) -> None:
        """Capture decode forwards for batch-size buckets up to max_num_seqs, and the pieces of prefill and mixed steps
        of up to PIECEWISE_MAX_TOKENS tokens (CUDA only)."""
        self.graphs = CudaGraphRunner(self.model, self.caches, self.device, max_num_seqs,
                                      -(-max_model_len // self.block_size), max_model_len)
        self.graphs.capture()
        self.piecewise = PiecewiseGraphRunner(self.model, self.caches, self.device,
                                              min(PIECEWISE_MAX_TOKENS, self.max_num_batched_tokens), self.block_size)
        self.piecewise.capture()

    def zero_slots(self, slots: list[int]) -> None:
        if not slots:
            return
        idx = to_device(slots, self.device)
        for t in self.caches.conv + self.caches.recurrent:
            t.index_fill_(0, idx, 0)

    def plan(self, sched: SchedulerOutput) -> tuple[StepPlan, list[int]]:
        """-> the step's StepPlan and, per sequence, the row of its first logits row (-1: needs none)."""
        ids, pos, slot_map, cu, ctx, logit_rows, first_row = [], [], [], [0], [], [], []
        inflight_rows, inflight_src = [], []
        bs = self.block_size
        seq_index = {id(s.request): i for i, s in enumerate(sched.seqs)} if sched.inline_snapshots else {}
        for s in sched.seqs:
            req, start, n = s.request, s.start, s.num_new_tokens
            ids += req.token_ids(start, min(start + n, req.num_tokens))
            if start + n > req.num_tokens:  # its last token is the one in flight: a placeholder, filled on device
                inflight_rows.append(len(ids))
                inflight_src.append(self.last_sampled_rows[req.request_id])
                ids.append(0)
            pos += range(start, start + n)
            slot_map += [req.block_ids[p // bs] * bs + p % bs for p in range(start, start + n)]
            rows = self._logit_positions(s)
            first_row.append(len(logit_rows) if rows else -1)
            logit_rows += [cu[-1] + p - start for p in rows]
            cu.append(cu[-1] + n)
            ctx.append(start + n)
        plan = StepPlan(
            input_ids=ids, positions=pos, slot_mapping=slot_map, cu_seqlens=cu, context_lens=ctx,
            state_slots=[s.request.state_slot for s in sched.seqs],
            block_tables=[list(s.request.block_ids) for s in sched.seqs], logits_rows=logit_rows,
            query_lens=[s.num_new_tokens for s in sched.seqs], slots_to_zero=list(sched.slots_to_zero),
            copies=[(f.parent.state_slot, f.child.state_slot, list(f.parent.block_ids), list(f.child.block_ids))
                    for f in sched.forks], inflight_rows=inflight_rows, inflight_src=inflight_src,
            restores=[(c.src, c.dst) for c in sched.restores], snapshots=[(c.src, c.dst) for c in sched.snapshots],
            gdn_snapshots=[(seq_index[id(s.request)], s.offset, s.dst) for s in sched.inline_snapshots])
        return plan, first_row

    def build_batch(self, plan: StepPlan) -> ForwardBatch:
        put = self.staging.put
        self.staging.begin()
        batch = ForwardBatch(
            input_ids=put("input_ids", plan.input_ids), positions=put("positions", plan.positions),
            cu_seqlens=put("cu_seqlens", plan.cu_seqlens), context_lens=put("context_lens", plan.context_lens),
            state_slots=put("state_slots", plan.state_slots), block_tables=self.staging.put_tables(plan.block_tables),
            slot_mapping=put("slot_mapping", plan.slot_mapping), logits_indices=put("logits_indices", plan.logits_rows),
            query_lens_cpu=plan.query_lens, context_lens_cpu=plan.context_lens,
            is_decode=len(plan.input_ids) == len(plan.query_lens), max_context_len=max(plan.context_lens),
        )
        self._fill_inflight(batch.input_ids, plan)
        if not batch.is_decode:
            self._split_mixed(batch, plan)
        self.staging.end()
        return batch

    def _fill_inflight(self, input_ids: torch.Tensor, plan: StepPlan) -> None:
        """Write the tokens still in flight (sampled by the step before, not yet read by the host) into the step's
        input ids on the device."""
        n = len(plan.inflight_rows)
        if n and _in_order(plan.inflight_rows) and _in_order(plan.inflight_src):  # steady decode: one copy
            input_ids[:n].copy_(self.last_sampled[:n])
        elif n:
            src = self.last_sampled.index_select(0, self.staging.put("inflight_src", plan.inflight_src))
            input_ids.index_copy_(0, self.staging.put("inflight_rows", plan.inflight_rows), src)

    def _run_decode_graph(self, plan: StepPlan) -> torch.Tensor:
        """A decode step on its captured graph: its per-row inputs go straight into the graph's buffers (one copy,
        CudaGraphRunner.stage), the block tables through the staging buffers -> hidden states [N, hidden]."""
        self.staging.begin()
        input_ids = self.graphs.stage((plan.input_ids, plan.positions, plan.slot_mapping, plan.state_slots,
                                       plan.context_lens))
        tables = self.staging.put_tables(plan.block_tables)
        self._fill_inflight(input_ids, plan)
        self.staging.end()
        return self.graphs.run(len(plan.query_lens), tables)

    def _split_mixed(self, batch: ForwardBatch, plan: StepPlan) -> None:
        """A mixed step's leading one-token sequences (running decodes come first) go to the decode kernels of the
        GDN layers and of attention; the rest to the chunked / varlen paths, with offsets (and GDN chunk tables) of
        their own."""
        d = next((i for i, n in enumerate(plan.query_lens) if n != 1), len(plan.query_lens))
        rest = plan.query_lens[d:]
        batch.decode_rows = d
        if self.cfg.linear_attention_layers:
            cu = batch.cu_seqlens if d == 0 else self.staging.put("gdn_cu_seqlens",
                                                                   [c - d for c in plan.cu_seqlens[d:]])
            snaps = tuple((i - d, offset, slot) for i, offset, slot in plan.gdn_snapshots)
            batch.gdn_prefill = GdnPrefill(cu, batch.state_slots[d:], rest,
                                           build_step_tables(rest, self.device, snaps), snaps)

    @staticmethod
    def _logit_positions(s) -> list[int]:
        """Positions (in the sequence) whose logits this step needs: prompt positions still owed a prompt
        logprob (position p predicts token p+1), then the last position when sampling."""
        req = s.request
        rows = []
        if req.wants_prompt_logprobs:
            first = max(s.start, len(req.prompt_logprobs) - 1)
            rows = list(range(first, min(s.start + s.num_new_tokens, req.num_prompt_tokens - 1)))
        last = s.start + s.num_new_tokens - 1
        if s.sample and last not in rows:
            rows.append(last)
        return rows

    def release_graphs(self) -> None:
        """Destroy the CUDA graphs (before leaving a tensor-parallel group: CudaGraphRunner.release)."""
        for graphs in (self.graphs, self.piecewise):
            if graphs is not None:
                graphs.release()

    @torch.inference_mode()
    def run_plan(self, plan: StepPlan) -> torch.Tensor:
        """Zero new slots (or restore cached prefix states into them), run the forward, make the prefix snapshots
        and the fork copies -> logits [M, V] fp32 (every rank)."""
        self.zero_slots(plan.slots_to_zero)
        self.copy_states(plan.restores)
        rows = plan.logits_rows
        if self.graphs is not None and self.graphs.can_run(len(plan.input_ids), len(plan.query_lens)):
            hidden = self._run_decode_graph(plan)
            indices = None if _in_order(rows) else to_device(rows, self.device)
        else:
            batch = self.build_batch(plan)
            if self.piecewise is not None and self.piecewise.can_run(batch):
                hidden = self.piecewise.run(batch)
            else:
                hidden = self.model(batch, self.caches)
            indices = batch.logits_indices
        # a decode step samples every row in order: its hidden rows as they are, no gather launch
        last = hidden[:len(rows)] if _in_order(rows) else hidden[indices]
        logits = self.model.compute_logits(last)
        self.copy_states(plan.snapshots)
        for src_slot, dst_slot, src_blocks, dst_blocks in plan.copies:
            self.copy_sequence(src_slot, dst_slot, src_blocks, dst_blocks)
        return logits

    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        """Run one step and read its samples (synchronous)."""
        return self.launch(sched).result()

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput) -> PendingOutput:
        """Queue one step's forward and sampling on the device; the samples are read by `result()`. Prompt logprobs
        are read here (a host sync, on prompt-logprob steps only)."""
        plan, first_row = self.plan(sched)
        # [M, V] fp32; under TP the workers run the same plan (TPWorkers.run_step: a step left part-way on rank 0
        # gives the group up, since the ranks' collectives would no longer pair)
        logits = self.run_plan(plan) if self.peers is None else self.peers.run_step(plan, self.run_plan)
        out = RunnerOutput()
        self._prompt_logprobs(sched, logits, first_row, out)
        rows = {s.request.request_id: first_row[i] + len(self._logit_positions(s)) - 1
                for i, s in enumerate(sched.seqs) if s.sample}
        samplers = [(s.request, rows[s.request.request_id]) for s in sched.seqs if s.sample]
        samplers += [(f.child, rows[f.parent.request_id]) for f in sched.forks]
        if not samplers:
            return PendingOutput(out, [], [], token_ids=None, logprobs=None, logprob_ids=None, logprob_ranks=None,
                                 ready=None, check=self._check)
        return self._sample(samplers, logits, out)

    def copy_states(self, pairs: list[tuple[int, int]]) -> None:
        """Copy every GDN layer's conv and recurrent state from slot src to slot dst, for each (src, dst); the dst
        slots are distinct (a prefix-cache slot is never handed out twice in one step)."""
        if not pairs:
            return
        src, dst = (to_device([p[i] for p in pairs], self.device) for i in (0, 1))
        for t in self.caches.conv + self.caches.recurrent:
            t.index_copy_(0, dst, t.index_select(0, src))

    def copy_sequence(self, src_slot: int, dst_slot: int, src_blocks: list[int], dst_blocks: list[int]) -> None:
        """Copy a GDN state slot and KV blocks (a fork of n > 1 samples; dst has as many blocks as src)."""
        self.copy_states([(src_slot, dst_slot)])
        if src_blocks:
            s_idx, d_idx = to_device(src_blocks, self.device), to_device(dst_blocks, self.device)
            for k, v in self.caches.kv:
                for t in block_tensors(k) + block_tensors(v):  # a quantized side: codes, scales, zeros
                    t.index_copy_(0, d_idx, t.index_select(0, s_idx))

    def _prompt_logprobs(self, sched: SchedulerOutput, logits: torch.Tensor, first_row: list[int],
                         out: RunnerOutput) -> None:
        for i, s in enumerate(sched.seqs):
            req = s.request
            if not req.wants_prompt_logprobs or first_row[i] < 0:
                continue
            positions = [p for p in self._logit_positions(s) if p < req.num_prompt_tokens - 1]
            if not positions:
                continue
            targets = torch.tensor([req.prompt_token_ids[p + 1] for p in positions], device=logits.device)
            got = out.prompt_logprobs[req.request_id] = []
            for c in range(0, len(positions), PROMPT_LOGPROB_ROWS):
                rows = logits[first_row[i] + c: first_row[i] + min(c + PROMPT_LOGPROB_ROWS, len(positions))]
                vals, toks, ranks = compute_topk_logprobs(torch.log_softmax(rows, dim=-1), req.params.prompt_logprobs,
                                                          targets[c: c + PROMPT_LOGPROB_ROWS])
                got += [_logprob_dict(v, t, r) for v, t, r in zip(vals.tolist(), toks.tolist(), ranks.tolist())]

    def _sample(self, samplers: list, logits: torch.Tensor, out: RunnerOutput) -> PendingOutput:
        """samplers: (request, its logits row) pairs. Queues the sampler and the copies of its results to the host."""
        reqs = [r for r, _ in samplers]
        row_ids = [row for _, row in samplers]
        whole = len(row_ids) == logits.shape[0] and _in_order(row_ids)
        rows = logits if whole else logits[to_device(row_ids, self.device)]
        res = self.sampler(rows, self._sampling_batch(reqs))
        self.last_sampled, self.last_sampled_rows = res.token_ids, {r.request_id: j for j, r in enumerate(reqs)}
        host = [t.to("cpu", non_blocking=True) if t is not None else None
                for t in (res.token_ids, res.logprobs, res.logprob_token_ids, res.logprob_ranks)]
        ready = None
        if self.device.type == "cuda":
            ready = torch.cuda.Event()
            ready.record()
        return PendingOutput(out, reqs, [r.params.logprobs for r in reqs], *host, ready, self._check)

    def _sampling_batch(self, reqs: list[Request]) -> SamplingBatch:
        """The rows' SamplingBatch. One that depends on nothing but the requests' parameters (no penalties, no
        banned tokens this step, no grammar) is kept and reused while the same requests sample in the same order:
        steady decode then builds and copies none (~0.1-0.2 ms of host time a step at batch 1 on the H200's host)."""
        banned = [_banned(r, self.eos_token_ids, self.cfg.vocab_size) for r in reqs]
        grammars = [r.grammar for r in reqs]
        static = not any(banned) and all(g is None for g in grammars) and all(map(_no_penalties, reqs))
        key = [(r, r.params, r.generator) for r in reqs]
        kept = self._kept_sampling
        if static and kept is not None and len(kept[0]) == len(key) and all(
                a is b for old, new in zip(kept[0], key) for a, b in zip(old, new)):
            return kept[1]
        sbatch = SamplingBatch.from_requests(
            [r.params for r in reqs], [r.prompt_token_ids for r in reqs], [r.output_token_ids for r in reqs],
            [r.generator for r in reqs], self.cfg.vocab_size, self.device, banned if any(banned) else None,
            grammars if any(g is not None for g in grammars) else None,
        )
        self._kept_sampling = (key, sbatch) if static else None
        return sbatch

    @property
    def _check(self) -> Callable[[], None] | None:
        return self.peers.check_step if self.peers is not None else None


def _not_yet(req: Request, eos_token_ids: tuple[int, ...], vocab_size: int) -> list[int]:
    """The tokens `req` may not sample now: while it has fewer than min_tokens outputs (a token still in flight under
    async scheduling counts), EOS (ignore_eos too, as vLLM: its min_tokens bans every id in _all_stop_token_ids, EOS
    included whatever ignore_eos says) and its stop_token_ids. A grammar decides alone where its text may end
    (structured outputs ignore min_tokens)."""
    p = req.params
    if req.grammar is not None or len(req.output_token_ids) + req.num_inflight >= p.min_tokens:
        return []
    return [t for t in (*eos_token_ids, *p.stop_token_ids) if t < vocab_size]


def _no_penalties(req: Request) -> bool:
    """Whether req's sampling reads none of its tokens so far (no repetition, presence or frequency penalty)."""
    p = req.params
    return p.repetition_penalty == 1.0 and p.presence_penalty == 0.0 and p.frequency_penalty == 0.0


def _banned(req: Request, eos_token_ids: tuple[int, ...], vocab_size: int) -> list[int]:
    """What `req` may not sample this step: _not_yet's tokens and its bad words' endings. Where those would leave none
    of its allowed_token_ids, the bad words give way for the step (add_request refuses the cases known up front)."""
    not_yet, bad = _not_yet(req, eos_token_ids, vocab_size), _bad_word_ends(req, vocab_size)
    allowed = req.params.allowed_token_ids
    if bad and allowed and set(allowed) <= set(not_yet).union(bad):
        return not_yet
    return not_yet + bad


def _bad_word_ends(req: Request, vocab_size: int) -> list[int]:
    """The last token of each of req's bad words (runtime Request.bad_word_ids) whose other tokens end its output now;
    a one-token word always. The engine reads every sample of such a request before staging its next step (async
    scheduling), so the output here is complete."""
    out = req.output_token_ids
    return [ids[-1] for ids in req.bad_word_ids
            if ids[-1] < vocab_size and len(out) >= len(ids) - 1 and out[len(out) - len(ids) + 1:] == ids[:-1]]


def _logprob_dict(vals: list[float], toks: list[int], rank: int) -> Logprobs:
    """One position's 1 + k values and ids (the actual token first, with its rank over the vocabulary, then the top
    k in order) -> {token id: Logprob}, the actual token once: where it is also in the top k, that entry (rank = its
    place) wins, as in vLLM's append_logprobs_for_next_position; the decoded texts come later (engine_core)."""
    d = {toks[0]: Logprob(vals[0], rank)}
    for i, (t, v) in enumerate(zip(toks[1:], vals[1:]), start=1):
        d[t] = Logprob(v, i)
    return d
