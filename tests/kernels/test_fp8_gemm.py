"""Triton block-FP8 GEMM (W8A8 and weight-only) and activation quantizer against the torch reference.

CPU (CI): the Triton interpreter (triton 3.9) handles e4m3 loads, fp8 tl.dot and casts, so the Triton wrappers
themselves run here on small shapes (odd M, N and K, partial 128-blocks, split-K). Two interpreter limits shape the
cases: its fp32 -> e4m3 cast is wrong when rounding carries into the exponent (7.75 -> 4.0), so triton.py rounds by
hand under the interpreter (`to_e4m3`), and its tl.dot multiplies bf16 as raw bits, so the weight-only path runs in
fp16 here (bf16 on the GPU). Observed on CPU: the quantizer is bit-exact; GEMM relative errors ~3e-7 (fp32 out).
GPU (`gpu` marker, H100, Triton 3.6): Qwen3.5-9B shapes (4096 -> 12288, 12288 -> 4096), T in {1, 16, 512, 4096},
bf16 in / out. Bounds: each element within 2^-8 |ref| (bf16 rounding of the output: half an ulp) + 1e-4 max|ref|
(fp32 accumulation order) of the reference fed the same fp8 operands; quantizing activations to e4m3 moves the
output by a relative RMS of ~2.6% on Gaussian data (measured with the reference on CPU), bounded at 4e-2.
"""
import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"  # before triton.jit decorates the kernels
pytest.importorskip("triton")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"

from triton.runtime.interpreter import InterpretedFunction  # noqa: E402

from deltaserve.kernels import fp8_gemm  # noqa: E402
from deltaserve.kernels.fp8_gemm import reference as ref  # noqa: E402
from deltaserve.kernels.fp8_gemm import triton as fp8_triton  # noqa: E402
from deltaserve.layers.fp8 import quantize_blocks  # noqa: E402

if INTERPRET and not isinstance(fp8_triton._fp8_gemm_kernel, InterpretedFunction):
    fp8_triton = importlib.reload(fp8_triton)  # imported earlier without the interpreter: re-decorate for the CPU

BLOCK = (128, 128)
ACT_QUANT_REL = 4e-2  # relative RMS of W8A8 vs unquantized activations (Gaussian data; observed ~2.6e-2)


def make(m: int, n: int, k: int, dtype: torch.dtype, seed: int = 0):
    """x [m, k] in dtype, and a block-FP8 weight [n, k] with its scales, made on DEVICE (fast at 9B sizes)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    x = torch.randn(m, k, generator=g, device=DEVICE).to(dtype)
    w = torch.randn(n, k, generator=g, device=DEVICE) * torch.linspace(0.005, 0.05, k, device=DEVICE)
    q, s = quantize_blocks(w, BLOCK)  # the linspace gives blocks with different ranges
    return x, q, s


def assert_close(name, expect, out, rel, floor):
    """|out - expect| <= rel |expect| + floor · max|expect| elementwise; a NaN anywhere fails."""
    assert out.shape == expect.shape, f"{name}: shape {tuple(out.shape)} != {tuple(expect.shape)}"
    expect, out = expect.float(), out.float()
    excess = ((out - expect).abs() - rel * expect.abs() - floor * expect.abs().max()).max().item()
    assert excess <= 0, f"{name}: error beyond {rel:.1e} |ref| + {floor:.0e} max|ref| by {excess:.2e}"


def rel_rms(a, b) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


CPU_SHAPES = {  # (M, N, K): partial blocks in every dim, M across the tile sizes, K long enough for split-K
    "m5_n200_k300": (5, 200, 300),
    "m33_n130_k256": (33, 130, 256),
    "m1_n96_k1024_splitk": (1, 96, 1024),
    "m70_n64_k384": (70, 64, 384),
}


@pytest.mark.parametrize("shape", list(CPU_SHAPES.values()), ids=list(CPU_SHAPES))
def test_quant_act_matches_reference(shape):
    m, _, k = shape
    x, _, _ = make(m, 8, k, torch.float32, seed=1)
    x[0, :100] = 0  # a zero group
    xq, xs = fp8_triton.quant_act_triton(x, 128)
    xq_ref, xs_ref = ref.quant_act(x, 128)
    torch.testing.assert_close(xs, xs_ref, rtol=1e-6, atol=0)
    differ = xq.float() != xq_ref.float()
    if INTERPRET:
        assert not differ.any(), f"{int(differ.sum())} quantized values differ"
    else:  # the GPU's fp32 division may flip a rounding: at most one e4m3 step, rarely
        assert differ.float().mean() < 1e-3
        assert ((xq.float() - xq_ref.float()).abs() <= 2.0**-3 * xq_ref.float().abs() + 2.0**-9)[differ].all()


@pytest.mark.parametrize("shape", list(CPU_SHAPES.values()), ids=list(CPU_SHAPES))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_w8a8_gemm_small(shape, dtype):
    m, n, k = shape
    x, q, s = make(m, n, k, dtype)
    out = fp8_triton.fp8_gemm_triton(x, q, s, BLOCK, weight_only=False)
    assert out.dtype == dtype
    expect = ref.w8a8_block_gemm(*fp8_triton.quant_act_triton(x, 128), q, s, BLOCK, torch.float32)
    assert_close("w8a8", expect, out, 1e-6 if dtype == torch.float32 else 2.0**-11, 1e-5)
    assert rel_rms(out, ref.fp8_linear(x.float(), q, s, BLOCK)) < ACT_QUANT_REL


@pytest.mark.parametrize("shape", list(CPU_SHAPES.values()), ids=list(CPU_SHAPES))
def test_weight_only_gemm_small(shape):
    m, n, k = shape
    dtype = torch.float16 if INTERPRET else torch.bfloat16
    x, q, s = make(m, n, k, dtype)
    out = fp8_triton.fp8_gemm_triton(x, q, s, BLOCK, weight_only=True)
    expect = ref.fp8_linear(x.float(), q, s, BLOCK)  # no activation quantization at all
    assert_close("weight_only", expect, out, 2.0**-11 if dtype == torch.float16 else 2.0**-8, 1e-4)


def test_split_k_is_exercised():
    """The decode shape above really splits K (else the split-K path would go untested on CPU)."""
    bm, bn, _, _, split = fp8_triton._config(1, 96, 8, True, fp8_triton._num_sms(torch.device(DEVICE)))
    assert split > 1 or DEVICE == "cuda"


def test_dispatch_validates():
    x, q, s = make(2, 64, 256, torch.float32)
    with pytest.raises(ValueError, match="x has 128 input channels"):
        fp8_gemm.fp8_linear(x[:, :128], q, s, BLOCK)
    with pytest.raises(ValueError, match="weight_scale_inv must be"):
        fp8_gemm.fp8_linear(x, q, s[:, :1], BLOCK)
    with pytest.raises(ValueError, match="needs a block of 32..256"):
        fp8_triton.fp8_gemm_triton(x, q, s, (128, 100), weight_only=False)


# ---- full size on the GPU ----

GPU_SHAPES = {"9b_up_4096_12288": (12288, 4096), "9b_down_12288_4096": (4096, 12288)}  # (N, K)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 16, 64])  # the rows each kernel is dispatched for (fp8_gemm.W8A8_MAX_T = 64)
@pytest.mark.parametrize("shape", list(GPU_SHAPES.values()), ids=list(GPU_SHAPES))
@pytest.mark.parametrize("weight_only", [False, True], ids=["w8a8", "weight_only"])
def test_gemm_9b_shapes(shape, t, weight_only):
    n, k = shape
    if weight_only and t > 16:
        pytest.skip("the weight-only path is the decode path (T <= 16)")
    x, q, s = make(t, n, k, torch.bfloat16, seed=t)
    out = fp8_triton.fp8_gemm_triton(x, q, s, BLOCK, weight_only=weight_only)
    exact = ref.fp8_linear(x.float(), q, s, BLOCK)
    if weight_only:
        assert_close("weight_only", exact, out, 2.0**-8, 1e-4)
        return
    expect = ref.w8a8_block_gemm(*fp8_triton.quant_act_triton(x, 128), q, s, BLOCK, torch.float32)
    # one bf16 ulp: the bf16 store alone rounds by up to 2^-8 relative. The 128-row tiles (T = 512 / 4096) missed
    # even this on an H100 (2026-11-28), so the dispatch sends T > W8A8_MAX_T to dequant + cuBLAS instead
    assert_close("w8a8", expect, out, 2.0**-7, 1e-4)
    assert rel_rms(out, exact) < ACT_QUANT_REL


@pytest.mark.gpu
@pytest.mark.parametrize("t", [512, 4096])
def test_dispatch_large_t_is_dequant_then_gemm(t):
    """Above W8A8_MAX_T rows the dispatch dequantizes and runs one cuBLAS GEMM (the W8A8 kernel's 128-row tiles
    missed the reference by more than a bf16 ulp there on an H100): exactly the reference path."""
    x, q, s = make(t, 12288, 4096, torch.bfloat16, seed=t)
    assert t > fp8_gemm.W8A8_MAX_T
    torch.testing.assert_close(fp8_gemm.fp8_linear(x, q, s, BLOCK), ref.fp8_linear(x, q, s, BLOCK), rtol=0, atol=0)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 64])
def test_dispatch_under_cuda_graph(t):
    """fp8_linear (the layer's path) has no host syncs: captured in a CUDA graph and replayed on new inputs, it
    gives what it gives eagerly."""
    x, q, s = make(t, 12288, 4096, torch.bfloat16)
    fp8_gemm.fp8_linear(x, q, s, BLOCK)  # compile outside the capture
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fp8_gemm.fp8_linear(x, q, s, BLOCK)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fp8_gemm.fp8_linear(x, q, s, BLOCK)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(out, fp8_gemm.fp8_linear(x, q, s, BLOCK), rtol=0, atol=0)
