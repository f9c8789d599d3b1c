"""W4A16 GEMM: the Triton kernel (interpreter on CPU, small shapes; full sizes under `gpu`) against the torch reference
(dequantize, then F.linear), and the compressed-tensors -> AWQ conversion the kernel's single layout relies on.

Weights are RTN-quantized random matrices (to_awq: asymmetric with zero points; to_ct -> ct_to_awq: symmetric, zero
point 8), so every nibble position, zero and scale is exercised. Errors are measured against the reference run on
the same int4 tensors: only the kernel's arithmetic differs (fp32 accumulation order, one rounding of W to x's
dtype)."""
import pytest
import torch
import triton.language as tl

from deltaserve.kernels import int4_gemm as int4_dispatch
from deltaserve.kernels.int4_gemm import int4_gemm_reference
from deltaserve.kernels.int4_gemm.gemv import GEMV_MAX_T, GemvPlan, gemv_plan, int4_gemv_triton
from deltaserve.kernels.int4_gemm.triton import GemmPlan, int4_gemm_triton, plan
from deltaserve.layers.linear import QuantLinear
from deltaserve.layers.quant import (
    ct_to_awq,
    dequant_awq,
    dequant_ct,
    narrowest_exact,
    to_awq,
    to_ct,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL_FP32 = 1e-4  # fp32 in the interpreter: exact products, only the summation order differs; observed ~2e-5


@pytest.fixture(autouse=True)
def _triton_ready():
    if not torch.cuda.is_available() and type(tl.max).__name__ != "InterpretedFunction":
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it first)")


def assert_close(name, ref, out, atol, rtol=0.0):
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    ref, out = ref.float(), out.float()
    assert not out.isnan().any(), f"{name}: NaN in the output"
    err = ((out - ref).abs() - rtol * ref.abs()).max().item() if ref.numel() else 0.0
    assert err <= atol, f"{name}: error {err:.2e} beyond atol {atol:.0e} + rtol {rtol:.0e} * |ref|"


def awq_weight(n: int, k: int, group: int, symmetric: bool = False, seed: int = 0, device="cpu"):
    """-> AWQ tensors of a random [n, k] weight: RTN with zero points, or symmetric (compressed-tensors, converted)."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5
    if symmetric:
        ct = to_ct(w, group)
        tensors = ct_to_awq(ct["weight_packed"], ct["weight_scale"], None)
    else:
        tensors = to_awq(w, group)
    return {name: t.to(device) for name, t in tensors.items()}


# (T, K, N, group): T=1 and T<=16 take the split-K decode plan, T>16 the tiled plan; N=32 is the GDN in_proj_a/b
# width, N=40 / N=200 are multiples of 8 that no block size divides
CASES = {
    "t1-k256-n64-g32": (1, 256, 64, 32),
    "t1-k512-n200-g128": (1, 512, 200, 128),
    "t5-k256-n32-g64": (5, 256, 32, 64),
    "t16-k384-n40-g128": (16, 384, 40, 128),
    "t20-k256-n96-g32": (20, 256, 96, 32),
    "t70-k128-n136-g64": (70, 128, 136, 64),
}


@pytest.mark.parametrize("symmetric", [False, True], ids=["zero_points", "symmetric"])
@pytest.mark.parametrize("t, k, n, group", CASES.values(), ids=CASES.keys())
def test_int4_gemm_matches_reference(t, k, n, group, symmetric):
    w = awq_weight(n, k, group, symmetric, seed=t + n)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(k))
    ref = int4_gemm_reference(x, w["qweight"], w["qzeros"], w["scales"], group)
    out = int4_gemm_triton(x, w["qweight"], w["qzeros"], w["scales"].float(), group)
    assert_close("int4_gemm", ref, out, ATOL_FP32)


SPLITS = {"split1": 1, "split3-uneven": 3, "split8-one-step-each": 8}


@pytest.mark.parametrize("split", SPLITS.values(), ids=SPLITS.keys())
def test_split_k_partials_add_up(split):
    """An explicit plan: K=256 in 8 steps of 32 over `split` programs (3 does not divide 8: a short last split)."""
    t, k, n, group = 3, 256, 48, 32
    w = awq_weight(n, k, group, seed=split)
    x = torch.randn(t, k)
    ref = int4_gemm_reference(x, w["qweight"], w["qzeros"], w["scales"], group)
    cfg = GemmPlan(block_m=16, block_n=32, block_k=32, split_k=split, num_warps=4, num_stages=2)
    assert_close(f"split {split}", ref, int4_gemm_triton(x, w["qweight"], w["qzeros"], w["scales"], group, cfg),
                 ATOL_FP32)


def test_int4_gemm_fp16_activations():
    t, k, n, group = 4, 256, 64, 64
    w = awq_weight(n, k, group)
    x = torch.randn(t, k).half()
    ref = int4_gemm_reference(x.float(), w["qweight"], w["qzeros"], w["scales"], group)
    out = int4_gemm_triton(x, w["qweight"], w["qzeros"], w["scales"], group)
    assert out.dtype == torch.float16
    assert_close("fp16", ref, out, 2e-2, 1e-2)  # W and the output rounded to fp16 (2^-11 relative each)


def test_plan_splits_k_for_decode_only_when_it_pays():
    decode, prefill = plan(1, 4096, 12288, 128), plan(2048, 12288, 4096, 128)
    assert decode.block_m == 16 and decode.split_k > 1 and 128 % decode.block_k == 0
    assert prefill.block_m == 128 and prefill.split_k == 1


def test_int4_gemm_refuses_bad_inputs():
    w = awq_weight(64, 256, 32)
    x = torch.randn(2, 256)
    with pytest.raises(ValueError, match="group_size 48"):
        int4_gemm_triton(x, w["qweight"], w["qzeros"], w["scales"], 48)
    with pytest.raises(ValueError, match="qweight"):
        int4_gemm_triton(torch.randn(2, 128), w["qweight"], w["qzeros"], w["scales"], 32)


# ---- the decode GEMV (T <= 16) ----
# (T, K, N, group): N=200 / 40 / 264 leave the last column tile partly masked, N=32 is the GDN in_proj_a/b width;
# the interpreter's 4 "SMs" make the auto plan split K on most of these (explicit uneven splits: GEMV_PLANS)
GEMV_CASES = {
    "t1-k256-n64-g32": (1, 256, 64, 32),
    "t1-k512-n200-g128": (1, 512, 200, 128),
    "t1-k128-n32-g64": (1, 128, 32, 64),
    "t3-k512-n200-g64": (3, 512, 200, 64),
    "t3-k256-n32-g32": (3, 256, 32, 32),
    "t16-k384-n40-g128": (16, 384, 40, 128),
    "t16-k256-n264-g32": (16, 256, 264, 32),
}


@pytest.mark.parametrize("symmetric", [False, True], ids=["zero_points", "symmetric"])
@pytest.mark.parametrize("t, k, n, group", GEMV_CASES.values(), ids=GEMV_CASES.keys())
def test_int4_gemv_matches_reference(t, k, n, group, symmetric):
    w = awq_weight(n, k, group, symmetric, seed=t + n + group)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(k + t))
    ref = int4_gemm_reference(x, w["qweight"], w["qzeros"], w["scales"], group)
    out = int4_gemv_triton(x, w["qweight"], w["qzeros"], w["scales"].float(), group)
    assert_close("int4_gemv", ref, out, ATOL_FP32)


# explicit plans on T=1 / T=5, K=384 (group 64): 6 K steps of 64 (or 12 of 32) over `split_k` programs; N=136 is
# 17 packed columns, so every block_np leaves a partly masked last tile
GEMV_PLANS = {
    "fma-split1": (1, GemvPlan(block_np=8, block_k=64, split_k=1, use_dot=False)),
    "fma-split4-uneven": (1, GemvPlan(block_np=4, block_k=64, split_k=4, use_dot=False)),
    "fma-bk32-split5-uneven": (1, GemvPlan(block_np=32, block_k=32, split_k=5, use_dot=False)),
    "dot-t1": (1, GemvPlan(block_np=16, block_k=32, split_k=2, use_dot=True)),
    "dot-split4-uneven": (5, GemvPlan(block_np=16, block_k=64, split_k=4, use_dot=True)),
    "dot-split12": (5, GemvPlan(block_np=32, block_k=32, split_k=12, use_dot=True)),
}


@pytest.mark.parametrize("t, cfg", GEMV_PLANS.values(), ids=GEMV_PLANS.keys())
def test_int4_gemv_plans_and_uneven_splits(t, cfg):
    k, n, group = 384, 136, 64
    w = awq_weight(n, k, group, seed=cfg.split_k)
    x = torch.randn(t, k)
    ref = int4_gemm_reference(x, w["qweight"], w["qzeros"], w["scales"], group)
    assert_close(str(cfg), ref, int4_gemv_triton(x, w["qweight"], w["qzeros"], w["scales"], group, cfg), ATOL_FP32)


def test_int4_gemv_fp16_activations():
    t, k, n, group = 4, 256, 64, 64
    w = awq_weight(n, k, group)
    x = torch.randn(t, k).half()
    ref = int4_gemm_reference(x.float(), w["qweight"], w["qzeros"], w["scales"], group)
    for rows in (x, x[:1]):  # tl.dot on fp16 rows, and the T=1 FMA path
        out = int4_gemv_triton(rows, w["qweight"], w["qzeros"], w["scales"], group)
        assert out.dtype == torch.float16
        assert_close("fp16", ref[: rows.shape[0]], out, 2e-2, 1e-2)


def test_int4_gemv_is_deterministic():
    """Split-K partials are summed in split order by a kernel, not atomics: bit-identical reruns."""
    k, n, group = 512, 64, 32
    w = awq_weight(n, k, group)
    x = torch.randn(2, k)
    cfg = GemvPlan(block_np=16, block_k=32, split_k=7, use_dot=True)
    outs = [int4_gemv_triton(x, w["qweight"], w["qzeros"], w["scales"], group, cfg) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])


def test_gemv_plan_is_a_function_of_shapes():
    o_proj, up = gemv_plan(1, 4096, 4096, 128), gemv_plan(16, 34816, 5120, 128)
    assert not o_proj.use_dot and o_proj.split_k > 1 and 128 % o_proj.block_k == 0
    assert up.use_dot and up.block_np >= 16 and up.block_k >= 16
    assert up.split_k * 16 * 34816 * 4 <= 5120 * 34816 // 2 // 8  # fp32 partials <= 1/8 of the int4 bytes
    assert gemv_plan(1, 32, 4096, 128).block_np == 4  # GDN in_proj_a/b: 4 packed columns
    assert gemv_plan(1, 4096, 4096, 128) == o_proj
    assert int4_dispatch.GEMV_MAX_T == GEMV_MAX_T


def test_int4_gemv_refuses_what_it_cannot_run():
    w = awq_weight(64, 256, 32)
    with pytest.raises(ValueError, match="at most 16 rows"):
        int4_gemv_triton(torch.randn(17, 256), w["qweight"], w["qzeros"], w["scales"], 32)
    bad = GemvPlan(block_np=8, block_k=64, split_k=1, use_dot=False)
    with pytest.raises(ValueError, match="block_k must divide the group"):
        int4_gemv_triton(torch.randn(1, 256), w["qweight"], w["qzeros"], w["scales"], 32, bad)
    with pytest.raises(ValueError, match="T > 1 needs use_dot"):
        int4_gemv_triton(torch.randn(2, 256), w["qweight"], w["qzeros"], w["scales"], 32,
                         GemvPlan(block_np=8, block_k=32, split_k=1, use_dot=False))


FORMATS = {"ct-symmetric": False, "ct-zero-point": True}


@pytest.mark.parametrize("zero_point", FORMATS.values(), ids=FORMATS.keys())
def test_ct_to_awq_is_bit_exact(zero_point):
    """dequant_awq(ct_to_awq(t)) == dequant_ct(t), for one Linear and for a stack of experts."""
    w = torch.randn(3, 48, 128)
    cts = [to_ct(w[e], 32, zero_point) for e in range(3)]
    stacked = {name: torch.stack([c[name] for c in cts]) for name in cts[0]}
    for tensors in (cts[0], stacked):
        awq = ct_to_awq(tensors["weight_packed"], tensors["weight_scale"], tensors.get("weight_zero_point"))
        ref = dequant_ct(tensors["weight_packed"], tensors["weight_scale"], tensors.get("weight_zero_point"), 32,
                         torch.float32)
        assert torch.equal(dequant_awq(awq["qweight"], awq["qzeros"], awq["scales"], 32, torch.float32), ref)


def test_ct_to_awq_refuses_outputs_not_multiple_of_8():
    ct = to_ct(torch.randn(12, 64), 32)
    with pytest.raises(ValueError, match="12 outputs"):
        ct_to_awq(ct["weight_packed"], ct["weight_scale"], None)


def test_narrowest_exact_keeps_values():
    assert narrowest_exact(torch.rand(4, 8).half().float()).dtype == torch.float16
    assert narrowest_exact(torch.tensor([1e-8, 3.0]).bfloat16().float()).dtype == torch.bfloat16  # under fp16 range
    assert narrowest_exact(torch.tensor([1.0 + 2**-20])).dtype == torch.float32


@pytest.mark.parametrize("zero_point", FORMATS.values(), ids=FORMATS.keys())
def test_quant_linear_to_kernel_layout_keeps_its_output(zero_point):
    """A compressed-tensors QuantLinear (experts too) rewritten in the AWQ layout computes the same thing."""
    for experts in (None, 2):
        lin = QuantLinear("ct_zp" if zero_point else "ct", 64, 48, 32, experts)
        w = torch.randn(experts or 1, 48, 64)
        cts = [to_ct(w[e], 32, zero_point) for e in range(experts or 1)]
        for name in lin.kinds:
            t = torch.stack([c[name] for c in cts]) if experts else cts[0][name]
            getattr(lin, name).data.copy_(t)
        before = lin.dequant(torch.float32)
        lin.to_kernel_layout()
        assert lin.fmt == "awq" and set(dict(lin.named_parameters())) == {"qweight", "qzeros", "scales"}
        assert lin.scales.dtype == torch.float16  # to_ct stores fp16 scales: narrowed, exactly
        assert torch.equal(lin.dequant(torch.float32), before)


# ---- full size on the GPU (bf16 activations, group 128 as the published AWQ checkpoints) ----
GPU_SHAPES = {"9b-mlp-up-4096x12288": (4096, 12288), "9b-mlp-down-12288x4096": (12288, 4096),
              "gdn-ab-4096x32": (4096, 32)}


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 16, 512], ids=lambda t: f"t{t}")
@pytest.mark.parametrize("k, n", GPU_SHAPES.values(), ids=GPU_SHAPES.keys())
def test_int4_gemm_full_size(k, n, t):
    w = awq_weight(n, k, 128, device="cuda")
    x = torch.randn(t, k, device="cuda").bfloat16()
    ref = int4_gemm_reference(x.float(), w["qweight"], w["qzeros"], w["scales"], 128)
    out = int4_gemm_triton(x, w["qweight"], w["qzeros"], w["scales"], 128).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, f"relative error {rel:.2e}"  # bf16 rounding of W and y: ~3e-3


@pytest.mark.gpu
def test_int4_gemm_captures_in_a_cuda_graph():
    """The decode plan (split-K, partial sums) replays from a CUDA graph with new inputs: no host sync inside."""
    w = awq_weight(4096, 4096, 128, device="cuda")
    x = torch.randn(1, 4096, device="cuda").bfloat16()
    int4_gemm_triton(x, w["qweight"], w["qzeros"], w["scales"], 128)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = int4_gemm_triton(x, w["qweight"], w["qzeros"], w["scales"], 128)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(y, int4_gemm_triton(x, w["qweight"], w["qzeros"], w["scales"], 128))


GPU_GEMV_SHAPES = {"9b-o-proj-4096x4096": (4096, 4096), "9b-gate-up-4096x24576": (4096, 24576),
                   "27b-down-17408x5120": (17408, 5120), "27b-gate-up-5120x34816": (5120, 34816),
                   "gdn-ab-4096x32": (4096, 32)}


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 3, 16], ids=lambda t: f"t{t}")
@pytest.mark.parametrize("k, n", GPU_GEMV_SHAPES.values(), ids=GPU_GEMV_SHAPES.keys())
def test_int4_gemv_full_size(k, n, t):
    w = awq_weight(n, k, 128, device="cuda")
    x = torch.randn(t, k, device="cuda").bfloat16()
    ref = int4_gemm_reference(x.float(), w["qweight"], w["qzeros"], w["scales"], 128)
    out = int4_gemv_triton(x, w["qweight"], w["qzeros"], w["scales"], 128).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, f"relative error {rel:.2e}"  # bf16 output rounding (W is not rounded here): ~2e-3


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 16], ids=lambda t: f"t{t}")
def test_int4_gemv_captures_in_a_cuda_graph(t):
    """The GEMV (split-K partials + the summing kernel) replays from a CUDA graph with new inputs."""
    w = awq_weight(4096, 4096, 128, device="cuda")
    x = torch.randn(t, 4096, device="cuda").bfloat16()
    assert gemv_plan(t, 4096, 4096, 128).split_k > 1
    int4_gemv_triton(x, w["qweight"], w["qzeros"], w["scales"], 128)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = int4_gemv_triton(x, w["qweight"], w["qzeros"], w["scales"], 128)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(y, int4_gemv_triton(x, w["qweight"], w["qzeros"], w["scales"], 128))


@pytest.mark.gpu
def test_int4_gemm_dispatch_sends_decode_to_the_gemv(monkeypatch):
    from deltaserve.kernels.int4_gemm import gemv as int4_gemv
    from deltaserve.kernels.int4_gemm import triton as int4_triton

    w = awq_weight(256, 512, 128, device="cuda")
    calls = []
    monkeypatch.setattr(int4_gemv, "int4_gemv_triton", lambda *a: calls.append("gemv") or int4_gemv_triton(*a))
    monkeypatch.setattr(int4_triton, "int4_gemm_triton", lambda *a: calls.append("gemm") or int4_gemm_triton(*a))
    for t in (1, 16, 17):
        int4_dispatch.int4_gemm(torch.randn(t, 512, device="cuda").half(), *w.values(), 128)
    assert calls == (["gemv", "gemv", "gemm"] if int4_dispatch.DECODE_GEMV else ["gemm"] * 3)


@pytest.mark.gpu
def test_quant_linear_uses_the_kernel_on_cuda(monkeypatch):
    from deltaserve.layers import linear

    lin = QuantLinear("awq", 256, 64, 64).cuda()
    for name, t in awq_weight(64, 256, 64, device="cuda").items():
        getattr(lin, name).data = t
    called = []
    monkeypatch.setattr(linear, "int4_gemm", lambda *a: called.append(1) or int4_gemm_triton(*a))
    x = torch.randn(3, 256, device="cuda").bfloat16()
    out = lin(x)
    assert called and torch.allclose(out.float(), torch.nn.functional.linear(x.float(), lin.dequant(torch.float32)),
                                     atol=3e-2, rtol=2e-2)
