"""Long prompts through cuBLAS (kernels/int4_gemm/dequant.py): the dequantization kernel of each int4 layout (AWQ,
K-packed, fragment) against the torch dequantizer bit for bit (interpreter on CPU, full sizes under `gpu`), the
product against the reference, and the dispatch's threshold (int4_gemm.DEQUANT_MIN_T)."""
import pytest
import torch

from deltaserve.kernels import int4_gemm as int4_dispatch
from deltaserve.kernels.int4_gemm import int4_gemm_reference
from deltaserve.kernels.int4_gemm.dequant import LAYOUT_AWQ, LAYOUT_KPACK, LAYOUT_MMA, dequant_int4, int4_gemm_dequant
from deltaserve.layers.quant import awq_to_kpack, awq_to_mma, dequant_awq
from graph_helpers import replay_after_new_input
from test_int4_gemm import awq_weight

ATOL_FP32 = 1e-4
PACKERS = {LAYOUT_AWQ: lambda q: q, LAYOUT_KPACK: awq_to_kpack, LAYOUT_MMA: awq_to_mma}
LAYOUT_FLAGS = {LAYOUT_AWQ: {}, LAYOUT_KPACK: {"kpack": True}, LAYOUT_MMA: {"mma": True}}


# (layout, N, K, group): N = 40 / 200 leave a partial 128-column tile; the fragment layout takes N % 16 == 0 and
# groups of 128·m, the K-packed one groups of 64 and more
CASES = {
    "awq-n40-k96-g32": (LAYOUT_AWQ, 40, 96, 32),
    "awq-n136-k128-g64": (LAYOUT_AWQ, 136, 128, 64),
    "kpack-n200-k256-g64": (LAYOUT_KPACK, 200, 256, 64),
    "kpack-n64-k256-g128": (LAYOUT_KPACK, 64, 256, 128),
    "mma-n48-k256-g128": (LAYOUT_MMA, 48, 256, 128),
    "mma-n144-k512-g256": (LAYOUT_MMA, 144, 512, 256),
}


@pytest.mark.parametrize("layout, n, k, group", CASES.values(), ids=CASES.keys())
def test_dequant_int4_is_the_torch_dequantizer(layout, n, k, group):
    t = awq_weight(n, k, group)
    w = dequant_int4(PACKERS[layout](t["qweight"]), t["qzeros"], t["scales"], group, torch.float32, layout)
    assert w.shape == (k, n)
    assert torch.equal(w, dequant_awq(t["qweight"], t["qzeros"], t["scales"], group, torch.float32).T)


@pytest.mark.parametrize("layout, n, k, group", CASES.values(), ids=CASES.keys())
def test_int4_gemm_dequant_matches_reference(layout, n, k, group):
    t = awq_weight(n, k, group, seed=1)
    x = torch.randn(7, k)
    ref = int4_gemm_reference(x, t["qweight"], t["qzeros"], t["scales"], group)
    out = int4_gemm_dequant(x, PACKERS[layout](t["qweight"]), t["qzeros"], t["scales"], group,
                            **LAYOUT_FLAGS[layout])
    err = (out - ref).abs().max().item()
    assert out.shape == ref.shape and err <= ATOL_FP32, f"error {err:.2e}"


def test_dispatch_sends_long_inputs_to_cublas(monkeypatch):
    """int4_gemm takes the dequant path from DEQUANT_MIN_T rows on (and never with the threshold off), the int4
    GEMM below it. kernel_supports is forced so the CPU interpreter runs the CUDA dispatch."""
    from deltaserve.kernels.int4_gemm import dequant, triton as int4_triton

    t = awq_weight(64, 256, 128)
    kq = awq_to_kpack(t["qweight"])
    calls = []
    real_dq, real_gemm = dequant.int4_gemm_dequant, int4_triton.int4_gemm_triton
    monkeypatch.setattr(int4_dispatch, "kernel_supports", lambda x, g: True)
    monkeypatch.setattr(dequant, "int4_gemm_dequant", lambda *a: calls.append("dequant") or real_dq(*a))
    monkeypatch.setattr(int4_triton, "int4_gemm_triton", lambda *a, **kw: calls.append("gemm") or real_gemm(*a, **kw))
    for min_t, rows in ((24, 23), (24, 24), (None, 40)):
        monkeypatch.setattr(int4_dispatch, "DEQUANT_MIN_T", min_t)
        x = torch.randn(rows, 256)
        out = int4_dispatch.int4_gemm(x, kq, t["qzeros"], t["scales"], 128, kpack=True)
        ref = int4_gemm_reference(x, t["qweight"], t["qzeros"], t["scales"], 128)
        assert (out - ref).abs().max().item() <= ATOL_FP32
    assert calls == ["gemm", "dequant", "gemm"]


def test_dispatch_sends_the_fragment_layout_past_its_gemv_to_cublas(monkeypatch):
    """Beyond mma.MMA_MAX_T tokens a fragment-layout weight dequantizes, whatever DEQUANT_MIN_T says (it has no
    int4 GEMM). Up to it the GEMV runs (CUDA only: recorded here, not run)."""
    from deltaserve.kernels.int4_gemm import dequant, mma

    t = awq_weight(32, 128, 128)
    fq = awq_to_mma(t["qweight"])
    calls = []
    real_dq = dequant.int4_gemm_dequant
    monkeypatch.setattr(int4_dispatch, "kernel_supports", lambda x, g: True)
    monkeypatch.setattr(int4_dispatch, "DEQUANT_MIN_T", None)
    monkeypatch.setattr(mma, "MMA_MAX_T", 16)
    monkeypatch.setattr(dequant, "int4_gemm_dequant", lambda *a, **kw: calls.append("dequant") or real_dq(*a, **kw))
    monkeypatch.setattr(mma, "mma_gemv", lambda *a: calls.append("gemv"))
    int4_dispatch.int4_gemm(torch.randn(16, 128), fq, t["qzeros"], t["scales"], 128, mma=True)
    x = torch.randn(17, 128)
    out = int4_dispatch.int4_gemm(x, fq, t["qzeros"], t["scales"], 128, mma=True)
    ref = int4_gemm_reference(x, t["qweight"], t["qzeros"], t["scales"], 128)
    assert calls == ["gemv", "dequant"] and (out - ref).abs().max().item() <= ATOL_FP32


def test_int4_gemm_dequant_refuses_bad_tensors():
    t = awq_weight(64, 256, 128)
    x = torch.randn(3, 256)
    with pytest.raises(ValueError, match="qweight"):
        int4_gemm_dequant(x, awq_to_mma(t["qweight"])[:, :2], t["qzeros"], t["scales"], 128, mma=True)
    with pytest.raises(ValueError, match="stack of experts"):
        int4_gemm_dequant(x, awq_to_kpack(t["qweight"])[None], t["qzeros"][None], t["scales"][None], 128,
                          kpack=True)
    with pytest.raises(ValueError, match="group_size"):
        int4_gemm_dequant(x, t["qweight"], t["qzeros"], t["scales"], 96)


# ---- full size on the GPU ----
GPU_SHAPES = {"27b-gate-up-5120x34816": (34816, 5120), "27b-down-17408x5120": (5120, 17408),
              "35b-out-proj-4096x2048": (2048, 4096)}


@pytest.mark.gpu
@pytest.mark.parametrize("layout", [LAYOUT_KPACK, LAYOUT_MMA], ids=["kpack", "mma"])
@pytest.mark.parametrize("n, k", GPU_SHAPES.values(), ids=GPU_SHAPES.keys())
def test_dequant_full_size(n, k, layout):
    """bf16: the kernel's one rounding of (q - z)·s equals the torch dequantizer's, bit for bit; the product at
    T = 512 within bf16 rounding of the reference."""
    t = awq_weight(n, k, 128, device="cuda")
    q = PACKERS[layout](t["qweight"])
    w = dequant_int4(q, t["qzeros"], t["scales"], 128, torch.bfloat16, layout)
    assert torch.equal(w, dequant_awq(t["qweight"], t["qzeros"], t["scales"], 128, torch.bfloat16).T)
    x = torch.randn(512, k, device="cuda").bfloat16()
    ref = int4_gemm_reference(x.float(), t["qweight"], t["qzeros"], t["scales"], 128)
    out = int4_gemm_dequant(x, q, t["qzeros"], t["scales"], 128, **LAYOUT_FLAGS[layout]).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, f"relative error {rel:.2e}"


@pytest.mark.gpu
def test_dequant_path_captures_in_a_cuda_graph():
    """Piecewise prefill graphs may capture the dequant path: no host sync, new inputs replay correctly."""
    t = awq_weight(4096, 2048, 128, device="cuda")
    q = awq_to_mma(t["qweight"])
    x = torch.randn(256, 2048, device="cuda").bfloat16()
    torch.testing.assert_close(*replay_after_new_input(
        lambda v: int4_gemm_dequant(v, q, t["qzeros"], t["scales"], 128, mma=True), x))
