"""Triton fused MoE (int4 AWQ experts and 16-bit experts) against the per-expert reference loop run on the same
weights dequantized; the device-side sort/align it walks. Interpreter on CPU (8-16 experts, small dims), full size
under `gpu` (256 experts top-8, H=2048, I=512)."""
import pytest
import torch
import triton.language as tl

from deltaserve.kernels.fused_moe import (
    ExpertWeights,
    fused_moe_experts,
    fused_moe_int4,
    route_topk_softmax,
)
from deltaserve.kernels.fused_moe.align import max_padded_rows, moe_align
from deltaserve.kernels.fused_moe.align_triton import moe_align_triton
from deltaserve.kernels.fused_moe.triton import fused_moe_triton
from deltaserve.layers.linear import QuantExperts
from deltaserve.layers.quant import ct_to_awq, to_awq, to_ct

ATOL_FP32 = 1e-4  # fp32 in the interpreter: only the summation order differs from the reference; observed ~1e-6


@pytest.fixture(autouse=True)
def _triton_ready():
    if not torch.cuda.is_available() and type(tl.max).__name__ != "InterpretedFunction":
        pytest.fail("triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it first)")


def int4_experts(w: torch.Tensor, group: int, symmetric: bool = False) -> ExpertWeights:
    """w: [E, N, K] -> AWQ ExpertWeights (RTN with zero points, or symmetric compressed-tensors converted)."""
    def one(m):
        if not symmetric:
            return to_awq(m, group)
        ct = to_ct(m, group)
        return ct_to_awq(ct["weight_packed"], ct["weight_scale"], None)
    ds = [one(w[e]) for e in range(w.shape[0])]
    return ExpertWeights(*(torch.stack([d[n] for d in ds]) for n in ("qweight", "qzeros", "scales")),
                         group_size=group)


def moe_inputs(t, e, k, h, inter, device="cpu", seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(t, h, generator=g, device=device)
    gate_up = torch.randn(e, 2 * inter, h, generator=g, device=device) / h**0.5
    down = torch.randn(e, h, inter, generator=g, device=device) / inter**0.5
    weights, ids = route_topk_softmax(torch.randn(t, e, generator=g, device=device), k)
    return x, gate_up, down, weights, ids


ALIGN = {"t37-e8-k2": (37, 8, 2, 16), "t1-e16-k4": (1, 16, 4, 16), "t64-e6-k6-bm64": (64, 6, 6, 64),
         "t1-e256-k8": (1, 256, 8, 16), "t9-e256-k8": (9, 256, 8, 16), "t3-e20-k3-bm32": (3, 20, 3, 32)}
ALIGNERS = {"torch": moe_align, "triton": moe_align_triton}


@pytest.mark.parametrize("align", ALIGNERS.values(), ids=ALIGNERS.keys())
@pytest.mark.parametrize("t, e, k, bm", ALIGN.values(), ids=ALIGN.keys())
def test_moe_align_sorts_every_pair_into_its_experts_tiles(t, e, k, bm, align):
    ids = route_topk_softmax(torch.randn(t, e, generator=torch.Generator().manual_seed(t)), k)[1]
    al = align(ids, e, bm)
    flat, m = ids.reshape(-1), t * k
    assert al.sorted_ids.numel() == max_padded_rows(m, e, bm) and al.sorted_ids.numel() % bm == 0
    used = int(al.num_tokens_post_pad)
    counts = torch.bincount(flat, minlength=e)
    assert used == int(((counts + bm - 1) // bm * bm).sum())
    rows = al.sorted_ids[:used].long()
    assert sorted(rows[rows < m].tolist()) == list(range(m))  # every pair exactly once
    assert (al.sorted_ids[used:] == m).all()  # rows past the used tiles are padding
    tile_expert = al.expert_ids.long().repeat_interleave(bm)[:used]
    assert torch.equal(flat[rows[rows < m]], tile_expert[rows < m])  # each row sits in a tile of its expert


@pytest.mark.parametrize("t, e, k, bm", ALIGN.values(), ids=ALIGN.keys())
def test_triton_align_equals_the_torch_align(t, e, k, bm):
    """Same tensors, not only the same invariants: within an expert both keep pair order."""
    ids = route_topk_softmax(torch.randn(t, e, generator=torch.Generator().manual_seed(t + 1)), k)[1]
    ref, out = moe_align(ids, e, bm), moe_align_triton(ids, e, bm)
    for name in ("sorted_ids", "expert_ids", "num_tokens_post_pad"):
        assert torch.equal(getattr(ref, name), getattr(out, name)), name


CASES = {"t5-e8-k2-g32": (5, 8, 2, 32, None), "t1-e16-k4-g64": (1, 16, 4, 64, None),
         "t40-e8-k2-g32-bm16": (40, 8, 2, 32, 16), "t40-e8-k2-g64-bm64": (40, 8, 2, 64, 64)}


@pytest.mark.parametrize("symmetric", [False, True], ids=["zero_points", "symmetric"])
@pytest.mark.parametrize("t, e, k, group, bm", CASES.values(), ids=CASES.keys())
def test_int4_fused_moe_matches_reference(t, e, k, group, bm, symmetric):
    h, inter = 64, 48  # I=48: the gate/up column tile (64) is partly masked
    x, gate_up, down, weights, ids = moe_inputs(t, e, k, h, inter, seed=t + group)
    gu, dn = int4_experts(gate_up, group, symmetric), int4_experts(down, 16, symmetric)
    ref = fused_moe_experts(x, gu, dn, weights, ids)
    out = fused_moe_triton(x, gu, dn, weights, ids, block_m=bm)
    err = (out - ref).abs().max().item()
    assert err <= ATOL_FP32, f"error {err:.2e}"


PATHS = {"decode-gemv": {"decode_gemv": True},
         "gemm-triton-align": {"decode_gemv": False, "triton_align": True},
         "gemm-torch-align": {"decode_gemv": False, "triton_align": False},
         "gemm-bn32": {"decode_gemv": False, "gemm1_block_n": 32}}
PATH_CASES = {"t1-e16-k4-g64": (1, 16, 4, 64), "t16-e8-k2-g32": (16, 8, 2, 32), "t7-e32-k8-g32": (7, 32, 8, 32)}


@pytest.mark.parametrize("path", PATHS.values(), ids=PATHS.keys())
@pytest.mark.parametrize("t, e, k, group", PATH_CASES.values(), ids=PATH_CASES.keys())
def test_int4_fused_moe_paths_match_reference(t, e, k, group, path):
    """Every path the dispatch (or the benchmark) can pick, on the same inputs. I=48: 12 packed gate|up columns
    (tiles partly masked), down's K=48 in three groups of 16."""
    h, inter = 64, 48
    x, gate_up, down, weights, ids = moe_inputs(t, e, k, h, inter, seed=t + e)
    gu, dn = int4_experts(gate_up, group, symmetric=t % 2 == 0), int4_experts(down, 16)
    ref = fused_moe_experts(x, gu, dn, weights, ids)
    err = (fused_moe_triton(x, gu, dn, weights, ids, **path) - ref).abs().max().item()
    assert err <= ATOL_FP32, f"error {err:.2e}"


def test_int4_decode_gemv_is_deterministic():
    x, gate_up, down, weights, ids = moe_inputs(3, 8, 4, 64, 48, seed=5)
    gu, dn = int4_experts(gate_up, 32), int4_experts(down, 16)
    outs = [fused_moe_triton(x, gu, dn, weights, ids, decode_gemv=True) for _ in range(2)]
    assert torch.equal(outs[0], outs[1])


def test_int4_gemv_rows_refuses_bad_expert_tensors():
    from deltaserve.kernels.int4_gemm.gemv import int4_gemv_rows

    _, gate_up, _, _, ids = moe_inputs(2, 4, 2, 64, 32)
    gu = int4_experts(gate_up, 32)
    with pytest.raises(ValueError, match="expert weights must be"):
        int4_gemv_rows(torch.randn(2, 64), gu.qweight[0], gu.qzeros[0], gu.scales[0], 32, ids.reshape(-1))
    with pytest.raises(ValueError, match="qweight"):
        int4_gemv_rows(torch.randn(2, 32), gu.qweight, gu.qzeros, gu.scales, 32, ids.reshape(-1))


@pytest.mark.parametrize("splits, weighted", [(1, True), (7, True), (6, False)],
                         ids=["one_split", "seven_splits", "six_splits_unweighted"])
def test_combine_kernel_sums_each_tokens_splits_and_pairs(splits, weighted):
    """decode.combine_kernel reads a token's k pair rows BS splits at a time: more splits than BS (several chunks),
    pairs of another rank's experts (id -1) skipped, weights applied or not."""
    import triton

    from deltaserve.kernels.fused_moe.decode import combine_kernel

    t, k, h = 3, 9, 200
    g = torch.Generator().manual_seed(splits)
    part = torch.randn(splits, t * k, h, generator=g)
    weights = torch.rand(t * k, generator=g)
    ids = torch.randint(0, 5, (t * k,), generator=g)
    ids[[2, 13, 26]] = -1
    out = torch.empty(t, h)
    combine_kernel[(t, triton.cdiv(h, 64))](part, weights, ids, out, splits, t * k, h, TOP_K=k, BLOCK_K=16,
                                            MUL_WEIGHT=weighted, BLOCK=64, BS=4, IDS_EARLY=splits > 1)
    scale = (weights if weighted else torch.ones(t * k)) * (ids >= 0)
    ref = (part.sum(0) * scale[:, None]).view(t, k, h).sum(1)
    torch.testing.assert_close(out, ref, atol=ATOL_FP32, rtol=0)


def test_16bit_fused_moe_matches_reference():
    x, gate_up, down, weights, ids = moe_inputs(23, 8, 3, 64, 48, seed=3)
    ref = fused_moe_experts(x, ExpertWeights(weight=gate_up), ExpertWeights(weight=down), weights, ids)
    out = fused_moe_triton(x, ExpertWeights(weight=gate_up), ExpertWeights(weight=down), weights, ids)
    assert (out - ref).abs().max().item() <= ATOL_FP32


def test_fused_moe_refuses_mismatched_experts():
    x, gate_up, down, weights, ids = moe_inputs(2, 4, 2, 64, 32)
    with pytest.raises(ValueError, match="expert shapes"):
        fused_moe_triton(x, int4_experts(gate_up, 32), int4_experts(down[:, :32], 32), weights, ids)


def test_quant_experts_forward_on_cpu_is_the_reference():
    """QuantExperts (the layer) routes to the dequantized reference on CPU: same result as the oracle."""
    t, e, k, h, inter, group = 6, 4, 2, 64, 32, 32
    x, gate_up, down, weights, ids = moe_inputs(t, e, k, h, inter, seed=9)
    layer = QuantExperts("awq", e, h, inter, group)
    gu, dn = int4_experts(gate_up, group), int4_experts(down, group)
    for proj, w in ((layer.gate_up_proj, gu), (layer.down_proj, dn)):
        proj.qweight.data, proj.qzeros.data, proj.scales.data = w.qweight, w.qzeros, w.scales.float()
    torch.testing.assert_close(layer(x, weights, ids), fused_moe_experts(x, gu, dn, weights, ids))


# ---- full size on the GPU: Qwen3.5-35B-A3B experts ----
@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 16, 64, 2048], ids=lambda t: f"t{t}")
@pytest.mark.parametrize("int4", [True, False], ids=["int4", "bf16"])
def test_fused_moe_full_size(t, int4):
    e, k, h, inter = 256, 8, 2048, 512
    x, gate_up, down, weights, ids = moe_inputs(t, e, k, h, inter, device="cuda")
    if int4:
        gu, dn = int4_experts(gate_up, 128), int4_experts(down, 128)
    else:
        gu, dn = ExpertWeights(weight=gate_up.bfloat16()), ExpertWeights(weight=down.bfloat16())
    ref = fused_moe_experts(x, gu, dn, weights, ids)  # fp32, the same (de)quantized weights
    out = fused_moe_triton(x.bfloat16(), gu, dn, weights, ids).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 2e-2, f"relative error {rel:.2e}"  # bf16 x, W, activation and per-expert rows: ~5e-3
    if int4 and t <= 16:  # the other decode paths too (the default took the per-pair GEMVs)
        for path in ({"decode_gemv": False, "triton_align": True}, {"decode_gemv": False, "triton_align": False}):
            out = fused_moe_triton(x.bfloat16(), gu, dn, weights, ids, **path).float()
            assert ((out - ref).norm() / ref.norm()).item() < 2e-2, path


@pytest.mark.gpu
@pytest.mark.parametrize("t", [4, 64], ids=lambda t: f"t{t}")  # per-pair GEMVs; Triton align + grouped GEMM
def test_int4_fused_moe_captures_in_a_cuda_graph(t):
    e, k, h, inter = 256, 8, 2048, 512
    x, gate_up, down, weights, ids = moe_inputs(t, e, k, h, inter, device="cuda")
    gu, dn = int4_experts(gate_up, 128), int4_experts(down, 128)
    assert_graph_replays_like_eager(fused_moe_int4, x.bfloat16(), gu, dn, weights, ids)


def assert_graph_replays_like_eager(moe, x, gu, dn, weights, ids) -> None:
    """Capture moe(x, gu, dn, weights, ids) in a CUDA graph, give it new inputs and new routing in place, replay:
    the output equals an eager call on those inputs."""
    moe(x, gu, dn, weights, ids)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = moe(x, gu, dn, weights, ids)
    w2, ids2 = route_topk_softmax(torch.randn(ids.shape[0], gu.dims()[0], device="cuda"), ids.shape[1])
    weights.copy_(w2)
    ids.copy_(ids2)
    x.copy_(torch.randn_like(x))
    graph.replay()
    torch.testing.assert_close(y, moe(x, gu, dn, weights, ids))


ROUTES = {"t1-e256-k8": (1, 256, 8), "t37-e8-k2": (37, 8, 2), "t5-e100-k6": (5, 100, 6), "t3-e16-k1": (3, 16, 1),
          "t2-e512-k10": (2, 512, 10), "t4-e6-k6": (4, 6, 6)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t, e, k", ROUTES.values(), ids=ROUTES.keys())
def test_triton_router_matches_softmax_topk_renormalise(t, e, k, dtype):
    from deltaserve.kernels.fused_moe import route_topk_softmax_reference
    from deltaserve.kernels.fused_moe.route_triton import route_topk_softmax_triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(e + k)
    # distinct logits (ties may come out in either order): multiples of 1/64, exact in bf16 for |logit| <= 4
    logits = torch.stack([torch.randperm(e, generator=g) - e // 2 for _ in range(t)]).float() / 64
    logits = logits.to(dtype).to(dev)
    w, ids = route_topk_softmax_triton(logits, k)
    w_ref, ids_ref = route_topk_softmax_reference(logits, k)
    assert ids.dtype == torch.int64 and w.dtype == torch.float32 and ids.shape == (t, k)
    assert torch.equal(ids.cpu(), ids_ref.cpu())  # distinct random logits: the same experts, the same order
    torch.testing.assert_close(w.cpu(), w_ref.cpu(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("t, e, k, h", [(1, 256, 8, 2048), (37, 8, 2, 64), (3, 16, 1, 1100)],
                         ids=["t1-e256-k8-h2048", "t37-e8-k2-h64", "t3-e16-k1-h1100"])
def test_triton_router_appends_the_shared_expert(t, e, k, h, dtype):
    """route_with_shared_expert: the routed pairs as before, then id E with sigmoid(x . w) rounded in x's dtype as
    the 16-bit Linear and torch.sigmoid round it (h=1100: a last partial BLOCK_H of the gate's dot)."""
    from deltaserve.kernels.fused_moe import route_with_shared_expert_reference
    from deltaserve.kernels.fused_moe.route_triton import route_topk_softmax_triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(e + k + h)
    logits = (torch.stack([torch.randperm(e, generator=g) - e // 2 for _ in range(t)]).float() / 64).to(dtype)
    x = torch.randn(t, h, generator=g).to(dtype)
    w_gate = (torch.randn(1, h, generator=g) / h ** 0.5).to(dtype)
    w, ids = route_topk_softmax_triton(logits.to(dev), k, x.to(dev), w_gate.to(dev))
    w_ref, ids_ref = route_with_shared_expert_reference(logits, k, x, w_gate)
    assert w.shape == ids.shape == (t, k + 1) and ids_ref[:, -1].eq(e).all()
    assert torch.equal(ids.cpu(), ids_ref)
    torch.testing.assert_close(w.cpu()[:, :k], w_ref[:, :k], rtol=1e-5, atol=1e-6)
    # the gate's dot runs in another order than torch's: its bf16 rounding may land one ulp (<= 0.03 for |g| < 4)
    # apart, which the sigmoid (slope <= 1/4) passes on as up to ~8e-3
    torch.testing.assert_close(w.cpu()[:, k], w_ref[:, k], rtol=1e-5, atol=1e-6 if dtype == torch.float32 else 8e-3)


def test_triton_router_takes_the_lowest_id_among_equal_logits_and_refuses_bad_shapes():
    from deltaserve.kernels.fused_moe.route_triton import route_topk_softmax_triton

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    logits = torch.tensor([[0.0, 2.0, 1.0, 2.0, 2.0, -1.0]], device=dev)
    w, ids = route_topk_softmax_triton(logits, 3)
    assert ids.cpu().tolist() == [[1, 3, 4]]
    torch.testing.assert_close(w.cpu(), torch.full((1, 3), 1 / 3))
    with pytest.raises(ValueError, match="top_k in"):
        route_topk_softmax_triton(logits, 7)
    assert [x.shape for x in route_topk_softmax_triton(logits[:0], 2)] == [(0, 2), (0, 2)]
    bad = torch.tensor([[0.0, float("nan"), 1.0, 2.0]], device=dev)  # garbage in: whatever weights, real expert ids
    assert ((route_topk_softmax_triton(bad, 2)[1] >= 0) & (route_topk_softmax_triton(bad, 2)[1] < 4)).all()


def _router_case(t, e, h, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(t, h, generator=g).to(dtype)
    w = (2 * torch.randn(e, h, generator=g) / h ** 0.5).to(dtype)  # logits ~ N(0, 4): top-k gaps well over an ulp
    w_gate = (torch.randn(1, h, generator=g) / h ** 0.5).to(dtype)
    return x, w, w_gate


FUSED_ROUTES = {"t1-e256-k8-h2048": (1, 256, 8, 2048), "t3-e16-k2-h1100": (3, 16, 2, 1100),
                "t16-e100-k6-h64": (16, 100, 6, 64), "t2-e8-k8-h96": (2, 8, 8, 96)}


@pytest.mark.parametrize("shared", [False, True], ids=["routed", "shared"])
@pytest.mark.parametrize("t, e, k, h", FUSED_ROUTES.values(), ids=FUSED_ROUTES.keys())
def test_fused_router_equals_router_linear_then_routing(t, e, k, h, shared):
    """route_hidden_triton (the router's GEMV, top-k and the shared gate in one launch) against F.linear then the
    reference routing, fp32: only the dot's order differs (h=1100, 96: a last partial H tile; e=100: a partial row
    block), and the arrival counter is back at zero after every launch (a second launch routes the same)."""
    from deltaserve.kernels.fused_moe import route_topk_softmax_reference, route_with_shared_expert_reference
    from deltaserve.kernels.fused_moe.route_triton import arrival_counters, route_hidden_triton

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    x, w, w_gate = _router_case(t, e, h, torch.float32, t + e + h)
    logits = torch.nn.functional.linear(x, w)
    if shared:
        ref = route_with_shared_expert_reference(logits, k, x, w_gate)
    else:
        ref = route_topk_softmax_reference(logits, k)
    counter = arrival_counters(dev)
    for _ in range(2):
        got = route_hidden_triton(x.to(dev), w.to(dev), k, counter, w_gate.to(dev) if shared else None)
        assert torch.equal(got[1].cpu(), ref[1]) and counter.eq(0).all()
        torch.testing.assert_close(got[0].cpu(), ref[0], rtol=1e-5, atol=1e-6)


def test_fused_router_refuses_what_it_does_not_take():
    from deltaserve.kernels.fused_moe.route_triton import FUSED_MAX_T, route_hidden_triton

    counter = torch.zeros(FUSED_MAX_T, dtype=torch.int32)
    x, w, _ = _router_case(FUSED_MAX_T + 1, 8, 32, torch.float32, 0)
    with pytest.raises(ValueError, match=f"T <= {FUSED_MAX_T} tokens"):
        route_hidden_triton(x, w, 2, counter)
    with pytest.raises(ValueError, match="router of x's dtype"):
        route_hidden_triton(x[:2], w.half(), 2, counter)
    assert [y.shape for y in route_hidden_triton(x[:0], w, 2, counter)] == [(0, 2), (0, 2)]


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 5, 16], ids=["t1", "t5", "t16"])
def test_fused_router_bf16_in_a_cuda_graph(t):
    """bf16 at 35B-A3B sizes (E=256, k=8, H=2048) through route_hidden, captured and replayed in a CUDA graph with new
    inputs: the experts picked carry the reference's top-k logits (one bf16 ulp of the dot's order apart at most),
    the weights and the shared gate within bf16 rounding."""
    from deltaserve.kernels.fused_moe import route_hidden, route_with_shared_expert_reference

    x, w, w_gate = (a.cuda() for a in _router_case(t, 256, 2048, torch.bfloat16, t))
    route_hidden(x, w, 8, w_gate)  # eager first: the arrival counters exist before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        got = route_hidden(x, w, 8, w_gate)
    for seed in (100, 101):
        x.copy_(_router_case(t, 256, 2048, torch.bfloat16, seed)[0].cuda())
        graph.replay()
        logits = torch.nn.functional.linear(x, w)
        ref_w, ref_ids = route_with_shared_expert_reference(logits, 8, x, w_gate)
        picked = torch.gather(logits.float(), 1, got[1][:, :8]).sort(1, descending=True).values
        best = torch.gather(logits.float(), 1, ref_ids[:, :8]).sort(1, descending=True).values
        torch.testing.assert_close(picked, best, rtol=0, atol=0.07)  # bf16 ulp at |logit| < 8: 1/32
        assert got[1][:, 8].eq(256).all()
        torch.testing.assert_close(got[0].sort(1).values, ref_w.sort(1).values, rtol=0, atol=2e-2)
