"""The K-packed int4 layout (layers/quant.awq_to_kpack) and the kernels that read it: the T=1 GEMV (kpack.py, plain
and per-row experts), the GEMM's K-packed tiles (T > 1) and the fused MoE's, each against the torch reference on the
same int4 values (interpreter on CPU, small shapes; full sizes under `gpu`). Also QuantLinear.to_kernel_layout: which
weights it K-packs and that their output does not change."""
import pytest
import torch
import triton.language as tl

from deltaserve.kernels import int4_gemm as int4_dispatch
from deltaserve.kernels.fused_moe import ExpertWeights, fused_moe_reference, route_topk_softmax
from deltaserve.kernels.fused_moe.triton import fused_moe_triton
from deltaserve.kernels.int4_gemm import int4_gemm_reference
from deltaserve.kernels.int4_gemm.kpack import KpackPlan, kpack_gemv, kpack_gemv_rows, kpack_plan
from deltaserve.kernels.int4_gemm.triton import int4_gemm_triton
from deltaserve.layers import linear
from deltaserve.layers.linear import QuantExperts, QuantLinear, use_int4_kernels
from deltaserve.layers.quant import AWQ_ORDER, awq_to_kpack, dequant_awq, kpack_to_awq, to_awq, unpack_int4
from graph_helpers import replay_after_new_input

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ATOL_FP32 = 1e-4  # fp32 in the interpreter; the GEMV's 1.0-offset fold costs ~2^-16 relative: observed ~2e-5


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)  # the activations: every run draws the same inputs


@pytest.fixture(autouse=True)
def _triton_ready():
    if not torch.cuda.is_available() and type(tl.max).__name__ != "InterpretedFunction":
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it first)")


def assert_close(name, ref, out, atol):
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= atol, f"{name}: error {err:.2e} beyond {atol:.0e}"


def kpacked(n: int, k: int, group: int, seed: int = 0, experts: int | None = None, device: str = "cpu"):
    """-> (AWQ tensors, the same with qweight K-packed) of a random RTN-quantized [n, k] weight (or E of them)."""
    gen = torch.Generator().manual_seed(seed)
    ws = [to_awq(torch.randn(n, k, generator=gen) / k**0.5, group) for _ in range(experts or 1)]
    awq = {name: (torch.stack([w[name] for w in ws]) if experts else ws[0][name]).to(device) for name in ws[0]}
    return awq, dict(awq, qweight=awq_to_kpack(awq["qweight"]))


def test_kpack_layout_places_each_row_where_documented():
    awq, kp = kpacked(24, 192, 64)
    q = unpack_int4(awq["qweight"], AWQ_ORDER)  # [K, N]
    assert kp["qweight"].shape == (192 // 8, 24)
    for k in (0, 7, 8, 63, 64 + 8 * 3 + 5, 191):
        span, j, r = k // 64, (k % 64) // 8, k % 8
        got = (kp["qweight"][span * 8 + r] >> (4 * j)) & 0xF
        assert torch.equal(got, q[k]), f"row {k}"
    assert torch.equal(kpack_to_awq(kp["qweight"]), awq["qweight"])
    stacked, stacked_kp = kpacked(24, 128, 128, experts=3)
    assert torch.equal(kpack_to_awq(stacked_kp["qweight"]), stacked["qweight"])


# (K, N, group): N=200 / 136 leave the last column block partly masked; N=32 is the GDN in_proj_a/b width
GEMV_CASES = {"k256-n96-g64": (256, 96, 64), "k384-n136-g128": (384, 136, 128), "k512-n200-g256": (512, 200, 256),
              "k128-n32-g64": (128, 32, 64)}


@pytest.mark.parametrize("k, n, group", GEMV_CASES.values(), ids=GEMV_CASES.keys())
def test_kpack_gemv_matches_reference(k, n, group):
    awq, kp = kpacked(n, k, group, seed=k + n)
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(n))
    ref = int4_gemm_reference(x, awq["qweight"], awq["qzeros"], awq["scales"], group)
    assert_close("auto plan", ref, kpack_gemv(x, *kp.values(), group), ATOL_FP32)
    for split in (1, k // group):  # one program along K, and one group per program (split-K partials summed)
        cfg = KpackPlan(block_n=128, split_k=split, num_warps=4, num_stages=1)
        assert_close(f"split {split}", ref, kpack_gemv(x, *kp.values(), group, config=cfg), ATOL_FP32)


DOT_CASES = {"t2-k256-n72-g128": (2, 256, 72, 128), "t5-k512-n136-g256": (5, 512, 136, 256),
             "t16-k384-n200-g128": (16, 384, 200, 128)}


@pytest.mark.parametrize("t, k, n, group", DOT_CASES.values(), ids=DOT_CASES.keys())
def test_kpack_tensor_core_gemv_matches_reference(t, k, n, group):
    """2 <= T <= 16: the tensor-core twin (two spans per int32 tile, nibble j times its 16 gathered activations)."""
    awq, kp = kpacked(n, k, group, seed=t)
    x = torch.randn(t, k, generator=torch.Generator().manual_seed(t))
    ref = int4_gemm_reference(x, awq["qweight"], awq["qzeros"], awq["scales"], group)
    assert_close("auto plan", ref, kpack_gemv(x, *kp.values(), group), ATOL_FP32)
    cfg = KpackPlan(block_n=64, split_k=k // group, num_warps=4, num_stages=1)
    assert_close("one group per split", ref, kpack_gemv(x, *kp.values(), group, config=cfg), ATOL_FP32)


def test_kpack_tensor_core_gemv_takes_the_fp16_offset_back_out():
    """fp16 activations: the nibbles enter the dot as 1024 + q (fp32 ones: q), and the 1024 comes back out with the
    zero point (in the interpreter too; bf16 dots are not exact there)."""
    awq, kp = kpacked(72, 256, 128, seed=4)
    x = torch.randn(3, 256, generator=torch.Generator().manual_seed(4)).half()
    ref = int4_gemm_reference(x.float(), awq["qweight"], awq["qzeros"], awq["scales"], 128)
    out = kpack_gemv(x, *kp.values(), 128).float()
    assert ((out - ref).norm() / ref.norm()).item() < 2e-3  # fp16 rounding of y (~3e-4)


def test_kpack_gemv_rows_per_expert_and_skipped_rows():
    """Row r multiplies x[r // 2] by expert ids[r]; id -1 (another rank's expert) leaves its row untouched."""
    e, k, n, group = 4, 128, 48, 64
    awq, kp = kpacked(n, k, group, experts=e)
    x = torch.randn(2, k)
    ids = torch.tensor([3, -1, 0, 3])
    part = kpack_gemv_rows(x, *kp.values(), group, ids, 2)
    for r, i in enumerate(ids.tolist()):
        if i < 0:
            continue
        ref = int4_gemm_reference(x[r // 2 : r // 2 + 1], awq["qweight"][i], awq["qzeros"][i], awq["scales"][i],
                                  group)
        assert_close(f"row {r}", ref[0], part[:, r].sum(0), ATOL_FP32)


@pytest.mark.parametrize("t", [2, 20], ids=lambda t: f"t{t}")
def test_int4_gemm_reads_kpack_tiles(t):
    k, n, group = 256, 72, 128
    awq, kp = kpacked(n, k, group, seed=t)
    x = torch.randn(t, k)
    ref = int4_gemm_reference(x, awq["qweight"], awq["qzeros"], awq["scales"], group)
    assert_close("kpack gemm", ref, int4_gemm_triton(x, *kp.values(), group, kpack=True), ATOL_FP32)


PATHS = {"decode-gemv": {}, "grouped-gemm": {"decode_gemv": False}}


@pytest.mark.parametrize("kw", PATHS.values(), ids=PATHS.keys())
def test_fused_moe_on_kpack_experts(kw):
    """Both int4 MoE paths (per-pair GEMVs, align + grouped GEMM) on K-packed experts equal the reference."""
    e, h, inter, top_k, group = 8, 128, 64, 2, 64
    gu, gu_kp = kpacked(2 * inter, h, group, seed=1, experts=e)
    dn, dn_kp = kpacked(h, inter, group, seed=2, experts=e)
    x = torch.randn(3, h)
    weights, ids = route_topk_softmax(torch.randn(3, e), top_k)
    ref = fused_moe_reference(x, ExpertWeights(**gu, group_size=group).dense(torch.float32),
                              ExpertWeights(**dn, group_size=group).dense(torch.float32), weights, ids)
    out = fused_moe_triton(x, ExpertWeights(**gu_kp, group_size=group, kpack=True),
                           ExpertWeights(**dn_kp, group_size=group, kpack=True), weights, ids, **kw)
    assert_close("moe", ref, out, ATOL_FP32)


GROUPS = {"g32-stays-awq": (32, False), "g64-kpacked": (64, True), "g128-kpacked": (128, True)}


@pytest.mark.parametrize("group, packs", GROUPS.values(), ids=GROUPS.keys())
def test_quant_linear_kpacks_what_the_kernels_can_read(group, packs, monkeypatch):
    monkeypatch.setattr(linear, "KPACK_CHUNK_ROWS", 64)  # 128 rows in two chunks, as a big Linear in many
    for experts in (None, 2):
        lin = QuantLinear("awq", 128, 48, group, experts)
        awq, _ = kpacked(48, 128, group, experts=experts)
        for name, tensor in awq.items():
            getattr(lin, name).data = tensor.float() if name == "scales" else tensor
        before = lin.dequant(torch.float32)
        lin.to_kernel_layout()
        assert lin.kpack == packs
        assert lin.qweight.shape[-2:] == ((128 // 8, 48) if packs else (128, 48 // 8))
        assert torch.equal(lin.dequant(torch.float32), before)
        x = torch.randn(2, 128)
        if experts is None:  # the CPU forward dequantizes the K-packed weight too
            assert_close("forward", torch.nn.functional.linear(x, before), lin(x), 1e-5)
        lin.to_kernel_layout()  # a second call changes nothing
        assert torch.equal(lin.dequant(torch.float32), before)


def test_quant_experts_after_use_int4_kernels_compute_the_same():
    """use_int4_kernels K-packs a whole MoE layer's experts; the layer's output (CPU: the dequantized reference, which
    must read the K-packed qweight) is unchanged, and the Triton MoE on the ExpertWeights it builds agrees."""
    e, h, inter, group = 4, 128, 64, 64
    experts = QuantExperts("awq", e, h, inter, group)
    for lin, (n, k) in ((experts.gate_up_proj, (2 * inter, h)), (experts.down_proj, (h, inter))):
        awq, _ = kpacked(n, k, group, seed=n, experts=e)
        for name, tensor in awq.items():
            getattr(lin, name).data = tensor.float() if name == "scales" else tensor
    x = torch.randn(3, h)
    weights, ids = route_topk_softmax(torch.randn(3, e), 2)
    before = experts(x, weights, ids)
    use_int4_kernels(experts)
    assert experts.gate_up_proj.kpack and experts.down_proj.kpack
    assert_close("experts", before, experts(x, weights, ids), 1e-5)
    gu, dn = experts.gate_up_proj, experts.down_proj
    out = fused_moe_triton(x, ExpertWeights(gu.qweight, gu.qzeros, gu.scales, group, kpack=True),
                           ExpertWeights(dn.qweight, dn.qzeros, dn.scales, group, kpack=True), weights, ids)
    assert_close("triton", before, out, ATOL_FP32)


def test_split_sums_read_many_splits_per_tile():
    """The split-K sum reads up to 64 splits per tile: 70 splits take two tiles, the second partly masked."""
    from deltaserve.kernels.int4_gemm.triton import sum_splits

    part = torch.randn(70, 3, 50, generator=torch.Generator().manual_seed(0))
    # another summation order than torch's: fp32 rounding of sums up to ~25 differs by a few 1e-6
    assert_close("sum", part.sum(0), sum_splits(part, torch.empty(3, 50)), 5e-5)


def test_kpack_plan_and_refusals():
    up = kpack_plan(34816, 5120, 128)
    assert up.block_n == 512 and up.split_k > 1 and up.num_warps == 4
    assert kpack_plan(32, 4096, 128).block_n == 128  # GDN in_proj_a/b
    assert int4_dispatch.kpack_ok(4096, 128) and not int4_dispatch.kpack_ok(4096, 32)
    assert not int4_dispatch.kpack_ok(4096, 192)  # not a power of two: the kernels' groups are
    _, kp = kpacked(48, 128, 64)
    with pytest.raises(ValueError, match="multiple of 64"):
        kpack_gemv(torch.randn(1, 128), *kp.values(), 32)
    with pytest.raises(ValueError, match="qweight"):
        kpack_gemv(torch.randn(1, 256), *kp.values(), 64)
    with pytest.raises(ValueError, match="multiples of 128"):
        kpack_gemv(torch.randn(2, 128), *kp.values(), 64)  # the tensor-core GEMV: two spans per group
    with pytest.raises(ValueError, match="K-packed int4 weight runs only"):
        int4_dispatch.int4_gemm(torch.randn(1, 128), *kp.values(), 64, kpack=True)


# ---- full size on the GPU (bf16, group 128 as the published AWQ checkpoints) ----
GPU_SHAPES = {"9b-o-proj-4096x4096": (4096, 4096), "27b-down-17408x5120": (17408, 5120),
              "27b-gate-up-5120x34816": (5120, 34816), "gdn-ab-4096x32": (4096, 32)}


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 4, 16, 300], ids=lambda t: f"t{t}")
@pytest.mark.parametrize("k, n", GPU_SHAPES.values(), ids=GPU_SHAPES.keys())
def test_kpack_full_size(k, n, t):
    awq, kp = kpacked(n, k, 128, device="cuda")
    x = torch.randn(t, k, device="cuda").bfloat16()
    ref = int4_gemm_reference(x.float(), awq["qweight"], awq["qzeros"], awq["scales"], 128)
    out = int4_dispatch.int4_gemm(x, *kp.values(), 128, kpack=True).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, f"relative error {rel:.2e}"  # bf16 rounding of y (and of W in the GEMM): ~3e-3


@pytest.mark.gpu
@pytest.mark.parametrize("t", [2, 16], ids=lambda t: f"t{t}")
def test_kpack_tensor_core_gemv_fp16(t):
    """fp16 activations: the nibbles become fp16 1024 + q (bf16 ones use 128 + q), and the offset comes back out."""
    awq, kp = kpacked(5120, 6144, 128, device="cuda")
    x = torch.randn(t, 6144, device="cuda").half()
    ref = int4_gemm_reference(x.float(), awq["qweight"], awq["qzeros"], awq["scales"], 128)
    out = int4_dispatch.int4_gemm(x, *kp.values(), 128, kpack=True).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 2e-3, f"relative error {rel:.2e}"  # fp16 rounding of y: ~3e-4


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 16], ids=lambda t: f"t{t}")
def test_kpack_gemv_captures_in_a_cuda_graph(t):
    _, kp = kpacked(4096, 4096, 128, device="cuda")
    x = torch.randn(t, 4096, device="cuda").bfloat16()
    torch.testing.assert_close(*replay_after_new_input(lambda v: kpack_gemv(v, *kp.values(), 128), x))


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 16, 64], ids=lambda t: f"t{t}")
def test_fused_moe_kpack_full_size(t):
    """35B-A3B shapes: 256 experts top-8, H=2048, I=512, group 128."""
    e, h, inter = 256, 2048, 512
    gu, gu_kp = kpacked(2 * inter, h, 128, seed=1, experts=e, device="cuda")
    dn, dn_kp = kpacked(h, inter, 128, seed=2, experts=e, device="cuda")
    x = torch.randn(t, h, device="cuda").bfloat16()
    weights, ids = route_topk_softmax(torch.randn(t, e, device="cuda"), 8)
    gate_up = dequant_awq(gu["qweight"], gu["qzeros"], gu["scales"], 128, torch.float32)
    down = dequant_awq(dn["qweight"], dn["qzeros"], dn["scales"], 128, torch.float32)
    ref = fused_moe_reference(x.float(), gate_up, down, weights, ids)
    out = fused_moe_triton(x, ExpertWeights(**gu_kp, group_size=128, kpack=True),
                           ExpertWeights(**dn_kp, group_size=128, kpack=True), weights, ids).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, f"relative error {rel:.2e}"


def test_prefetch_rows_only_for_small_launches_and_early_expert_ids():
    """The L2 prefetch before the PDL wait (kpack.prefetch_rows): small launches only, a power of two of the tile's
    rows capped at PREFETCH_MAX_BYTES, and per-row experts only when their ids were written two launches back."""
    from deltaserve.kernels.int4_gemm.kpack import PREFETCH_MAX_BYTES, prefetch_rows

    assert prefetch_rows(128, 128, 512, 132, False, False) == 16  # 35B-A3B out_proj: one group a program
    assert prefetch_rows(480, 128, 512, 132, False, False) == 0  # 27B o_proj: 3.6 programs an SM
    assert prefetch_rows(144, 128, 512, 132, False, True) == 0  # MoE gate|up: the router just wrote the ids
    assert prefetch_rows(144, 128, 512, 132, True, True) == 16  # MoE down: ids from two launches back
    assert prefetch_rows(64, 1024, 512, 132, False, False) == PREFETCH_MAX_BYTES // (4 * 512)
    assert prefetch_rows(64, 3 * 128, 128, 132, False, False) == 32  # 48 rows -> 32
