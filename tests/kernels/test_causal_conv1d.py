"""Causal conv1d + SiLU over a flat varlen batch with a conv-state pool, against HF transformers' qwen3_5 functions.

HF's `causal_conv1d_update` convolves `[state | new inputs]` and keeps the tail as the new state, for any number of
new tokens: it is the per-sequence oracle; `causal_conv1d_fn` (zero left context) checks fresh sequences."""
import pytest
import torch

from deltaserve.kernels.causal_conv1d import causal_conv1d_varlen

hf = pytest.importorskip("transformers.models.qwen3_5.modeling_qwen3_5")

ATOL = 1e-6  # fp32; the same F.conv1d arithmetic as HF, so observed errors are ~0


def assert_close(name, ref, out, atol, rtol=0.0):
    """max |out - ref| - rtol * |ref| <= atol; NaN anywhere fails."""
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    ref, out = ref.float(), out.float()
    err = ((out - ref).abs() - rtol * ref.abs()).max().item() if ref.numel() else 0.0
    assert err <= atol, f"{name}: error {err:.2e} beyond atol {atol:.0e} + rtol {rtol:.0e} * |ref|"


@pytest.fixture(autouse=True)
def _seed():
    """Deterministic inputs (one intra-op thread for the whole suite: tests/conftest.py)."""
    torch.manual_seed(0)


def cu_of(lengths):
    return torch.tensor([0] + lengths).cumsum(0)


def make_pool(S, C, W, slots, seed=1):
    """[S, C, W-1] pool: random states at `slots`, NaN everywhere else (a read of the wrong slot shows)."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.full((S, C, W - 1), float("nan"))
    for s in slots:
        if s >= 0:
            pool[s] = torch.randn(C, W - 1, generator=gen)
    return pool


def hf_sequence(x, weight, state):
    """x: [L, C]; state: [C, W-1] -> (out [L, C], new state [C, W-1]) through HF's causal_conv1d_update."""
    state = state.clone()[None]
    out = hf.causal_conv1d_update(x.t()[None], state, weight, None, "silu")
    return out[0].t(), state[0]


def assert_untouched(before, after, used):
    rest = [s for s in range(before.shape[0]) if s not in used]
    assert torch.equal(before[rest].view(torch.int32), after[rest].view(torch.int32)), \
        "a slot outside the batch was written"


@pytest.mark.parametrize("W", [4, 2], ids=["w4", "w2"])
def test_varlen_matches_hf_per_sequence(W):
    C, S = 12, 11
    lengths = [1, 2, 3, 4, 0, 17, 1, 64]
    gen = torch.Generator().manual_seed(0)
    slots = torch.randperm(S, generator=gen)[: len(lengths)]
    x = torch.randn(sum(lengths), C, generator=gen)
    weight = torch.randn(C, W, generator=gen)
    pool = make_pool(S, C, W, slots.tolist())
    before = pool.clone()

    out = causal_conv1d_varlen(x, weight, pool, cu_of(lengths), slots)

    assert out.dtype == x.dtype and torch.isfinite(out).all(), "NaN from a poisoned slot leaked into the output"
    cu = cu_of(lengths).tolist()
    for i, L in enumerate(lengths):
        slot = slots[i].item()
        if L == 0:  # HF cannot run an empty sequence; ours must simply keep its state
            assert torch.equal(pool[slot], before[slot]), "a 0-token sequence changed its state"
            continue
        ref_out, ref_state = hf_sequence(x[cu[i]:cu[i + 1]], weight, before[slot])
        assert_close(f"out[seq {i}, L={L}]", ref_out, out[cu[i]:cu[i + 1]], ATOL)
        assert_close(f"state[seq {i}, L={L}]", ref_state, pool[slot], ATOL)
    assert_untouched(before, pool, slots.tolist())


def test_fresh_sequence_matches_hf_prefill():
    """A zeroed slot (fresh request) must equal HF's prefill path, which pads with zeros on the left."""
    C, W, L = 12, 4, 9
    x, weight = torch.randn(L, C), torch.randn(C, W)
    pool = torch.zeros(2, C, W - 1)
    out = causal_conv1d_varlen(x, weight, pool, cu_of([L]), torch.tensor([1]))
    ref = hf.causal_conv1d_fn(x.t()[None], weight, None, activation="silu")[0].t()
    assert_close("out", ref, out, ATOL)
    assert_close("state = last W-1 inputs", x[-(W - 1):].t(), pool[1], 0.0)


@pytest.mark.parametrize("split", [[1, 2], [1, 1, 1, 1], [2, 5], [1, 2, 3, 1]],
                         ids=["1-2", "1-1-1-1", "2-5", "1-2-3-1"])
def test_short_calls_shift_state_like_one_shot(split):
    """Calls with fewer than W-1 tokens must shift older stored inputs into the state, not drop them."""
    C, W, slot = 6, 4, 3
    L = sum(split)
    x, weight = torch.randn(L, C), torch.randn(C, W)
    pool_one = make_pool(5, C, W, [slot])
    pool_steps = pool_one.clone()
    out_one = causal_conv1d_varlen(x, weight, pool_one, cu_of([L]), torch.tensor([slot]))
    outs, start = [], 0
    for n in split:
        outs.append(causal_conv1d_varlen(x[start:start + n], weight, pool_steps, cu_of([n]), torch.tensor([slot])))
        start += n
    assert_close("out (calls vs one shot)", out_one, torch.cat(outs), ATOL)
    assert_close("state (calls vs one shot)", pool_one[slot], pool_steps[slot], 0.0)


def test_padding_rows_read_zeros_and_write_nothing():
    C, W, S = 6, 4, 5
    lengths = [3, 1, 2, 1]
    slots = torch.tensor([2, -1, 1, -1])
    x, weight = torch.randn(sum(lengths), C), torch.randn(C, W)
    pool = make_pool(S, C, W, [1, 2])  # slots 0 and S-1 (where a clamped or wrapped -1 lands) stay NaN
    before = pool.clone()
    out = causal_conv1d_varlen(x, weight, pool, cu_of(lengths), slots)
    assert torch.isfinite(out).all(), "a padding row read a NaN slot"
    assert_untouched(before, pool, [1, 2])
    cu = cu_of(lengths).tolist()
    for i in (1, 3):
        ref, _ = hf_sequence(x[cu[i]:cu[i + 1]], weight, torch.zeros(C, W - 1))
        assert_close(f"out[padding row {i}]", ref, out[cu[i]:cu[i + 1]], ATOL)


def test_bf16_stays_close_to_fp32():
    """bf16 x, weight and state (the model dtype) against fp32 on the same values. Observed: max abs error 3e-2 on
    outputs up to ~8, i.e. within one bf16 ulp (2^-8 relative: the conv sum and the SiLU are each rounded once);
    the state is exact (it only copies inputs). Also: fp32 x with a bf16 weight computes in bf16 and returns
    fp32, as HF does."""
    C, W = 16, 4
    lengths = [1, 2, 40]
    slots = torch.tensor([0, 3, 1])
    x = torch.randn(sum(lengths), C).bfloat16().float()
    weight = torch.randn(C, W).bfloat16().float()
    pool32 = make_pool(4, C, W, slots.tolist()).bfloat16().float()
    pool16, pool_mixed = pool32.bfloat16(), pool32.bfloat16()
    out32 = causal_conv1d_varlen(x, weight, pool32, cu_of(lengths), slots)
    out16 = causal_conv1d_varlen(x.bfloat16(), weight.bfloat16(), pool16, cu_of(lengths), slots)
    assert out16.dtype == torch.bfloat16
    assert_close("out bf16 vs fp32", out32, out16, 1e-3, rtol=2**-7)
    assert_close("state bf16 vs fp32", pool32[slots], pool16[slots], 0.0)

    mixed = causal_conv1d_varlen(x, weight.bfloat16(), pool_mixed, cu_of(lengths), slots)
    assert mixed.dtype == torch.float32
    assert_close("fp32 x with bf16 weight", out16, mixed, 0.0)


def _bad(**changes):
    C, W = 6, 4
    args = dict(x=torch.randn(4, C), weight=torch.randn(C, W), conv_state=torch.zeros(3, C, W - 1),
                cu_seqlens=torch.tensor([0, 1, 4]), slots=torch.tensor([0, 2]))
    args.update(changes)
    return args


@pytest.mark.parametrize("args, message", [
    (_bad(weight=torch.randn(5, 4)), "weight must be"),
    (_bad(conv_state=torch.zeros(3, 6, 4)), "conv_state must be"),
    (_bad(conv_state=torch.zeros(3, 6, 3, dtype=torch.bfloat16)), "dtype"),
    (_bad(cu_seqlens=torch.tensor([0, 1, 3])), "end at T=4"),
    (_bad(slots=torch.tensor([0, 1, 2])), "cu_seqlens has 3 entries but slots has 3"),
    (_bad(slots=torch.tensor([-2, 1])), "outside"),
    (_bad(cu_seqlens=torch.tensor([0.0, 1.0, 4.0])), "int32/int64"),
], ids=["weight-shape", "state-width", "state-dtype", "t-mismatch", "slots-length", "slot-range", "cu-float"])
def test_validation_errors(args, message):
    with pytest.raises(ValueError, match=message):
        causal_conv1d_varlen(**args)
