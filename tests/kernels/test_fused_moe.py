"""MoE: the grouped-GEMM path used on CUDA against the per-expert reference loop (CPU fp32 here; bf16 on the GPU)."""
import pytest
import torch

from deltaserve.kernels.fused_moe import _grouped_moe, fused_moe_reference, route_topk_softmax

pytestmark = pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")
CASES = {"t37-e8-k2": (37, 8, 2), "t1-e16-k4": (1, 16, 4), "t64-e6-k6-all": (64, 6, 6)}


@pytest.mark.parametrize("T, E, k", CASES.values(), ids=CASES.keys())
def test_grouped_moe_matches_reference(T, E, k):
    torch.manual_seed(T)
    H, inter = 64, 32
    x = torch.randn(T, H)
    gate_up, down = torch.randn(E, 2 * inter, H) / 8, torch.randn(E, H, inter) / 6
    weights, ids = route_topk_softmax(torch.randn(T, E), k)
    ref = fused_moe_reference(x, gate_up, down, weights, ids)
    out = _grouped_moe(x, gate_up, down, weights, ids)
    assert (out - ref).abs().max() < 1e-5


def test_grouped_moe_skips_other_ranks_experts():
    """Pairs marked -1 (experts another rank holds) add nothing, as in the reference."""
    torch.manual_seed(1)
    T, E, k, H, inter = 19, 8, 3, 64, 32
    x = torch.randn(T, H)
    gate_up, down = torch.randn(E, 2 * inter, H) / 8, torch.randn(E, H, inter) / 6
    weights, ids = route_topk_softmax(torch.randn(T, E), k)
    ids = torch.where(ids >= E // 2, -1, ids)
    assert (ids < 0).any() and (ids >= 0).any()
    ref = fused_moe_reference(x, gate_up, down, weights, ids)
    assert (_grouped_moe(x, gate_up, down, weights, ids) - ref).abs().max() < 1e-5


def test_router_renormalises_softmax_topk():
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    w, ids = route_topk_softmax(logits, 2)
    p = torch.softmax(logits, -1)[0, :2]
    assert ids.tolist() == [[0, 1]] and torch.allclose(w[0], p / p.sum())


@pytest.mark.gpu
def test_grouped_moe_bf16_full_size():
    torch.manual_seed(0)
    T, H, inter, E, k = 64, 2048, 512, 256, 8
    x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
    gate_up = (torch.randn(E, 2 * inter, H, device="cuda") / 45).bfloat16()
    down = (torch.randn(E, H, inter, device="cuda") / 22).bfloat16()
    weights, ids = route_topk_softmax(torch.randn(T, E, device="cuda"), k)
    ref = fused_moe_reference(x.float(), gate_up.float(), down.float(), weights, ids)
    out = _grouped_moe(x, gate_up, down, weights, ids)
    assert (out.float() - ref).norm() / ref.norm() < 2e-2, (out.float() - ref).norm() / ref.norm()
    # each token's pairs are summed in a fixed order (no atomics): the same batch gives the same bits
    assert torch.equal(out, _grouped_moe(x, gate_up, down, weights, ids))
