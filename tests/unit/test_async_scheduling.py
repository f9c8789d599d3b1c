"""Async scheduling on the CPU reference path (fp32): `LLM(..., async_scheduling=True)` launches step N+1 before
reading step N's samples, feeding each token still in flight by its device copy. On CPU every launch has finished by
the time it returns, but the engine's bookkeeping is the same as on CUDA, so these tests check that bookkeeping:

- async == sync on a mixed workload (chunked prefill, queueing, prompt logprobs, seeded sampling, n=2, requests that
  stop on a token read one step late), and the steps really overlap (launch k+1 before read k); a late stop costs
  exactly one dropped sample, a request whose last token (max_tokens, max_model_len) is in flight none;
- a step sampling a request with repetition / presence / frequency penalties is read before the next launch;
- abort while a step is in flight, preemption with a token in flight, freed memory never read (with late stops), and
  generate_stream's deltas (and closing it early) all match the synchronous answers and leave the engine idle, with
  no step left in flight;
- `_async_scheduling` resolves the default and refuses tensor parallelism.

Launches and reads are recorded by wrapping `llm.runner.launch` and each PendingOutput's `result` (LaunchLog).

"Sync" references are an identical LLM with async_scheduling=False, or the solo references of `Models` (default
setting: synchronous on CPU). Logprobs may differ by batch composition rounding only: LOGPROB_ATOL.
"""
from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, field

import pytest
import torch
from engine_helpers import (
    Models,
    StepLog,
    assert_close_logprobs,
    assert_engine_idle,
    assert_same_completion,
    boundary_stop,
    greedy,
    make_llm,
    poison_free_memory,
    random_prompt,
    run_until_done,
)

from deltaserve import SamplingParams
from deltaserve.llm import _async_scheduling
from deltaserve.runtime.request import RequestStatus


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return Models(tmp_path_factory)


@dataclass
class LaunchLog:
    """Wraps `llm.runner.launch` (and each returned PendingOutput's `result`) to record launches and reads in call
    order: ("launch", k) when step k is queued, ("read", k) when its samples are read on the host."""
    events: list[tuple[str, int]] = field(default_factory=list)
    sampled: list[list[str]] = field(default_factory=list)  # per launch k: ids of the requests it samples

    @classmethod
    def attach(cls, llm) -> LaunchLog:
        log = cls()
        inner = llm.runner.launch

        def launch(sched):
            pending = inner(sched)
            k = len(log.sampled)
            log.sampled.append([r.request_id for r in pending.requests])
            log.events.append(("launch", k))
            read = pending.result

            def result():
                log.events.append(("read", k))
                return read()

            pending.result = result  # instance attribute: shadows the method for this launch only
            return pending

        llm.runner.launch = launch
        return log

    def at(self, kind: str, k: int) -> int:
        return self.events.index((kind, k))

    def check_each_read_once(self) -> None:
        for k in range(len(self.sampled)):
            assert self.events.count(("read", k)) == 1, f"launch {k} read {self.events.count(('read', k))} times"
            assert self.at("launch", k) < self.at("read", k)

    def overlapped(self) -> list[int]:
        """Launches k whose successor k+1 was launched before k was read."""
        return [k for k in range(len(self.sampled) - 1) if self.at("launch", k + 1) < self.at("read", k)]

    def times_sampled(self, rid: str) -> int:
        return sum(rid in ids for ids in self.sampled)


def lp_greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, logprobs=1, ignore_eos=True, **kw)


def assert_same_request(name: str, ref, out) -> None:
    """ref/out: RequestOutput. Every completion the same (tokens, finish reason, logprobs within LOGPROB_ATOL) and
    prompt logprobs within LOGPROB_ATOL."""
    assert out.prompt_token_ids == ref.prompt_token_ids
    assert len(out.outputs) == len(ref.outputs), f"{name}: {len(out.outputs)} completions, expected {len(ref.outputs)}"
    for i, (r, o) in enumerate(zip(ref.outputs, out.outputs)):
        assert_same_completion(f"{name}.{i}", r, o)
        assert o.stop_reason == r.stop_reason, f"{name}.{i}: stop_reason {o.stop_reason} != {r.stop_reason}"
    assert_close_logprobs(f"{name}.prompt_logprobs", ref.prompt_logprobs, out.prompt_logprobs)


def assert_async_idle(llm) -> None:
    assert_engine_idle(llm)
    assert llm.engine._inflight is None, "a launched step was never read"
    assert not llm.engine.has_unfinished()


# ------------------------------------------------------------------------------------------ 1. async == sync

@pytest.mark.parametrize("kind", ["dense", "moe"], ids=["dense", "moe"])
def test_async_equals_sync_mixed_workload(models, kind):
    rng = random.Random(21)
    vocab = models.vocab(kind)
    lengths = [12, 90, 5, 33, 47, 2, 20, 64]
    prompts = [random_prompt(rng, n, vocab) for n in lengths]
    # request 0 stops on its 3rd generated token of the synchronous (solo) run: under async the step after it has
    # already been launched when that token is read, and its sample must be dropped
    plain = models.ref(kind, prompts[0], lp_greedy(12)).outputs[0].token_ids
    stop_tok = plain[2]
    stop_len = plain.index(stop_tok) + 1
    # request 3 (n=2, seeded) stops on sample 0's 3rd token: sample 0 stops late while sample 1 runs on, so the
    # dropped sample belongs to a group that is still live
    n2 = {"n": 2, "temperature": 0.8, "seed": 99, "max_tokens": 7, "logprobs": 1, "ignore_eos": True}
    s0, s1 = (c.token_ids for c in models.ref(kind, prompts[3], SamplingParams(**n2)).outputs)
    n2_stop = s0[2]
    n2_len = s0.index(n2_stop) + 1
    assert n2_stop not in s1[: n2_len + 1], "sample 1 stops no later than sample 0: pick another stop token"
    params = [
        lp_greedy(12, stop_token_ids=[stop_tok]),
        lp_greedy(6, prompt_logprobs=1),  # 90 tokens > budget 64: chunked, prompt logprobs over two chunks
        SamplingParams(temperature=0.8, seed=1234, max_tokens=9, logprobs=1, ignore_eos=True),
        SamplingParams(**n2, stop_token_ids=[n2_stop]),
        lp_greedy(1), lp_greedy(15), lp_greedy(4), lp_greedy(10),
    ]
    budget, seqs = 64, 3
    runs = {}
    for mode in (False, True):
        llm = make_llm(models.path(kind), max_num_seqs=seqs, max_num_batched_tokens=budget, block_size=8,
                       async_scheduling=mode)
        assert llm.engine.async_scheduling is mode
        steps, launches = StepLog.attach(llm), LaunchLog.attach(llm)
        outs = llm.generate(prompts, params, use_tqdm=False)
        assert budget < max(lengths) and any(s.is_partial_prefill for st in steps.steps for s in st.seqs)
        assert any(st.num_waiting for st in steps.steps), "requests never queued behind max_num_seqs"
        launches.check_each_read_once()
        assert_async_idle(llm)
        runs[mode] = (outs, launches)

    (sync, sync_log), (asy, async_log) = runs[False], runs[True]
    assert sync_log.overlapped() == [], "with async off, a launch happened before the previous step was read"
    assert len(async_log.overlapped()) >= len(async_log.sampled) // 2, \
        f"async: only launches {async_log.overlapped()} of {len(async_log.sampled)} overlapped the next one"
    for i, (s, a) in enumerate(zip(sync, asy)):
        assert_same_request(f"req{i}[{lengths[i]} tokens]", s, a)
    stop = asy[0].outputs[0]
    assert stop.finish_reason == "stop" and stop.stop_reason == stop_tok and len(stop.token_ids) == stop_len
    # sync samples the stopping request once per token; async once more (the dropped sample of the late stop)
    assert sync_log.times_sampled(sync[0].request_id) == stop_len
    assert async_log.times_sampled(asy[0].request_id) == stop_len + 1
    first, second = asy[3].outputs
    assert first.finish_reason == "stop" and len(first.token_ids) == n2_len
    assert len(second.token_ids) > n2_len, "sample 1 must outlive sample 0"
    assert async_log.times_sampled(asy[3].request_id) == n2_len + 1, "sample 0 did not stop late"
    # a request whose token in flight is its last (max_tokens) is not scheduled again: no wasted step
    for i in (1, 2, 4, 5, 6, 7):
        assert async_log.times_sampled(asy[i].request_id) == params[i].max_tokens, f"req{i}: a step was wasted"


def test_last_request_stops_late(models):
    """The only request stops on a token read late: the extra step launched after it is still read (and dropped)
    before generate returns, so nothing stays in flight."""
    prompt = random_prompt(random.Random(26), 18, models.vocab())
    plain = models.ref("dense", prompt, lp_greedy(12)).outputs[0].token_ids
    sp = lp_greedy(12, stop_token_ids=[plain[2]])
    llm = make_llm(models.path("dense"), max_num_seqs=2, max_num_batched_tokens=32, async_scheduling=True)
    launches = LaunchLog.attach(llm)
    out = llm.generate([prompt], sp, use_tqdm=False)[0]
    assert out.outputs[0].finish_reason == "stop"
    assert_same_completion("late", models.ref("dense", prompt, sp).outputs[0], out.outputs[0])
    assert launches.times_sampled(out.request_id) == len(out.outputs[0].token_ids) + 1, "it did not stop late"
    launches.check_each_read_once()
    assert_async_idle(llm)


def test_min_tokens_counts_the_token_in_flight(models):
    """min_tokens under async scheduling: the step sampling token k is launched before token k - 1 is read, so the
    ban on stop tokens must count the one in flight. A +100 bias makes the stop token the greedy pick wherever it is
    allowed, so the request ends exactly on token 4 (min_tokens 4) when the ban lifts on time, in both modes."""
    prompt = random_prompt(random.Random(27), 18, models.vocab())
    stop_tok = 7
    sp = lp_greedy(12, stop_token_ids=[stop_tok], min_tokens=4, logit_bias={stop_tok: 100.0})
    ref = models.ref("dense", prompt, sp).outputs[0]
    assert len(ref.token_ids) == 5 and ref.token_ids[-1] == stop_tok and stop_tok not in ref.token_ids[:4]
    llm = make_llm(models.path("dense"), max_num_seqs=2, max_num_batched_tokens=32, async_scheduling=True)
    launches = LaunchLog.attach(llm)
    out = llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0]
    assert_same_completion("min_tokens", ref, out)
    assert len(launches.overlapped()) >= len(launches.sampled) // 2
    assert_async_idle(llm)


# --------------------------------------------------------------- 2. penalties: read before the next launch

@pytest.mark.parametrize("penalty", [{"repetition_penalty": 1.3}, {"presence_penalty": 1.5},
                                     {"frequency_penalty": 1.5}], ids=["repetition", "presence", "frequency"])
def test_penalties_read_before_next_launch(models, penalty):
    rng = random.Random(22)
    vocab = models.vocab()
    prompts = [random_prompt(rng, n, vocab) for n in (15, 30, 8, 22)]
    # request 1's unpenalised greedy output repeats a token at once (258, 258, 258 from its 3rd token): its penalty
    # must see the token sampled by the step before, so that step has to be read first (the control run below shows
    # that skipping the read changes its answer)
    prompts[1] = random_prompt(random.Random(153), 12, vocab)
    t = models.ref("dense", prompts[1], lp_greedy(8)).outputs[0].token_ids
    assert any(a == b for a, b in itertools.pairwise(t)), f"no immediate repeat in {t}: nothing to penalise"
    # the penalised request finishes first, so the steps after it can overlap again
    params = [lp_greedy(14), lp_greedy(8, **penalty), lp_greedy(12), lp_greedy(14)]
    runs = {}
    for mode in ("sync", "async", "async-no-forced-read"):
        llm = make_llm(models.path("dense"), max_num_seqs=4, max_num_batched_tokens=64,
                       async_scheduling=mode != "sync")
        if mode == "async-no-forced-read":  # control: what async scheduling would compute without the forced read
            launch = llm.engine._launch

            def launch_unforced(sched, launch=launch):
                launched = launch(sched)
                launched.needs_host_tokens = False
                return launched

            llm.engine._launch = launch_unforced
        log = LaunchLog.attach(llm)
        runs[mode] = (llm.generate(prompts, params, use_tqdm=False), log)
        log.check_each_read_once()
        assert_async_idle(llm)

    (sync, _), (asy, log), (unforced, _) = runs["sync"], runs["async"], runs["async-no-forced-read"]
    for i, (s, a) in enumerate(zip(sync, asy)):
        assert_same_request(f"req{i}", s, a)
    assert unforced[1].outputs[0].token_ids != sync[1].outputs[0].token_ids, \
        "reading the penalised step late changes nothing here: the test is blind"
    rid = asy[1].request_id
    with_penalty = [k for k, ids in enumerate(log.sampled[:-1]) if rid in ids]
    assert len(with_penalty) == 8, with_penalty
    for k in with_penalty:
        assert log.at("read", k) < log.at("launch", k + 1), f"launch {k + 1} before the penalised step {k} was read"
    assert set(log.overlapped()) - set(with_penalty), "no other step overlapped: async was not exercised"


# ------------------------------------------------------------------------------------ 3. abort in flight

@pytest.mark.parametrize("steps", [1, 4], ids=["first-token-in-flight", "decoding"])
def test_abort_while_step_in_flight(models, steps):
    rng = random.Random(23)
    prompts = [random_prompt(rng, 20, models.vocab()) for _ in range(3)]
    sp = lp_greedy(10)
    llm = make_llm(models.path("dense"), max_num_seqs=4, max_num_batched_tokens=64, async_scheduling=True)
    s = llm.engine.scheduler
    ids = [llm.engine.add_request(p["prompt_token_ids"], sp) for p in prompts]
    for _ in range(steps):
        llm.engine.step()
    inflight = llm.engine._inflight
    assert inflight is not None, "no step in flight after step()"
    victim = next(r for r in inflight.pending.requests if r.request_id == ids[1])
    assert victim.num_inflight == 1 and victim.block_ids and victim.state_slot >= 0
    free_blocks, free_slots = s.blocks.num_free, s.states.num_free
    n_blocks = len(victim.block_ids)

    out = llm.engine.abort(ids[1])
    got, ref = out.outputs[0], models.ref("dense", prompts[1], sp).outputs[0]
    assert out.finished and got.finish_reason == "abort"
    assert len(got.token_ids) == steps - 1, "the aborted output holds exactly the tokens read (not the one in flight)"
    assert got.token_ids == ref.token_ids[: steps - 1]
    assert_close_logprobs("aborted.logprobs", ref.logprobs[: steps - 1], got.logprobs)
    assert victim.status == RequestStatus.FINISHED and victim.block_ids == [] and victim.state_slot == -1
    assert s.blocks.num_free == free_blocks + n_blocks and s.states.num_free == free_slots + 1
    assert llm.engine.abort(ids[1]) is None, "a second abort of the same id finds nothing"

    rest = run_until_done(llm, [ids[0], ids[2]])
    for i in (0, 2):
        assert_same_completion(f"req{i}", models.ref("dense", prompts[i], sp).outputs[0], rest[ids[i]].outputs[0])
    assert ids[1] not in llm.engine.groups
    assert_async_idle(llm)
    # the engine is still sound afterwards: the aborted prompt again, alone
    again = llm.generate([prompts[1]], sp, use_tqdm=False)[0]
    assert_same_completion("after", ref, again.outputs[0])
    assert_async_idle(llm)


# ------------------------------------------------------------------------------------------ 4. preemption

@pytest.mark.parametrize("budget, prompt_logprobs", [(64, None), (12, 0)], ids=["decode-preempt", "mid-prefill"])
def test_preempted_equals_uninterrupted_async(models, budget, prompt_logprobs):
    rng = random.Random(3)  # the prompts of test_preempted_equals_uninterrupted: their references are shared
    prompts = [random_prompt(rng, n, models.vocab()) for n in (20, 30, 12, 25, 40, 9)]
    params = greedy(20, prompt_logprobs=prompt_logprobs)
    # 16 blocks x 4 tokens = one max_model_len sequence; four running requests need far more
    llm = make_llm(models.path("dense"), max_model_len=64, block_size=4, num_kv_blocks=16, max_num_seqs=4,
                   max_num_batched_tokens=budget, async_scheduling=True)
    log = StepLog.attach(llm)
    launches = LaunchLog.attach(llm)
    sched = llm.engine.scheduler
    inner = sched.schedule
    inflight_at_preemption = []  # num_inflight of each victim when it was preempted

    def schedule():
        out = inner()
        inflight_at_preemption.extend(log.requests[rid].num_inflight for rid in out.preempted)
        return out

    sched.schedule = schedule
    outs = llm.generate(prompts, params, use_tqdm=False)

    assert log.preempted_ids(), "no request was preempted: the KV pool is not tight enough"
    if budget == 64:
        assert any(inflight_at_preemption), "no request was preempted with a token in flight"
    assert launches.overlapped(), "no step overlapped the next one"
    launches.check_each_read_once()
    for i, (p, out) in enumerate(zip(prompts, outs)):
        ref = models.ref("dense", p, params)
        assert_same_completion(f"req{i}", ref.outputs[0], out.outputs[0])
        assert_close_logprobs(f"req{i}.prompt_logprobs", ref.prompt_logprobs, out.prompt_logprobs)
    assert_async_idle(llm)


# ------------------------------------------------------------------------------ 5. freed memory never read

def test_freed_memory_never_read_async(models):
    """NaN in every free state slot and free KV block before every step, under async scheduling, with requests that
    stop on a token read one step late (their extra step's blocks and slot are freed after it was launched)."""
    rng = random.Random(24)
    vocab = models.vocab()
    llm = make_llm(models.path("dense"), max_model_len=256, max_num_seqs=3, max_num_batched_tokens=32,
                   block_size=8, num_kv_blocks=40, async_scheduling=True)
    warm = [random_prompt(rng, rng.randint(1, 90), vocab) for _ in range(5)]
    llm.generate(warm, greedy(6), use_tqdm=False)  # leaves real, non-zero states in every slot and many blocks
    prompts = [random_prompt(rng, n, vocab) for n in (1, 45, 7, 90, 16, 33, 2, 64, 20)]
    params = [greedy(rng.randint(1, 12), prompt_logprobs=0) for _ in prompts]
    late = (1, 4, 6)  # these stop on a token id seen in their plain greedy output
    for i, j in zip(late, (1, 2, 3)):
        plain = models.ref("dense", prompts[i], greedy(12)).outputs[0].token_ids
        params[i] = greedy(12, prompt_logprobs=0, stop_token_ids=[plain[j]])
    launches = LaunchLog.attach(llm)
    ids = [llm.engine.add_request(p["prompt_token_ids"], sp) for p, sp in zip(prompts, params)]
    poisoned = []
    outs = run_until_done(llm, ids, before_step=lambda: poisoned.append(poison_free_memory(llm)))

    assert len(prompts) > llm.engine.scheduler.states.num_slots, "slots must be reused within the round"
    assert sum(s for s, _ in poisoned) > 0 and sum(b for _, b in poisoned) > 0
    assert launches.overlapped(), "no step overlapped the next one"
    for i, (p, sp) in enumerate(zip(prompts, params)):
        ref, out = models.ref("dense", p, sp), outs[ids[i]]
        assert_same_completion(f"req{i}", ref.outputs[0], out.outputs[0])
        assert_close_logprobs(f"req{i}.prompt_logprobs", ref.prompt_logprobs, out.prompt_logprobs)
    for i in late:
        c = outs[ids[i]].outputs[0]
        assert c.finish_reason == "stop" and len(c.token_ids) < 12, f"req{i}: {c.finish_reason}, {c.token_ids}"
        assert launches.times_sampled(ids[i]) == len(c.token_ids) + 1, f"req{i} did not stop late"
    assert_async_idle(llm)


# ------------------------------------------------------------------------------------- 6. generate_stream

def _stream_workload(models, rng):
    """-> prompts, params; requests 1 (a stop string across a token boundary) and 2 (a stop token id) stop on a
    token read late under async."""
    vocab = models.vocab()
    prompts = [random_prompt(rng, n, vocab) for n in (10, 70, 25, 4, 40)]
    plain = models.ref("dense", prompts[1], lp_greedy(12)).outputs[0]
    found = boundary_stop(models.solo("dense").tokenizer, plain.token_ids, plain.text, 2, 2)
    assert found, "no usable stop string in the greedy text"
    plain_ids = models.ref("dense", prompts[2], lp_greedy(12)).outputs[0].token_ids
    params = [lp_greedy(9), lp_greedy(12, prompt_logprobs=0, stop=[found[0]]),
              lp_greedy(12, stop_token_ids=[plain_ids[2]]),
              SamplingParams(n=2, temperature=0.8, seed=5, max_tokens=8, logprobs=1, ignore_eos=True),
              lp_greedy(11)]
    return prompts, params


def test_generate_stream_async(models):
    prompts, params = _stream_workload(models, random.Random(25))
    kw = {"max_num_seqs": 3, "max_num_batched_tokens": 32, "block_size": 8}
    sync = make_llm(models.path("dense"), async_scheduling=False, **kw).generate(prompts, params, use_tqdm=False)
    llm = make_llm(models.path("dense"), async_scheduling=True, **kw)
    launches = LaunchLog.attach(llm)

    tokens, texts, final, yields = {}, {}, {}, {}
    for out in llm.generate_stream(prompts, params):
        assert out.request_id not in final, f"{out.request_id} yielded after it finished"
        yields[out.request_id] = yields.get(out.request_id, 0) + 1
        for c in out.outputs:
            tokens.setdefault((out.request_id, c.index), []).extend(c.delta_token_ids)
            texts[(out.request_id, c.index)] = texts.get((out.request_id, c.index), "") + c.delta_text
        if out.finished:
            final[out.request_id] = out
    assert len(final) == len(prompts)
    outs = [final[rid] for rid in sorted(final, key=int)]
    for i, (s, a) in enumerate(zip(sync, outs)):
        assert yields[a.request_id] > 1, f"req{i} was never streamed before finishing"
        for c in a.outputs:
            assert tokens[(a.request_id, c.index)] == c.token_ids, f"req{i}.{c.index}: deltas != final tokens"
            assert texts[(a.request_id, c.index)] == c.text, f"req{i}.{c.index}: delta texts != final text"
        assert_same_request(f"req{i}", s, a)
    for i in (1, 2):  # both stopped on a token read one step late
        c = outs[i].outputs[0]
        want = params[i].stop[0] if i == 1 else params[i].stop_token_ids[0]
        assert c.finish_reason == "stop" and c.stop_reason == want, f"req{i}: {c.finish_reason} {c.stop_reason!r}"
        assert launches.times_sampled(outs[i].request_id) == len(c.token_ids) + 1, f"req{i} did not stop late"
    assert launches.overlapped(), "no step overlapped the next one"
    assert_async_idle(llm)


def test_generate_stream_closed_early_async(models):
    """Closing the stream while a step is in flight aborts the rest; the engine then runs new work correctly."""
    prompts, params = _stream_workload(models, random.Random(25))
    llm = make_llm(models.path("dense"), max_num_seqs=3, max_num_batched_tokens=32, block_size=8,
                   async_scheduling=True)
    stream = llm.generate_stream(prompts, params)
    next(stream)
    assert llm.engine._inflight is not None, "no step in flight when the stream was closed"
    stream.close()
    assert_engine_idle(llm)
    out = llm.generate([prompts[0]], params[0], use_tqdm=False)[0]
    assert_same_completion("after", models.ref("dense", prompts[0], params[0]).outputs[0], out.outputs[0])
    assert_async_idle(llm)


# ---------------------------------------------------------------------------------------- 7. max_model_len

@pytest.mark.parametrize("length, max_tokens", [(50, None), (63, 20)], ids=["unbounded", "one-left"])
def test_clipped_to_max_model_len_async(models, length, max_tokens):
    """The token in flight is the last max_model_len allows: the request is not scheduled again, and stops there."""
    prompt = random_prompt(random.Random(17), length, models.vocab())
    llm = make_llm(models.path("dense"), max_model_len=64, block_size=8, num_kv_blocks=16, max_num_seqs=2,
                   max_num_batched_tokens=32, async_scheduling=True)
    launches = LaunchLog.attach(llm)
    res = llm.generate([prompt], SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0),
                       use_tqdm=False)[0]
    out = res.outputs[0]
    assert len(out.token_ids) == 64 - length and out.finish_reason == "length"
    assert launches.times_sampled(res.request_id) == 64 - length, "a step past max_model_len was run"
    assert_same_completion("clipped", models.ref("dense", prompt, greedy(64 - length)).outputs[0], out)
    assert_async_idle(llm)


# ---------------------------------------------------------------------------------------- 8. the default

def test_async_scheduling_resolution():
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        _async_scheduling(True, torch.device("cpu"), 2)
    assert _async_scheduling(None, torch.device("cpu"), 1) is False
    assert _async_scheduling(None, torch.device("cpu"), 2) is False
    assert _async_scheduling(None, torch.device("cuda"), 1) is True
    assert _async_scheduling(None, torch.device("cuda"), 2) is False, "async is not the default under TP"


def test_async_scheduling_with_tp_is_refused_before_any_worker_starts(models, monkeypatch):
    """It used to be refused only after the TP worker processes had been spawned (and torn down again)."""
    from deltaserve.llm import LLM

    def no_spawn(*a, **k):
        raise AssertionError("a TP worker was started")

    monkeypatch.setattr(LLM, "_start_tp", no_spawn)
    with pytest.raises(ValueError, match="async_scheduling needs tensor_parallel_size=1"):
        make_llm(models.path("dense"), tensor_parallel_size=2, async_scheduling=True)
    assert _async_scheduling(False, torch.device("cuda"), 1) is False
    assert _async_scheduling(True, torch.device("cpu"), 1) is True


# ------------------------------------------------------------------------- 9. the e2e tests' forced-output hook

def test_forced_output_hook_wraps_launch_and_turns_async_off(models, monkeypatch):
    """The server / chat tests drive the model through `serve.testing`; it must see every step the engine launches
    (it once wrapped only `execute`, which the engine no longer calls) and run it synchronously."""
    import json

    from deltaserve.serve.testing import ENV_VAR, install_from_env

    llm = make_llm(models.path("dense"), max_num_seqs=2, async_scheduling=True)
    text = "hello forced world"
    monkeypatch.setenv(ENV_VAR, json.dumps([{"contains": ["MARK"], "output": text},
                                            {"contains": ["BOOM"], "raise": "injected"}]))
    assert install_from_env(llm) and not llm.engine.async_scheduling
    outs = llm.generate(["MARK one", "plain two"], SamplingParams(temperature=0.0, max_tokens=30), use_tqdm=False)
    assert outs[0].outputs[0].text == text and outs[0].outputs[0].finish_reason == "stop"
    assert outs[1].outputs[0].text != text
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate(["BOOM"], SamplingParams(max_tokens=4), use_tqdm=False)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_open_streams_keep_their_own_requests(models, async_scheduling):
    """Two streams open at once, a generate while one is open, and LLM.abort of a streamed request: each stream
    yields exactly its own requests' outputs (deltas adding up to the solo answers), the abort ends its stream's
    request with finish_reason "abort", and nothing spins or is left running."""
    prompts, params = _stream_workload(models, random.Random(26))
    llm = make_llm(models.path("dense"), max_num_seqs=4, max_num_batched_tokens=32, block_size=8,
                   async_scheduling=async_scheduling)
    solo = [models.ref("dense", p, sp).outputs[0] for p, sp in zip(prompts, params)]

    def drain(stream, texts):
        for out in stream:
            texts.setdefault(out.request_id, []).append(out)
            yield out

    got1, got2 = {}, {}
    s1 = drain(llm.generate_stream(prompts[:2], params[:2]), got1)
    s2 = drain(llm.generate_stream(prompts[4:], params[4:]), got2)
    next(s1), next(s2)
    middle = llm.generate([prompts[2]], params[2], use_tqdm=False)[0].outputs[0]  # while both are open
    for _ in zip(s1, s2):
        pass
    for _ in s1:
        pass
    for _ in s2:
        pass
    assert_same_completion("generate mid-stream", solo[2], middle)
    for got, idx in ((got1, (0, 1)), (got2, (4,))):
        assert len(got) == len(idx), f"a stream saw {sorted(got)}"
        for rid, i in zip(sorted(got, key=int), idx):
            outs = got[rid]
            assert outs[-1].finished and all(not o.finished for o in outs[:-1])
            assert "".join(o.outputs[0].delta_text for o in outs) == solo[i].text == outs[-1].outputs[0].text
    stream, aborted = llm.generate_stream(prompts[3:5], [params[4], params[4]]), None
    for out in stream:
        if aborted is None:
            aborted = out.request_id
            llm.abort(aborted)
        elif out.request_id == aborted:
            assert out.finished and out.outputs[0].finish_reason == "abort"
            aborted = "seen"
    assert aborted == "seen", "the aborted request's end never reached its stream"
    assert_engine_idle(llm)


def test_a_stream_checks_its_requests_at_the_call_and_a_dropped_one_aborts_them(models):
    """generate_stream raised a bad request's error only at the first next(); it raises at the call now, with
    nothing queued. Its requests are queued at the call (a generate meanwhile batches them), and a stream dropped
    without being iterated aborts them: no request is left in the engine."""
    import gc

    prompts, params = _stream_workload(models, random.Random(26))
    llm = make_llm(models.path("dense"), max_num_seqs=4, max_num_batched_tokens=32, block_size=8)
    with pytest.raises(ValueError, match="max_model_len"):
        llm.generate_stream([prompts[0], {"prompt_token_ids": [1] * 10_000}], params[0])
    assert not llm.engine.has_unfinished()
    stream = llm.generate_stream(prompts[:2], params[:2])
    assert llm.engine.has_unfinished()
    del stream
    gc.collect()
    assert not llm.engine.has_unfinished() and not llm._inbox
    assert_engine_idle(llm)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
@pytest.mark.parametrize("where", ["launch", "read"])
def test_a_step_that_raises_aborts_every_request_and_leaves_the_engine_usable(models, async_scheduling, where):
    """A step that raises part-way (a device error, Ctrl-C) in one caller's generate, with another caller's stream
    open: before, the other stream's requests went on with a token appended twice (a read that failed after some
    appends was read again) or, when the launch failed under async scheduling, never finished. Now every request is
    aborted, the open stream ends each of its requests with finish_reason "abort", the engine is idle, and the next
    generate answers as a fresh engine does."""
    prompts, params = _stream_workload(models, random.Random(26))
    llm = make_llm(models.path("dense"), max_num_seqs=4, max_num_batched_tokens=32, block_size=8,
                   async_scheduling=async_scheduling)
    other = llm.generate_stream(prompts[:2], params[:2])
    seen = [next(other)]
    runner, real_launch = llm.runner, llm.runner.launch
    calls = []

    def launch(sched):
        calls.append(sched)
        if len(calls) < 2:
            return real_launch(sched)
        runner.launch = real_launch  # fail once
        if where == "launch":
            raise RuntimeError("injected launch failure")
        pending = real_launch(sched)

        def result():
            raise RuntimeError("injected read failure")

        pending.result = result
        return pending

    runner.launch = launch
    with pytest.raises(RuntimeError, match="injected"):
        llm.generate([prompts[4]], params[4], use_tqdm=False)
    seen += list(other)
    last = {}
    for out in seen:
        assert out.request_id not in last or not last[out.request_id].finished, "an output after the request ended"
        last[out.request_id] = out
    assert len(last) == 2 and all(o.finished and o.outputs[0].finish_reason == "abort" for o in last.values())
    assert_engine_idle(llm)
    again = llm.generate(prompts, params, use_tqdm=False)
    for i in (0, 1, 2, 4):
        assert_same_completion(f"request {i} after the failure", models.ref("dense", prompts[i], params[i]).outputs[0],
                               again[i].outputs[0])
