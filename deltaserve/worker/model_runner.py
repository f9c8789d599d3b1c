"""ModelRunner: owns the model and its caches; turns a SchedulerOutput into a ForwardBatch, runs the forward, samples.

Caches: per full-attention layer a (k, v) pair [num_blocks, block_size, Hkv, D] in the model dtype; per GDN layer a
conv state [num_slots, conv_dim, W-1] (model dtype) and a recurrent state [num_slots, HV, K, V] (state dtype).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..config import ModelConfig
from ..models.qwen3_5 import ModelCaches
from ..runtime.scheduler_output import SchedulerOutput
from .forward_batch import ForwardBatch
from .sampler import Sampler, SamplingBatch, compute_topk_logprobs

Logprobs = dict[int, float]


@dataclass
class RunnerOutput:
    sampled: dict[str, int] = field(default_factory=dict)  # request id -> new token
    logprobs: dict[str, Logprobs] = field(default_factory=dict)  # request id -> logprobs of the new token
    sampled_logprob: dict[str, float] = field(default_factory=dict)  # request id -> logprob of the new token
    prompt_logprobs: dict[str, list[Logprobs]] = field(default_factory=dict)  # request id -> next prompt positions


def kv_bytes_per_block(cfg: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * len(cfg.full_attention_layers) * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


def state_bytes_per_slot(cfg: ModelConfig, dtype: torch.dtype, state_dtype: torch.dtype) -> int:
    conv = cfg.conv_dim * (cfg.linear_conv_kernel_dim - 1) * torch.empty((), dtype=dtype).element_size()
    rec = (cfg.linear_num_value_heads * cfg.linear_key_head_dim * cfg.linear_value_head_dim
           * torch.empty((), dtype=state_dtype).element_size())
    return len(cfg.linear_attention_layers) * (conv + rec)


class ModelRunner:
    def __init__(self, cfg: ModelConfig, model: torch.nn.Module, device: torch.device, dtype: torch.dtype,
                 num_kv_blocks: int, block_size: int, num_slots: int, state_dtype: torch.dtype):
        self.cfg, self.model, self.device, self.dtype = cfg, model, device, dtype
        self.block_size = block_size
        kv_shape = (num_kv_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        conv_shape = (num_slots, cfg.conv_dim, cfg.linear_conv_kernel_dim - 1)
        rec_shape = (num_slots, cfg.linear_num_value_heads, cfg.linear_key_head_dim, cfg.linear_value_head_dim)
        self.caches = ModelCaches(
            kv=[(torch.zeros(kv_shape, dtype=dtype, device=device), torch.zeros(kv_shape, dtype=dtype, device=device))
                for _ in cfg.full_attention_layers],
            conv=[torch.zeros(conv_shape, dtype=dtype, device=device) for _ in cfg.linear_attention_layers],
            recurrent=[torch.zeros(rec_shape, dtype=state_dtype, device=device) for _ in cfg.linear_attention_layers],
        )
        self.sampler = Sampler()

    def zero_slots(self, slots: list[int]) -> None:
        if not slots:
            return
        idx = torch.tensor(slots, device=self.device)
        for t in self.caches.conv + self.caches.recurrent:
            t.index_fill_(0, idx, 0)

    def build_batch(self, sched: SchedulerOutput) -> tuple[ForwardBatch, list[int]]:
        """-> the ForwardBatch and, per sequence, the row of its first logits row (-1: needs none)."""
        ids, pos, slot_map, cu, ctx, logit_rows, first_row = [], [], [], [0], [], [], []
        bs = self.block_size
        max_blocks = max(len(s.request.block_ids) for s in sched.seqs)
        tables = torch.zeros((len(sched.seqs), max_blocks), dtype=torch.int32)
        for i, s in enumerate(sched.seqs):
            req, start, n = s.request, s.start, s.num_new_tokens
            ids += req.token_ids(start, start + n)
            pos += range(start, start + n)
            slot_map += [req.block_ids[p // bs] * bs + p % bs for p in range(start, start + n)]
            tables[i, : len(req.block_ids)] = torch.tensor(req.block_ids, dtype=torch.int32)
            rows = self._logit_positions(s)
            first_row.append(len(logit_rows) if rows else -1)
            logit_rows += [cu[-1] + p - start for p in rows]
            cu.append(cu[-1] + n)
            ctx.append(start + n)
        dev = self.device

        def t(x):
            return torch.tensor(x, dtype=torch.int64, device=dev)

        batch = ForwardBatch(
            input_ids=t(ids), positions=t(pos), cu_seqlens=t(cu), context_lens=t(ctx),
            state_slots=t([s.request.state_slot for s in sched.seqs]), block_tables=tables.to(dev),
            slot_mapping=t(slot_map), logits_indices=t(logit_rows),
            query_lens_cpu=[s.num_new_tokens for s in sched.seqs], context_lens_cpu=ctx,
        )
        return batch, first_row

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

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> RunnerOutput:
        self.zero_slots(sched.slots_to_zero)
        batch, first_row = self.build_batch(sched)
        hidden = self.model(batch, self.caches)
        logits = self.model.compute_logits(hidden[batch.logits_indices])  # [M, V] fp32
        out = RunnerOutput()
        self._prompt_logprobs(sched, logits, first_row, out)
        samplers = [(s, first_row[i] + len(self._logit_positions(s)) - 1)
                    for i, s in enumerate(sched.seqs) if s.sample]
        if samplers:
            self._sample(samplers, logits, out)
        return out

    def _prompt_logprobs(self, sched: SchedulerOutput, logits: torch.Tensor, first_row: list[int],
                         out: RunnerOutput) -> None:
        for i, s in enumerate(sched.seqs):
            req = s.request
            if not req.wants_prompt_logprobs or first_row[i] < 0:
                continue
            positions = [p for p in self._logit_positions(s) if p < req.num_prompt_tokens - 1]
            if not positions:
                continue
            rows = logits[first_row[i]: first_row[i] + len(positions)]
            targets = torch.tensor([req.prompt_token_ids[p + 1] for p in positions], device=logits.device)
            lp = torch.log_softmax(rows, dim=-1)
            vals, toks = compute_topk_logprobs(lp, req.params.prompt_logprobs, targets)
            out.prompt_logprobs[req.request_id] = _to_dicts(vals, toks)

    def _sample(self, samplers, logits: torch.Tensor, out: RunnerOutput) -> None:
        reqs = [s.request for s, _ in samplers]
        rows = logits[torch.tensor([r for _, r in samplers], device=logits.device)]
        sbatch = SamplingBatch.from_requests(
            [r.params for r in reqs], [r.prompt_token_ids for r in reqs], [r.output_token_ids for r in reqs],
            [r.generator for r in reqs], self.cfg.vocab_size, self.device,
        )
        res = self.sampler(rows, sbatch)
        tokens = res.token_ids.tolist()
        lp_vals = res.logprobs.tolist() if res.logprobs is not None else None
        lp_ids = res.logprob_token_ids.tolist() if res.logprob_token_ids is not None else None
        for j, req in enumerate(reqs):
            out.sampled[req.request_id] = tokens[j]
            if lp_vals is not None:
                out.sampled_logprob[req.request_id] = lp_vals[j][0]
                if req.params.logprobs is not None:
                    k = req.params.logprobs
                    out.logprobs[req.request_id] = {
                        lp_ids[j][0]: lp_vals[j][0], **dict(zip(lp_ids[j][1: 1 + k], lp_vals[j][1: 1 + k]))}


def _to_dicts(vals: torch.Tensor, toks: torch.Tensor) -> list[Logprobs]:
    """[P, 1+k] values and ids (actual token first) -> one dict per position, actual token included."""
    result = []
    for v_row, t_row in zip(vals.tolist(), toks.tolist()):
        d = {t_row[0]: v_row[0]}
        for t, v in zip(t_row[1:], v_row[1:]):
            d.setdefault(t, v)
        result.append(d)
    return result
