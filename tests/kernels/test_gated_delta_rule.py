"""Gated delta rule over a flat varlen batch with a state pool, against HF transformers' qwen3_5 torch functions.

HF runs one sequence at a time (recurrent for 1 token with a state, chunked otherwise, as its layer does);
we check outputs, the states written back at the slots, slot isolation and chunked continuation."""
import pytest
import torch
import torch.nn.functional as F

from deltaserve.kernels.gated_delta_rule import (
    chunk_gated_delta_rule,
    gated_delta_rule_varlen,
    gdn_gating,
    l2norm,
    recurrent_gated_delta_rule_step,
)

hf = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")

ATOL = 1e-5  # fp32; observed max error against HF is ~1e-7 (outputs ~0.5, states ~2)

HEADS = [
    pytest.param(dict(Hk=2, HV=2, K=16, V=16), id="mha-k16"),
    pytest.param(dict(Hk=2, HV=6, K=16, V=24), id="gqa3-k16-v24"),
]


def assert_close(name, ref, out, atol):
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    err = (out.float() - ref.float()).abs().max().item() if ref.numel() else 0.0
    assert err <= atol, f"{name}: max abs error {err:.2e} > atol {atol:.0e}"  # NaN fails too


def make_inputs(T, Hk, HV, K, V, seed=0):
    """Raw layer inputs as the conv would hand them over: q, k not normalised; decays mild enough (g ~ -0.05..-1.5
    per token) that the initial state still shapes the output of every short sequence."""
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(T, Hk, K, generator=gen), torch.randn(T, Hk, K, generator=gen)
    v = torch.randn(T, HV, V, generator=gen)
    a, b = torch.randn(T, HV, generator=gen), torch.randn(T, HV, generator=gen)
    A_log = torch.empty(HV).uniform_(0.05, 1.0, generator=gen).log()
    dt_bias = torch.randn(HV, generator=gen) * 0.5
    return q, k, v, a, b, A_log, dt_bias


def make_pool(S, HV, K, V, slots, seed=1):
    """[S, HV, K, V] fp32 pool: random states at `slots`, NaN everywhere else (a read of the wrong slot shows)."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.full((S, HV, K, V), float("nan"))
    for s in slots:
        if s >= 0:
            pool[s] = torch.randn(HV, K, V, generator=gen) * 0.5
    return pool


def hf_sequence(q, k, v, a, b, A_log, dt_bias, init):
    """One sequence through HF, computing g and beta the way Qwen3_5GatedDeltaNet.forward does.
    init: [HV, K, V] or None. Returns (o [L, HV, V], final state [HV, K, V])."""
    g = -A_log.float().exp() * F.softplus(a.float() + dt_bias)
    beta = b.sigmoid()
    decode = q.shape[0] == 1 and init is not None  # the layer's own choice of path
    fn = hf.torch_recurrent_gated_delta_rule if decode else hf.torch_chunk_gated_delta_rule
    o, state = fn(q[None], k[None], v[None], g=g[None], beta=beta[None],
                  initial_state=None if init is None else init[None],
                  output_final_state=True, use_qk_l2norm_in_kernel=True)
    return o[0], state[0]


@pytest.fixture(autouse=True)
def _seed():
    """Deterministic inputs (one intra-op thread for the whole suite: tests/conftest.py)."""
    torch.manual_seed(0)


def cu_of(lengths):
    return torch.tensor([0] + lengths).cumsum(0)


def assert_untouched(pool_before, pool_after, used):
    """Slots not in `used` must be bit-identical (NaN-safe: compare the raw bits)."""
    rest = [s for s in range(pool_before.shape[0]) if s not in used]
    assert torch.equal(pool_before[rest].view(torch.int32), pool_after[rest].view(torch.int32)), \
        "a slot outside the batch was written"


@pytest.mark.parametrize("heads", HEADS)
def test_varlen_matches_hf_per_sequence(heads):
    lengths = [1, 3, 0, 63, 64, 65, 130, 1]
    S = 13
    slots = torch.randperm(S, generator=torch.Generator().manual_seed(3))[: len(lengths)]
    inputs = make_inputs(sum(lengths), **heads)
    pool = make_pool(S, heads["HV"], heads["K"], heads["V"], slots.tolist())
    before = pool.clone()

    out = gated_delta_rule_varlen(*inputs, pool, cu_of(lengths), slots)

    assert out.dtype == torch.float32 and torch.isfinite(out).all(), "NaN from a poisoned slot leaked into o"
    cu = cu_of(lengths).tolist()
    for i, L in enumerate(lengths):
        s, e, slot = cu[i], cu[i + 1], slots[i].item()
        if L == 0:
            assert torch.equal(pool[slot], before[slot]), "a 0-token sequence changed its state"
            continue
        ref_o, ref_state = hf_sequence(*(x[s:e] for x in inputs[:5]), *inputs[5:], before[slot])
        assert_close(f"o[seq {i}, L={L}]", ref_o, out[s:e], ATOL)
        assert_close(f"state[seq {i}, L={L}]", ref_state, pool[slot], ATOL)
    assert_untouched(before, pool, slots.tolist())

    # guard on the test itself: the initial states must visibly matter, or the slot plumbing is untested
    zero_o, _ = hf_sequence(*(x[cu[5]:cu[6]] for x in inputs[:5]), *inputs[5:], None)
    assert (zero_o[:8] - out[cu[5]:cu[5] + 8]).abs().max() > 1e-2


def test_padding_rows_read_zeros_and_write_nothing():
    heads = dict(Hk=2, HV=4, K=16, V=16)
    S = 6
    lengths = [2, 1, 1, 5]
    slots = torch.tensor([2, -1, 3, -1])
    inputs = make_inputs(sum(lengths), **heads)
    # slots 0 and S-1 are where a clamped or Python-wrapped -1 would land: keep them NaN
    pool = make_pool(S, heads["HV"], heads["K"], heads["V"], [2, 3])
    before = pool.clone()

    out = gated_delta_rule_varlen(*inputs, pool, cu_of(lengths), slots)

    assert torch.isfinite(out).all(), "a padding row read a NaN slot"
    assert_untouched(before, pool, [2, 3])
    cu = cu_of(lengths).tolist()
    for i in (1, 3):  # padding rows: same output as a fresh sequence
        ref_o, _ = hf_sequence(*(x[cu[i]:cu[i + 1]] for x in inputs[:5]), *inputs[5:], None)
        assert_close(f"o[padding row {i}]", ref_o, out[cu[i]:cu[i + 1]], ATOL)


def test_decode_split_into_several_steps_equals_one(monkeypatch):
    """Big states make the driver cut the decode batch into several steps (to stay in CPU cache); force that on
    small states: 1-token sequences, padding rows among them, must give the same outputs and states."""
    from deltaserve.kernels.gated_delta_rule import reference

    heads = dict(Hk=2, HV=4, K=16, V=16)
    lengths = [1, 1, 5, 1, 1, 1]
    slots = torch.tensor([6, -1, 1, 3, -1, 0])
    inputs = make_inputs(sum(lengths), **heads)
    pool_one = make_pool(8, heads["HV"], heads["K"], heads["V"], [6, 1, 3, 0])
    pool_split = pool_one.clone()
    out_one = gated_delta_rule_varlen(*inputs, pool_one, cu_of(lengths), slots)
    monkeypatch.setattr(reference, "_DECODE_STEP_BYTES", 2 * pool_one[0].numel() * 4)  # 2 sequences per step
    out_split = gated_delta_rule_varlen(*inputs, pool_split, cu_of(lengths), slots)
    assert_close("o (split vs one step)", out_one, out_split, 0.0)
    assert torch.equal(pool_one.view(torch.int32), pool_split.view(torch.int32)), "states differ"


@pytest.mark.parametrize("split", [[70, 1, 60], [1, 1, 129], [64, 64, 3]], ids=["70-1-60", "1-1-129", "64-64-3"])
def test_chunked_continuation_equals_one_call(split):
    heads = dict(Hk=2, HV=6, K=16, V=24)
    L = sum(split)
    inputs = make_inputs(L, **heads)
    other = make_inputs(3 * 5, **heads, seed=7)  # a companion sequence of 5 tokens per call shares every batch
    S, slot, slot_other = 8, 5, 2
    pool_one = make_pool(S, heads["HV"], heads["K"], heads["V"], [slot, slot_other])
    pool_steps = pool_one.clone()

    # one call: the whole sequence (and the companion's 15 tokens)
    whole = [torch.cat([x, y]) for x, y in zip(inputs[:5], other[:5])]
    out_one = gated_delta_rule_varlen(*whole, *inputs[5:], pool_one, cu_of([L, 15]), torch.tensor([slot, slot_other]))

    outs, start = [], 0
    for n, part in enumerate(split):
        chunk = [torch.cat([x[start:start + part], y[5 * n:5 * n + 5]]) for x, y in zip(inputs[:5], other[:5])]
        o = gated_delta_rule_varlen(*chunk, *inputs[5:], pool_steps, cu_of([part, 5]),
                                    torch.tensor([slot, slot_other]))
        outs.append(o[:part])
        start += part

    assert_close("o (3 calls vs 1)", out_one[:L], torch.cat(outs), ATOL)
    assert_close("state (3 calls vs 1)", pool_one[slot], pool_steps[slot], ATOL)
    assert_close("companion state", pool_one[slot_other], pool_steps[slot_other], ATOL)


@pytest.mark.parametrize("chunk_size", [64, 16], ids=["chunk64", "chunk16"])
def test_chunk_building_block_matches_hf(chunk_size):
    Hk, HV, K, V, L = 2, 6, 16, 24, 100
    q, k, v, a, b, A_log, dt_bias = make_inputs(L, Hk, HV, K, V)
    g, beta = gdn_gating(a, b, A_log, dt_bias)
    init = torch.randn(HV, K, V)
    ref_o, ref_state = hf.torch_chunk_gated_delta_rule(
        q[None], k[None], v[None], g=g[None], beta=beta[None], initial_state=init[None],
        output_final_state=True, use_qk_l2norm_in_kernel=True)
    init_copy = init.clone()
    o, state = chunk_gated_delta_rule(l2norm(q) * K**-0.5, l2norm(k), v, g, beta, init, chunk_size=chunk_size)
    assert torch.equal(init, init_copy), "chunk_gated_delta_rule modified its initial_state"
    assert_close("o", ref_o[0], o, ATOL)
    assert_close("state", ref_state[0], state, ATOL)


def test_recurrent_step_building_block_matches_hf():
    B, Hk, HV, K, V = 5, 2, 6, 16, 24
    q, k, v, a, b, A_log, dt_bias = make_inputs(B, Hk, HV, K, V)  # B sequences of one token each
    g, beta = gdn_gating(a, b, A_log, dt_bias)
    state = torch.randn(B, HV, K, V)
    ref_o, ref_state = hf.torch_recurrent_gated_delta_rule(
        q[:, None], k[:, None], v[:, None], g=g[:, None], beta=beta[:, None], initial_state=state,
        output_final_state=True, use_qk_l2norm_in_kernel=True)
    o, new_state = recurrent_gated_delta_rule_step(l2norm(q) * K**-0.5, l2norm(k), v, g, beta, state)
    assert_close("o", ref_o[:, 0], o, ATOL)
    assert_close("state", ref_state, new_state, ATOL)


def test_bf16_inputs_stay_close_to_fp32():
    """Model-dtype (bf16) inputs, fp32 state, against fp32 on the unrounded inputs. Observed on CPU: max o error
    ~2e-3 with |o| <= 0.5 (twice the bf16 rounding of o alone, the rest is the rounding of q, k, v, a, b) and max
    state error ~5e-3 after 130 tokens with |S| ~2; the bounds leave ~2.5x headroom."""
    heads = dict(Hk=2, HV=6, K=16, V=24)
    lengths = [1, 65, 130]
    slots = torch.tensor([4, 0, 2])
    inputs = make_inputs(sum(lengths), **heads)
    pool32 = make_pool(5, heads["HV"], heads["K"], heads["V"], slots.tolist())
    pool16 = pool32.clone()
    out32 = gated_delta_rule_varlen(*inputs, pool32, cu_of(lengths), slots)
    out16 = gated_delta_rule_varlen(*(x.bfloat16() for x in inputs), pool16, cu_of(lengths), slots)
    assert out16.dtype == torch.bfloat16 and pool16.dtype == torch.float32
    assert_close("o bf16 vs fp32", out32, out16, 5e-3)
    assert_close("state bf16 vs fp32", pool32[slots], pool16[slots], 1.2e-2)


def _bad(**changes):
    T, Hk, HV, K, V = 4, 2, 4, 8, 8
    args = dict(zip(["q", "k", "v", "a", "b", "A_log", "dt_bias"], make_inputs(T, Hk, HV, K, V)))
    args.update(state=torch.zeros(3, HV, K, V), cu_seqlens=torch.tensor([0, 1, 4]), slots=torch.tensor([0, 2]))
    args.update(changes)
    return args


@pytest.mark.parametrize("args, message", [
    (_bad(v=torch.randn(4, 3, 8), a=torch.randn(4, 3), b=torch.randn(4, 3), A_log=torch.randn(3),
          dt_bias=torch.randn(3), state=torch.zeros(3, 3, 8, 8)), "not divisible"),
    (_bad(state=torch.zeros(3, 4, 8, 8, dtype=torch.float16)), "float32 or bfloat16"),
    (_bad(state=torch.zeros(3, 4, 8, 9)), "state must be"),
    (_bad(cu_seqlens=torch.tensor([0, 1, 5])), "end at T=4"),
    (_bad(cu_seqlens=torch.tensor([0, 3, 1, 4]), slots=torch.tensor([0, 1, 2])), "never decrease"),
    (_bad(slots=torch.tensor([0])), "cu_seqlens has 3 entries but slots has 1"),
    (_bad(slots=torch.tensor([0, 3])), "outside"),
    (_bad(a=torch.randn(4, 2)), "a must be"),
], ids=["hv-not-multiple", "state-fp16", "state-shape", "t-mismatch", "decreasing", "slots-length", "slot-range",
        "a-shape"])
def test_validation_errors(args, message):
    with pytest.raises(ValueError, match=message):
        gated_delta_rule_varlen(**args)
