"""Prefix caching (runtime/prefix_cache.py) on the CPU reference path (fp32): a request that starts from a cached
prefix (shared KV blocks + a copy of the GDN states snapshotted there) gets what it gets without the cache; the
snapshots are never written by the requests that read them; nothing unowned is read; cached prefixes give way
under memory pressure. The snapshot granularity is cut from 256 tokens to 16 so tiny prompts cross it."""
from __future__ import annotations

import random

import pytest
import torch
from engine_helpers import (
    Models,
    StepLog,
    assert_close_logprobs,
    assert_same_completion,
    greedy,
    make_llm,
    poison_free_memory,
    random_prompt,
    run_until_done,
    small_prefix_chunks,
)

from deltaserve import LLM
from deltaserve.runtime import prefix_cache
from deltaserve.runtime.block_pool import BlockPool
from deltaserve.runtime.prefix_cache import PrefixCache

CHUNK = 16


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return Models(tmp_path_factory)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    small_prefix_chunks(monkeypatch, CHUNK)


def cached_llm(models, kind="dense", **kw):
    kw = {"max_num_seqs": 4, "max_num_batched_tokens": 64, "block_size": 8, "enable_prefix_caching": True,
          "prefix_cache_slots": 4, **kw}
    return make_llm(models.path(kind), **kw)


def shared_prompts(rng, vocab, shared: int, tails: list[int]) -> list[dict]:
    head = [rng.randrange(vocab) for _ in range(shared)]
    return [{"prompt_token_ids": head + [rng.randrange(vocab) for _ in range(t)]} for t in tails]


def assert_idle_with_cache(llm) -> None:
    """Nothing running; every KV block is free or held by a cached prefix, and none once the cache is reset."""
    s = llm.engine.scheduler
    assert not s.has_unfinished() and s.states.num_free == s.states.num_slots
    held = {b for e in s.cache._entries.values() for b in e.block_ids}
    assert s.blocks.num_free == s.blocks.num_blocks - len(held)
    llm.reset_prefix_cache()
    assert len(s.cache) == 0 and s.blocks.num_free == s.blocks.num_blocks


# ------------------------------------------------------------------------------------------ the pools


def test_block_references():
    pool = BlockPool(4, 8)
    a = pool.allocate(2)
    pool.share(a, cache=True)  # a prefix snapshot
    pool.free(a)  # its request finishes
    assert (pool.num_free, pool.num_in_requests) == (2, 0), "the cache alone holds them"
    pool.share(a)  # a request starts from the prefix
    pool.free(a, cache=True)  # the prefix is evicted while the request reads it
    assert (pool.num_free, pool.num_in_requests) == (2, 2)
    pool.free(a)
    assert (pool.num_free, pool.num_in_requests) == (4, 0)
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free(a[:1])
    with pytest.raises(RuntimeError, match="shared while free"):
        pool.share(a[:1])
    b = pool.allocate(1)
    with pytest.raises(RuntimeError, match="freed twice"):
        pool.free(b, cache=True)  # the cache never took a reference on it


def test_lookup_takes_the_longest_ready_proper_prefix_and_evicts_the_least_recent():
    pool = BlockPool(16, 8)
    cache = PrefixCache(pool, slots=[10, 11], chunk=CHUNK)
    toks = list(range(100))
    held = pool.allocate(6)
    assert cache.stops(toks[:49]) == [32, 48] and cache.stops(toks[:48]) == [16, 32]
    short = cache.insert(toks, 16, held[:2])
    assert cache.lookup(toks) is None, "an entry whose slot is not filled yet was found"
    short.ready = True
    long = cache.insert(toks, 32, held[:4])
    long.ready = True
    assert cache.stops(toks[:49]) == [48]
    assert cache.lookup(toks) is long and cache.lookup(toks[:33]) is long
    assert cache.lookup(toks[:32]) is short, "a prefix as long as the prompt leaves no token to sample from"
    assert cache.lookup([1] + toks[1:]) is None
    pool.free(held)
    assert pool.num_free == 16 - 4, "the entries hold their blocks"
    third = cache.insert(toks, 48, pool.allocate(6))  # no free slot: evicts `long`, used before `short` above
    assert third.slot == long.slot and cache.lookup(toks) is short
    # `third` is this step's (not ready): its slot is not handed to another snapshot of the step
    assert cache.insert(list(range(1, 100)), 16, pool.allocate(2)) is not None  # evicts `short`
    assert cache.insert(list(range(2, 100)), 16, pool.allocate(2)) is None, "a slot this step writes, given twice"
    assert not cache.evict_one() and len(cache) == 2
    cache.clear()
    assert len(cache) == 0


def test_room_for_blocks_evicts_only_entries_that_free_some():
    """_make_room dropped cached prefixes least recently used first whether or not their blocks were free to take:
    a running request's shared system prompt (its blocks the request holds) went for nothing, and the next request
    with that prompt missed. Now only entries whose drop frees a block go, least recently used first."""
    from deltaserve.runtime.scheduler import Scheduler
    from deltaserve.runtime.state_pool import StatePool

    pool = BlockPool(16, 8)
    cache = PrefixCache(pool, slots=[10, 11, 12, 13], chunk=CHUNK)
    p1, p2 = list(range(100)), list(range(200, 300))
    running = pool.allocate(4)  # a running request's blocks, which p1's entries share
    done = pool.allocate(4)  # a finished request's: only p2's entries hold them once it lets go
    for toks, blocks in ((p1, running), (p2, done)):
        for n in (16, 32):
            cache.insert(toks, n, blocks[: n // 8]).ready = True
    pool.free(done)
    sched = Scheduler(pool, StatePool(4), 4, 128, cache)
    free = pool.num_free
    assert sched._make_room(free + 1)
    assert pool.num_free == free + 2 and sorted((e.tokens[0], len(e.tokens)) for e in cache._entries.values()) == \
        [(0, 16), (0, 32), (200, 16)], "more was evicted than the blocks needed, or entries that freed nothing"
    assert sched._make_room(pool.num_free + 2) and len(cache) == 2  # p2@16 now frees its two blocks
    assert cache.lookup(p1 + [1]) is not None, "the running request's prefix was dropped for nothing"
    assert not sched._make_room(pool.num_free + 1) and len(cache) == 2, "entries that free nothing were dropped"


# ------------------------------------------------------------------------------------------ the engine


@pytest.mark.parametrize("kind, async_scheduling", [("dense", False), ("dense", True), ("moe", False)],
                         ids=["dense", "dense-async", "moe"])
def test_cached_prefix_gives_the_uncached_answer(models, kind, async_scheduling):
    rng = random.Random(1)
    prompts = shared_prompts(rng, models.vocab(kind), 40, [1, 9, 30, 3, 17])
    llm = cached_llm(models, kind, async_scheduling=async_scheduling, prefix_cache_slots=8)
    sp = greedy(8)
    first = [llm.generate([p], sp, use_tqdm=False)[0] for p in prompts]  # one at a time: each finds the last's
    again = llm.generate(prompts, sp, use_tqdm=False)  # all at once, every prefix cached
    for i, p in enumerate(prompts):
        ref = models.ref(kind, p, sp).outputs[0]
        assert_same_completion(f"first{i}", ref, first[i].outputs[0])
        assert_same_completion(f"again{i}", ref, again[i].outputs[0])
    # the 40 shared tokens hold two whole chunks; prompt 0 (41 tokens) snapshots at 16 and 32 itself
    assert [o.num_cached_tokens for o in first] == [0, 32, 32, 32, 32]
    n = [len(p["prompt_token_ids"]) for p in prompts]
    assert [o.num_cached_tokens for o in again] == [(k - 1) // CHUNK * CHUNK for k in n]
    assert_idle_with_cache(llm)


def prefill_chunks(log: StepLog) -> list[tuple[int, int]]:
    return [(s.start, s.num_new_tokens) for st in log.steps for s in st.seqs if not s.is_decode]


def run_70_tokens(models, budget: int):
    """-> (llm, prompt, its prefill chunks): one 70-token prompt run once."""
    prompt = random_prompt(random.Random(2), 70, models.vocab())
    llm = cached_llm(models, max_num_batched_tokens=budget)
    log = StepLog.attach(llm)
    llm.generate([prompt], greedy(2), use_tqdm=False)
    return llm, prompt, prefill_chunks(log)


def test_prefill_pauses_at_the_snapshot_points(models):
    llm, prompt, chunks = run_70_tokens(models, 64)
    assert chunks == [(0, 48), (48, 16), (64, 6)], "the last two multiples of 16 below token 69 are 48 and 64"
    assert llm.generate([prompt], greedy(2), use_tqdm=False)[0].num_cached_tokens == 64


@pytest.mark.parametrize("kw", [{}, {"async_scheduling": True}, {"tensor_parallel_size": 2}],
                         ids=["sync", "async", "tp2"])
def test_snapshots_at_multiples_of_64_inside_a_chunk_need_no_pause(models, monkeypatch, kw):
    """Snapshots 64-aligned from a chunk's first token are written by the GDN prefill itself (the chunked kernels
    hold the state there; under TP every rank its own shard): one step for the whole prompt, and the prefixes it
    cached give the uncached answers."""
    monkeypatch.setattr(prefix_cache, "CHUNK_TOKENS", 64)
    rng = random.Random(9)
    a, b = shared_prompts(rng, models.vocab(), 150, [50, 7])
    llm = cached_llm(models, max_num_batched_tokens=256, **kw)
    log = StepLog.attach(llm)
    sp = greedy(6)
    outs = [llm.generate([p], sp, use_tqdm=False)[0] for p in (a, b, a)]
    llm.shutdown()
    assert prefill_chunks(log) == [(0, 200), (128, 29), (192, 8)], "a: one step, snapshots at 128 and 192 inside it"
    assert [o.num_cached_tokens for o in outs] == [0, 128, 192]
    for name, p, out in zip("aba", (a, b, a), outs):
        assert_same_completion(name, models.ref("dense", p, sp).outputs[0], out.outputs[0])


def test_short_prefixes_are_cached_only_where_a_chunk_ends_anyway(models, monkeypatch):
    monkeypatch.setattr(prefix_cache, "MIN_PAUSE_TOKENS", 64)
    llm, prompt, chunks = run_70_tokens(models, 32)
    assert chunks == [(0, 32), (32, 32), (64, 6)], "no pause at 48; 64 is a chunk end of the budget's"
    assert llm.generate([prompt], greedy(2), use_tqdm=False)[0].num_cached_tokens == 64
    assert [len(e.tokens) for e in llm.engine.scheduler.cache._entries.values()] == [64]


def test_a_request_continuing_from_a_snapshot_leaves_it_intact(models):
    """B restores A's snapshot into its own slot and writes its own KV past the shared blocks; A run again after B
    finds the snapshot as A left it (a restore that aliased the cache slot, or a write into a shared block, would
    change A's second answer)."""
    rng = random.Random(3)
    a, b = shared_prompts(rng, models.vocab(), 33, [4, 40])
    llm = cached_llm(models)
    sp = greedy(10)
    ref_a, ref_b = models.ref("dense", a, sp).outputs[0], models.ref("dense", b, sp).outputs[0]
    assert_same_completion("a", ref_a, llm.generate([a], sp, use_tqdm=False)[0].outputs[0])
    out_b = llm.generate([b], sp, use_tqdm=False)[0]
    assert out_b.num_cached_tokens == 32
    assert_same_completion("b", ref_b, out_b.outputs[0])
    out_a = llm.generate([a], sp, use_tqdm=False)[0]
    assert out_a.num_cached_tokens == 32
    assert_same_completion("a again", ref_a, out_a.outputs[0])


def test_unowned_memory_is_never_read(models):
    """NaN in every state slot and KV block that neither a live request nor a cached prefix owns, before every step:
    a restore from the wrong slot, or a block read after its last reference went, turns an answer NaN."""
    rng = random.Random(4)
    vocab = models.vocab()
    prompts = shared_prompts(rng, vocab, 35, [1, 20, 7, 50, 2, 33]) + [random_prompt(rng, 60, vocab)]
    llm = cached_llm(models, max_num_seqs=3, num_kv_blocks=40, max_model_len=128)
    llm.generate(prompts[:3], greedy(4), use_tqdm=False)  # real states in every slot, prefixes in the cache

    params = [greedy(rng.randint(1, 9)) for _ in prompts]
    ids = [llm.engine.add_request(p["prompt_token_ids"], sp) for p, sp in zip(prompts, params)]
    outs = run_until_done(llm, ids, before_step=lambda: poison_unowned(llm))
    assert sum(o.num_cached_tokens for o in outs.values()) > 0
    for i, (p, sp) in enumerate(zip(prompts, params)):
        assert_same_completion(f"req{i}", models.ref("dense", p, sp).outputs[0], outs[ids[i]].outputs[0])
    assert_idle_with_cache(llm)


def poison_unowned(llm) -> None:
    """poison_free_memory, sparing the blocks the prefix cache holds, and NaN in the cache's free slots."""
    s = llm.engine.scheduler
    live = s.running
    try:  # free_slots_and_blocks counts what requests own: let the entries pass for requests
        s.running = live + [_Holder(e.block_ids) for e in s.cache._entries.values()]
        poison_free_memory(llm)
    finally:
        s.running = live
    if s.cache._free_slots:
        idx = torch.tensor(s.cache._free_slots)
        for t in llm.runner.caches.conv + llm.runner.caches.recurrent:
            t.index_fill_(0, idx, float("nan"))


class _Holder:
    """Stands in for a request owning a cached prefix's blocks (free_slots_and_blocks reads these two fields)."""

    def __init__(self, blocks):
        self.block_ids, self.state_slot = blocks, -1


def test_cached_prefixes_give_way_to_requests(models):
    """A KV pool that cannot hold the cache and the running requests: prefixes are released (least recently used
    first) before any request waits or is preempted, and every answer stays the uncached one."""
    rng = random.Random(5)
    vocab = models.vocab()
    prompts = [random_prompt(rng, rng.randint(40, 90), vocab) for _ in range(8)]
    llm = cached_llm(models, max_num_seqs=2, num_kv_blocks=26, prefix_cache_slots=6, max_model_len=128)
    sp = greedy(6)
    log = StepLog.attach(llm)
    for p in prompts:  # one by one: each leaves its snapshots behind, filling the pool
        assert_same_completion("solo", models.ref("dense", p, sp).outputs[0],
                               llm.generate([p], sp, use_tqdm=False)[0].outputs[0])
    outs = llm.generate(prompts[::-1], sp, use_tqdm=False)
    for i, p in enumerate(prompts[::-1]):
        assert_same_completion(f"req{i}", models.ref("dense", p, sp).outputs[0], outs[i].outputs[0])
    assert not log.preempted_ids(), "a request was preempted while cached prefixes held blocks"
    assert_idle_with_cache(llm)


def test_more_snapshots_in_a_step_than_cache_slots(models):
    """One cache slot, three prompts whose prefills reach snapshot points in the same steps: a step's snapshots never
    share a slot (extra ones are skipped), and the answers stay the uncached ones."""
    rng = random.Random(11)
    prompts = [random_prompt(rng, 40, models.vocab()) for _ in range(3)]
    llm = cached_llm(models, max_num_batched_tokens=128, prefix_cache_slots=1)
    log = StepLog.attach(llm)
    sp = greedy(5)
    outs = llm.generate(prompts, sp, use_tqdm=False)
    assert len(log.steps[0].seqs) == 3
    for i, p in enumerate(prompts):
        assert_same_completion(f"req{i}", models.ref("dense", p, sp).outputs[0], outs[i].outputs[0])
    assert len(llm.engine.scheduler.cache) == 1
    assert_idle_with_cache(llm)


def test_a_step_that_raised_leaves_no_unfilled_snapshot(models, monkeypatch):
    """A step that fails before its forward (out of memory, a lost TP worker) leaves the entries it scheduled
    unwritten: they are dropped, never marked ready by a later step (a prompt sharing their prefix read a zero
    state and unwritten KV blocks)."""
    rng = random.Random(12)
    p = random_prompt(rng, 40, models.vocab())
    q = {"prompt_token_ids": p["prompt_token_ids"][:16] + [rng.randrange(models.vocab()) for _ in range(10)]}
    llm = cached_llm(models)
    real, calls = llm.runner.launch, []

    def launch(sched):
        calls.append(sched)
        if len(calls) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        return real(sched)

    monkeypatch.setattr(llm.runner, "launch", launch)
    sp = greedy(6)
    with pytest.raises(RuntimeError, match="simulated"):
        llm.generate([p], sp, use_tqdm=False)
    for prompt in (p, q):
        out = llm.generate([prompt], sp, use_tqdm=False)[0]
        assert_same_completion("after the failure", models.ref("dense", prompt, sp).outputs[0], out.outputs[0])
    assert all(e.ready for e in llm.engine.scheduler.cache._entries.values())


def test_cached_prefixes_that_would_free_nothing_stay(models):
    """Entries whose blocks running requests share free nothing when evicted: a request that does not fit waits
    without wiping them."""
    rng = random.Random(13)
    vocab = models.vocab()
    head = [rng.randrange(vocab) for _ in range(40)]
    llm = cached_llm(models, num_kv_blocks=12, max_model_len=96)
    llm.generate([{"prompt_token_ids": head + [1, 2, 3]}], greedy(2), use_tqdm=False)  # entries at 16 and 32
    eng, s = llm.engine, llm.engine.scheduler
    ids = [eng.add_request(head + [4 + i, 5, 6], greedy(10)) for i in range(2)]  # share the entries' blocks
    eng.step()
    eng.step()
    before = sorted(len(e.tokens) for e in s.cache._entries.values())
    eng.add_request([rng.randrange(vocab) for _ in range(80)], greedy(2))  # does not fit beside them
    eng.step()
    assert len(s.waiting) == 1 and sorted(len(e.tokens) for e in s.cache._entries.values()) == before == [16, 32]
    run_until_done(llm, ids)


def test_prompt_logprobs_requests_compute_every_position(models):
    rng = random.Random(6)
    a, b = shared_prompts(rng, models.vocab(), 40, [5, 5])
    llm = cached_llm(models)
    llm.generate([a], greedy(3), use_tqdm=False)
    sp = greedy(3, prompt_logprobs=0)
    out = llm.generate([b], sp, use_tqdm=False)[0]
    ref = models.ref("dense", b, sp)
    assert out.num_cached_tokens == 0
    assert_close_logprobs("prompt_logprobs", ref.prompt_logprobs, out.prompt_logprobs)
    assert_same_completion("b", ref.outputs[0], out.outputs[0])


def test_flags_are_checked(models):
    with pytest.raises(ValueError, match="enable_prefix_caching=True"):
        make_llm(models.path("dense"), prefix_cache_slots=4)
    with pytest.raises(ValueError, match="enable_prefix_caching must be True or False, got 'false'"):
        make_llm(models.path("dense"), enable_prefix_caching="false")
    with pytest.raises(ValueError, match="positive integer"):
        make_llm(models.path("dense"), enable_prefix_caching=True, prefix_cache_slots=0)
    assert make_llm(models.path("dense"), enable_prefix_caching=True).engine.scheduler.cache.num_slots == 16


def test_tensor_parallel_ranks_restore_and_snapshot_alike(models):
    """Rank 0 schedules; every rank copies its own shard of the states (the StepPlan carries the copies)."""
    rng = random.Random(7)
    prompts = shared_prompts(rng, models.vocab(), 36, [3, 12])
    llm = cached_llm(models, tensor_parallel_size=2, max_model_len=128)
    try:
        sp = greedy(6)
        outs = [llm.generate([p], sp, use_tqdm=False)[0] for p in prompts]
    finally:
        llm.shutdown()
    assert outs[1].num_cached_tokens == 32
    for i, p in enumerate(prompts):
        assert_same_completion(f"req{i}", models.ref("dense", p, sp).outputs[0], outs[i].outputs[0])


@pytest.mark.gpu
def test_on_cuda_a_restored_prefix_repeats_the_first_answer_exactly(models):
    """bf16, CUDA graphs, async scheduling: the first run prefills 0-16, 16-32, 32-48 (pausing at the snapshots),
    the second restores the state at 32 and runs the same last chunk alone, so everything after must match bit for
    bit; another prompt sharing the first 40 tokens starts from the snapshot at 32 too."""
    rng = random.Random(8)
    a, b = shared_prompts(rng, models.vocab(), 40, [8, 9])
    llm = LLM(models.path("dense"), device="cuda", dtype="bfloat16", max_model_len=256, max_num_seqs=4,
              block_size=16, enable_prefix_caching=True, prefix_cache_slots=4)
    assert llm.runner.graphs is not None and llm.engine.async_scheduling
    sp = greedy(12)
    first = llm.generate([a], sp, use_tqdm=False)[0]
    again = llm.generate([a], sp, use_tqdm=False)[0]
    assert (first.num_cached_tokens, again.num_cached_tokens) == (0, 32)
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
    assert again.outputs[0].logprobs == first.outputs[0].logprobs
    assert llm.generate([b], sp, use_tqdm=False)[0].num_cached_tokens == 32


@pytest.mark.gpu
def test_on_cuda_snapshots_inside_a_chunk(models, monkeypatch):
    """The Triton state pass writing the state at 64-aligned points inside a chunk (its own test: tests/kernels):
    one prefill step for the whole prompt, and a rerun from the snapshot at 192 answers as the first run did, up to
    bf16 roundings (its last 8 tokens run in a GEMM of 8 rows, not 200)."""
    monkeypatch.setattr(prefix_cache, "CHUNK_TOKENS", 64)
    a = shared_prompts(random.Random(10), models.vocab(), 150, [50])[0]
    llm = LLM(models.path("dense"), device="cuda", dtype="bfloat16", max_model_len=256, max_num_seqs=4,
              block_size=16, enable_prefix_caching=True, prefix_cache_slots=4)
    log = StepLog.attach(llm)
    first, again = (llm.generate([a], greedy(8), use_tqdm=False)[0] for _ in range(2))
    assert prefill_chunks(log) == [(0, 200), (192, 8)] and again.num_cached_tokens == 192
    lp = [(f[t], g[t]) for f, g, t in zip(first.outputs[0].logprobs, again.outputs[0].logprobs,
                                           first.outputs[0].token_ids) if t in g]
    assert lp and max(abs(x - y) for x, y in lp) < 0.1, lp
