"""The two-launch int4 MoE decode over K-packed experts (kernels/fused_moe/decode_kpack.py) against the reference on
the same int4 values: tiles that straddle the ends of K and of the columns, another rank's experts (id -1), top-k
that is not a power of two, more tokens than one. Interpreter on CPU, full size under `gpu`."""
import pytest
import torch

from deltaserve.kernels.fused_moe import ExpertWeights, fused_moe_reference, route_topk_softmax
from deltaserve.kernels.fused_moe import decode_kpack
from deltaserve.kernels.fused_moe.decode_kpack import fused_moe_kpack_decode
from deltaserve.kernels.fused_moe.triton import fused_moe_triton
from test_int4_kpack import ATOL_FP32, assert_close, kpacked

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# (tokens, experts, top-k, H, I, gate|up group, down group, gate|up tile, down tile)
CASES = {
    "t1-k3-masked": (1, 8, 3, 192, 64, 64, 64, (32, 1), (4, 4)),  # 4·CG > I: masked columns; 3 spans in 1 slot
    "t3-k2-g128": (3, 6, 2, 256, 64, 128, 64, (4, 4), (8, 2)),  # 4 spans of K in 32 slots
    "t2-k9-shared": (2, 12, 9, 128, 128, 64, 128, (8, 2), (8, 1)),  # 18 (pair, span) slots, five steps of 4
}


def experts(e, h, inter, g1, g2, seed, device=DEVICE):
    gu, gu_kp = kpacked(2 * inter, h, g1, seed=seed, experts=e, device=device)
    dn, dn_kp = kpacked(h, inter, g2, seed=seed + 1, experts=e, device=device)
    dense = (ExpertWeights(**gu, group_size=g1).dense(torch.float32),
             ExpertWeights(**dn, group_size=g2).dense(torch.float32))
    return dense, ExpertWeights(**gu_kp, group_size=g1, kpack=True), ExpertWeights(**dn_kp, group_size=g2, kpack=True)


@pytest.mark.parametrize("t, e, k, h, inter, g1, g2, tile1, tile2", CASES.values(), ids=CASES.keys())
def test_kpack_decode_matches_reference(t, e, k, h, inter, g1, g2, tile1, tile2):
    (gate_up, down), gu, dn = experts(e, h, inter, g1, g2, seed=t)
    gen = torch.Generator(device=DEVICE).manual_seed(t)
    x = torch.randn(t, h, generator=gen, device=DEVICE)
    weights, ids = route_topk_softmax(torch.randn(t, e, generator=gen, device=DEVICE), k)
    ref = fused_moe_reference(x, gate_up, down, weights, ids)
    out = fused_moe_kpack_decode(x, gu, dn, weights, ids, gate_up_tile=tile1, down_tile=tile2)
    assert_close("moe", ref, out, ATOL_FP32)


def test_kpack_decode_skips_other_ranks_experts_and_is_deterministic():
    """Pairs with id -1 add nothing (expert parallelism): the output equals the reference without those pairs."""
    (gate_up, down), gu, dn = experts(8, 128, 64, 64, 64, seed=7)
    x = torch.randn(2, 128, device=DEVICE)
    weights, ids = route_topk_softmax(torch.randn(2, 8, device=DEVICE), 4)
    ids[0, 1] = ids[1, 3] = -1
    kept = weights.clone()
    kept[ids < 0] = 0.0
    ref = fused_moe_reference(x, gate_up, down, kept, ids.clamp(min=0))
    outs = [fused_moe_kpack_decode(x, gu, dn, weights, ids) for _ in range(2)]
    assert_close("moe", ref, outs[0], ATOL_FP32)
    assert torch.equal(outs[0], outs[1])


def test_decode_dispatch_takes_kpack_experts_up_to_max_tokens(monkeypatch):
    """fused_moe_triton's decode path sends K-packed experts at up to MAX_TOKENS tokens to decode_kpack; more tokens
    keep the per-pair GEMVs of decode.py (and two_launch overrides both ways). Every path equals the reference."""
    calls = []
    real = decode_kpack.fused_moe_kpack_decode
    monkeypatch.setattr("deltaserve.kernels.fused_moe.decode.fused_moe_kpack_decode",
                        lambda *a, **kw: calls.append(a[0].shape[0]) or real(*a, **kw))
    (gate_up, down), gu, dn = experts(4, 64, 64, 64, 64, seed=3)
    big = decode_kpack.MAX_TOKENS + 1
    for t, two_launch in ((1, None), (big, None), (1, False), (big, True)):
        x = torch.randn(t, 64, device=DEVICE)
        weights, ids = route_topk_softmax(torch.randn(t, 4, device=DEVICE), 2)
        assert_close(f"t={t} two_launch={two_launch}", fused_moe_reference(x, gate_up, down, weights, ids),
                     fused_moe_triton(x, gu, dn, weights, ids, two_launch=two_launch), ATOL_FP32)
    assert calls == [1, big]


def test_two_launch_refuses_awq_layout_experts():
    gu, dn = (ExpertWeights(**kpacked(n, k, 64, experts=2)[0], group_size=64) for n, k in ((128, 64), (64, 64)))
    weights, ids = route_topk_softmax(torch.randn(1, 2), 1)
    with pytest.raises(ValueError, match="K-packed experts"):
        fused_moe_triton(torch.randn(1, 64), gu, dn, weights, ids, two_launch=True)


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 4, 16], ids=lambda t: f"t{t}")
def test_kpack_decode_full_size(t):
    """35B-A3B shapes: 256 experts, top-8 + a shared expert as a ninth pair, H = 2048, I = 512, group 128, bf16."""
    (gate_up, down), gu, dn = experts(257, 2048, 512, 128, 128, seed=t)
    x = torch.randn(t, 2048, device="cuda").bfloat16()
    weights, ids = route_topk_softmax(torch.randn(t, 256, device="cuda"), 8)
    ids = torch.cat([ids, torch.full((t, 1), 256, device="cuda", dtype=ids.dtype)], 1)
    weights = torch.cat([weights, torch.rand(t, 1, device="cuda")], 1)
    ref = fused_moe_reference(x.float(), gate_up, down, weights, ids)
    out = fused_moe_kpack_decode(x, gu, dn, weights, ids).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, f"relative error {rel:.2e}"  # bf16 x, activation and output: ~5e-3


_ASM_ON = ('%1 = tt.elementwise_inline_asm "mov.f32 $0, $4;" {{pure = true}} %0 : tensor<256x4xf32, #blocked> '
           '-> tensor<256x4xf32, #blocked>\n')
LAYOUTS = {"row-a-thread": ("[1, 4]", "[32, 1]", True), "rows-split": ("[2, 2]", "[16, 2]", False),
           "columns-across-lanes": ("[1, 1]", "[8, 4]", False)}


@pytest.mark.parametrize("size, lanes, ok", LAYOUTS.values(), ids=LAYOUTS.keys())
def test_asm_row_layout_guard(size, lanes, ok):
    """_bcast (and mma.py's MMAs) read a row's 4 elements as one thread's registers: a compiled kernel whose TTGIR
    lays the asm's [R, 4] operands out otherwise is refused with the switch that avoids the kernel, not run."""
    from deltaserve.kernels.int4_gemm.mma import check_rows_are_threads

    class Compiled:
        asm = {"ttgir": f"#blocked = #ttg.blocked<{{sizePerThread = {size}, threadsPerWarp = {lanes}, "
                        f"warpsPerCTA = [8, 1], order = [1, 0]}}>\n" + _ASM_ON}
    if ok:
        check_rows_are_threads(Compiled(), "the two-launch int4 MoE decode", "DELTASERVE_MOE_TWO_LAUNCH=0")
    else:
        with pytest.raises(RuntimeError, match="two-launch int4 MoE decode needs one tensor row a thread.*"
                                               "DELTASERVE_MOE_TWO_LAUNCH=0"):
            check_rows_are_threads(Compiled(), "the two-launch int4 MoE decode", "DELTASERVE_MOE_TWO_LAUNCH=0")
