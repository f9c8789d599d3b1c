"""Engine invariants on the CPU reference path (fp32): what a request gets back must not depend on what else the
engine is doing. Batched == solo, chunked prefill == one shot, preempted == uninterrupted, freed state slots and KV
blocks are never read, abort frees everything, seeded sampling ignores the batch, stop strings / n / max_model_len
behave as in vLLM.

"Solo" references come from one LLM with a large token budget, running each request alone.
"""
from __future__ import annotations

import math
import os
import random

import pytest
from engine_helpers import (
    LOGPROB_ATOL,
    Models,
    StepLog,
    assert_close_logprobs,
    assert_engine_idle,
    assert_same_completion,
    boundary_stop,
    free_slots_and_blocks,
    greedy,
    make_llm,
    poison_free_memory,
    random_prompt,
    run_until_done,
    small_prefix_chunks,
)

from deltaserve import LLM, SamplingParams
from deltaserve.worker.model_runner import PROMPT_LOGPROB_ROWS


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return Models(tmp_path_factory)


# ------------------------------------------------------------------------------------------ 1. batched == solo

LENGTHS = [1, 2, 3, 5, 8, 13, 16, 17, 31, 32, 33, 47, 63, 64, 65, 90, 127, 128, 129, 170, 201, 255, 280, 300]


@pytest.mark.parametrize("kind, lengths", [("dense", LENGTHS), ("moe", LENGTHS[1::2])], ids=["dense", "moe"])
def test_batched_equals_solo(models, kind, lengths):
    rng = random.Random(1)
    prompts = [random_prompt(rng, n, models.vocab(kind)) for n in lengths]
    rng.shuffle(prompts)  # long and short prompts interleaved in arrival order
    max_tokens = [1, 20] + [rng.randint(1, 20) for _ in prompts[2:]]
    params = [greedy(m) for m in max_tokens]
    budget, seqs = 64, 4
    llm = make_llm(models.path(kind), max_num_seqs=seqs, max_num_batched_tokens=budget, block_size=8)
    log = StepLog.attach(llm)
    outs = llm.generate(prompts, params, use_tqdm=False)

    assert budget < max(lengths), "the longest prompt must be chunk-prefilled"
    assert log.mixed_steps() > 0, "no step mixed a prefill chunk with another request's decode"
    assert any(st.num_waiting for st in log.steps), "requests never queued behind max_num_seqs"
    for i, st in enumerate(log.steps):
        assert sum(s.num_new_tokens for s in st.seqs) <= budget, f"step {i} exceeds the token budget"
        assert len(st.seqs) <= seqs, f"step {i} runs more than max_num_seqs sequences"
    for i, (p, sp, out) in enumerate(zip(prompts, params, outs)):
        assert out.prompt_token_ids == p["prompt_token_ids"]
        assert len(out.outputs[0].token_ids) == sp.max_tokens
        assert_same_completion(f"req{i}[{len(p['prompt_token_ids'])} tokens]",
                               models.ref(kind, p, sp).outputs[0], out.outputs[0])
    assert_engine_idle(llm)


# ------------------------------------------------------------------------- 2. chunked prefill == one shot

@pytest.mark.parametrize("kind, budget, top", [("dense", 32, 0), ("dense", 29, 2), ("moe", 32, 0)],
                         ids=["dense-32", "dense-29-top2", "moe-32"])
def test_chunked_prefill_equals_one_shot(models, kind, budget, top):
    prompt = random_prompt(random.Random(2), 300, models.vocab(kind))
    sp = greedy(8, prompt_logprobs=top)
    ref = models.ref(kind, prompt, sp)  # budget 512: the whole prompt in one step
    # ... whose 299 prompt logprobs the runner computes PROMPT_LOGPROB_ROWS rows at a time (bounded temporaries)
    assert PROMPT_LOGPROB_ROWS < 299
    llm = make_llm(models.path(kind), max_num_seqs=2, max_num_batched_tokens=budget)
    log = StepLog.attach(llm)
    out = llm.generate([prompt], sp, use_tqdm=False)[0]

    prefill_steps = sum(1 for st in log.steps for s in st.seqs if not s.is_decode)
    assert prefill_steps == math.ceil(300 / budget)
    assert len(out.prompt_logprobs) == 300 and out.prompt_logprobs[0] is None
    assert all(len(d) >= 1 and len(d) <= top + 1 for d in out.prompt_logprobs[1:])
    assert_close_logprobs("prompt_logprobs", ref.prompt_logprobs, out.prompt_logprobs)
    assert_same_completion("completion", ref.outputs[0], out.outputs[0])


# ----------------------------------------------------------------------- 3. preempted == uninterrupted

@pytest.mark.parametrize("budget, prompt_logprobs", [(64, None), (12, 0)], ids=["decode-preempt", "mid-prefill"])
def test_preempted_equals_uninterrupted(models, budget, prompt_logprobs):
    rng = random.Random(3)
    prompts = [random_prompt(rng, n, models.vocab()) for n in (20, 30, 12, 25, 40, 9)]
    params = greedy(20, prompt_logprobs=prompt_logprobs)
    # 16 blocks x 4 tokens = one max_model_len sequence; four running requests need far more
    llm = make_llm(models.path("dense"), max_model_len=64, block_size=4, num_kv_blocks=16, max_num_seqs=4,
                   max_num_batched_tokens=budget)
    log = StepLog.attach(llm)
    outs = llm.generate(prompts, params, use_tqdm=False)

    assert log.preempted_ids(), "no request was preempted: the KV pool is not tight enough"
    assert any(r.num_preemptions > 0 for r in log.requests.values())
    if budget < 40:  # some victim was still in its prompt when preempted
        mid = []
        for j, st in enumerate(log.steps):
            for rid in st.preempted:
                last = [s for prev in log.steps[:j] for s in prev.seqs if s.request_id == rid]
                mid += [rid] if last and last[-1].is_partial_prefill else []
        assert mid, "no request was preempted in the middle of its prefill"
    for i, (p, out) in enumerate(zip(prompts, outs)):
        ref = models.ref("dense", p, params)
        assert_same_completion(f"req{i}", ref.outputs[0], out.outputs[0])
        assert_close_logprobs(f"req{i}.prompt_logprobs", ref.prompt_logprobs, out.prompt_logprobs)
    assert_engine_idle(llm)


def test_a_forked_sample_never_recomputes_prompt_logprobs(models, monkeypatch):
    """Only sample 0 reports a group's prompt logprobs; a forked sample that was preempted and prefilled again computed
    logits rows (and a log-softmax) for the whole prompt, then dropped them. Outputs stay those of the reference."""
    rng = random.Random(5)
    prompts = [random_prompt(rng, n, models.vocab()) for n in (20, 30, 25, 18)]
    params = SamplingParams(n=2, temperature=0.8, seed=11, max_tokens=16, prompt_logprobs=0, ignore_eos=True)
    llm = make_llm(models.path("dense"), max_model_len=64, block_size=4, num_kv_blocks=16, max_num_seqs=4,
                   max_num_batched_tokens=64)
    log = StepLog.attach(llm)
    rows = []
    inner = llm.runner._logit_positions

    def positions(s):
        out = inner(s)
        rows.append((s.request.request_id, s.request.num_prompt_tokens, out))
        return out

    monkeypatch.setattr(llm.runner, "_logit_positions", positions)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert any("#" in rid for rid in log.preempted_ids()), "no forked sample was preempted: the pool is too roomy"
    assert not [(rid, pos) for rid, n, pos in rows if "#" in rid and any(p < n - 1 for p in pos)]
    for i, (p, out) in enumerate(zip(prompts, outs)):
        ref = models.ref("dense", p, params)
        assert_close_logprobs(f"req{i}.prompt_logprobs", ref.prompt_logprobs, out.prompt_logprobs)
        for j, (rc, oc) in enumerate(zip(ref.outputs, out.outputs)):
            assert_same_completion(f"req{i}.{j}", rc, oc)
    assert_engine_idle(llm)


# -------------------------------------------------------------------------- 4. slot reuse / isolation

def test_freed_slots_and_blocks_are_never_read(models):
    """NaN in every free state slot and free KV block before every step: a request that reads memory it does not own
    (a stale slot not zeroed on admission, the unwritten tail of a fresh block) turns NaN or changes its answer."""
    rng = random.Random(4)
    vocab = models.vocab()
    llm = make_llm(models.path("dense"), max_model_len=256, max_num_seqs=3, max_num_batched_tokens=32,
                   block_size=8, num_kv_blocks=40)
    warm = [random_prompt(rng, rng.randint(1, 90), vocab) for _ in range(5)]
    llm.generate(warm, greedy(6), use_tqdm=False)  # leaves real, non-zero states in every slot and many blocks
    prompts = [random_prompt(rng, n, vocab) for n in (1, 45, 7, 90, 16, 33, 2, 64, 20)]
    params = [greedy(rng.randint(1, 12), prompt_logprobs=0) for _ in prompts]
    ids = [llm.engine.add_request(p["prompt_token_ids"], sp) for p, sp in zip(prompts, params)]
    poisoned = []
    outs = run_until_done(llm, ids, before_step=lambda: poisoned.append(poison_free_memory(llm)))

    assert len(prompts) > llm.engine.scheduler.states.num_slots, "slots must be reused within the round"
    assert sum(s for s, _ in poisoned) > 0 and sum(b for _, b in poisoned) > 0
    for i, (p, sp) in enumerate(zip(prompts, params)):
        ref, out = models.ref("dense", p, sp), outs[ids[i]]
        assert_same_completion(f"req{i}", ref.outputs[0], out.outputs[0])
        assert_close_logprobs(f"req{i}.prompt_logprobs", ref.prompt_logprobs, out.prompt_logprobs)
    assert_engine_idle(llm)


def test_poisoning_a_live_slot_is_detected(models):
    """Control for the test above: NaN in the state slot of a running request does reach its output."""
    prompt = random_prompt(random.Random(5), 20, models.vocab())
    llm = make_llm(models.path("dense"), max_num_seqs=2, max_num_batched_tokens=64)
    rid = llm.engine.add_request(prompt["prompt_token_ids"], greedy(6))
    llm.engine.step()  # prefill + first token
    slot = llm.engine.scheduler.running[0].state_slot
    assert slot not in free_slots_and_blocks(llm)[0]
    for t in llm.runner.caches.recurrent:
        t[slot] = float("nan")
    out = run_until_done(llm, [rid])[rid].outputs[0]
    assert any(not math.isfinite(lp) for d in out.logprobs[1:] for lp in d.values())


def test_probe_answer_survives_many_rounds(models):
    rng = random.Random(6)
    vocab = models.vocab()
    probe, probe_sp = random_prompt(rng, 77, vocab), greedy(12)
    ref = models.ref("dense", probe, probe_sp).outputs[0]
    llm = make_llm(models.path("dense"), max_num_seqs=3, max_num_batched_tokens=48, block_size=8)
    for r in range(5):
        others = [random_prompt(rng, rng.randint(1, 120), vocab) for _ in range(rng.randint(2, 4))]
        params = [greedy(rng.randint(1, 10)) for _ in others]
        pos = r % (len(others) + 1)  # probe first, in the middle, last
        others.insert(pos, probe)
        params.insert(pos, probe_sp)
        outs = llm.generate(others, params, use_tqdm=False)
        assert_same_completion(f"round{r}", ref, outs[pos].outputs[0])
        assert_engine_idle(llm)


# ------------------------------------------------------------------------------------------------ 5. abort

def _abort_llm(models, **kw):
    kw = {"max_num_seqs": 4, "max_num_batched_tokens": 64, **kw}
    return make_llm(models.path("dense"), **kw)


def test_abort_running_request(models):
    rng = random.Random(7)
    prompts = [random_prompt(rng, 20, models.vocab()) for _ in range(3)]
    sp = greedy(10)
    llm = _abort_llm(models)
    ids = [llm.engine.add_request(p["prompt_token_ids"], sp) for p in prompts]
    for _ in range(4):
        llm.engine.step()
    out = llm.engine.abort(ids[1])
    assert out.finished and out.request_id == ids[1]
    got, ref = out.outputs[0], models.ref("dense", prompts[1], sp).outputs[0]
    assert got.finish_reason == "abort"
    assert 0 < len(got.token_ids) < sp.max_tokens
    assert got.token_ids == ref.token_ids[: len(got.token_ids)]
    assert llm.engine.abort(ids[1]) is None, "a second abort of the same id finds nothing"
    rest = run_until_done(llm, [ids[0], ids[2]])
    for i in (0, 2):
        assert_same_completion(f"req{i}", models.ref("dense", prompts[i], sp).outputs[0], rest[ids[i]].outputs[0])
    assert_engine_idle(llm)


@pytest.mark.parametrize("where", ["waiting", "mid-prefill", "everything"])
def test_abort_frees_everything(models, where):
    rng = random.Random(8)
    vocab = models.vocab()
    llm = _abort_llm(models, max_num_seqs=2, max_num_batched_tokens=32)
    lengths = {"waiting": (10, 10, 10), "mid-prefill": (200,), "everything": (5, 150, 30, 12)}[where]
    prompts = [random_prompt(rng, n, vocab) for n in lengths]
    ids = [llm.engine.add_request(p["prompt_token_ids"], greedy(8)) for p in prompts]
    for _ in range(3):
        llm.engine.step()
    s = llm.engine.scheduler
    if where == "waiting":
        target = [ids[2]]
        assert s.waiting and s.waiting[0].request_id == ids[2] and s.waiting[0].num_computed_tokens == 0
    elif where == "mid-prefill":
        target = [ids[0]]
        assert 0 < s.running[0].num_computed_tokens < 200
    else:
        target = ids
        assert s.running and s.waiting
    for rid in target:
        out = llm.engine.abort(rid)
        assert out.finished and out.outputs[0].finish_reason == "abort", rid
        if where != "everything":
            assert out.outputs[0].token_ids == []
    rest = run_until_done(llm, [rid for rid in ids if rid not in target])
    for rid, out in rest.items():
        i = ids.index(rid)
        assert_same_completion(f"req{i}", models.ref("dense", prompts[i], greedy(8)).outputs[0], out.outputs[0])
    assert_engine_idle(llm)
    assert llm.engine.step() == []
    # the engine is still sound afterwards
    again = llm.generate([prompts[0]], greedy(8), use_tqdm=False)[0]
    assert_same_completion("after", models.ref("dense", prompts[0], greedy(8)).outputs[0], again.outputs[0])


@pytest.mark.parametrize("forked", [True, False], ids=["after-fork", "before-fork"])
def test_abort_n_gt_1(models, forked):
    prompt = random_prompt(random.Random(9), 60, models.vocab())
    llm = _abort_llm(models, max_num_batched_tokens=16)
    rid = llm.engine.add_request(prompt["prompt_token_ids"], SamplingParams(n=3, temperature=1.0, max_tokens=20))
    for _ in range(5 if forked else 1):  # 60 prompt tokens / 16 per step: forked during step 4
        llm.engine.step()
    assert len(llm.engine.scheduler.running) == (3 if forked else 1)
    out = llm.engine.abort(rid)
    assert out.finished and [c.index for c in out.outputs] == [0, 1, 2]
    assert [c.finish_reason for c in out.outputs] == ["abort"] * 3
    assert_engine_idle(llm)


# --------------------------------------------------------------------------------------- 6. seeded sampling

@pytest.mark.parametrize("pos", [0, 2, 5], ids=["first", "middle", "last"])
def test_seeded_sampling_ignores_batch(models, pos):
    rng = random.Random(10)
    vocab = models.vocab()
    target = random_prompt(rng, 40, vocab)
    seeded = SamplingParams(seed=123, temperature=1.0, max_tokens=12, ignore_eos=True, logprobs=0)
    ref = models.ref("dense", target, seeded).outputs[0]
    others = [random_prompt(rng, rng.randint(1, 100), vocab) for _ in range(5)]
    params = [SamplingParams(temperature=1.0, max_tokens=rng.randint(1, 12), ignore_eos=True) if i % 2
              else greedy(rng.randint(1, 12)) for i in range(5)]
    others.insert(pos, target)
    params.insert(pos, seeded)
    llm = make_llm(models.path("dense"), max_num_seqs=3, max_num_batched_tokens=32, block_size=8)
    outs = llm.generate(others, params, use_tqdm=False)
    assert_same_completion("seeded", ref, outs[pos].outputs[0])


def test_unseeded_samples_differ(models):
    prompt = random_prompt(random.Random(11), 30, models.vocab())
    llm = make_llm(models.path("dense"), max_num_seqs=4, max_num_batched_tokens=128)
    outs = llm.generate([prompt] * 4, SamplingParams(temperature=1.0, max_tokens=12, ignore_eos=True),
                        use_tqdm=False)
    assert len({tuple(o.outputs[0].token_ids) for o in outs}) > 1


# ----------------------------------------------------------------------------------------- 7. stop strings

def _stop_across_tokens(llm: LLM, before: int, after: int):
    """A text prompt, its greedy output (30 tokens) and a stop string around one of its token boundaries: `before`
    characters of it end one token's text, `after` follow (engine_helpers.boundary_stop's (string, start, need))."""
    tok = llm.tokenizer
    base = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    candidates = ("The numbers are", "Hello world, this is", "def f(x):", "1 2 3 4", "Once upon a time",
                  "The quick brown fox", "import os\n", "In the beginning", "Dear friend,", "x = [")
    for text_prompt in candidates:
        ref = llm.generate([text_prompt], base, use_tqdm=False)[0].outputs[0]
        if tok.decode(ref.token_ids) != ref.text:
            continue
        if found := boundary_stop(tok, ref.token_ids, ref.text, before, after):
            return text_prompt, ref, found
    pytest.fail("no greedy output had a usable token boundary")


@pytest.mark.parametrize("before, after, include", [(2, 2, False), (2, 2, True), (1, 6, False)],
                         ids=["2+2", "2+2-include", "1+6"])
def test_stop_string_across_tokens(models, before, after, include):
    llm = models.solo("dense")
    text_prompt, ref, (stop, start, need) = _stop_across_tokens(llm, before, after)
    sp = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=["\x00never\x00", stop],
                        include_stop_str_in_output=include)
    out = llm.generate([text_prompt], sp, use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == (ref.text[: start + len(stop)] if include else ref.text[:start])
    assert out.token_ids == ref.token_ids[:need], "generation must end with the token completing the stop string"


def test_streamed_text_holds_back_a_partial_stop_string(models):
    """A stop string's first characters end one token's text: a streamed output's cumulative `text` held them (the
    delta_text did not) and then shrank when the next token completed the string; as vLLM's cumulative outputs, it is
    now the deltas so far, each a prefix of the final text."""
    llm = models.solo("dense")
    text_prompt, ref, (stop, start, need) = _stop_across_tokens(llm, 2, 2)
    sp = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop])
    outs = [o.outputs[0] for o in llm.generate_stream([text_prompt], sp)]
    final, sent = outs[-1], ""
    assert final.finish_reason == "stop" and final.text == ref.text[:start]
    for c in outs:
        sent += c.delta_text
        assert c.text == sent and final.text.startswith(c.text), (c.text, final.text)


def test_streamed_text_holds_nothing_back_when_the_stop_string_is_shown(models):
    """include_stop_str_in_output=True: a stop string is never cut from the text, so vLLM holds no characters back
    from streamed outputs; here each step's text lagged by the longest stop string's length - 1 characters."""
    llm = models.solo("dense")
    tok = llm.tokenizer
    text_prompt, ref, (stop, start, need) = _stop_across_tokens(llm, 2, 2)
    sp = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=[stop, "\x00" * 20],
                        include_stop_str_in_output=True)
    outs = [o.outputs[0] for o in llm.generate_stream([text_prompt], sp)]
    final, sent = outs[-1], ""
    assert final.finish_reason == "stop" and final.text == ref.text[: start + len(stop)]
    checked = 0
    for c in outs:
        sent += c.delta_text
        assert c.text == sent
        whole = tok.decode(c.token_ids)
        if not c.finished() and whole and "\ufffd" not in whole:  # no character cut in two; the end is cut
            assert c.text == whole, (c.text, whole)
            checked += 1
    assert checked > 1


def test_stop_strings_ending_at_one_position_go_by_list_order(models):
    """Two stop strings completed by one token at the same position: the first listed wins, as in vLLM (the
    alphabetically smallest won)."""
    llm = models.solo("dense")
    tok = llm.tokenizer
    ref = llm.generate(["The quick brown fox"], SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert tok.decode(ref.token_ids) == ref.text
    for i in range(len(ref.token_ids)):
        start = len(tok.decode(ref.token_ids[:i]))
        piece = tok.decode(ref.token_ids[: i + 1])[start:]
        if len(piece) >= 2 and ref.text.find(piece[0]) == start:  # no earlier match of either string
            break
    else:
        pytest.fail("no greedy token of two or more characters starts a fresh character")
    for stops in ([piece[:2], piece[:1]], [piece[:1], piece[:2]]):
        sp = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True, stop=stops,
                            include_stop_str_in_output=True)
        out = llm.generate(["The quick brown fox"], sp, use_tqdm=False)[0].outputs[0]
        assert out.stop_reason == stops[0] and out.text == ref.text[: start + len(stops[0])], (stops, out.text)


def test_stop_strings_without_a_tokenizer_are_refused(models, tmp_path):
    """They were ignored without a word: the request ran to its length limit."""
    import shutil

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in os.listdir(models.path("dense")):
        if not name.startswith(("tokenizer", "chat_template")):
            shutil.copy(os.path.join(models.path("dense"), name), bare / name)
    llm = make_llm(str(bare))
    assert llm.tokenizer is None
    with pytest.raises(ValueError, match="stop strings need the model's tokenizer"):
        llm.generate([{"prompt_token_ids": [5, 6, 7]}], SamplingParams(max_tokens=4, stop=["x"]), use_tqdm=False)


def _first_completion(ids: list[int], seqs: list[list[int]]) -> int | None:
    """The first position of ids at which one of seqs ends, else None."""
    return next((j for j in range(len(ids)) for q in seqs if j + 1 >= len(q) and ids[j + 1 - len(q):j + 1] == q),
                None)


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_bad_words_never_complete(models, async_scheduling):
    """vLLM's bad_words: a two-token word taken from the greedy output and a one-token one. The output follows the
    unconstrained one until a word would complete there, differs at that token, and never holds a word. Under async
    scheduling a multi-token word needs the previous sample before the next step's ban: the step is read first."""
    from deltaserve.tokenizer import bad_word_ids

    llm = make_llm(models.path("dense"), async_scheduling=async_scheduling)
    tok = llm.tokenizer
    base = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    ref = llm.generate(["The quick brown fox"], base, use_tqdm=False)[0].outputs[0].token_ids
    two = next(w for i in range(3, len(ref) - 1) if ref[i:i + 2] in bad_word_ids(tok, [w := tok.decode(ref[i:i + 2])])
               and _first_completion(ref, bad_word_ids(tok, [w])) == i + 1)
    one = next(w for i in range(len(ref)) if [ref[i]] in bad_word_ids(tok, [w := tok.decode(ref[i:i + 1])]))
    for words in ([two], [one], [two, one]):
        seqs = bad_word_ids(tok, words)
        sp = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, bad_words=words)
        out = llm.generate(["The quick brown fox"], sp, use_tqdm=False)[0].outputs[0].token_ids
        j = _first_completion(ref, seqs)
        assert out[:j] == ref[:j] and out[j] != ref[j], (words, seqs, ref, out)
        assert _first_completion(out, seqs) is None, (words, seqs, out)


def test_allowed_token_ids_hold_against_bans(models):
    """Bans (min_tokens' EOS, bad words) covering every allowed id left the row all -inf, and token 0 came out:
    refused up front where known, and a multi-token bad word gives way for the step where it would empty the set."""
    from deltaserve.tokenizer import bad_word_ids

    llm = models.solo("dense")
    tok = llm.tokenizer
    eos = tok.token_to_id("<|im_end|>")
    a = tok.encode("a")
    with pytest.raises(ValueError, match="only EOS and stop tokens, which min_tokens bans"):
        llm.generate(["hi"], SamplingParams(max_tokens=4, min_tokens=2, allowed_token_ids=[eos]), use_tqdm=False)
    with pytest.raises(ValueError, match="only tokens that bad_words ban"):
        llm.generate(["hi"], SamplingParams(max_tokens=4, allowed_token_ids=a, bad_words=["a"]), use_tqdm=False)
    # the two together: EOS (banned by min_tokens at first) and a one-token bad word (the bad word came out)
    with pytest.raises(ValueError, match="only tokens that bad_words ban and EOS and stop tokens"):
        llm.generate(["hi"], SamplingParams(max_tokens=4, min_tokens=2, allowed_token_ids=a + [eos], bad_words=["a"]),
                     use_tqdm=False)
    # after "a", the bad words "aa" and "ab" ban both allowed tokens: they give way, and "a" (biased) goes on
    b = tok.encode("b")
    assert [a + a, a + b] == [ids for ids in bad_word_ids(tok, ["aa", "ab"]) if ids[0] == a[0]]
    out = llm.generate(["hi"], SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logit_bias={a[0]: 50},
                                              allowed_token_ids=a + b, bad_words=["aa", "ab"]),
                       use_tqdm=False)[0].outputs[0]
    assert out.token_ids == a * 6, out.token_ids


def test_truncate_prompt_tokens_keeps_the_prompts_end(models):
    """vLLM's truncate_prompt_tokens: the request reads its prompt's last k tokens (-1: as many as leave room for
    max_tokens), prompt logprobs included."""
    llm = models.solo("dense")
    ids = random_prompt(random.Random(5), 40, models.vocab())["prompt_token_ids"]
    cut = llm.generate([{"prompt_token_ids": ids}], greedy(5, truncate_prompt_tokens=12, prompt_logprobs=0),
                       use_tqdm=False)[0]
    alone = llm.generate([{"prompt_token_ids": ids[-12:]}], greedy(5, prompt_logprobs=0), use_tqdm=False)[0]
    assert cut.prompt_token_ids == ids[-12:] and cut.outputs[0].token_ids == alone.outputs[0].token_ids
    assert cut.prompt_logprobs == alone.prompt_logprobs
    room = make_llm(models.path("dense"), max_model_len=32)
    out = room.generate([{"prompt_token_ids": ids}], greedy(5, truncate_prompt_tokens=-1), use_tqdm=False)[0]
    assert out.prompt_token_ids == ids[-27:] and len(out.outputs[0].token_ids) == 5
    # beyond max_model_len it can only be a mistake (vLLM raises too); it was taken as "keep everything"
    assert room.generate([{"prompt_token_ids": ids[:8]}], greedy(2, truncate_prompt_tokens=32),
                         use_tqdm=False)[0].prompt_token_ids == ids[:8]
    with pytest.raises(ValueError, match=r"^truncate_prompt_tokens=33 is more than max_model_len \(32\)"):
        room.generate([{"prompt_token_ids": ids[:8]}], greedy(2, truncate_prompt_tokens=33), use_tqdm=False)
    assert_engine_idle(room)


def test_stop_token_ids(models):
    llm = models.solo("dense")
    prompt = random_prompt(random.Random(12), 25, models.vocab())
    ref = llm.generate([prompt], greedy(20), use_tqdm=False)[0].outputs[0]
    # a token from position 6 on whose own text is plain (so leaving it out of the text shows)
    stop_tok = next(t for t in ref.token_ids[6:] if llm.tokenizer.decode([t]).strip().isascii()
                    and llm.tokenizer.decode([t]).strip())
    first = ref.token_ids.index(stop_tok)
    out = llm.generate([prompt], greedy(20, stop_token_ids=[stop_tok]), use_tqdm=False)[0].outputs[0]
    assert out.token_ids == ref.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_tok
    assert_close_logprobs("logprobs", ref.logprobs[: first + 1], out.logprobs)
    # the stop token's own text is left out of the text unless include_stop_str_in_output (as vLLM)
    upto, through = (llm.generate([prompt], greedy(n), use_tqdm=False)[0].outputs[0].text for n in (first, first + 1))
    assert out.text == upto
    kept = llm.generate([prompt], greedy(20, stop_token_ids=[stop_tok], include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.token_ids == out.token_ids and kept.text == through


@pytest.mark.parametrize("min_tokens", [2, 3, 6], ids=["before-stop", "at-stop", "past-stop"])
def test_min_tokens_holds_back_stop_tokens(models, min_tokens):
    """The greedy run would stop on its token 2 (stop_token_ids): with min_tokens <= 2 it still does; with 3 or 6 the
    stop token cannot be sampled for the first min_tokens tokens (the run diverges there) and ends on it later or at
    max_tokens. Logprobs stay the raw model's: the diverging position reports the stop token's raw logprob."""
    llm = models.solo("dense")
    prompt = random_prompt(random.Random(15), 20, models.vocab())
    ref = llm.generate([prompt], greedy(16), use_tqdm=False)[0].outputs[0]
    stop_tok = ref.token_ids[2]
    first = ref.token_ids.index(stop_tok)
    assert first == 2, "the greedy run repeats its token 2 earlier: pick another prompt"
    params = SamplingParams(temperature=0.0, max_tokens=16, logprobs=1, ignore_eos=True, stop_token_ids=[stop_tok],
                            min_tokens=min_tokens)
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    if min_tokens <= first:
        assert out.token_ids == ref.token_ids[: first + 1] and out.finish_reason == "stop"
        return
    assert stop_tok not in out.token_ids[:min_tokens] and len(out.token_ids) > min_tokens
    assert out.token_ids[:first] == ref.token_ids[:first] and out.token_ids[first] != stop_tok
    assert max(out.logprobs[first], key=out.logprobs[first].get) == stop_tok  # raw top-1 at the banned position
    assert out.finish_reason == "length" or out.token_ids[-1] == stop_tok and stop_tok not in out.token_ids[:-1]


def test_min_tokens_holds_back_stop_strings(models):
    """A stop string the greedy text reaches within its first tokens does not end a request before min_tokens."""
    llm = models.solo("dense")
    prompt = random_prompt(random.Random(16), 20, models.vocab())
    ref = llm.generate([prompt], greedy(12), use_tqdm=False)[0].outputs[0]
    stop = ref.text[:2]
    early = llm.generate([prompt], greedy(12, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert early.finish_reason == "stop" and len(early.token_ids) < 8
    out = llm.generate([prompt], greedy(12, stop=[stop], min_tokens=8), use_tqdm=False)[0].outputs[0]
    assert out.token_ids[:8] == ref.token_ids[:8]
    # a longer stop string beside it changes nothing: the early match is not found again once min_tokens is reached
    both = llm.generate([prompt], greedy(12, stop=[stop, "\x00a much longer stop\x00"], min_tokens=8),
                        use_tqdm=False)[0].outputs[0]
    assert (both.text, both.token_ids, both.finish_reason) == (out.text, out.token_ids, out.finish_reason)


def test_min_tokens_lets_a_stop_string_end_the_request_one_token_later(models):
    """As vLLM: the first min_tokens tokens cannot end a request by a stop string (nor EOS / stop tokens, which are
    banned for them); the token after them can. A stop string completed by token min_tokens itself ended it."""
    llm = models.solo("dense")
    tok = llm.tokenizer
    prompt = random_prompt(random.Random(16), 20, models.vocab())
    ref = llm.generate([prompt], greedy(12), use_tqdm=False)[0].outputs[0]
    assert tok.decode(ref.token_ids) == ref.text
    k = next(k for k in range(2, 10) if (word := tok.decode(ref.token_ids[k - 1:k]).strip())
             and tok.decode(ref.token_ids[:k - 1]).find(word) < 0)  # token k's text, not seen before it
    out = llm.generate([prompt], greedy(12, stop=[word], min_tokens=k), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) > k  # token k completes the stop string but may not end the request
    out = llm.generate([prompt], greedy(12, stop=[word], min_tokens=k - 1), use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and len(out.token_ids) == k


def test_min_tokens_holds_back_the_tokenizers_eos_too(tmp_path):
    """A checkpoint whose config.json names another EOS than its tokenizer (no generation_config.json): the engine
    stopped on the tokenizer's EOS, but min_tokens banned only config.json's, so the tokenizer's EOS was sampled
    mid-output and the request then ended on it at min_tokens."""
    import json
    import os

    from deltaserve.tiny import make_tiny

    path = make_tiny(str(tmp_path / "tiny"))
    os.remove(os.path.join(path, "generation_config.json"))
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    llm0 = LLM(path, device="cpu", max_model_len=64)
    eos = llm0.tokenizer.eos_token_id
    raw["text_config"]["eos_token_id"] = next(i for i in range(eos - 8, eos) if i not in llm0.config.eos_token_ids)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
    llm = LLM(path, device="cpu", max_model_len=64)
    assert eos not in llm.config.eos_token_ids
    out = llm.generate(["hi"], SamplingParams(temperature=0, max_tokens=6, min_tokens=4, logit_bias={eos: 100}),
                       use_tqdm=False)[0].outputs[0]
    assert eos not in out.token_ids[:4] and out.token_ids[4] == eos and out.finish_reason == "stop", out.token_ids


def test_logit_bias(models):
    """Batched together: one request forcing a token (+100), one banning the tokens its greedy run produced (-100)
    and one without bias, which equals its solo run. Bias moves sampling only: the banning request's first logprob
    is still that of the raw model's first greedy token. A token id outside the vocabulary is refused up front."""
    llm = models.solo("dense")
    prompt = random_prompt(random.Random(14), 30, models.vocab())
    ref = llm.generate([prompt], greedy(12), use_tqdm=False)[0].outputs[0]
    forced, banned = ref.token_ids[5], set(ref.token_ids)
    ban_params = SamplingParams(temperature=0.0, max_tokens=12, logprobs=1, ignore_eos=True,
                                logit_bias={t: -100.0 for t in banned})
    outs = llm.generate([prompt] * 3, [greedy(12, logit_bias={forced: 100.0}), ban_params, greedy(12)],
                        use_tqdm=False)
    force, ban, plain = (o.outputs[0] for o in outs)
    assert force.token_ids == [forced] * 12
    assert not banned & set(ban.token_ids) and ban.token_ids[0] != ref.token_ids[0]
    assert ban.logprobs[0][ref.token_ids[0]] == pytest.approx(ref.logprobs[0][ref.token_ids[0]], abs=LOGPROB_ATOL)
    assert max(ban.logprobs[0], key=ban.logprobs[0].get) == ref.token_ids[0]  # the raw top-1, banned or not
    assert plain.token_ids == ref.token_ids
    assert_close_logprobs("unbiased", ref.logprobs, plain.logprobs)
    vocab = models.vocab()
    with pytest.raises(ValueError, match=rf"^logit_bias token id {vocab} is outside the vocabulary \(0\.\.{vocab - 1}"):
        llm.generate([prompt], greedy(4, logit_bias={vocab: 1.0}), use_tqdm=False)
    assert not llm.engine.has_unfinished()


@pytest.mark.parametrize("case", ["logprobs", "prompt_logprobs", "token_type", "token_bool", "params_dict",
                                  "n_set_after", "prompt_logprobs_set_after", "stop_token_ids"])
def test_bad_requests_refused_before_any_is_queued(models, case):
    """Each refused when added, in one sentence, with nothing of the batch left queued (the valid prompt beside it
    is not lost mid-step). A field set after SamplingParams was built is checked too (n = 0 failed inside
    add_request and left its group behind; prompt_logprobs = -2 failed the whole batch mid-step). A stop token id
    outside the vocabulary, which can never be sampled, was taken and silently never matched (as vLLM, refused)."""
    llm = models.solo("dense")
    vocab = models.vocab()
    good = {"prompt_token_ids": [1, 2, 3]}
    bad, params = good, [greedy(3), greedy(3)]
    if case in ("logprobs", "prompt_logprobs"):
        params = [greedy(3), SamplingParams(max_tokens=3, **{case: vocab + 1})]
    elif case == "token_type":
        bad = {"prompt_token_ids": [1, "2"]}
    elif case == "token_bool":
        bad = {"prompt_token_ids": [True, 2]}
    elif case == "n_set_after":
        params[1].n = 0
    elif case == "prompt_logprobs_set_after":
        params[1].prompt_logprobs = -2
    elif case == "stop_token_ids":
        params = [greedy(3), greedy(3, stop_token_ids=[5, vocab])]
    else:
        params = {"max_tokens": 3}
    with pytest.raises(ValueError) as e:
        llm.generate([good, bad], params, use_tqdm=False)
    assert "\n" not in str(e.value) and (case.split("_")[0] in str(e.value) or "SamplingParams" in str(e.value))
    assert not llm.engine.has_unfinished() and not llm.engine.groups


def test_numpy_token_ids_are_token_ids(models):
    """numpy integers (a tokenizer's or a dataset's arrays) were refused as 'outside the vocabulary'."""
    np = pytest.importorskip("numpy")
    llm = models.solo("dense")
    ids = [5, 17, 42]
    got = llm.generate([{"prompt_token_ids": list(np.array(ids))}], greedy(3), use_tqdm=False)[0]
    assert got.prompt_token_ids == ids and all(type(t) is int for t in got.prompt_token_ids)
    assert got.outputs[0].token_ids == llm.generate([{"prompt_token_ids": ids}], greedy(3),
                                                    use_tqdm=False)[0].outputs[0].token_ids


# ----------------------------------------------------------------------------------------------------- 8. n > 1

@pytest.mark.parametrize("max_num_seqs", [4, 1], ids=["forked", "no-room-to-fork"])
def test_n_seeded_samples(models, max_num_seqs):
    prompt = random_prompt(random.Random(13), 50, models.vocab())
    sp = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=10, ignore_eos=True, logprobs=0)
    llm = make_llm(models.path("dense"), max_num_seqs=max_num_seqs, max_num_batched_tokens=32)
    log = StepLog.attach(llm)
    out = llm.generate([prompt], sp, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 10 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) > 1, "n samples with distinct seeds all came out equal"
    assert (sum(st.num_forks for st in log.steps) > 0) == (max_num_seqs > 1)
    ref = models.ref("dense", prompt, sp)  # same seeds, forked in the solo LLM
    for i, (r, c) in enumerate(zip(ref.outputs, out.outputs)):
        assert_same_completion(f"sample{i}", r, c)
    assert_engine_idle(llm)


@pytest.mark.parametrize("n, length, budget", [(2, 40, 64), (3, 150, 32)], ids=["n2", "n3-chunked"])
def test_n_greedy_equals_single(models, n, length, budget):
    prompt = random_prompt(random.Random(14), length, models.vocab())
    ref = models.ref("dense", prompt, greedy(10)).outputs[0]
    llm = make_llm(models.path("dense"), max_num_seqs=4, max_num_batched_tokens=budget)
    # top_k 1 samples the argmax: n > 1 needs a temperature (greedy n > 1 is refused, as in vLLM)
    argmax = SamplingParams(n=n, temperature=1.0, top_k=1, max_tokens=10, logprobs=0, ignore_eos=True)
    out = llm.generate([prompt], argmax, use_tqdm=False)[0]
    assert [c.index for c in out.outputs] == list(range(n))
    for i, c in enumerate(out.outputs):
        assert_same_completion(f"sample{i}", ref, c)
    assert_engine_idle(llm)


# ------------------------------------------------------------------------------------------- 9. max_model_len

MAX_LEN = 64


@pytest.fixture
def short_llm(models):
    return make_llm(models.path("dense"), max_model_len=MAX_LEN, block_size=8, num_kv_blocks=16, max_num_seqs=2,
                    max_num_batched_tokens=32)


@pytest.mark.parametrize("length", [MAX_LEN + 1, MAX_LEN + 36], ids=["one-over", "longer"])
def test_prompt_too_long_is_rejected(models, short_llm, length):
    prompt = random_prompt(random.Random(15), length, models.vocab())
    with pytest.raises(ValueError, match=f"^the prompt has {length} tokens but max_model_len is {MAX_LEN}: shorten "
                                         f"the prompt to at most {MAX_LEN} tokens") as err:
        short_llm.generate([prompt], greedy(4), use_tqdm=False)
    assert "\n" not in str(err.value)
    assert_engine_idle(short_llm)


@pytest.mark.parametrize("kw, max_tokens", [
    ({"max_num_batched_tokens": MAX_LEN}, 4), ({}, 1), ({}, None), ({"async_scheduling": True}, 20),
    ({"enable_prefix_caching": True, "prefix_cache_slots": 2}, 4)],
    ids=["one-step", "chunked", "unbounded", "async", "prefix-cache"])
def test_prompt_of_max_model_len_samples_one_token(models, monkeypatch, kw, max_tokens):
    """As vLLM: a prompt of exactly max_model_len runs (it was refused), its prompt logprobs cover every position and
    match the same prompt's under a larger max_model_len, and it samples one token, finish_reason "length", whatever
    max_tokens asked: that token is never fed, so no KV block or position beyond max_model_len is used."""
    small_prefix_chunks(monkeypatch, 16)  # the prefix cache snapshots inside (and at the end of) this prompt
    llm = make_llm(models.path("dense"), **{"max_model_len": MAX_LEN, "block_size": 8, "num_kv_blocks": MAX_LEN // 8,
                                            "max_num_seqs": 2, "max_num_batched_tokens": 24, **kw})
    prompt = random_prompt(random.Random(18), MAX_LEN, models.vocab())
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=2, prompt_logprobs=2)
    ref = models.ref("dense", prompt, SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True, logprobs=2,
                                                     prompt_logprobs=2))
    for run in ("first", "again"):  # again: from the prefix cache, where it is on (prompt logprobs skip it)
        out = llm.generate([prompt], sp if run == "first" else greedy(max_tokens), use_tqdm=False)[0]
        assert len(out.outputs[0].token_ids) == 1 and out.outputs[0].finish_reason == "length"
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
        if run == "first":
            assert len(out.prompt_logprobs) == MAX_LEN
            assert_close_logprobs("prompt", ref.prompt_logprobs, out.prompt_logprobs)
            assert_same_completion("full", ref.outputs[0], out.outputs[0])
        elif "enable_prefix_caching" in kw:
            assert out.num_cached_tokens == 48, "the prompt's cached prefix was not used"
    llm.reset_prefix_cache()  # its snapshots hold blocks; every other one is back
    assert_engine_idle(llm)


def test_rejected_batch_leaves_no_request_behind(models, short_llm):
    rng = random.Random(16)
    good, bad = random_prompt(rng, 10, models.vocab()), random_prompt(rng, MAX_LEN + 1, models.vocab())
    with pytest.raises(ValueError, match="max_model_len"):
        short_llm.generate([good, bad], greedy(4), use_tqdm=False)
    assert_engine_idle(short_llm)


@pytest.mark.parametrize("length, max_tokens", [(50, 100), (50, None), (MAX_LEN - 1, 20)],
                         ids=["clipped", "unbounded", "one-left"])
def test_output_clipped_to_max_model_len(models, short_llm, length, max_tokens):
    prompt = random_prompt(random.Random(17), length, models.vocab())
    sp = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=0)
    out = short_llm.generate([prompt], sp, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == MAX_LEN - length
    assert out.finish_reason == "length"
    ref = models.ref("dense", prompt, greedy(MAX_LEN - length))
    assert_same_completion("clipped", ref.outputs[0], out, atol=LOGPROB_ATOL)
    assert_engine_idle(short_llm)


def test_max_model_len_the_kv_cache_cannot_hold_names_the_knob_that_sized_it(models, monkeypatch):
    """An explicit max_model_len longer than the KV cache is refused at start-up in one sentence naming the setting
    that sized the cache: num_kv_blocks when given (or on the CPU, whose automatic cache has a fixed budget), else on
    a GPU gpu_memory_utilization. On a GPU it said "raise num_kv_blocks", a flag the user had not set, whose value
    skips the memory profile: a pool past what the card holds fails at run time instead."""
    import torch

    import deltaserve.llm as llm_module
    from deltaserve.config import ModelConfig

    with pytest.raises(ValueError) as err:
        make_llm(models.path("dense"), max_model_len=64, block_size=16, num_kv_blocks=3)
    msg = str(err.value)
    assert "holds 48 tokens" in msg and "max_model_len is 64" in msg and "num_kv_blocks" in msg and "\n" not in msg
    monkeypatch.setattr(llm_module, "_auto_kv_blocks", lambda *a, **kw: 3)  # the CPU's budget holds 48 tokens
    with pytest.raises(ValueError, match="holds 48 tokens .* raise num_kv_blocks"):
        make_llm(models.path("dense"), max_model_len=64, block_size=16)
    spec = llm_module.RankSpec(config=ModelConfig.from_hf_dir(models.path("dense")), weights_dir=None, formats=None,
                               device=torch.device("cuda"), dtype=torch.bfloat16, max_num_seqs=4,
                               max_num_batched_tokens=64, max_model_len=64, block_size=16, num_kv_blocks=None,
                               gpu_memory_utilization=0.5, seed=0, enforce_eager=False)
    msg = spec.kv_too_small(3, torch.device("cuda"))
    assert "holds 48 tokens" in msg and "gpu_memory_utilization (now 0.5)" in msg and "num_kv_blocks" not in msg
    assert "at most 48" in msg


@pytest.mark.parametrize("kind,seqs,budget,max_len", [("dense", 3, 64, 512), ("moe", 3, 64, 512),
                                                      ("dense", 512, 16384, 1160)],
                         ids=["dense", "moe", "dense_offline_profile_limits"])
def test_warm_up_leaves_no_trace(models, kind, seqs, budget, max_len):
    """The start-up warm-up (run on CUDA before the first request) takes its mixed/chunked/decode steps, then leaves
    every slot and block free, and what follows equals a fresh engine's answers: no state leaks out of it."""
    llm = make_llm(models.path(kind), max_num_seqs=seqs, max_num_batched_tokens=budget, max_model_len=max_len)
    log = StepLog.attach(llm)
    llm.engine.warm_up()
    kinds = {("mixed" if any(s.is_decode for s in st.seqs) and not all(s.is_decode for s in st.seqs) else
              "decode" if all(s.is_decode for s in st.seqs) else "prefill") for st in log.steps}
    assert kinds == {"prefill", "decode", "mixed"}, kinds
    assert any(sum(not s.is_decode for s in st.seqs) > 1 for st in log.steps), "no multi-sequence prefill"
    if budget < max_len:  # else every prompt fits one step
        assert any(s.is_partial_prefill for st in log.steps for s in st.seqs), "no chunked prefill"
    # mixed steps whose decode rows all have short contexts and whose don't: on CUDA the attention decode kernel's
    # unsplit and split variants (a split-K partition holds 128+ keys) compile here, not inside a user's step
    longest = [max(s.start + s.num_new_tokens for s in st.seqs if s.is_decode) for st in log.steps
               if any(s.is_decode for s in st.seqs) and not all(s.is_decode for s in st.seqs)]
    assert min(longest) <= 128 < max(longest), f"longest decode context of each mixed step: {longest}"
    assert_engine_idle(llm)
    rng = random.Random(11)
    prompts = [random_prompt(rng, n, models.vocab(kind)) for n in (90, 7)]
    outs = run_until_done(llm, [llm.engine.add_request(p["prompt_token_ids"], greedy(6)) for p in prompts])
    for p, out in zip(prompts, outs.values()):
        assert_same_completion("after warm-up", models.ref(kind, p, greedy(6)).outputs[0], out.outputs[0])


def test_request_metrics(models):
    """RequestOutput.metrics: arrival <= first token <= finished, the first token lands on the step that sampled it
    (one step for max_tokens=1), an abort stamps finished_time, and LLM.generate reports it."""
    llm = make_llm(models.path("dense"), max_num_seqs=4, max_num_batched_tokens=32)
    rng = random.Random(12)
    prompts = [random_prompt(rng, n, models.vocab()) for n in (5, 70)]
    outs = llm.generate(prompts, [greedy(1), greedy(6)], use_tqdm=False)
    for out in outs:
        m = out.metrics
        assert m.arrival_time <= m.first_token_time <= m.finished_time
    assert outs[0].metrics.first_token_time == outs[0].metrics.finished_time
    # the 70-token prompt needs 3 steps of a 32-token budget before its first token; the 5-token one, 1 step
    assert outs[1].metrics.first_token_time > outs[0].metrics.first_token_time
    rid = llm.engine.add_request(prompts[1]["prompt_token_ids"], greedy(6))
    llm.engine.step()
    aborted = llm.engine.abort(rid)
    assert aborted.metrics.first_token_time is None and aborted.metrics.finished_time >= aborted.metrics.arrival_time
