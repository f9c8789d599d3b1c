"""silu_mul (the gated MLP's silu(gate) · up): Triton against the torch reference, which is HF's MLP expression.

Triton runs under TRITON_INTERPRET=1 on CPU at small shapes; the `gpu` cases use Qwen3.5-9B's intermediate size
(12288) in bf16 on CUDA, for a decode batch and a prefill chunk."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from deltaserve.kernels.activation import reference, silu_mul  # noqa: E402
from deltaserve.kernels.activation.triton import silu_mul_triton  # noqa: E402
from deltaserve.layers.mlp import GatedMLP  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL_BF16 = 2**-7  # one bf16 ulp: a rounding flipped by an fp32 exp() difference in the last bits

CASES = {"t1-i48": (1, 48), "t5-i3": (5, 3), "t70-i40": (70, 40), "t3-i2100": (3, 2100), "t0": (0, 16)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("T, inter", CASES.values(), ids=CASES.keys())
def test_silu_mul_triton(T, inter, dtype):
    torch.manual_seed(T * 1000 + inter)
    x = (torch.randn(T, 2 * inter, device=DEVICE) * 3).to(dtype)
    ref, out = reference.silu_mul(x), silu_mul_triton(x)
    assert out.shape == (T, inter) and out.dtype == dtype
    tol = dict(atol=2e-6, rtol=2e-6) if dtype == torch.float32 else dict(atol=1e-6, rtol=RTOL_BF16)
    torch.testing.assert_close(out, ref, **tol)
    if dtype == torch.bfloat16 and DEVICE == "cpu" and T:
        # the interpreter reproduces both roundings: a skipped cast of silu(gate) to bf16 flips many last bits
        assert (out != ref).float().mean().item() <= 1e-3


def test_silu_mul_strided_rows():
    """A row-strided view (a slice of a wider buffer) reads its own rows only."""
    torch.manual_seed(1)
    buf = torch.randn(6, 2 * 24 + 8, device=DEVICE)
    x = buf[:, :48]
    torch.testing.assert_close(silu_mul_triton(x), reference.silu_mul(x), atol=2e-6, rtol=2e-6)


def test_silu_mul_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[T, 2\*I\]"):
        silu_mul(torch.randn(4, 7))
    with pytest.raises(ValueError, match="floating-point"):
        silu_mul(torch.ones(4, 8, dtype=torch.int32))


def test_gated_mlp_matches_hf_expression():
    """GatedMLP == down(silu(gate(x)) * up(x)) with gate / up as the halves of the stacked projection."""
    torch.manual_seed(2)
    mlp = GatedMLP(32, 48).to(DEVICE)
    x = torch.randn(9, 32, device=DEVICE)
    gate_w, up_w = mlp.gate_up_proj.weight.chunk(2, dim=0)
    expect = mlp.down_proj(torch.nn.functional.silu(x @ gate_w.t()) * (x @ up_w.t()))
    torch.testing.assert_close(mlp(x), expect, atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("T", [1, 64, 8192])
def test_gpu_silu_mul_9b(T):
    torch.manual_seed(T)
    x = (torch.randn(T, 2 * 12288, device="cuda") * 3).to(torch.bfloat16)
    out, ref = silu_mul(x), reference.silu_mul(x)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=RTOL_BF16)
    assert (out != ref).float().mean().item() <= 1e-3
