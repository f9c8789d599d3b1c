"""Block-FP8 experts in the Triton fused MoE (kernels/fused_moe, FP8=True) against the reference loop over the same
experts dequantized, and Fp8Experts' stacked [gate | up] layout. Interpreter on CPU (fp32 activations, small scale
blocks so a few experts span several of them, partial blocks along N); full size under `gpu` (256 experts top-8,
H=2048, I=512, 128 x 128 blocks, bf16)."""
import pytest
import torch
from test_fused_moe_triton import ATOL_FP32, assert_graph_replays_like_eager, moe_inputs  # noqa: E402  (pytest puts this folder on sys.path)

from deltaserve.kernels.fused_moe import ExpertWeights, fused_moe_experts, fused_moe_fp8, route_topk_softmax
from deltaserve.kernels.fused_moe.triton import fused_moe_triton
from deltaserve.layers.fp8 import Fp8Experts, quantize_blocks


def fp8_experts(w: torch.Tensor, block: tuple[int, int]) -> ExpertWeights:
    """w: [E, N, K] float -> block-FP8 ExpertWeights (per-expert amax scales)."""
    qs = [quantize_blocks(w[e], block) for e in range(w.shape[0])]
    return ExpertWeights(weight=torch.stack([q for q, _ in qs]), scale_inv=torch.stack([s for _, s in qs]),
                         block=block)


# (t, e, k, hidden, intermediate, block (BN, BK), block_m); hidden 80 with BN 32: down's last row block is partial
CASES = {"t5-e8-k2-b16x32": (5, 8, 2, 64, 32, (16, 32), None), "t1-e16-k4-b32x16": (1, 16, 4, 64, 32, (32, 16), None),
         "t40-e8-k2-b16x16-bm64": (40, 8, 2, 64, 48, (16, 16), 64),
         "t9-e6-k3-h80-b32x16": (9, 6, 3, 80, 32, (32, 16), None)}


@pytest.mark.parametrize("t, e, k, h, inter, block, bm", CASES.values(), ids=CASES.keys())
def test_fp8_fused_moe_matches_reference(t, e, k, h, inter, block, bm):
    x, gate_up, down, weights, ids = moe_inputs(t, e, k, h, inter, seed=t + e)
    gu, dn = fp8_experts(gate_up, block), fp8_experts(down, block)
    ref = fused_moe_experts(x, gu, dn, weights, ids)
    err = (fused_moe_triton(x, gu, dn, weights, ids, block_m=bm) - ref).abs().max().item()
    assert err <= ATOL_FP32, f"error {err:.2e}"


def test_fp8_fused_moe_skips_other_ranks_experts():
    """Expert parallelism: ids -1 add nothing; the rest equals the reference on the kept pairs."""
    x, gate_up, down, weights, ids = moe_inputs(7, 8, 3, 64, 32, seed=4)
    gu, dn = fp8_experts(gate_up, (16, 32)), fp8_experts(down, (16, 32))
    local = torch.where(ids < 4, ids, -1)
    ref = fused_moe_experts(x, gu, dn, torch.where(ids < 4, weights, 0.0), ids.clamp(max=3))
    err = (fused_moe_triton(x, gu, dn, weights, local) - ref).abs().max().item()
    assert err <= ATOL_FP32, f"error {err:.2e}"


def _layer(e: int, h: int, inter: int, block: tuple[int, int], seed: int) -> Fp8Experts:
    g = torch.Generator().manual_seed(seed)
    layer = Fp8Experts(e, h, inter, block)
    for proj, (n, kk) in ((layer.gate_proj, (inter, h)), (layer.up_proj, (inter, h)), (layer.down_proj, (h, inter))):
        q = fp8_experts(torch.randn(e, n, kk, generator=g) / kk**0.5, block)
        proj.weight.data, proj.weight_scale_inv.data = q.weight, q.scale_inv
    return layer


def test_stacked_layout_gives_the_same_experts():
    """to_kernel_layout stacks gate and up (weights and scales); dense weights and the forward stay the same."""
    e, h, inter, block = 4, 64, 32, (16, 32)
    layer = _layer(e, h, inter, block, seed=1)
    x = torch.randn(6, h)
    weights, ids = route_topk_softmax(torch.randn(6, e), 2)
    before_dense, before = layer.dense(torch.float32), layer(x, weights, ids)
    layer.to_kernel_layout()
    assert layer.gate_up is not None and not hasattr(layer, "gate_proj")
    assert layer.gate_up.weight.dtype == torch.float8_e4m3fn and tuple(layer.gate_up.weight.shape) == (e, 2 * inter, h)
    for a, b in zip(before_dense, layer.dense(torch.float32)):
        assert torch.equal(a, b)
    torch.testing.assert_close(layer(x, weights, ids), before, rtol=0, atol=1e-6)


def test_no_stacking_when_a_scale_block_would_straddle_gate_and_up():
    layer = _layer(2, 64, 24, (16, 32), seed=2)  # I = 24: gate's last 16-row block is partial
    layer.to_kernel_layout()
    assert layer.gate_up is None and hasattr(layer, "gate_proj")


def test_fp8_dispatch_on_cpu_is_the_reference():
    x, gate_up, down, weights, ids = moe_inputs(3, 4, 2, 64, 32, seed=6)
    gu, dn = fp8_experts(gate_up, (16, 32)), fp8_experts(down, (16, 32))
    torch.testing.assert_close(fused_moe_fp8(x, gu, dn, weights, ids), fused_moe_experts(x, gu, dn, weights, ids))


# ---- full size on the GPU: Qwen3.5-35B-A3B experts in the official FP8 layout ----
@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 16, 256], ids=lambda t: f"t{t}")
def test_fp8_fused_moe_full_size(t):
    e, k, h, inter = 256, 8, 2048, 512
    x, gate_up, down, weights, ids = moe_inputs(t, e, k, h, inter, device="cuda")
    gu, dn = fp8_experts(gate_up, (128, 128)), fp8_experts(down, (128, 128))
    ref = fused_moe_experts(x, gu, dn, weights, ids)  # fp32 over the same dequantized experts
    out = fused_moe_fp8(x.bfloat16(), gu, dn, weights, ids).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, f"relative error {rel:.2e}"  # bf16 x, W and activations, as the int4 MoE's test


@pytest.mark.gpu
def test_fp8_fused_moe_captures_in_a_cuda_graph():
    e, k, h, inter, t = 256, 8, 2048, 512, 8
    x, gate_up, down, weights, ids = moe_inputs(t, e, k, h, inter, device="cuda")
    gu, dn = fp8_experts(gate_up, (128, 128)), fp8_experts(down, (128, 128))
    assert_graph_replays_like_eager(fused_moe_fp8, x.bfloat16(), gu, dn, weights, ids)
