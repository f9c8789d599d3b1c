"""Where features meet (CPU, fp32): prefix caching on/off x async scheduling on/off, dense and MoE, under a KV pool
small enough to preempt, a token budget small enough to chunk every prompt, prompts sharing prefixes across
prefix-snapshot boundaries, and an abort (llm_engine.abort_request) mid-way.

Every request uses a different mix of sampling features: n > 1 with seeds, logprobs and prompt logprobs of the whole
vocabulary (-1), stop strings, stop token ids with min_tokens, penalties, logit_bias, allowed_token_ids, bad_words,
structured outputs (choice, regex), max_tokens=None running into max_model_len, truncate_prompt_tokens (k and -1), a
prompt filling max_model_len scored by its prompt logprobs (the echo of vLLM's scoring: max_tokens=1; 0 is refused as
vLLM refuses it). Each must get what it gets run alone on a roomy synchronous engine without prefix caching (tokens,
text, finish and stop reason, logprobs and prompt logprobs within ATOL), and the engine must end idle: every state
slot free, every KV block free or held only by a cached prefix.
"""
from __future__ import annotations

import random

import pytest
from engine_helpers import (Models, assert_close_logprobs, assert_idle_or_cached, assert_same_completion,
                            count_scheduler_events, make_llm, small_prefix_chunks)

from deltaserve import SamplingParams
from deltaserve.sampling_params import StructuredOutputs

MAX_LEN = 96
BLOCK = 8
PREFIX_CHUNK = 16  # snapshot granularity cut from 256 so these prompts cross it (as in test_prefix_cache.py)
# chunking a prompt differently moves a few logprobs of these checkpoints by up to ~3.4e-4 (test_engine_fuzz.py)
ATOL = 5e-4


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return Models(tmp_path_factory, max_model_len=MAX_LEN)


@pytest.fixture(autouse=True)
def small_chunks(monkeypatch):
    small_prefix_chunks(monkeypatch, PREFIX_CHUNK)


def greedy(max_tokens, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def seeded(max_tokens, seed, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.9, seed=seed, max_tokens=max_tokens, ignore_eos=True, **kw)


def workload(models, kind: str) -> list[tuple[str, dict, SamplingParams]]:
    """(name, prompt, params) per request; the stop conditions are read off the requests' plain solo answers so
    that they trigger."""
    rng = random.Random(5)
    vocab = models.vocab(kind)
    tok = models.solo(kind).tokenizer

    def ids(n):
        return [rng.randrange(vocab) for _ in range(n)]

    heads = [ids(20), ids(37)]  # past one and two snapshot points (16, 32)
    p = {name: {"prompt_token_ids": t} for name, t in [
        ("a", heads[0] + ids(5)), ("b", heads[0] + ids(17)), ("c", heads[1] + ids(3)), ("d", heads[1] + ids(12)),
        ("e", heads[0]), ("f", heads[1] + ids(30)), ("g", ids(33)), ("h", heads[0] + ids(29)), ("i", ids(9)),
        ("long", heads[1] + ids(MAX_LEN - 37 - 10)), ("full", heads[0] + ids(MAX_LEN - 20)),
        ("over", heads[1] + ids(MAX_LEN)), ("cut", ids(30) + heads[0] + ids(4))]}
    plain = models.ref(kind, p["c"], greedy(10)).outputs[0]
    text = tok.decode(plain.token_ids[3:5])
    stop = text[:2] if text.strip() else "a"
    # the plain answer's 2nd token, which min_tokens=3 bans there, and the first later token of the answer it leaves
    early = models.ref(kind, p["d"], greedy(10)).outputs[0].token_ids[1]
    held = models.ref(kind, p["d"], greedy(10, stop_token_ids=[early], min_tokens=3)).outputs[0].token_ids
    late = next(t for k, t in enumerate(held) if k >= 3 and t not in held[:3])
    banned = models.ref(kind, p["g"], greedy(6)).outputs[0].token_ids[0]
    return [
        ("n2-seeded", p["a"], seeded(6, 7, n=2, logprobs=2, prompt_logprobs=1)),
        ("whole-vocab", p["b"], greedy(3, logprobs=-1, prompt_logprobs=-1)),
        ("stop-string", p["c"], greedy(10, stop=[stop], logprobs=0)),
        ("stop-token-min", p["d"], greedy(10, stop_token_ids=[early, late], min_tokens=3, logprobs=1)),
        ("penalties", p["e"], seeded(8, 3, repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.4,
                                     logprobs=0)),
        ("n3-penalties", p["f"], seeded(5, 11, n=3, frequency_penalty=1.0, top_k=5)),
        ("logit-bias", p["g"], greedy(6, logit_bias={banned: -100.0, 7: 4.0}, logprobs=1)),
        ("allowed-bad", p["h"], seeded(6, 2, allowed_token_ids=list(range(10, 40)), bad_words=[tok.decode([12])])),
        ("choice", p["a"], greedy(None, structured_outputs=StructuredOutputs(choice=["yes", "no", "maybe so"]))),
        ("regex", p["i"], seeded(12, 4, structured_outputs=StructuredOutputs(regex="[a-d]{2,4}x"), logprobs=0)),
        ("to-max-len", p["long"], greedy(None, logprobs=0)),
        ("score-full", p["full"], greedy(1, prompt_logprobs=2)),
        ("truncate-1", p["over"], greedy(4, truncate_prompt_tokens=-1, prompt_logprobs=0)),
        ("truncate-k", p["cut"], seeded(5, 9, n=2, truncate_prompt_tokens=40)),
    ]


def run(llm, work, arrive: list[int], aborts: dict[str, int]) -> dict:
    """Add work[i] before step arrive[i] (under its name), abort aborts[name] before that step -> {name: final
    RequestOutput} of those that finished."""
    eng, done = llm.llm_engine, {}
    for step in range(1000):
        for name, at in aborts.items():
            if at == step:
                eng.abort_request(name)
        for (name, prompt, params), at in zip(work, arrive):
            if at == step:
                eng.add_request(name, prompt, params)
        if step > max(arrive) and not eng.has_unfinished_requests():
            return done
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
    raise AssertionError("the engine did not finish the workload")


CASES = [  # (kind, prefix caching, async scheduling)
    ("dense", False, False), ("dense", True, False), ("dense", False, True), ("dense", True, True),
    ("moe", True, True),
]


@pytest.mark.parametrize("kind, cached, async_scheduling", CASES,
                         ids=[f"{k}{'-prefix' if c else ''}{'-async' if a else ''}" for k, c, a in CASES])
def test_feature_matrix_equals_solo(models, kind, cached, async_scheduling):
    work = workload(models, kind)
    kw = {"enable_prefix_caching": True, "prefix_cache_slots": 4} if cached else {}
    llm = make_llm(models.path(kind), max_model_len=MAX_LEN, block_size=BLOCK, max_num_seqs=4,
                   max_num_batched_tokens=24, num_kv_blocks=22, async_scheduling=async_scheduling, **kw)
    tally = count_scheduler_events(llm)
    rng = random.Random(1)
    arrive = sorted(rng.randrange(0, 16) for _ in work)
    arrive[0] = 0
    victim = ("victim", {"prompt_token_ids": work[0][1]["prompt_token_ids"] + [3] * 20},
              seeded(30, 1, n=2, logprobs=1))
    done = run(llm, work + [victim], arrive + [2], {"victim": 9})

    assert "victim" not in done, "the aborted request finished before its abort"
    assert set(done) == {name for name, _, _ in work}
    assert tally["preempted"], "no request was preempted: the KV pool is not tight enough"
    assert tally["forks"] and tally["chunked"]
    assert not cached or tally["restores"], "no request started from a cached prefix"
    for name, prompt, params in work:
        ref, out = models.ref(kind, prompt, params), done[name]
        assert out.prompt_token_ids == ref.prompt_token_ids, name
        assert len(out.outputs) == len(ref.outputs), name
        for j, (rc, oc) in enumerate(zip(ref.outputs, out.outputs)):
            assert_same_completion(f"{name}.{j}", rc, oc, ATOL)
            assert (oc.text, oc.stop_reason) == (rc.text, rc.stop_reason), f"{name}.{j}"
        assert_close_logprobs(f"{name}.prompt_logprobs", ref.prompt_logprobs, out.prompt_logprobs, ATOL)
    assert llm.engine._inflight is None
    assert_idle_or_cached(llm)


def test_the_workload_exercises_its_features(models):
    """The stop conditions trigger, max_tokens=None runs into max_model_len, truncation cuts, and max_tokens=0 is
    refused (as vLLM's SamplingParams does)."""
    outs = {name: models.ref("dense", prompt, params) for name, prompt, params in workload(models, "dense")}
    assert outs["stop-string"].outputs[0].finish_reason == "stop"
    assert outs["stop-token-min"].outputs[0].finish_reason == "stop"
    assert len(outs["stop-token-min"].outputs[0].token_ids) == 4  # at the first token min_tokens=3 allows
    assert len(outs["to-max-len"].prompt_token_ids) + len(outs["to-max-len"].outputs[0].token_ids) == MAX_LEN
    assert len(outs["truncate-1"].prompt_token_ids) == MAX_LEN - 4
    assert len(outs["truncate-k"].prompt_token_ids) == 40
    assert len(outs["score-full"].prompt_logprobs) == MAX_LEN
    assert outs["choice"].outputs[0].text in ("yes", "no", "maybe so")
    assert all(len(lp) == models.vocab("dense") for lp in outs["whole-vocab"].prompt_logprobs[1:])
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
