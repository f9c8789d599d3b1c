"""Helpers for the engine-invariant tests: build LLMs, make prompts, record steps, compare outputs, poison caches."""
from __future__ import annotations

import collections
import math
import random
from dataclasses import dataclass, field

import torch

from deltaserve import LLM, SamplingParams
from deltaserve.kernels.paged_attention import block_tensors
from deltaserve.runtime import prefix_cache
from deltaserve.tiny import make_tiny

# fp32 on CPU: batching, chunking and preemption may only change rounding. Different batch shapes change the matmul
# reduction order, which moves logprobs by up to ~2e-5 (logits are O(10)); a leaked or stale state moves them by >1e-2.
LOGPROB_ATOL = 1e-4


def small_prefix_chunks(monkeypatch, tokens: int) -> None:
    """Prefix-cache snapshots every `tokens` tokens (256 in the engine) and no minimum pause, so tiny prompts cross
    them."""
    monkeypatch.setattr(prefix_cache, "CHUNK_TOKENS", tokens)
    monkeypatch.setattr(prefix_cache, "MIN_PAUSE_TOKENS", 0)


def make_llm(path: str, **kw) -> LLM:
    """A CPU fp32 LLM; kw overrides the engine limits."""
    kw.setdefault("max_model_len", 512)
    return LLM(model=path, device="cpu", dtype="float32", **kw)


def random_prompt(rng: random.Random, n: int, vocab: int) -> dict:
    return {"prompt_token_ids": [rng.randrange(vocab) for _ in range(n)]}


def greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=0, ignore_eos=True, **kw)


def solo(llm: LLM, prompt: dict, params: SamplingParams):
    """Run one request alone in `llm` (which must be idle) -> its RequestOutput."""
    assert not llm.engine.has_unfinished(), "the solo LLM must be idle"
    return llm.generate([prompt], params, use_tqdm=False)[0]


def assert_close_logprobs(name: str, ref: list | None, out: list | None, atol: float = LOGPROB_ATOL) -> None:
    """ref/out: lists of {token id: logprob} dicts (None entries allowed, e.g. prompt position 0)."""
    assert (ref is None) == (out is None), f"{name}: one side has no logprobs"
    if ref is None:
        return
    assert len(ref) == len(out), f"{name}: {len(out)} positions, expected {len(ref)}"
    for pos, (r, o) in enumerate(zip(ref, out)):
        if r is None or o is None:
            assert r is None and o is None, f"{name}[{pos}]: {o} vs {r}"
            continue
        assert r.keys() == o.keys(), f"{name}[{pos}]: token ids {sorted(o)} vs {sorted(r)}"
        for tok, lp in r.items():
            assert math.isfinite(o[tok]), f"{name}[{pos}][{tok}] = {o[tok]}"
            assert abs(o[tok] - lp) <= atol, f"{name}[{pos}][{tok}]: {o[tok]} vs {lp} (atol {atol})"


def assert_same_completion(name: str, ref, out, atol: float = LOGPROB_ATOL) -> None:
    """ref/out: CompletionOutput. Same tokens, same finish reason, logprobs within atol."""
    assert out.token_ids == ref.token_ids, f"{name}: tokens {out.token_ids} != {ref.token_ids}"
    assert out.finish_reason == ref.finish_reason, f"{name}: finish {out.finish_reason} != {ref.finish_reason}"
    assert_close_logprobs(f"{name}.logprobs", ref.logprobs, out.logprobs, atol)


def assert_engine_idle(llm: LLM) -> None:
    """Nothing queued or running, every KV block and state slot back in its pool."""
    s = llm.engine.scheduler
    assert not s.has_unfinished(), f"{len(s.waiting)} waiting, {len(s.running)} running"
    assert s.blocks.num_free == s.blocks.num_blocks, f"{s.blocks.num_free}/{s.blocks.num_blocks} blocks free"
    assert s.states.num_free == s.states.num_slots, f"{s.states.num_free}/{s.states.num_slots} slots free"
    assert not llm.engine.groups, f"engine still tracks {list(llm.engine.groups)}"
    assert not llm.engine.has_unfinished(), "a launched step is still unread"



def assert_idle_or_cached(llm: LLM) -> None:
    """Nothing running or queued; every slot free, every KV block free or held by a cached prefix only (and free
    once the prefix cache is reset)."""
    s = llm.engine.scheduler
    assert not llm.engine.has_unfinished() and not llm.engine.groups
    assert s.states.num_free == s.states.num_slots, f"{s.states.num_free}/{s.states.num_slots} slots free"
    held = {b for e in s.cache._entries.values() for b in e.block_ids} if s.cache is not None else set()
    assert s.blocks.num_free == s.blocks.num_blocks - len(held), f"{s.blocks.num_free} blocks free, {len(held)} cached"
    if s.cache is not None:
        llm.reset_prefix_cache()
        assert s.blocks.num_free == s.blocks.num_blocks


def count_scheduler_events(llm: LLM) -> collections.Counter:
    """Wraps the scheduler to count what its steps hand out: preemptions, forks, prefix restores, partial prefills."""
    tally = collections.Counter()
    sched = llm.engine.scheduler
    inner = sched.schedule

    def schedule():
        out = inner()
        tally.update(preempted=len(out.preempted), forks=len(out.forks), restores=len(out.restores),
                     chunked=sum(s.start + s.num_new_tokens < s.request.num_prompt_tokens for s in out.seqs))
        return out

    sched.schedule = schedule
    return tally

@dataclass
class SeqRecord:
    request_id: str
    start: int  # tokens already in the caches before this step
    num_new_tokens: int
    num_prompt_tokens: int
    sample: bool

    @property
    def is_decode(self) -> bool:
        return self.start >= self.num_prompt_tokens

    @property
    def is_partial_prefill(self) -> bool:
        return self.start + self.num_new_tokens < self.num_prompt_tokens


@dataclass
class StepRecord:
    seqs: list[SeqRecord]
    preempted: list[str]
    num_forks: int
    num_waiting: int  # requests still queued after this step was scheduled


@dataclass
class StepLog:
    """Wraps `llm.engine.scheduler.schedule` to record every step it hands out (values copied at schedule time)."""
    steps: list[StepRecord] = field(default_factory=list)
    requests: dict = field(default_factory=dict)  # request id -> Request object, every one ever scheduled

    @classmethod
    def attach(cls, llm: LLM) -> "StepLog":
        log = cls()
        sched = llm.engine.scheduler
        inner = sched.schedule

        def schedule():
            out = inner()
            for s in out.seqs:
                log.requests[s.request.request_id] = s.request
            log.steps.append(StepRecord(
                [SeqRecord(s.request.request_id, s.start, s.num_new_tokens, s.request.num_prompt_tokens, s.sample)
                 for s in out.seqs],
                list(out.preempted), len(out.forks), len(sched.waiting)))
            return out

        sched.schedule = schedule
        return log

    def mixed_steps(self) -> int:
        """Steps holding a partial prompt chunk together with another request's decode token."""
        return sum(any(s.is_partial_prefill for s in st.seqs) and any(s.is_decode for s in st.seqs)
                   for st in self.steps)

    def preempted_ids(self) -> list[str]:
        return [rid for st in self.steps for rid in st.preempted]


def free_slots_and_blocks(llm: LLM) -> tuple[list[int], list[int]]:
    """State slots and KV blocks that no live request owns (derived from the requests, not the pools' free lists)."""
    s = llm.engine.scheduler
    live = list(s.running) + list(s.waiting)
    used_slots = {r.state_slot for r in live if r.state_slot >= 0}
    used_blocks = {b for r in live for b in r.block_ids}
    return ([i for i in range(s.states.num_slots) if i not in used_slots],
            [b for b in range(s.blocks.num_blocks) if b not in used_blocks])


def poison_free_memory(llm: LLM) -> tuple[int, int]:
    """Fill every free state slot (conv + recurrent) and every free KV block with NaN -> (slots, blocks) poisoned."""
    slots, blocks = free_slots_and_blocks(llm)
    caches = llm.runner.caches
    if slots:
        idx = torch.tensor(slots)
        for t in caches.conv + caches.recurrent:
            t.index_fill_(0, idx, float("nan"))
    if blocks:
        idx = torch.tensor(blocks)
        for k, v in caches.kv:
            for t in block_tensors(k) + block_tensors(v):  # quantized: NaN scales poison the integer codes
                if t.is_floating_point():
                    t.index_fill_(0, idx, float("nan"))
    return len(slots), len(blocks)


def run_until_done(llm: LLM, ids: list[str], before_step=None, max_steps: int = 10_000) -> dict:
    """Step the engine until no request is left -> {request id: final RequestOutput} for `ids`."""
    done = {}
    for _ in range(max_steps):
        if not llm.engine.has_unfinished():
            break
        if before_step is not None:
            before_step()
        for out in llm.engine.step():
            if out.finished:
                done[out.request_id] = out
    else:
        raise AssertionError(f"engine did not finish within {max_steps} steps")
    return {rid: done[rid] for rid in ids}


class Models:
    """Tiny checkpoints (written once per module) and one idle 'solo' LLM per checkpoint for references."""

    def __init__(self, tmp_path_factory, max_model_len: int | None = None):
        """max_model_len: the solo references' (the tested engines' own, where it clips or truncates)."""
        self._factory = tmp_path_factory
        self._solo_len = {} if max_model_len is None else {"max_model_len": max_model_len}
        self._paths: dict[str, str] = {}
        self._solo: dict = {}
        self._refs: dict = {}

    def path(self, kind: str) -> str:
        if kind not in self._paths:
            self._paths[kind] = make_tiny(str(self._factory.mktemp(kind)), moe=kind == "moe")
        return self._paths[kind]

    def solo(self, kind: str):
        if kind not in self._solo:
            self._solo[kind] = make_llm(self.path(kind), max_num_seqs=4, max_num_batched_tokens=512,
                                        **self._solo_len)
        return self._solo[kind]

    def vocab(self, kind: str = "dense") -> int:
        return self.solo(kind).config.vocab_size

    def ref(self, kind: str, prompt: dict, params: SamplingParams):
        """RequestOutput of the request run alone with a budget that prefills any prompt here in one step."""
        key = (kind, tuple(prompt["prompt_token_ids"]), repr(params))
        if key not in self._refs:
            self._refs[key] = solo(self.solo(kind), prompt, params)
        return self._refs[key]


def boundary_stop(tok, token_ids: list[int], text: str, before: int, after: int):
    """A stop string text[b-before : b+after] around a token boundary b, first occurring there -> (string, start,
    number of tokens needed to complete it), or None."""
    cum = [len(tok.decode(token_ids[:k])) for k in range(len(token_ids) + 1)]
    for k in range(1, len(token_ids)):
        b = cum[k]
        lo, hi = b - before, b + after
        if lo < 1 or hi > len(text) or cum[k - 1] >= b or cum[k + 1] <= b:
            continue
        s = text[lo:hi]
        if "\ufffd" in s or text.find(s) != lo or "\ufffd" in text[:hi]:
            continue
        need = next(j for j in range(len(cum)) if cum[j] >= hi)
        return s, lo, need
    return None
