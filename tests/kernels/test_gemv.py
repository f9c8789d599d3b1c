"""The 16-bit GEMV (kernels/gemv/triton.py) against fp64, interpreter on CPU (small shapes) and at Qwen3.5 shapes on
the GPU (`gpu`): fp32 out for the logits (kernels/logits), x's dtype out for the 16-bit Linears (layers.linear.Linear);
both dispatches and their refusals."""
import pytest
import torch
import torch.nn.functional as F

from deltaserve.kernels import gemv as gemv_dispatch
from deltaserve.kernels.gemv.triton import LOGITS_TILE, MAX_ROWS, GemvTile, gemv, linear_tile
from deltaserve.kernels.logits import logits, reference
from deltaserve.layers.linear import Linear

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
TILES = {"logits": LOGITS_TILE, "linear": None, "bk-tail": GemvTile(16, 64, 1, 2)}


@pytest.mark.parametrize("tile", TILES.values(), ids=TILES.keys())
@pytest.mark.parametrize("m, v, h", SHAPES.values(), ids=SHAPES.keys())
def test_gemv_matches_fp64_within_fp32_accumulation(m, v, h, tile):
    # the interpreter runs fp32 inputs (its dot of 16-bit tiles is fp32 anyway); bf16 inputs under `gpu` below
    hidden, weight = inputs(m, v, h, torch.float32)
    out = gemv(hidden, weight, torch.float32, tile)
    assert out.dtype == torch.float32 and out.shape == (m, v)
    torch.testing.assert_close(out.double().cpu(), exact(hidden, weight).cpu(), rtol=1e-5, atol=1e-5)


def test_gemv_rounds_once_to_the_output_dtype():
    """Out in bf16: the fp32 sums rounded once, so within one bf16 ulp of the exact product (the interpreter's cast
    truncates; the GPU's rounds to nearest)."""
    hidden, weight = inputs(3, 200, 160, torch.float32, seed=1)
    out = gemv(hidden, weight, torch.bfloat16)
    want = exact(hidden, weight).cpu()
    assert out.dtype == torch.bfloat16
    assert ((out.double().cpu() - want).abs() <= want.abs() * 2.0**-7 + 1e-6).all()


def test_gemv_reads_strided_rows_and_refuses_what_it_cannot_take():
    hidden, weight = inputs(4, 70, 64, torch.float32)
    wide = torch.zeros(4, 100, device=DEV)
    wide[:, :64] = hidden
    torch.testing.assert_close(gemv(wide[:, :64], weight, torch.float32).cpu(), exact(hidden, weight).float().cpu(),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=f"up to {MAX_ROWS} rows"):
        gemv(torch.zeros(MAX_ROWS + 1, 64, device=DEV), weight)
    with pytest.raises(ValueError, match="contiguous rows"):
        gemv(hidden, weight.t().contiguous().t())
    with pytest.raises(ValueError, match="must be"):
        logits(hidden, weight[:, :10])
    assert gemv(hidden[:0], weight).shape == (0, 70)


def test_linear_tiles_and_where_cublas_stays():
    assert linear_tile(4096, 12288).block_k == 512 and linear_tile(12352, 2048).num_warps == 4
    assert linear_tile(5120, 6144) is None and linear_tile(24576, 17408) is None
    assert linear_tile(34816, 5120) is None and linear_tile(24576, 4096) is None  # 27B and 9B gate|up
    assert linear_tile(16480, 5120) == linear_tile(14336, 5120) == GemvTile(32, 128, 2, 3)  # 27B in_proj, q|k|v


def test_dispatches_use_the_reference_on_cpu_and_for_what_the_gemv_does_not_take():
    hidden, weight = inputs(2, 50, 32, torch.bfloat16)
    if DEV == "cpu":
        torch.testing.assert_close(logits(hidden, weight), reference.logits(hidden, weight))
    calls = []
    real = gemv_dispatch.reference.linear

    def spy(*args):
        calls.append(args)
        return real(*args)

    gemv_dispatch.reference.linear = spy
    try:
        lin = Linear(32, 50, bias=True).to(DEV, torch.bfloat16)  # N = 50: linear_tile has tiles
        lin(hidden)  # a bias: F.linear
        assert len(calls) == 1
        lin.bias = None
        lin(torch.randn(MAX_ROWS + 1, 32, device=DEV, dtype=torch.bfloat16))  # past the GEMV's rows
        assert len(calls) == 2
        out = lin(hidden)
        assert len(calls) == (3 if DEV == "cpu" else 2)
        torch.testing.assert_close(out, F.linear(hidden, lin.weight), rtol=1e-2, atol=1e-2)
    finally:
        gemv_dispatch.reference.linear = real


@pytest.mark.gpu
@pytest.mark.parametrize("m", [1, 4, 16, 17])
@pytest.mark.parametrize("h", [2048, 5120])
def test_logits_gemv_at_qwen35_vocab_in_bf16(m, h):
    hidden, weight = inputs(m, 248320, h, torch.bfloat16)
    out = logits(hidden, weight)  # m = 17: cuBLAS
    assert out.dtype == torch.float32
    torch.testing.assert_close(out.double(), exact(hidden, weight), rtol=1e-4, atol=2e-4)


LINEAR_SHAPES = {"35b-in_proj": (12352, 2048), "9b-in_proj": (12352, 4096), "9b-down": (4096, 12288),
                 "9b-out_proj": (4096, 4096)}


@pytest.mark.gpu
@pytest.mark.parametrize("n, k", LINEAR_SHAPES.values(), ids=LINEAR_SHAPES.keys())
def test_linear_gemv_at_qwen35_shapes_in_bf16(n, k):
    """Within half a bf16 ulp of fp64 (plus fp32 accumulation), like cuBLAS; a row's output is the same bits whatever
    rows are batched with it."""
    hidden, weight = inputs(16, n, k, torch.bfloat16, seed=2)
    lin = Linear(k, n, bias=False, device=DEV, dtype=torch.bfloat16)
    lin.weight.data.copy_(weight)
    out = lin(hidden)
    want = exact(hidden, weight)
    assert ((out.double() - want).abs() <= want.abs() * 2.0**-8 + 1e-3).all()
    for m in (1, 5):
        assert torch.equal(lin(hidden[:m]), out[:m])
