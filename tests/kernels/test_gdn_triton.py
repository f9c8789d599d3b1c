"""Triton GDN kernels (chunked varlen prefill, fused decode step) against the torch reference.

CPU (CI): the kernels run under TRITON_INTERPRET=1 at small shapes, fp32 only. The interpreter runs tl.dot in fp32
through numpy (input_precision is ignored), so Triton and reference agree to fp32 rounding: observed max abs errors
3e-7..6e-7 on outputs (|o| <= 0.5) and ~1e-6 on states (|S| <= 2). (bf16 cannot run there: the interpreter's tl.dot
multiplies bf16 as raw uint16 bits and its fp32->bf16 cast truncates.)
GPU (`gpu` marker, run on an H100): Qwen3.5-9B shapes, bf16 inputs, fp32 states. The prefill rounds its
intermediates (T, A_qk; the states, beta (v - exp(G) k h) and v_new as dot operands) to bf16 as fla does; emulating bf16
round-to-nearest on the CPU at K=V=128 over 700 tokens gave relative RMS errors of 4.3e-3 (o) and 3.2e-3 (states)
against the fp32 reference. Decode computes in fp32 and matched to ~4e-7 there."""
import importlib
import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton.jit decorates the kernels
pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"  # the small cases run compiled on a GPU box

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from deltaserve.kernels.gated_delta_rule import reference as ref  # noqa: E402
from deltaserve.kernels.gated_delta_rule import triton_chunk, triton_decode  # noqa: E402

if INTERPRET and not isinstance(triton_chunk._chunk_solve_kernel, InterpretedFunction):
    # imported earlier without the interpreter (e.g. by dispatch): re-decorate the kernels for the CPU
    triton_chunk, triton_decode = importlib.reload(triton_chunk), importlib.reload(triton_decode)

# fp32: the interpreter multiplies in true fp32 (observed <= ~1e-6); compiled on a GPU fp32 dots run as tf32
# (emulated on the CPU: <= 2.6e-4 on o, <= 7.4e-4 on states at these shapes)
ATOL = 2e-5 if INTERPRET else 3e-3
GPU_REL = dict(prefill=2e-2, decode=5e-3)  # relative RMS vs the reference; expected ~4e-3 and ~1e-6


def assert_close(name, ref_t, out, atol):
    assert ref_t.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref_t.shape)}"
    err = (out.float() - ref_t.float()).abs().max().item() if ref_t.numel() else 0.0
    assert err <= atol, f"{name}: max abs error {err:.2e} > atol {atol:.0e}"  # NaN fails too


def assert_close_rel(name, ref_t, out, rel):
    """||out - ref|| / ||ref|| <= rel (RMS-relative), and nothing non-finite."""
    assert ref_t.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref_t.shape)}"
    assert torch.isfinite(out).all(), f"{name}: non-finite values"
    err = ((out.float() - ref_t.float()).norm() / ref_t.float().norm().clamp(min=1e-12)).item()
    assert err <= rel, f"{name}: relative RMS error {err:.2e} > {rel:.0e}"


def assert_untouched(before, after, used):
    """Slots not in `used` must be bit-identical (NaN-safe: compare raw bits)."""
    rest = [s for s in range(before.shape[0]) if s not in used]
    bits = torch.int16 if before.element_size() == 2 else torch.int32
    assert torch.equal(before[rest].view(bits), after[rest].view(bits)), "a slot outside the batch was written"


@pytest.fixture(autouse=True)
def _seed():
    """Deterministic inputs (one intra-op thread for the whole suite: tests/conftest.py)."""
    torch.manual_seed(0)


def projection_view(t: torch.Tensor, pad: int = 7) -> torch.Tensor:
    """t [T, HV] as the engine hands a/b over: a view into a wider projection output (row stride HV + pad, NaN in
    the other columns, so a kernel that ignores the row stride reads NaN)."""
    wide = torch.full((t.shape[0], t.shape[1] + pad), float("nan"), dtype=t.dtype, device=t.device)
    wide[:, 3: 3 + t.shape[1]] = t
    return wide[:, 3: 3 + t.shape[1]]


def make_inputs(T, Hk, HV, K, V, dtype=torch.float32, device="cpu", seed=0):
    """Raw layer inputs as the conv hands them over: q, k not normalised; decays mild enough (g ~ -0.05..-1.5 per
    token) that initial states still shape the outputs."""
    gen = torch.Generator().manual_seed(seed)
    q, k = torch.randn(T, Hk, K, generator=gen), torch.randn(T, Hk, K, generator=gen)
    v = torch.randn(T, HV, V, generator=gen)
    a, b = torch.randn(T, HV, generator=gen), torch.randn(T, HV, generator=gen)
    A_log = torch.empty(HV).uniform_(0.05, 1.0, generator=gen).log()
    dt_bias = torch.randn(HV, generator=gen) * 0.5
    cast = lambda x: x.to(device=device, dtype=dtype)  # noqa: E731
    return (cast(q), cast(k), cast(v), projection_view(cast(a)), projection_view(cast(b)), A_log.to(device),
            dt_bias.to(device))


def make_pool(shape, slots, scale=0.5, dtype=torch.float32, device="cpu", seed=1):
    """[S, *shape] pool: random values at `slots`, NaN everywhere else (a read of the wrong slot shows)."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.full(tuple(shape), float("nan"))
    for s in slots:
        if s >= 0:
            pool[s] = torch.randn(tuple(shape[1:]), generator=gen) * scale
    return pool.to(device=device, dtype=dtype)


def cu_of(lengths, device="cpu"):
    return torch.tensor([0] + lengths, device=device).cumsum(0)


def run_chunk_case(heads, lengths, slots, S, dtype=torch.float32, device="cpu", config=None,
                   state_dtype=torch.float32):
    """Triton and reference on the same inputs and pools. Returns (o_ref, o, pool_ref, pool, pool_before)."""
    inputs = make_inputs(sum(lengths), **heads, dtype=dtype, device=device)
    pool = make_pool((S, heads["HV"], heads["K"], heads["V"]), slots.tolist(), device=device, dtype=state_dtype)
    pool_ref, before = pool.clone(), pool.clone()
    cu = cu_of(lengths, device)
    o_ref = ref.gated_delta_rule_varlen(*inputs, pool_ref, cu, slots)
    o = triton_chunk.chunk_gated_delta_rule_varlen(*inputs, pool, cu, slots, lengths, config=config)
    return o_ref, o, pool_ref, pool, before


CPU_CHUNK_CASES = [
    pytest.param(dict(Hk=2, HV=4, K=32, V=16), None, id="gqa2-k32-v16"),
    # V-tiles of 16 over V=24: two tiles per head in the state pass, the second one masked
    pytest.param(dict(Hk=2, HV=6, K=16, V=24), triton_chunk.ChunkLaunchConfig(state_block_v=16),
                 id="gqa3-k16-v24-2tiles"),
    # the diagonal blocks' substitution in 4 x 4 blocks, merged 4 -> 8 -> 16, and in one 16 x 16 block (the default:
    # 8 x 8, merged once)
    pytest.param(dict(Hk=2, HV=4, K=32, V=16), triton_chunk.ChunkLaunchConfig(diag_sub=4), id="diag-sub4"),
    pytest.param(dict(Hk=2, HV=4, K=32, V=16), triton_chunk.ChunkLaunchConfig(diag_sub=16), id="diag-sub16"),
]


@pytest.mark.parametrize("heads,config", CPU_CHUNK_CASES)
def test_chunk_varlen_matches_reference(heads, config):
    """Partial chunks (ending in the first, third and fourth 16-token block), a 1-token sequence, a padding row (-1),
    random initial states at shuffled slots."""
    lengths = [70, 1, 5, 130, 64, 40, 57]
    slots = torch.tensor([4, 0, -1, 7, 2, 8, 1], device=DEVICE)
    o_ref, o, pool_ref, pool, before = run_chunk_case(heads, lengths, slots, S=9, device=DEVICE, config=config)

    assert o.dtype == torch.float32
    assert_close("o", o_ref, o, ATOL)  # the padding row too: both compute it from a zero state
    live = [s for s in slots.tolist() if s >= 0]
    assert_close("states", pool_ref[live], pool[live], ATOL)
    assert_untouched(before, pool, live)
    # guard on the test: initial states must visibly matter, or the slot gather is untested
    assert (pool[4] - before[4]).abs().max() > 1e-2 and (o_ref[:8] - o[:8]).abs().max() < ATOL


def test_chunk_strong_decay_in_partial_chunks():
    """Decays of ~-10 a token (in-chunk cumsums down to ~-600, where exp(-G) overflows fp32) in chunks that end
    inside their first, second and fourth 16-token blocks: the rows past a sequence's end must stay finite, since
    the triangular solve's merges multiply them by exact zeros."""
    heads = dict(Hk=2, HV=4, K=16, V=16)
    lengths, slots = [61, 20, 100], torch.tensor([0, 1, 2], device=DEVICE)
    q, k, v, a, b, A_log, dt_bias = make_inputs(sum(lengths), **heads, device=DEVICE, seed=3)
    A_log = torch.full_like(A_log, math.log(8.0))
    a = a.abs() + 1.0  # softplus(a + dt_bias) >~ 1: g <~ -8 per token
    pool = make_pool((3, 4, 16, 16), [0, 1, 2], device=DEVICE)
    pool_ref, cu = pool.clone(), cu_of(lengths, DEVICE)
    o_ref = ref.gated_delta_rule_varlen(q, k, v, a, b, A_log, dt_bias, pool_ref, cu, slots)
    o = triton_chunk.chunk_gated_delta_rule_varlen(q, k, v, a, b, A_log, dt_bias, pool, cu, slots, lengths)
    assert torch.isfinite(o).all() and torch.isfinite(pool).all()
    assert_close("o", o_ref, o, ATOL)
    assert_close("states", pool_ref, pool, ATOL)


def test_chunk_bf16_state_pool():
    """A bf16 pool (state_dtype="bfloat16"): both sides read the same bf16 states, run in fp32 and round once on
    store, so outputs agree as in fp32 and stored states within one bf16 ulp (2^-7 relative: a rounding may flip)."""
    lengths, slots = [70, 1, 130], torch.tensor([4, -1, 2], device=DEVICE)
    o_ref, o, pool_ref, pool, before = run_chunk_case(dict(Hk=2, HV=4, K=32, V=16), lengths, slots, S=6,
                                                      device=DEVICE, state_dtype=torch.bfloat16)
    assert pool.dtype == torch.bfloat16
    assert_close("o", o_ref, o, ATOL)
    live = [4, 2]
    assert_close("states", pool_ref[live], pool[live], 2.0**-7 * pool_ref[live].float().abs().max().item())
    assert_untouched(before, pool, live)


def test_chunk_snapshots_write_the_state_at_their_offsets():
    """The prefix cache's snapshots: the state after 64 and 128 of a 150-token sequence's tokens (and after 64 of
    another's) lands in its own slot, as the reference computes it and as a call ending there would leave it, while
    outputs and final states stay those of a call without snapshots."""
    heads = dict(Hk=2, HV=4, K=16, V=16)
    lengths, slots = [150, 5, 70], torch.tensor([0, 1, 2], device=DEVICE)
    snaps = ((0, 64, 3), (0, 128, 4), (2, 64, 5))
    inputs = make_inputs(sum(lengths), **heads, dtype=torch.float32, device=DEVICE, seed=9)
    pool = make_pool((6, 4, 16, 16), [0, 1, 2], device=DEVICE)
    plain, pool_ref, cu = pool.clone(), pool.clone(), cu_of(lengths, DEVICE)  # slots 3-5: NaN until written
    o_plain = triton_chunk.chunk_gated_delta_rule_varlen(*inputs, plain, cu, slots, lengths)
    o_ref = ref.gated_delta_rule_varlen(*inputs, pool_ref, cu, slots, snapshots=snaps)
    tables = triton_chunk.build_chunk_tables(lengths, DEVICE, snaps)
    o = triton_chunk.chunk_gated_delta_rule_varlen(*inputs, pool, cu, slots, lengths, tables=tables, snapshots=snaps)
    assert_close("o", o_plain, o, ATOL)
    assert_close("o (reference)", o_ref, o, ATOL)
    assert_close("final states", plain[:3], pool[:3], ATOL)
    assert_close("snapshots (reference)", pool_ref[3:], pool[3:], ATOL)
    for slot, seq_slot, (s, e) in ((3, 0, (0, 64)), (4, 0, (0, 128)), (5, 2, (155, 219))):
        alone = make_pool((6, 4, 16, 16), [0, 1, 2], device=DEVICE)  # the initial states again
        part = [x[s:e] for x in inputs[:5]] + list(inputs[5:])
        ref.gated_delta_rule_varlen(*part, alone, cu_of([e - s], DEVICE), torch.tensor([seq_slot], device=DEVICE))
        assert_close(f"snapshot {slot} vs a call ending there", alone[seq_slot], pool[slot], ATOL)
    with pytest.raises(ValueError, match="at multiples of 64 inside it"):
        triton_chunk.build_chunk_tables(lengths, DEVICE, ((0, 32, 3),))


def test_chunk_continuation_equals_one_shot():
    """A sequence split over two calls (37 | 63 tokens) must end where one call of 100 ends; a 0-token sequence in
    the batch keeps its state."""
    heads = dict(Hk=2, HV=4, K=16, V=16)
    q, k, v, a, b, A_log, dt_bias = make_inputs(100, **heads, device=DEVICE, seed=5)
    pool = make_pool((3, 4, 16, 16), [0, 1], device=DEVICE)
    one_shot, split = pool.clone(), pool.clone()
    tables = triton_chunk.build_chunk_tables([100], DEVICE)  # prebuilt once per step, as dispatch may do
    o_full = triton_chunk.chunk_gated_delta_rule_varlen(
        q, k, v, a, b, A_log, dt_bias, one_shot, cu_of([100], DEVICE), torch.tensor([0], device=DEVICE), [100],
        tables=tables)
    parts = []
    for s, e in ((0, 37), (37, 100)):
        # the empty second sequence (slot 1) rides along in both calls
        parts.append(triton_chunk.chunk_gated_delta_rule_varlen(
            q[s:e], k[s:e], v[s:e], a[s:e], b[s:e], A_log, dt_bias, split,
            cu_of([e - s, 0], DEVICE), torch.tensor([0, 1], device=DEVICE), [e - s, 0]))
    assert_close("o (split vs one shot)", o_full, torch.cat(parts), ATOL)
    assert_close("state (split vs one shot)", one_shot[0], split[0], ATOL)
    assert torch.equal(split[1], pool[1]), "a 0-token sequence changed its state"


def test_chunk_rejects_bad_arguments():
    heads = dict(Hk=2, HV=4, K=16, V=16)
    inputs = make_inputs(10, **heads)
    pool = make_pool((2, 4, 16, 16), [0])
    with pytest.raises(ValueError, match="query_lens"):
        triton_chunk.chunk_gated_delta_rule_varlen(*inputs, pool, cu_of([10]), torch.tensor([0]), [9])
    with pytest.raises(ValueError, match="chunk_size"):
        triton_chunk.chunk_gated_delta_rule_varlen(*inputs, pool, cu_of([10]), torch.tensor([0]), [10], 32)
    with pytest.raises(ValueError, match="tables were built"):
        triton_chunk.chunk_gated_delta_rule_varlen(*inputs, pool, cu_of([10]), torch.tensor([0]), [10],
                                                   tables=triton_chunk.build_chunk_tables([9], "cpu"))
    with pytest.raises(ValueError, match="fp32/bf16 pool"):
        triton_chunk.chunk_gated_delta_rule_varlen(*inputs, pool.double(), cu_of([10]), torch.tensor([0]), [10])


def test_mixed_step_rows_go_into_one_output():
    """A mixed step's decode rows (fused decode kernel) and prefill rows (chunk kernels) write their rows of one
    [T, HV, V] buffer through out=, exactly what each kernel returns on its own, and nothing else of it."""
    heads = dict(Hk=2, HV=4, K=16, V=16)
    d, lengths, S, W = 3, [5, 66], 8, 4
    dec = make_decode_inputs(d, S, **heads, W=W, slots=[0, 1, 2], device=DEVICE)
    dims = (heads["Hk"], heads["K"], heads["V"])
    inputs = make_inputs(sum(lengths), **heads, device=DEVICE)
    slots = torch.tensor([3, 4], device=DEVICE)
    pool = make_pool((S, heads["HV"], heads["K"], heads["V"]), [3, 4], device=DEVICE)
    buf = torch.full((d + sum(lengths), heads["HV"], heads["V"]), float("nan"), device=DEVICE)
    dec_state, dec_conv, chunk_pool = dec[7].clone(), dec[2].clone(), pool.clone()
    dec_slots = torch.tensor([0, 1, 2], device=DEVICE)
    o_dec = triton_decode.fused_recurrent_decode(*dec[:2], dec_conv, *dec[3:7], dec_state, dec_slots, *dims)
    o_chunk = triton_chunk.chunk_gated_delta_rule_varlen(*inputs, chunk_pool, cu_of(lengths, DEVICE), slots, lengths)
    got = triton_decode.fused_recurrent_decode(*dec[:2], dec[2], *dec[3:7], dec[7], dec_slots, *dims, out=buf[:d])
    assert got.data_ptr() == buf.data_ptr()
    triton_chunk.chunk_gated_delta_rule_varlen(*inputs, pool, cu_of(lengths, DEVICE), slots, lengths, out=buf[d:])
    assert torch.equal(buf[:d], o_dec) and torch.equal(buf[d:], o_chunk)
    with pytest.raises(ValueError, match="out must be a contiguous"):
        triton_chunk.chunk_gated_delta_rule_varlen(*inputs, pool, cu_of(lengths, DEVICE), slots, lengths,
                                                   out=buf[d + 1:])


def make_decode_inputs(B, S, Hk, HV, K, V, W, slots, dtype=torch.float32, device="cpu", seed=2):
    """Pre-conv mixed_qkv [B, C], conv weight [C, W], a/b as projection views, and both pools (NaN outside
    `slots`)."""
    gen = torch.Generator().manual_seed(seed)
    C = 2 * Hk * K + HV * V
    x = torch.randn(B, C, generator=gen).to(device=device, dtype=dtype)
    weight = (torch.randn(C, W, generator=gen) * 0.5).to(device=device, dtype=dtype)
    a = projection_view(torch.randn(B, HV, generator=gen).to(device=device, dtype=dtype))
    b = projection_view(torch.randn(B, HV, generator=gen).to(device=device, dtype=dtype))
    A_log = torch.empty(HV).uniform_(0.05, 1.0, generator=gen).log().to(device)
    dt_bias = (torch.randn(HV, generator=gen) * 0.5).to(device)
    conv_state = make_pool((S, C, W - 1), slots, scale=1.0, dtype=dtype, device=device, seed=3)
    state = make_pool((S, HV, K, V), slots, device=device, seed=4)
    return x, weight, conv_state, a, b, A_log, dt_bias, state


DECODE_CASES = [
    # block_v < V: several V-tiles share one key head's q/k conv state (the arrival-counter path), masked tail
    pytest.param(dict(Hk=2, HV=6, K=16, V=24), 16, id="gqa3-k16-v24-2tiles"),
    pytest.param(dict(Hk=2, HV=4, K=32, V=16), 32, id="gqa2-k32-v16-1tile"),
]


@pytest.mark.parametrize("arrive_late", [True, False], ids=["arrive-late", "arrive-early"])
@pytest.mark.parametrize("state_dtype", [torch.float32, torch.bfloat16], ids=["fp32-state", "bf16-state"])
@pytest.mark.parametrize("heads,block_v", DECODE_CASES)
def test_decode_matches_reference(heads, block_v, state_dtype, arrive_late):
    """Two consecutive steps (the second reads the conv state the first shifted), padding row -1 in the batch, with
    the conv-state arrival counted after the conv and after the state store.
    bf16 state pool: a stored state may differ by one bf16 ulp (2^-7 relative), and step 1 reads it back."""
    slots = torch.tensor([3, 0, -1, 6, 2], device=DEVICE)
    S, W = 8, 4
    x, weight, conv_state, a, b, A_log, dt_bias, state = make_decode_inputs(5, S, **heads, W=W,
                                                                         slots=slots.tolist(), device=DEVICE)
    state = state.to(state_dtype)
    tol = ATOL if state_dtype == torch.float32 else 2.0**-7 * 4  # |states|, |o| stay below ~4 here
    conv_ref, state_ref = conv_state.clone(), state.clone()
    conv_before, state_before = conv_state.clone(), state.clone()
    live = slots >= 0
    L = slots[live].tolist()
    config = triton_decode.DecodeLaunchConfig(block_v=block_v, arrive_late=arrive_late)
    dims = (heads["Hk"], heads["K"], heads["V"])
    for step in range(2):
        xs = x if step == 0 else torch.randn_like(x)
        o_ref = ref.fused_recurrent_decode_reference(xs, weight, conv_ref, a, b, A_log, dt_bias, state_ref, slots,
                                                     *dims)
        o = triton_decode.fused_recurrent_decode(xs, weight, conv_state, a, b, A_log, dt_bias, state, slots, *dims,
                                                 config=config)
        assert torch.isfinite(o).all(), "a padding row read a NaN slot"
        assert_close(f"o (step {step})", o_ref[live], o[live], tol)
        assert_close(f"state (step {step})", state_ref[L], state[L], tol)
        assert_close(f"conv_state (step {step})", conv_ref[L], conv_state[L], 0.0)
    assert_untouched(state_before, state, L)
    assert_untouched(conv_before, conv_state, L)
    counters = triton_decode._arrival_counters(x.device, S, heads["Hk"])
    assert not counters.any(), "the decode kernel left its arrival counters non-zero"


def test_decode_default_config_by_rows_and_card(monkeypatch):
    """Below 8 rows the small-batch tiles, below 32 the 32-wide ones; above, the card's own sweep result where one is
    listed, else the H100 defaults."""
    cpu = torch.device("cpu")
    assert triton_decode.default_config(1, cpu) == triton_decode.SMALL_BATCH_CONFIG
    assert triton_decode.default_config(7, cpu) == triton_decode.SMALL_BATCH_CONFIG
    assert triton_decode.default_config(8, cpu) == triton_decode.MID_BATCH_CONFIG
    assert triton_decode.default_config(31, cpu).block_v == 32
    assert triton_decode.default_config(64, cpu) == triton_decode.DecodeLaunchConfig()
    monkeypatch.setitem(triton_decode._DEVICE_NAMES, cpu, "NVIDIA H200")
    assert triton_decode.default_config(64, cpu) == triton_decode.TUNED_CONFIGS["NVIDIA H200"]
    assert triton_decode.default_config(16, cpu) == triton_decode.MID_BATCH_CONFIG


def test_decode_rejects_bad_channel_count():
    x, weight, conv_state, a, b, A_log, dt_bias, state = make_decode_inputs(2, 3, 2, 4, 16, 16, 4, [0, 1])
    with pytest.raises(ValueError, match="channels"):
        triton_decode.fused_recurrent_decode(x, weight, conv_state, a, b, A_log, dt_bias, state,
                                             torch.tensor([0, 1]), 2, 16, 24)


# ---- full size on the GPU (run by the lead on an H100) ----

QWEN35_9B = dict(Hk=16, HV=32, K=128, V=128)


@pytest.mark.gpu
@pytest.mark.parametrize("lengths,slot_list", [
    pytest.param([2048, 1, 700, 1333], [5, 2, 9, 0], id="4seq-mixed-2k"),
    pytest.param([64, 2000, 129, 1, 5], [5, 2, 9, 0, -1], id="5seq-with-padding-row"),
])
def test_chunk_gpu_qwen35_9b(lengths, slot_list):
    slots = torch.tensor(slot_list, device="cuda")
    o_ref, o, pool_ref, pool, before = run_chunk_case(QWEN35_9B, lengths, slots, S=12, dtype=torch.bfloat16,
                                                      device="cuda")
    assert o.dtype == torch.bfloat16
    assert_close_rel("o", o_ref, o, GPU_REL["prefill"])
    live = [s for s in slots.tolist() if s >= 0]
    for s in live:
        assert_close_rel(f"state[{s}]", pool_ref[s], pool[s], GPU_REL["prefill"])
    assert_untouched(before, pool, live)


@pytest.mark.gpu
@pytest.mark.parametrize("B", [1, 16, 64, 256], ids=lambda B: f"B{B}")  # the three launch configs
def test_decode_gpu_qwen35_9b(B):
    S = B + 8
    perm = torch.randperm(S, generator=torch.Generator().manual_seed(0))[:B]
    slots = perm.clone()
    if B > 1:
        slots[B // 2] = -1  # a CUDA-graph padding row in the middle
    x, weight, conv_state, a, b, A_log, dt_bias, state = make_decode_inputs(
        B, S, **QWEN35_9B, W=4, slots=slots.tolist(), dtype=torch.bfloat16, device="cuda")
    slots = slots.cuda()
    conv_ref, state_ref = conv_state.clone(), state.clone()
    state_before, conv_before = state.clone(), conv_state.clone()
    dims = (QWEN35_9B["Hk"], QWEN35_9B["K"], QWEN35_9B["V"])
    live = slots >= 0
    L = slots[live].tolist()
    for step in range(3):
        xs = x if step == 0 else torch.randn_like(x)
        o_ref = ref.fused_recurrent_decode_reference(xs, weight, conv_ref, a, b, A_log, dt_bias, state_ref, slots,
                                                     *dims)
        o = triton_decode.fused_recurrent_decode(xs, weight, conv_state, a, b, A_log, dt_bias, state, slots, *dims)
        torch.cuda.synchronize()
        assert torch.isfinite(o).all()
        assert_close_rel(f"o (step {step})", o_ref[live], o[live], GPU_REL["decode"])
        assert_close_rel(f"state (step {step})", state_ref[L], state[L], GPU_REL["decode"])
        # conv + SiLU rounding to bf16 may differ by an ulp from cuDNN's accumulation order; the state is a copy
        assert torch.equal(conv_ref[L], conv_state[L]), "conv_state shift differs from the reference"
    assert_untouched(state_before, state, L)
    assert_untouched(conv_before, conv_state, L)
