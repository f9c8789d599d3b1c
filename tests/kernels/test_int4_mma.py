"""The fragment int4 layout (layers/quant.awq_to_mma) and what reads it: the tensor-core GEMV (mma.py, CUDA only: its
MMAs are inline PTX, which the interpreter cannot run; longer inputs dequantize for cuBLAS, test_int4_dequant.py).
On CPU a torch emulation of mma.m16n8k16's lanes checks the contract the GEMV's asm relies on: which lane and register
hold which weight, and which activation pairs meet them. Also QuantLinear.to_mma_layout: which Linears move."""
import pytest
import torch

from deltaserve.kernels import int4_gemm as int4_dispatch
from deltaserve.kernels.int4_gemm import int4_gemm_reference
from deltaserve.layers import linear
from deltaserve.layers.linear import QuantLinear, use_int4_mma_layout
from deltaserve.layers.quant import AWQ_ORDER, awq_to_mma, mma_to_awq, to_awq, unpack_int4
from graph_helpers import replay_after_new_input



@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)


def assert_close(name, ref, out, atol):
    assert ref.shape == out.shape, f"{name}: shape {tuple(out.shape)} != reference {tuple(ref.shape)}"
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= atol, f"{name}: error {err:.2e} beyond {atol:.0e}"


def fragment_packed(n: int, k: int, group: int, seed: int = 0, device: str = "cpu"):
    """-> (AWQ tensors, the same with qweight in the fragment layout) of a random RTN-quantized [n, k] weight."""
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / k**0.5
    awq = {name: t.to(device) for name, t in to_awq(w, group).items()}
    return awq, dict(awq, qweight=awq_to_mma(awq["qweight"]))


def emulate_mma_gemv(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x [T <= 8, K] times the int4 values of a fragment-layout qweight, computed as the GEMV's warps do: per 16-column
    tile and k16 step, lane 4g + t's int32 gives A[g | g + 8][2t, 2t + 1 | 2t + 8, 2t + 9] (register a_j = nibbles j
    and j + 4) and its B registers the activation pairs 16h + 4t + c of the span, token g (mma.py)."""
    t_rows, k = x.shape
    nt, kk = packed.shape[:2]
    out = torch.zeros(t_rows, nt * 16, dtype=torch.float64)
    words = packed.to(torch.int64) & 0xFFFFFFFF
    for tile in range(nt):
        for span in range(kk):
            for c in range(4):
                a, b = torch.zeros(16, 16, dtype=torch.float64), torch.zeros(16, 8, dtype=torch.float64)
                for lane in range(32):
                    g, t = divmod(lane, 4)
                    word = int(words[tile, span, lane, c])
                    nib = [((word >> (4 * j)) & 0xF, (word >> (16 + 4 * j)) & 0xF) for j in range(4)]
                    for j, (row, col) in enumerate([(g, 2 * t), (g + 8, 2 * t), (g, 2 * t + 8), (g + 8, 2 * t + 8)]):
                        a[row, col], a[row, col + 1] = nib[j]
                    if g < t_rows:
                        for h, col in ((0, 2 * t), (1, 2 * t + 8)):
                            pair = 64 * span + 2 * (16 * h + 4 * t + c)
                            b[col, g], b[col + 1, g] = x[g, pair], x[g, pair + 1]
                out[:, 16 * tile: 16 * tile + 16] += (a @ b)[:, :t_rows].T
    return out


def test_fragment_layout_round_trips_and_meets_the_mma_lanes():
    awq, fr = fragment_packed(48, 128, 64)
    assert fr["qweight"].shape == (3, 2, 32, 4) and fr["qweight"].dtype == torch.int32
    assert torch.equal(mma_to_awq(fr["qweight"]), awq["qweight"])
    q = unpack_int4(awq["qweight"], AWQ_ORDER).double()  # [K, N]
    x = torch.randn(5, 128, dtype=torch.float64)
    assert_close("lanes", x @ q, emulate_mma_gemv(x, fr["qweight"]), 1e-9)
    with pytest.raises(ValueError, match="multiples of 16"):
        awq_to_mma(to_awq(torch.randn(40, 128), 64)["qweight"])


CASES = {"g128-moves": (128, 48, None, True), "g256-moves": (256, 32, None, True), "g64-stays": (64, 48, None, False),
         "n40-stays": (128, 40, None, False), "experts-stay": (128, 48, 2, False)}


@pytest.mark.parametrize("group, n, experts, moves", CASES.values(), ids=CASES.keys())
def test_quant_linear_moves_to_the_fragment_layout_what_the_gemv_reads(group, n, experts, moves, monkeypatch):
    monkeypatch.setattr(int4_dispatch, "USE_MMA", True)  # the default (DELTASERVE_INT4_MMA unset)
    monkeypatch.setattr(linear, "MMA_CHUNK_COLS", 16)  # several column chunks, as a big Linear in many
    lin = QuantLinear("awq", 256, n, group, experts)
    gen = torch.Generator().manual_seed(n)
    ws = [to_awq(torch.randn(n, 256, generator=gen) / 16, group) for _ in range(experts or 1)]
    for name in ws[0]:
        tensor = torch.stack([w[name] for w in ws]) if experts else ws[0][name]
        getattr(lin, name).data = tensor.float() if name == "scales" else tensor
    before = lin.dequant(torch.float32)
    lin.to_kernel_layout()
    use_int4_mma_layout(lin)
    assert lin.mma == moves and lin.kpack == (not moves)
    if moves:
        assert lin.qweight.shape == (n // 16, 256 // 64, 32, 4)
    assert torch.equal(lin.dequant(torch.float32), before)
    if experts is None:  # the CPU forward dequantizes the fragment-layout weight
        x = torch.randn(3, 256)
        assert_close("forward", torch.nn.functional.linear(x, before), lin(x), 1e-5)
    assert not lin.to_mma_layout()  # a second call changes nothing


def test_mma_layout_switch_and_gemv_refusals(monkeypatch):
    monkeypatch.setattr(int4_dispatch, "USE_MMA", False)  # DELTASERVE_INT4_MMA=0
    assert not int4_dispatch.mma_ok(5120, 34816, 128)
    monkeypatch.setattr(int4_dispatch, "USE_MMA", True)
    _, fr = fragment_packed(48, 128, 128)
    from deltaserve.kernels.int4_gemm.mma import check_mma_tensors, mma_gemv

    with pytest.raises(ValueError, match="fp16/bf16 on CUDA"):
        mma_gemv(torch.randn(1, 128), *fr.values(), 128)
    with pytest.raises(ValueError, match="multiple of 128"):
        check_mma_tensors(torch.randn(1, 128), *fr.values(), 64)
    with pytest.raises(ValueError, match="qweight"):
        check_mma_tensors(torch.randn(1, 256), *fr.values(), 128)
    with pytest.raises(ValueError, match="fragment-layout int4 weight runs only"):
        int4_dispatch.int4_gemm(torch.randn(1, 128), *fr.values(), 128, mma=True)
    assert int4_dispatch.mma_ok(5120, 34816, 128) and int4_dispatch.mma_ok(4096, 32, 256)
    assert not int4_dispatch.mma_ok(4096, 32, 64) and not int4_dispatch.mma_ok(4096, 40, 128)


# ---- the GEMV on the GPU (bf16 / fp16, group 128 as the published AWQ checkpoints) ----
GPU_SHAPES = {"27b-gate-up-5120x34816": (5120, 34816), "27b-down-17408x5120": (17408, 5120),
              "35b-out-proj-4096x2048": (4096, 2048), "gdn-ab-4096x32": (4096, 32), "n48-k256": (256, 48)}


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 2, 7, 8, 9, 16, 40, 127, 300], ids=lambda t: f"t{t}")
@pytest.mark.parametrize("k, n", GPU_SHAPES.values(), ids=GPU_SHAPES.keys())
def test_mma_gemv_full_size(k, n, t):
    """Token blocks of 8 (t 9 to 127), a partial warp tile set (n 48, 32), split K and none (n48-k256: two units);
    t 300 dequantizes the same layout for cuBLAS."""
    from deltaserve.kernels.int4_gemm.mma import MMA_MAX_T

    awq, fr = fragment_packed(n, k, 128, seed=k + n, device="cuda")
    x = torch.randn(t, k, device="cuda").bfloat16()
    ref = int4_gemm_reference(x.float(), awq["qweight"], awq["qzeros"], awq["scales"], 128)
    out = int4_dispatch.int4_gemm(x, *fr.values(), 128, mma=True).float()
    rel = ((out - ref).norm() / ref.norm()).item()
    assert rel < 1e-2, f"relative error {rel:.2e}"  # bf16 rounding of y (and of W for cuBLAS, t 300): ~3e-3
    if t <= MMA_MAX_T:  # the GEMV: exact products (q - z and x in 16 bits), fp32 sums, one rounding of y
        exact = ref.to(torch.bfloat16).float()
        near = (out - exact).abs() <= exact.abs() * 2**-7 + 1e-6
        assert near.float().mean() > 0.99, f"{(~near).sum().item()} of {near.numel()} beyond one bf16 step"


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 5, 16], ids=lambda t: f"t{t}")
def test_mma_gemv_fp16_group256_and_unaligned_activations(t):
    """fp16 (1024 + q, the f16 MMA), groups of 256 (two units a group), and x 4 bytes off 16-byte alignment (the GEMV
    copies it: Triton would lay 4-byte loads out another way than one tensor row a thread)."""
    awq, fr = fragment_packed(2048, 4096, 256, device="cuda")
    flat = torch.randn(t * 4096 + 2, device="cuda").half()
    x = flat[2:].view(t, 4096)
    ref = int4_gemm_reference(x.float(), awq["qweight"], awq["qzeros"], awq["scales"], 256)
    for xs in (x, x.bfloat16()):
        out = int4_dispatch.int4_gemm(xs, *fr.values(), 256, mma=True).float()
        rel = ((out - ref).norm() / ref.norm()).item()
        assert rel < 1e-2, f"{xs.dtype}: relative error {rel:.2e}"


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 8], ids=lambda t: f"t{t}")
def test_mma_gemv_captures_in_a_cuda_graph_bit_for_bit(t):
    from deltaserve.kernels.int4_gemm.mma import mma_gemv

    _, fr = fragment_packed(4096, 4096, 128, device="cuda")
    x = torch.randn(t, 4096, device="cuda").bfloat16()
    assert torch.equal(*replay_after_new_input(lambda v: mma_gemv(v, *fr.values(), 128), x))


@pytest.mark.gpu
def test_engine_on_the_fragment_layout_agrees_with_the_k_packed_one(monkeypatch):
    """Qwen3.5-27B shapes cut to 4 layers, mixed AWQ (group 128): the decode steps (CUDA graphs) and the prompts (the
    GEMV: 3 x 60 tokens) read the fragment layout, and the prompt logprobs stay within bf16 noise of the K-packed run
    (H200, the prompts through the fragment GEMM of an earlier tree: max 0.033, mean 0.011 nats over 3 x 59
    positions)."""
    from deltaserve import LLM, SamplingParams
    from deltaserve.bench import preset_config

    prompts = [{"prompt_token_ids": list(range(100 + 37 * i, 160 + 37 * i))} for i in range(3)]
    params = SamplingParams(max_tokens=8, temperature=0, prompt_logprobs=0, ignore_eos=True)
    runs = {}
    for on in (False, True):
        monkeypatch.setattr(int4_dispatch, "USE_MMA", on)
        llm = LLM.from_config(preset_config("qwen3.5-27b", 4), device="cuda", quantization="awq", max_num_seqs=4,
                              max_model_len=256, num_kv_blocks=64)
        moved = sum(isinstance(m, QuantLinear) and m.mma for m in llm.model.modules())
        assert (moved > 0) == on
        runs[on] = llm.generate(prompts, params, use_tqdm=False)
        del llm
        torch.cuda.empty_cache()
    for prompt, a, b in zip(prompts, runs[False], runs[True]):
        ids = prompt["prompt_token_ids"]
        lp_a = torch.tensor([a.prompt_logprobs[i][ids[i]] for i in range(1, len(ids))])
        lp_b = torch.tensor([b.prompt_logprobs[i][ids[i]] for i in range(1, len(ids))])
        diff = (lp_a - lp_b).abs()
        print(f"prompt logprobs: max |diff| {diff.max():.4f}, mean {diff.mean():.5f}; tokens "
              f"{a.outputs[0].token_ids} / {b.outputs[0].token_ids}")
        assert diff.max() < 0.1 and diff.mean() < 0.03
