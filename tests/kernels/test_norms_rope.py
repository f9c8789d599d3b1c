"""RMSNorm (+ fused residual add), GDN gated RMSNorm and fused q/k norm + partial RoPE: Triton against the torch
references (which the HF parity tests in tests/reference pin to transformers).

Triton runs under TRITON_INTERPRET=1 on CPU at small shapes; the `gpu` cases use the Qwen3.5-9B sizes
(hidden 4096, HV=32, V=128, 16 q / 4 kv heads, head_dim 256, rotary_dim 64) in bf16 on CUDA."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from deltaserve.kernels import rmsnorm as norm_ops  # noqa: E402
from deltaserve.kernels import rotary as rope_ops  # noqa: E402
from deltaserve.kernels.rmsnorm import reference as norm_ref  # noqa: E402
from deltaserve.kernels.rmsnorm.triton import gated_rmsnorm_triton, rmsnorm_triton  # noqa: E402
from deltaserve.kernels.rotary import reference as rope_ref  # noqa: E402
from deltaserve.kernels.rotary.triton import qk_norm_rope_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6
# fp32: same formula; only the reduction order and rsqrt / cos implementations differ (observed <= 5e-7 on values
# up to ~5, CPU interpreter)
ATOL_FP32, RTOL_FP32 = 2e-6, 2e-6
# bf16: both sides round at the same points, so a difference is one rounding flipped by an fp32 difference in
# the last bits: one bf16 ulp (<= 2^-7 relative) of the value, or, for RoPE, of the larger input of
# x·cos + x'·sin (the sum can cancel), i.e. of max|x̂|. Observed on the CPU interpreter: bit-exact.
RTOL_BF16 = 2**-7
MAX_BF16_DIFFER = 1e-3  # CPU interpreter only: share of bf16 elements allowed to differ at all (observed 0)
DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp32", "bf16"]


def assert_close(name, ref, out, atol, rtol=0.0):
    """max(|out - ref| - rtol * |ref|) <= atol; a NaN anywhere fails."""
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    assert ref.dtype == out.dtype, f"{name}: dtype {out.dtype} != reference {ref.dtype}"
    ref, out = ref.float(), out.float()
    err = ((out - ref).abs() - rtol * ref.abs()).max().item() if ref.numel() else 0.0
    assert err <= atol, f"{name}: error {err:.2e} beyond atol {atol:.0e} + rtol {rtol:.0e} * |ref|"


def assert_kernel_close(name, ref, out, rope=False):
    if ref.dtype == torch.float32:
        assert_close(name, ref, out, ATOL_FP32, RTOL_FP32)
        return
    if rope:  # one bf16 ulp of the largest magnitude as the floor: x·cos + x'·sin can cancel
        assert_close(name, ref, out, RTOL_BF16 * ref.float().abs().amax().item(), RTOL_BF16)
    else:
        assert_close(name, ref, out, 1e-6, RTOL_BF16)
    if DEVICE == "cpu" and ref.numel():
        # the interpreter reproduces every rounding of the reference: a skipped or extra cast to bf16 shows up
        # as a flipped last bit in a large share of elements, which the 1-ulp bound above cannot see
        differ = (out != ref).float().mean().item()
        assert differ <= MAX_BF16_DIFFER, f"{name}: {differ:.1%} of elements differ from the reference"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEVICE) * scale).to(dtype)


# ---------------------------------------------------------------- Triton against the references

RMS_CASES = {"h96-t7": (7, 96), "h200-t3": (3, 200), "h1024-t2": (2, 1024), "t0": (0, 64)}


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "add-residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T, H", RMS_CASES.values(), ids=RMS_CASES.keys())
def test_rmsnorm_triton(T, H, dtype, with_residual):
    x = randn(T, H, dtype=dtype, scale=2)
    residual = randn(T, H, dtype=dtype, scale=4) if with_residual else None
    weight = randn(H, dtype=dtype, scale=0.3)
    ref_y, ref_r = norm_ref.rmsnorm(x, weight, EPS, residual)
    y, r = rmsnorm_triton(x, weight, EPS, residual)
    assert_kernel_close("y", ref_y, y)
    assert torch.equal(r, ref_r), "residual_out must be exactly x + residual in x's dtype"


def test_rmsnorm_triton_strided_rows():
    """x may be a column slice of a wider activation (row stride > H)."""
    x = randn(5, 160)[:, 16:144]
    weight = randn(128, scale=0.3)
    assert_kernel_close("y", norm_ref.rmsnorm(x, weight, EPS)[0], rmsnorm_triton(x, weight, EPS)[0])


@pytest.mark.parametrize("w_dtype", [torch.bfloat16, torch.float32], ids=["w-bf16", "w-fp32"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gated_rmsnorm_triton(dtype, w_dtype):
    T, HV, V = 5, 6, 64
    x, z = randn(T, HV, V, dtype=dtype), randn(T, HV, V, dtype=dtype, scale=2)
    weight = (1 + randn(V, scale=0.3)).to(w_dtype)
    assert_kernel_close("y", norm_ref.gated_rmsnorm(x, z, weight, EPS), gated_rmsnorm_triton(x, z, weight, EPS))


def test_gated_rmsnorm_triton_strided_heads():
    """x and z may be head slices of wider tensors (token and head strides of their own)."""
    x = randn(4, 8, 48)[:, 2:7, 8:40]
    z = randn(4, 5, 64)[:, :, :32]
    weight = 1 + randn(32, scale=0.3)
    assert_kernel_close("y", norm_ref.gated_rmsnorm(x, z, weight, EPS), gated_rmsnorm_triton(x, z, weight, EPS))


ROPE_CASES = {  # (T, H, Hkv, D, rotary_dim)
    "d64-rd16": (9, 4, 2, 64, 16),
    "d32-full-rotary": (5, 2, 1, 32, 32),
    "d48-odd-heads": (4, 3, 3, 48, 16),  # D not a power of two, H == Hkv
}


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("T, H, HKV, D, RD", ROPE_CASES.values(), ids=ROPE_CASES.keys())
def test_qk_norm_rope_triton(T, H, HKV, D, RD, dtype):
    theta = 1e7
    q = randn(T, H, 2 * D, dtype=dtype, scale=2).view(T, H, 2 * D).chunk(2, dim=-1)[0]  # row stride 2D
    assert not q.is_contiguous()
    k = randn(T, HKV, D, dtype=dtype)
    q_w, k_w = randn(D, dtype=dtype, scale=0.3), randn(D, dtype=dtype, scale=0.3)
    positions = torch.randint(0, 100_000, (T,), device=DEVICE)
    positions[0] = 0
    ref_q, ref_k = rope_ref.qk_norm_rope(q, k, q_w, k_w, positions, theta, RD, EPS)
    out_q, out_k = qk_norm_rope_triton(q, k, q_w, k_w, positions, theta, RD, EPS)
    assert_kernel_close("q", ref_q, out_q, rope=True)
    assert_kernel_close("k", ref_k, out_k, rope=True)
    # dims past rotary_dim are the normalised input, untouched by RoPE
    assert_kernel_close("q[..., rotary_dim:]", rope_ref._norm(q, q_w, EPS)[..., RD:], out_q[..., RD:])


# ---------------------------------------------------------------- dispatch and validation (CPU path)

def test_dispatch_runs_the_reference_off_cuda():
    x, w = torch.randn(3, 16), torch.randn(16)
    y, r = norm_ops.rmsnorm(x, w, EPS, residual=x)
    assert torch.equal(y, norm_ref.rmsnorm(x, w, EPS, x)[0]) and torch.equal(r, x + x)


@pytest.mark.parametrize("call, message", [
    (lambda: norm_ops.rmsnorm(torch.randn(2, 3, 4), torch.zeros(4), EPS), r"x must be \[T, H\]"),
    (lambda: norm_ops.rmsnorm(torch.randn(2, 4), torch.zeros(5), EPS), r"weight must be \[H=4\]"),
    (lambda: norm_ops.rmsnorm(torch.randn(2, 4), torch.zeros(4), EPS, torch.randn(2, 4).double()), "residual"),
    (lambda: norm_ops.gated_rmsnorm(torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.ones(4), EPS), "x and z"),
    (lambda: rope_ops.qk_norm_rope(torch.randn(2, 4, 8), torch.randn(2, 1, 8), torch.zeros(8), torch.zeros(8),
                                   torch.arange(2), 1e4, 3, EPS), "rotary_dim must be even"),
    (lambda: rope_ops.qk_norm_rope(torch.randn(2, 4, 8), torch.randn(2, 1, 8), torch.zeros(8), torch.zeros(8),
                                   torch.arange(2).float(), 1e4, 4, EPS), "positions"),
], ids=["rms-3d", "rms-weight", "rms-residual-dtype", "gated-z-shape", "rope-odd-rotary", "rope-float-positions"])
def test_validation_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


# ---------------------------------------------------------------- full Qwen3.5-9B sizes on the GPU

@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 8192], ids=["decode", "prefill-8k"])
def test_gpu_rmsnorm_9b(T):
    x, residual = randn(T, 4096, dtype=torch.bfloat16, scale=2), randn(T, 4096, dtype=torch.bfloat16, scale=8)
    weight = randn(4096, dtype=torch.bfloat16, scale=0.3)
    ref_y, ref_r = norm_ref.rmsnorm(x, weight, EPS, residual)
    y, r = norm_ops.rmsnorm(x, weight, EPS, residual)
    assert_kernel_close("y", ref_y, y)
    assert torch.equal(r, ref_r)


@pytest.mark.gpu
def test_gpu_gated_rmsnorm_9b():
    x, z = randn(4096, 32, 128, dtype=torch.bfloat16), randn(4096, 32, 128, dtype=torch.bfloat16, scale=2)
    weight = (1 + randn(128, scale=0.3)).bfloat16()
    # two roundings in a row (w·x̂ to bf16, then ·silu(z)), with the GPU's silu/exp differing from torch's in the
    # last fp32 bits: a flipped first rounding moves small outputs by more than their own ulp (H100: 6e-3 beyond
    # one ulp of |ref|), so the floor is one ulp of the largest output, as for RoPE's cancellations
    assert_kernel_close("y", norm_ref.gated_rmsnorm(x, z, weight, EPS), norm_ops.gated_rmsnorm(x, z, weight, EPS),
                        rope=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_gpu_qk_norm_rope_9b(dtype):
    T, H, HKV, D, RD, theta = 4096, 16, 4, 256, 64, 1e7
    q = randn(T, H * 2 * D, dtype=dtype, scale=2).view(T, H, 2 * D).chunk(2, dim=-1)[0]
    k = randn(T, HKV, D, dtype=dtype)
    q_w, k_w = randn(D, dtype=dtype, scale=0.3), randn(D, dtype=dtype, scale=0.3)
    positions = torch.randint(0, 100_000, (T,), device=DEVICE)
    ref_q, ref_k = rope_ref.qk_norm_rope(q, k, q_w, k_w, positions, theta, RD, EPS)
    out_q, out_k = rope_ops.qk_norm_rope(q, k, q_w, k_w, positions, theta, RD, EPS)
    assert_kernel_close("q", ref_q, out_q, rope=True)
    assert_kernel_close("k", ref_k, out_k, rope=True)
