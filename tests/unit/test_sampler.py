"""Sampler and SamplingParams: validation, greedy, top-k/p, min-p, penalties, seeding, logprobs, temperature."""
import numpy as np
import pytest
import torch

from deltaserve.sampling_params import SamplingParams, StructuredOutputs
from deltaserve.worker.sampler import (
    Sampler,
    SamplingBatch,
    apply_penalties,
    compute_topk_logprobs,
)

PROBS = [0.06, 0.3, 0.04, 0.5, 0.1]  # known distribution, deliberately unsorted
BY_RANK = [3, 1, 4, 0, 2]  # token ids from most to least likely


def make_batch(params, vocab_size, prompt=None, output=None, gens=None):
    n = len(params)
    return SamplingBatch.from_requests(
        params,
        prompt if prompt is not None else [[] for _ in range(n)],
        output if output is not None else [[] for _ in range(n)],
        gens if gens is not None else [None] * n,
        vocab_size,
        "cpu",
    )


def sample(logits, params, **kw):
    return Sampler()(logits, make_batch(params, logits.shape[1], **kw))


def rows_of(probs, n):
    return torch.tensor(probs).log().expand(n, -1).contiguous()


# ---------------------------------------------------------------- SamplingParams

@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"n": 0}, "n"),
        ({"n": 2, "temperature": 0}, "n"),  # vLLM's "n must be 1 when using greedy sampling"
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": 2.5}, "temperature"),  # vLLM refuses it too (OpenAI's range is [0, 2])
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"min_p": 1.1}, "min_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"frequency_penalty": -3.0}, "frequency_penalty"),
        ({"logprobs": -2}, "logprobs"),  # -1 is vLLM's "the whole vocabulary"
        ({"prompt_logprobs": -2}, "prompt_logprobs"),
        ({"seed": 1.5}, "seed"),
        ({"logit_bias": {3: 101}}, "logit_bias"),
        ({"logit_bias": {-1: 5}}, "logit_bias"),
        ({"logit_bias": {"3": 5}}, "logit_bias"),
        ({"logit_bias": [3, 5]}, "logit_bias"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 5, "max_tokens": 4}, "min_tokens"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": float("inf")}, "temperature"),
        ({"repetition_penalty": float("nan")}, "repetition_penalty"),
        ({"seed": 2 ** 64}, "seed"),
        ({"seed": 2 ** 64 - 2, "n": 3}, "seed"),  # row i draws from seed + i
        ({"seed": -(2 ** 63) - 1}, "seed"),
        ({"stop": 123}, "stop"),
        ({"stop_token_ids": 5}, "stop_token_ids"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [1, -2]}, "allowed_token_ids"),
        ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ],
    ids=["n", "n_greedy", "temperature", "temperature_above_2", "top_p_zero", "top_p_big", "top_k", "min_p",
         "max_tokens", "repetition", "presence", "frequency", "logprobs", "prompt_logprobs", "seed_float", "bias_range",
         "bias_negative_id", "bias_str_id", "bias_not_dict", "min_tokens", "min_over_max", "temperature_nan",
         "temperature_inf", "repetition_nan", "seed_overflow", "seed_plus_n_overflow", "seed_underflow", "stop_int",
         "stop_token_ids_int", "allowed_empty", "allowed_negative", "truncate_zero"],
)
def test_params_validation_names_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^{field} must be"):
        SamplingParams(**kwargs)


def test_params_defaults_and_normalisation():
    p = SamplingParams()
    assert (p.n, p.temperature, p.top_p, p.top_k, p.min_p, p.max_tokens) == (1, 1.0, 1.0, 0, 0.0, 16)
    assert p.stop == [] and p.stop_token_ids == [] and not p.greedy
    assert SamplingParams(stop="\n\n").stop == ["\n\n"]
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(top_k=-1, max_tokens=None).max_tokens is None
    # vLLM reads logprobs=True / prompt_logprobs=True as 1 (they were refused). False stays refused: vLLM takes it as
    # 0 (the chosen token's logprob), which is not what a script passing False means
    assert (SamplingParams(logprobs=True).logprobs, SamplingParams(prompt_logprobs=True).prompt_logprobs) == (1, 1)
    with pytest.raises(ValueError, match="^logprobs must be"):
        SamplingParams(logprobs=False)
    # vLLM takes stop_token_ids as any collection, each id once (a set was refused)
    assert SamplingParams(stop_token_ids={7}).stop_token_ids == [7]
    assert SamplingParams(stop_token_ids=frozenset([7])).stop_token_ids == [7]
    assert SamplingParams(stop_token_ids=(5, 3, 5)).stop_token_ids == [5, 3]
    with pytest.raises(ValueError, match="^stop_token_ids must be"):
        SamplingParams(stop_token_ids={-1})


def test_numpy_scalars_are_taken_as_plain_numbers():
    """vLLM takes numpy scalars (`seed=rng.integers(1000)`, a sweep's np.float32 temperature): they were refused in a
    sentence contradicting them ("seed must be ... an integer, got np.int64(3)"); now read as Python ints / floats."""
    p = SamplingParams(n=np.int64(2), temperature=np.float32(0.5), top_p=np.float32(0.9), top_k=np.int32(5),
                       max_tokens=np.int64(7), min_tokens=np.int64(1), seed=np.random.default_rng(0).integers(1000),
                       logprobs=np.int64(2), repetition_penalty=np.float32(1.1), stop_token_ids=[np.int64(3)],
                       allowed_token_ids=[np.int64(4)], logit_bias={np.int64(5): np.float32(1.5)})
    values = (p.n, p.top_k, p.max_tokens, p.min_tokens, p.seed, p.logprobs, *p.stop_token_ids, *p.allowed_token_ids)
    assert all(type(v) is int for v in values) and (p.n, p.top_k, p.max_tokens, p.stop_token_ids) == (2, 5, 7, [3])
    assert all(type(v) is float for v in (p.temperature, p.top_p, p.repetition_penalty)) and p.temperature == 0.5
    assert p.logit_bias == {5: 1.5} and p.allowed_token_ids == [4]
    with pytest.raises(ValueError, match="^top_k must be"):  # still checked after the conversion
        SamplingParams(top_k=np.int64(-2))
    with pytest.raises(ValueError, match="^ignore_eos must be"):  # a numpy bool is not a number here
        SamplingParams(ignore_eos=np.int64(1))


def test_zero_dim_arrays_and_tensors_are_taken_as_plain_numbers():
    """A 0-d torch tensor or numpy array (`temperature=torch.tensor(0.7)`, a value out of a tensor sweep) was refused as
    "temperature must be in [0, 2] ..., got tensor(0.7000)", which it is; now read as its Python number."""
    p = SamplingParams(temperature=torch.tensor(0.5), top_p=np.array(0.9), max_tokens=torch.tensor(7),
                       seed=np.array(3), stop_token_ids=list(torch.tensor([5, 6])),
                       logit_bias={torch.tensor(4): np.array(2.0)})
    assert type(p.temperature) is float and p.temperature == 0.5 and type(p.top_p) is float
    assert (p.max_tokens, p.seed, p.stop_token_ids, p.logit_bias) == (7, 3, [5, 6], {4: 2.0})
    assert all(type(v) is int for v in (p.max_tokens, p.seed, *p.stop_token_ids))
    with pytest.raises(ValueError, match="^temperature must be in"):  # still checked after the conversion
        SamplingParams(temperature=torch.tensor(3.0))
    with pytest.raises(ValueError, match="^max_tokens must be"):  # a bool tensor is not a number here
        SamplingParams(max_tokens=torch.tensor(True))
    with pytest.raises(ValueError, match="^max_tokens must be"):  # nor a 1-element vector
        SamplingParams(max_tokens=torch.tensor([7]))


# ---------------------------------------------------------------- greedy / top-k

@pytest.mark.parametrize("temperature", [1e-6, 1e-3, 5e-3])
def test_tiny_temperature_samples_at_vllm_floor(temperature):
    """vLLM's SamplingParams raises a temperature in (0, 0.01) to 0.01: such a request samples (not greedy), from
    softmax(logits / 0.01)."""
    p = SamplingParams(temperature=temperature)
    assert (p.temperature, p.greedy) == (0.01, False)
    assert SamplingParams(temperature=0).greedy and SamplingParams(temperature=0.01).temperature == 0.01
    torch.manual_seed(0)
    out = sample(torch.tensor([[1.0, 0.99, 0.5]]).expand(4000, -1).contiguous(), [p] * 4000)
    share = (out.token_ids == 1).float().mean().item()  # softmax([100, 99, 50])[1] = 0.269
    assert abs(share - 0.269) < 0.03


def test_greedy_is_argmax_in_mixed_batch():
    torch.manual_seed(0)
    logits = torch.randn(8, 50)
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 1.0) for i in range(8)]
    out = sample(logits, params)
    assert torch.equal(out.token_ids[0::2], logits.argmax(-1)[0::2])
    assert out.logprobs is None


def test_top_k_1_equals_greedy():
    torch.manual_seed(0)
    logits = torch.randn(64, 100)
    out = sample(logits, [SamplingParams(temperature=1.0, top_k=1)] * 64)
    assert torch.equal(out.token_ids, logits.argmax(-1))


@pytest.mark.parametrize("k", [2, 3], ids=["k2", "k3"])
@pytest.mark.parametrize("path", ["partial_topk", "full_sort"], ids=["partial_topk", "full_sort"])
def test_top_k_keeps_k_most_likely(k, path):
    torch.manual_seed(0)
    # A top-p row in the batch forces the full-sort path; otherwise top-k alone uses a partial topk.
    last = SamplingParams(top_p=0.99) if path == "full_sort" else SamplingParams(top_k=k)
    out = sample(rows_of(PROBS, 4001), [SamplingParams(top_k=k)] * 4000 + [last])
    assert set(out.token_ids[:4000].tolist()) == set(BY_RANK[:k])


# ---------------------------------------------------------------- top-p / min-p

@pytest.mark.parametrize(
    "top_p, nucleus",
    [(0.75, {3, 1}), (0.85, {3, 1, 4}), (0.3, {3}), (1e-9, {3})],  # 1 - 1e-9 == 1 in fp32: keep-one guard
    ids=["p0.75", "p0.85", "p0.3", "p_tiny"],
)
def test_top_p_keeps_only_nucleus(top_p, nucleus):
    torch.manual_seed(0)
    out = sample(rows_of(PROBS, 4000), [SamplingParams(top_p=top_p)] * 4000)
    assert set(out.token_ids.tolist()) == nucleus


def test_top_p_with_per_row_generator():
    gen = torch.Generator().manual_seed(123)
    batch = make_batch([SamplingParams(top_p=0.75)], 5, gens=[gen])
    seen = {Sampler()(rows_of(PROBS, 1), batch).token_ids.item() for _ in range(400)}
    assert seen == {3, 1}


@pytest.mark.parametrize(
    "min_p, kept", [(0.25, {3, 1}), (0.15, {3, 1, 4}), (0.9, {3})], ids=["m0.25", "m0.15", "m0.9"]
)
def test_min_p_drops_relatively_unlikely(min_p, kept):
    torch.manual_seed(0)
    out = sample(rows_of(PROBS, 4000), [SamplingParams(min_p=min_p)] * 4000)
    assert set(out.token_ids.tolist()) == kept


def test_min_p_comes_before_top_p_as_in_vllm(monkeypatch):
    """vLLM V1 applies min-p right after temperature, before top-k / top-p: with probs [.4, .3, .2, .1], min_p 0.3
    drops .1, and top-p 0.75 over the renormalised [.44, .33, .22] then drops .22 -> [4/7, 3/7, 0, 0] exactly
    (min-p after top-p kept three tokens)."""
    import deltaserve.worker.sampler as sampler_mod

    seen = {}
    race = sampler_mod.exponential_race
    monkeypatch.setattr(sampler_mod, "exponential_race", lambda p, g: (seen.setdefault("p", p.clone()), race(p, g))[1])
    sample(torch.tensor([[0.4, 0.3, 0.2, 0.1]]).log(), [SamplingParams(top_p=0.75, min_p=0.3)])
    got = seen["p"][0] / seen["p"][0].sum()
    assert torch.allclose(got, torch.tensor([4 / 7, 3 / 7, 0.0, 0.0]), atol=1e-6)


def test_min_tokens_bans_eos_under_ignore_eos_too():
    """vLLM's min_tokens bans _all_stop_token_ids, which holds EOS whatever ignore_eos says (the README: the first
    min_tokens tokens can be neither EOS nor stop_token_ids)."""
    from deltaserve.runtime.request import Request
    from deltaserve.worker.model_runner import _banned

    for ignore_eos in (False, True):
        p = SamplingParams(min_tokens=4, max_tokens=8, ignore_eos=ignore_eos, stop_token_ids=[5])
        assert sorted(_banned(Request("r", [1, 2], p, max_tokens=8), (7,), 100)) == [5, 7]


# ---------------------------------------------------------------- penalties

@pytest.mark.parametrize(
    "logits, seen_where, expected",
    [
        ([1.0, 1.5, 0.2, 2.0], "prompt", 1),  # 2.0 / 2 = 1.0 < 1.5
        ([1.0, 1.5, 0.2, 2.0], "output", 1),
        ([-1.0, -0.8, -3.0, -2.0], "prompt", 0),  # -0.8 * 2 = -1.6 < -1.0
    ],
    ids=["positive_prompt", "positive_output", "negative_prompt"],
)
def test_repetition_penalty_moves_argmax(logits, seen_where, expected):
    logits = torch.tensor([logits])
    top = int(logits.argmax())
    params = [SamplingParams(temperature=0.0, repetition_penalty=2.0)]
    kw = {seen_where: [[top]]}
    assert sample(logits, params, **kw).token_ids.item() == expected
    assert sample(logits, [SamplingParams(temperature=0.0)], **kw).token_ids.item() == top


def test_presence_frequency_subtract_expected_amounts():
    logits = torch.tensor([[0.5, 1.0, 2.0, -1.0, 0.0, 3.0]])
    v = 6
    prompt = torch.tensor([[4, 4, v]])  # prompt-only token 4 must not get presence/frequency penalties
    output = torch.tensor([[2, 2, 5, v]])  # token 2 twice, token 5 once, one pad
    out = apply_penalties(
        logits, prompt, output, torch.tensor([1.0]), torch.tensor([0.25]), torch.tensor([0.5])
    )
    expected = logits.clone()
    expected[0, 2] -= 2 * 0.5 + 0.25
    expected[0, 5] -= 1 * 0.5 + 0.25
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_batch_penalty_tensors_are_padded_with_vocab_size():
    params = [SamplingParams(repetition_penalty=1.2), SamplingParams()]
    batch = make_batch(params, 10, prompt=[[1, 2, 3], [4]], output=[[5], []])
    assert batch.prompt_ids.tolist() == [[1, 2, 3], [4, 10, 10]]
    assert batch.output_ids.tolist() == [[5], [10]]
    assert make_batch([SamplingParams()], 10, prompt=[[1]]).prompt_ids is None


# ---------------------------------------------------------------- seeding

def _seeded_tokens(position, others, steps=6, seed=1234, v=1000):
    torch.manual_seed(position + 7 * len(others))  # unseeded rows differ between the two runs
    logits_row = torch.randn(1, v, generator=torch.Generator().manual_seed(0))
    params = list(others)
    params.insert(position, SamplingParams(temperature=1.0, seed=seed))
    gens = [None] * len(params)
    gens[position] = torch.Generator().manual_seed(seed)
    logits = torch.randn(len(params), v)
    logits[position] = logits_row
    batch = make_batch(params, v, gens=gens)
    return [Sampler()(logits, batch).token_ids[position].item() for _ in range(steps)]


def test_seeded_row_independent_of_batch_and_position():
    a = _seeded_tokens(0, [SamplingParams(temperature=0.5), SamplingParams(top_k=3), SamplingParams()])
    b = _seeded_tokens(2, [SamplingParams(temperature=2.0)] * 4 + [SamplingParams(temperature=0.0)])
    c = _seeded_tokens(1, [SamplingParams(top_p=0.5)])
    assert a == b == c
    assert len(set(a)) > 1  # successive steps advance the generator
    assert _seeded_tokens(0, [SamplingParams()], seed=99) != a  # the seed matters


# ---------------------------------------------------------------- logprobs

def test_logprobs_are_raw_and_sampled_first():
    torch.manual_seed(0)
    v = 40
    logits = torch.randn(3, v)
    params = [
        SamplingParams(temperature=0.7, top_k=5, repetition_penalty=1.5, presence_penalty=1.0, logprobs=3),
        SamplingParams(temperature=0.0, frequency_penalty=2.0, logprobs=0),
        SamplingParams(top_p=0.5, min_p=0.1),
    ]
    output = [[int(logits[0].argmax())], [int(logits[1].argmax())] * 3, []]
    before = logits.clone()
    out = sample(logits, params, output=output)
    assert torch.equal(logits, before)  # the sampler never writes into the caller's logits
    raw = torch.log_softmax(logits, dim=-1)
    assert out.logprobs.shape == (3, 4) and out.logprob_token_ids.shape == (3, 4)
    assert torch.equal(out.logprob_token_ids[:, 0], out.token_ids)
    torch.testing.assert_close(out.logprobs[:, 0], raw.gather(1, out.token_ids[:, None])[:, 0], rtol=0, atol=1e-6)
    top_values, top_ids = raw.topk(3, dim=-1)
    torch.testing.assert_close(out.logprobs[:, 1:], top_values, rtol=0, atol=1e-6)
    assert torch.equal(out.logprob_token_ids[:, 1:], top_ids)
    assert out.token_ids[1].item() != logits[1].argmax().item()  # the penalty acted on sampling, not on logprobs


# ---------------------------------------------------------------- logit_bias

def test_logit_bias_moves_sampling_not_logprobs():
    """Row 0: +100 on the least likely token forces it (sampled and greedy); row 1: -100 on the argmax bans it, so
    greedy takes the runner-up; row 2 has no bias and keeps its argmax. Logprobs stay those of the raw logits."""
    logits = rows_of(PROBS, 4)
    params = [SamplingParams(temperature=0.8, seed=1, logit_bias={2: 100}, logprobs=1),
              SamplingParams(temperature=0, logit_bias={3: -100, 0: 0.5}, logprobs=1),
              SamplingParams(temperature=0, logprobs=1),
              SamplingParams(temperature=0, logit_bias={2: 100}, logprobs=1)]
    before = logits.clone()
    out = sample(logits, params)
    assert out.token_ids.tolist() == [2, 1, 3, 2]
    assert torch.equal(logits, before)  # the bias is added out of place
    raw = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(out.logprobs[:, 0], raw.gather(1, out.token_ids[:, None])[:, 0], rtol=0, atol=1e-6)
    assert out.logprob_token_ids[:, 1].tolist() == [3, 3, 3, 3]  # the raw top-1, whatever the bias


def test_logit_bias_adds_exactly_and_before_penalties():
    """Logits [0, 1, 0.8]: +0.3 on token 2 lifts it over token 1, +0.1 does not; with token 1 already in the output
    its presence penalty (0.5) comes on top, and +0.1 is then enough."""
    logits = torch.tensor([[0.0, 1.0, 0.8]])
    assert sample(logits, [SamplingParams(temperature=0, logit_bias={2: 0.3})]).token_ids.tolist() == [2]
    assert sample(logits, [SamplingParams(temperature=0, logit_bias={2: 0.1})]).token_ids.tolist() == [1]
    penalised = [SamplingParams(temperature=0, logit_bias={2: 0.1}, presence_penalty=0.5)]
    assert sample(logits, penalised, output=[[1]]).token_ids.tolist() == [2]


def test_banned_tokens_are_never_sampled():
    """banned (min_tokens: EOS and stop tokens not yet allowed): row 0 bans its argmax and the runner-up, greedy;
    row 1 bans all but token 0 of a sampling row; row 2 bans nothing. Logprobs stay raw."""
    logits = rows_of(PROBS, 3)
    params = [SamplingParams(temperature=0, logprobs=0), SamplingParams(temperature=1.0, seed=5, logprobs=0),
              SamplingParams(temperature=0, logprobs=0)]
    batch = make_batch(params, 5)
    banned = SamplingBatch.from_requests(params, [[]] * 3, [[]] * 3, [None] * 3, 5, "cpu", [[3, 1], [1, 2, 3, 4], []])
    for _ in range(5):
        assert Sampler()(logits, banned).token_ids.tolist() == [4, 0, 3]
    out, plain = Sampler()(logits, banned), Sampler()(logits, batch)
    raw = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(out.logprobs[:, 0], raw.gather(1, out.token_ids[:, None])[:, 0], rtol=0, atol=1e-6)
    assert plain.token_ids.tolist()[::2] == [3, 3]


def test_allowed_token_ids_are_the_only_candidates():
    """Row 0 (greedy) may take 0 or 2 only: the likelier of them, 0; row 1 samples among {1, 4} (its seeded draws hit
    both over 40 steps, nothing else); row 2 is free; a row 3 beyond 32 ids checks the packing's second word.
    Logprobs stay raw."""
    logits = rows_of(PROBS, 3)
    params = [SamplingParams(temperature=0, allowed_token_ids=[2, 0], logprobs=0),
              SamplingParams(temperature=1.0, allowed_token_ids=[1, 4], logprobs=0), SamplingParams(temperature=0)]
    seen = set()
    for step in range(40):
        params[1].seed = step
        out = sample(logits, params)
        assert out.token_ids[0] == 0 and out.token_ids[2] == 3
        seen.add(out.token_ids[1].item())
    assert seen == {1, 4}
    raw = torch.log_softmax(logits, dim=-1)
    torch.testing.assert_close(out.logprobs[:2, 0], raw[[0, 1], out.token_ids[:2]], rtol=0, atol=1e-6)
    wide = torch.zeros(1, 70)
    wide[0, 5] = 9.0
    assert sample(wide, [SamplingParams(temperature=0, allowed_token_ids=[33, 69])]).token_ids.item() in (33, 69)
    with pytest.raises(ValueError, match="cannot be combined"):
        SamplingParams(allowed_token_ids=[1], structured_outputs=StructuredOutputs(choice=["a"]))


def test_ranks_of_tied_tokens_as_vllm():
    """vLLM's rank counts the tokens whose logprob is >= the chosen one's, and a chosen token also in the top k keeps
    the top-k entry's rank (its place there): with tokens 1 and 2 tied for the top, token 2 is rank 2."""
    from deltaserve.worker.model_runner import _logprob_dict

    lp = torch.tensor([[2.0, 3.0, 3.0, 1.0]]).log_softmax(-1)
    for k, want in ((0, {2: 2}), (2, {2: 2, 1: 1})):
        v, i, r = compute_topk_logprobs(lp, k, torch.tensor([2]))
        assert {t: x.rank for t, x in _logprob_dict(v[0].tolist(), i[0].tolist(), int(r[0])).items()} == want
    assert compute_topk_logprobs(lp, 0, torch.tensor([1]))[2].tolist() == [2]
    assert compute_topk_logprobs(lp, 0, torch.tensor([0]))[2].tolist() == [3]


def test_compute_topk_logprobs_for_prompt_tokens():
    lp = torch.log_softmax(torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]]), dim=-1)
    values, ids, ranks = compute_topk_logprobs(lp, 2, torch.tensor([2, 1]))
    assert ids.tolist() == [[2, 1, 2], [1, 0, 2]] and ranks.tolist() == [2, 3]  # 1 = the most likely
    torch.testing.assert_close(values, lp.gather(1, ids), rtol=0, atol=0)
    with pytest.raises(ValueError, match="k=4"):
        compute_topk_logprobs(lp, 4, torch.tensor([0, 0]))


# ---------------------------------------------------------------- temperature

@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0], ids=["T0.5", "T1", "T2"])
def test_temperature_frequencies_match_softmax(temperature):
    torch.manual_seed(0)
    n = 20000
    base = torch.tensor([1.0, 0.5, 0.0, -0.5, -1.0])
    out = sample(base.expand(n, -1).contiguous(), [SamplingParams(temperature=temperature)] * n)
    counts = torch.bincount(out.token_ids, minlength=5).double()

    def chi2(p):
        expected = p.double() * n
        return float(((counts - expected) ** 2 / expected).sum())

    assert chi2(torch.softmax(base / temperature, -1)) < 30.0  # df=4: P(chi2 > 30) ~ 5e-6
    other = 1.0 if temperature != 1.0 else 2.0
    assert chi2(torch.softmax(base / other, -1)) > 100.0  # the temperature really changed the distribution


# ---------------------------------------------------------------- user errors

def test_batch_errors_are_one_sentence():
    with pytest.raises(ValueError, match="logprobs=20 exceeds the vocabulary size"):
        make_batch([SamplingParams(logprobs=20)], 10)
    with pytest.raises(ValueError, match=r"^logit_bias token id 10 is outside the vocabulary \(0..9\)\.$"):
        make_batch([SamplingParams(logit_bias={10: 1.0})], 10)
    with pytest.raises(ValueError, match=r"^allowed_token_ids token id 12 is outside the vocabulary \(0..9\)\.$"):
        make_batch([SamplingParams(allowed_token_ids=[3, 12])], 10)
    batch = make_batch([SamplingParams()], 10)
    with pytest.raises(ValueError, match="do not match the sampling batch"):
        Sampler()(torch.zeros(2, 10), batch)
    assert 0 <= Sampler()(torch.zeros(1, 10), batch).token_ids.item() < 10
