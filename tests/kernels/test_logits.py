"""The logits GEMV (kernels/logits/triton.py) against the fp32 reference, interpreter on CPU (small shapes), and at
Qwen3.5 vocab x hidden on the GPU (`gpu`); the dispatch and its refusals."""
import pytest
import torch

from deltaserve.kernels.logits import logits, reference
from deltaserve.kernels.logits.triton import MAX_ROWS, logits_triton

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def inputs(m, v, h, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(m, h, generator=g).to(dtype).to(DEV)
    weight = (torch.randn(v, h, generator=g) / h**0.5).to(dtype).to(DEV)
    return hidden, weight


def exact(hidden, weight):
    return hidden.double() @ weight.double().t()


SHAPES = {"m1-v300-h96": (1, 300, 96), "m3-v64-h200": (3, 64, 200), "m16-v130-h128": (16, 130, 128),
          "m5-v1-h40": (5, 1, 40)}


@pytest.mark.parametrize("m, v, h", SHAPES.values(), ids=SHAPES.keys())
def test_logits_gemv_matches_fp64_within_fp32_accumulation(m, v, h):
    # the interpreter runs fp32 inputs (its dot of 16-bit tiles is fp32 anyway); bf16 inputs under `gpu` below
    hidden, weight = inputs(m, v, h, torch.float32)
    out = logits_triton(hidden, weight)
    assert out.dtype == torch.float32 and out.shape == (m, v)
    torch.testing.assert_close(out.double().cpu(), exact(hidden, weight).cpu(), rtol=1e-5, atol=1e-5)


def test_logits_gemv_reads_strided_hidden_rows_and_refuses_what_it_cannot_take():
    hidden, weight = inputs(4, 70, 64, torch.float32)
    wide = torch.zeros(4, 100, device=DEV)
    wide[:, :64] = hidden
    torch.testing.assert_close(logits_triton(wide[:, :64], weight).cpu(), exact(hidden, weight).float().cpu(),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=f"up to {MAX_ROWS} rows"):
        logits_triton(torch.zeros(MAX_ROWS + 1, 64, device=DEV), weight)
    with pytest.raises(ValueError, match="contiguous rows"):
        logits_triton(hidden, weight.t().contiguous().t())
    with pytest.raises(ValueError, match="must be"):
        logits(hidden, weight[:, :10])
    assert logits_triton(hidden[:0], weight).shape == (0, 70)


def test_dispatch_uses_the_reference_on_cpu():
    hidden, weight = inputs(2, 50, 32, torch.bfloat16)
    if DEV == "cpu":
        torch.testing.assert_close(logits(hidden, weight), reference.logits(hidden, weight))


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16, 17])
@pytest.mark.parametrize("h", [2048, 5120])
def test_logits_gemv_at_qwen35_vocab_in_bf16(m, h):
    hidden, weight = inputs(m, 248320, h, torch.bfloat16)
    out = logits(hidden, weight)  # m = 17: cuBLAS
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact(hidden, weight), rtol=1e-4, atol=2e-4)
