"""Triton causal conv1d + SiLU (varlen, pooled state) against the torch reference.

Runs under TRITON_INTERPRET=1 on CPU at small shapes; the `gpu` cases run the GDN sizes of Qwen3.5-9B
(C = 2·16·128 + 32·128 = 8192, W = 4) in bf16 on CUDA."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from deltaserve.kernels.causal_conv1d import reference  # noqa: E402
from deltaserve.kernels.causal_conv1d.triton import causal_conv1d_varlen_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL_FP32 = 1e-5  # same products and sum in fp32, only the summation order (and FMA) differ: observed ~5e-7
# bf16: the conv sum and the SiLU are each rounded once to bf16 (as the reference does); a different fp32
# summation order can flip one rounding, i.e. one bf16 ulp = 2^-8 relative (plus a tiny absolute floor near 0)
ATOL_BF16, RTOL_BF16 = 1e-3, 2**-7


def assert_close(name, ref, out, atol, rtol=0.0):
    """max(|out - ref| - rtol * |ref|) <= atol; a NaN anywhere fails."""
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    ref, out = ref.float(), out.float()
    err = ((out - ref).abs() - rtol * ref.abs()).max().item() if ref.numel() else 0.0
    assert err <= atol, f"{name}: error {err:.2e} beyond atol {atol:.0e} + rtol {rtol:.0e} * |ref|"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def cu_of(lengths):
    return torch.tensor([0] + lengths, device=DEVICE).cumsum(0)


def make_pool(S, C, W, slots, dtype=torch.float32, seed=1):
    """[S, C, W-1] pool: random states at `slots`, NaN everywhere else (a read or write of a wrong slot shows)."""
    gen = torch.Generator().manual_seed(seed)
    pool = torch.full((S, C, W - 1), float("nan"))
    for s in slots:
        if s >= 0:
            pool[s] = torch.randn(C, W - 1, generator=gen)
    return pool.to(device=DEVICE, dtype=dtype)


def run_both(x, weight, pool, lengths, slots):
    """-> (ref_out, ref_pool, out, pool) from the reference and the kernel on copies of the same pool."""
    cu = cu_of(lengths)
    ref_pool, pool = pool.clone(), pool.clone()
    ref = reference.causal_conv1d_varlen(x, weight, ref_pool, cu, slots)
    out = causal_conv1d_varlen_triton(x, weight, pool, cu, slots, lengths)
    return ref, ref_pool, out, pool


def assert_pool_equal(name, ref_pool, pool):
    """Bit equality, NaN included: the state only ever copies inputs, and untouched slots must stay NaN."""
    assert torch.equal(ref_pool.view(torch.int16 if ref_pool.dtype == torch.bfloat16 else torch.int32),
                       pool.view(torch.int16 if pool.dtype == torch.bfloat16 else torch.int32)), \
        f"{name}: conv_state differs from the reference (or a slot outside the batch was written)"


CASES = {  # lengths: 40 spans three 16-token tiles (the table path); all <= 16 take the one-tile-per-sequence path
    "mixed-1-2-5-40": [1, 2, 5, 40],
    "with-empty-seq": [3, 0, 33, 1],
    "decode-1x6": [1] * 6,
    "short-2-5-16": [2, 5, 16],
}


@pytest.mark.parametrize("dtype, atol, rtol", [(torch.float32, ATOL_FP32, 0.0), (torch.bfloat16, ATOL_BF16, RTOL_BF16)],
                         ids=["fp32", "bf16"])
@pytest.mark.parametrize("lengths", CASES.values(), ids=CASES.keys())
def test_varlen_matches_reference(lengths, dtype, atol, rtol):
    C, W, S = 40, 4, 11  # C not a power of two: the channel mask is exercised
    slots = torch.randperm(S)[: len(lengths)].to(DEVICE)
    x = torch.randn(sum(lengths), C, device=DEVICE, dtype=dtype)
    weight = torch.randn(C, W, device=DEVICE, dtype=dtype)
    pool = make_pool(S, C, W, slots.tolist(), dtype)
    ref, ref_pool, out, pool = run_both(x, weight, pool, lengths, slots)
    assert out.dtype == dtype and torch.isfinite(out).all(), "NaN from a poisoned slot leaked into the output"
    assert_close("out", ref, out, atol, rtol)
    assert_pool_equal("state", ref_pool, pool)
    if DEVICE == "cpu" and dtype == torch.bfloat16:
        # the interpreter reproduces each rounding of the reference (observed bit-exact): a skipped or extra cast
        # to bf16 flips the last bit of many outputs, which the 1-ulp bound above cannot see
        assert (out != ref).float().mean().item() <= 1e-3, "bf16 roundings differ from the reference's"


@pytest.mark.parametrize("W", [2, 3], ids=["w2", "w3"])
def test_other_widths(W):
    lengths, C, S = [1, 2, 5, 40], 24, 6
    slots = torch.tensor([4, 0, 2, 5], device=DEVICE)
    x, weight = torch.randn(sum(lengths), C, device=DEVICE), torch.randn(C, W, device=DEVICE)
    ref, ref_pool, out, pool = run_both(x, weight, make_pool(S, C, W, slots.tolist()), lengths, slots)
    assert_close("out", ref, out, ATOL_FP32)
    assert_pool_equal("state", ref_pool, pool)


@pytest.mark.parametrize("lengths", [[3, 1, 40, 1], [1, 1, 1, 1]], ids=["prefill-tiles", "decode"])
def test_padding_slot_reads_zeros_and_writes_nothing(lengths):
    C, W, S = 24, 4, 5
    slots = torch.tensor([2, -1, 1, -1], device=DEVICE)
    x, weight = torch.randn(sum(lengths), C, device=DEVICE), torch.randn(C, W, device=DEVICE)
    pool = make_pool(S, C, W, [1, 2])  # slots 0, 3 and S-1 (where a clamped or wrapped -1 lands) stay NaN
    ref, ref_pool, out, pool_after = run_both(x, weight, pool, lengths, slots)
    assert torch.isfinite(out).all(), "a padding row read a NaN slot"
    assert_close("out", ref, out, ATOL_FP32)
    assert torch.isnan(pool_after[[0, 3, 4]]).all(), "a padding row wrote into the pool"
    assert_pool_equal("state", ref_pool, pool_after)


@pytest.mark.parametrize("split", [[1, 2, 5, 32], [40], [2, 1, 1, 36]], ids=["1-2-5-32", "one-call", "2-1-1-36"])
def test_continuation_across_calls_equals_one_shot(split):
    """A chunked prefill (and decode steps shorter than W-1) must continue from the stored state."""
    C, W, slot = 24, 4, 3
    x, weight = torch.randn(sum(split), C, device=DEVICE), torch.randn(C, W, device=DEVICE)
    pool_one = make_pool(5, C, W, [slot])
    pool_steps = pool_one.clone()
    slots = torch.tensor([slot], device=DEVICE)
    out_one = reference.causal_conv1d_varlen(x, weight, pool_one, cu_of([sum(split)]), slots)
    outs, start = [], 0
    for n in split:
        outs.append(causal_conv1d_varlen_triton(x[start:start + n], weight, pool_steps, cu_of([n]), slots, [n]))
        start += n
    assert_close("out (calls vs one shot)", out_one, torch.cat(outs), ATOL_FP32)
    assert_pool_equal("state (calls vs one shot)", pool_one, pool_steps)


def test_fp32_input_bf16_weight_and_strided_rows():
    """fp32 x with a bf16 weight computes in bf16 and returns fp32; x may be a column slice (row stride > C)."""
    lengths, C, W, S = [5, 40], 24, 4, 3
    slots = torch.tensor([2, 0], device=DEVICE)
    x = torch.randn(sum(lengths), C + 8, device=DEVICE)[:, 4:4 + C]
    weight = torch.randn(C, W, device=DEVICE, dtype=torch.bfloat16)
    ref, ref_pool, out, pool = run_both(x, weight, make_pool(S, C, W, [0, 2], torch.bfloat16), lengths, slots)
    assert out.dtype == torch.float32
    assert_close("out", ref, out, ATOL_BF16, RTOL_BF16)
    assert_pool_equal("state", ref_pool, pool)


def test_query_lens_must_match():
    x, weight = torch.randn(4, 8, device=DEVICE), torch.randn(8, 4, device=DEVICE)
    with pytest.raises(ValueError, match="query_lens"):
        causal_conv1d_varlen_triton(x, weight, torch.zeros(2, 8, 3, device=DEVICE), cu_of([1, 3]),
                                    torch.tensor([0, 1], device=DEVICE), [1, 2])


GPU_CASES = {"decode-256": [1] * 256, "mixed-prefill": [1, 7, 300, 2048, 3, 1, 64], "long-8k": [8192]}


@pytest.mark.gpu
@pytest.mark.parametrize("lengths", GPU_CASES.values(), ids=GPU_CASES.keys())
def test_gpu_qwen35_9b_sizes_bf16(lengths):
    C, W, S = 8192, 4, 300
    slots = torch.randperm(S)[: len(lengths)].to(DEVICE)
    slots[0] = -1  # one padding row among them
    x = torch.randn(sum(lengths), C, device=DEVICE, dtype=torch.bfloat16)
    weight = torch.randn(C, W, device=DEVICE, dtype=torch.bfloat16) * 0.5
    pool = make_pool(S, C, W, slots.tolist(), torch.bfloat16)
    ref, ref_pool, out, pool = run_both(x, weight, pool, lengths, slots)
    assert_close("out", ref, out, ATOL_BF16, RTOL_BF16)
    assert_pool_equal("state", ref_pool, pool)
