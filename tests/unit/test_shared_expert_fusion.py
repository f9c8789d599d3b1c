"""fuse_shared_experts: each MoE layer's shared expert stacked after its routed experts as expert E and routed as one
more pair, weighted by sigmoid(shared_expert_gate(x)) (layers/moe.py).

The oracle is the same random model with the fusion switched off (same seed, same weights): prompt logprobs agree to
fp32 rounding and the greedy tokens are the same, 16-bit and int4 (AWQ mixed and full). Layers whose shared expert
the experts cannot take (another format or size, expert parallel) keep it apart."""
import dataclasses

import pytest
import torch
from torch import nn

import deltaserve.llm
from deltaserve import LLM
from deltaserve.config import ModelConfig
from deltaserve.layers.linear import QuantExperts
from deltaserve.layers.moe import Experts, SparseMoE
from deltaserve.tiny import tiny_config
from test_projection_merge import _generate  # noqa: E402  (prompt logprobs and greedy tokens of two prompts)


def _cfg(**overrides) -> ModelConfig:
    return dataclasses.replace(ModelConfig.from_dict(tiny_config(256, True, 4)), **overrides)  # 8 experts, top-2


def _llm(quantization: str | None, cfg: ModelConfig | None = None) -> LLM:
    return LLM.from_config(cfg or _cfg(), device="cpu", dtype="float32", quantization=quantization, group_size=32,
                           max_num_seqs=4, num_kv_blocks=32, max_model_len=128, seed=5)


def _moes(llm: LLM) -> list[SparseMoE]:
    return [m for m in llm.model.modules() if isinstance(m, SparseMoE)]


@pytest.mark.parametrize("quantization", [None, "awq", "awq-full"], ids=["16bit", "awq", "awq-full"])
def test_fused_model_generates_as_the_unfused(quantization, monkeypatch):
    fused = _llm(quantization)
    for moe in _moes(fused):
        assert moe.shared_expert is None, "the shared expert was not stacked"
        stacks = (moe.experts.gate_up_proj, moe.experts.down_proj)
        if quantization:
            assert isinstance(moe.experts, QuantExperts)
            stacks = tuple(lin.scales for lin in stacks)
        assert [s.shape[0] for s in stacks] == [9, 9]  # 8 routed + the shared one
    with monkeypatch.context() as m:
        m.setattr(deltaserve.llm, "fuse_shared_experts", lambda model: None)
        plain = _llm(quantization)
    assert all(moe.shared_expert is not None for moe in _moes(plain))
    for (lp, toks), (lp_ref, toks_ref) in zip(_generate(fused), _generate(plain)):
        assert max(abs(a - b) for a, b in zip(lp, lp_ref)) < 1e-5
        assert toks == toks_ref


def test_fp8_checkpoint_stacks_its_shared_expert_and_generates_as_unfused(tmp_path, monkeypatch):
    """A block-FP8 MoE checkpoint (quantize --method fp8): the shared expert's gate and up Fp8Linears join the
    experts' gate and up stacks (kept apart: I=64 is under one 128-row scale block), its down the down stack."""
    from deltaserve.layers.fp8 import Fp8Experts
    from deltaserve.quantize import quantize_checkpoint
    from deltaserve.tiny import make_tiny

    q = quantize_checkpoint(make_tiny(str(tmp_path / "src"), moe=True), str(tmp_path / "q"), method="fp8",
                            progress=False)

    def llm() -> LLM:
        return LLM(model=q, device="cpu", dtype="float32", max_num_seqs=4, num_kv_blocks=32, max_model_len=128)

    fused = llm()
    for moe in _moes(fused):
        assert isinstance(moe.experts, Fp8Experts) and moe.shared_expert is None
        stacks = (moe.experts.gate_proj, moe.experts.up_proj, moe.experts.down_proj)
        assert [s.weight.shape[0] for s in stacks] == [s.weight_scale_inv.shape[0] for s in stacks] == [9, 9, 9]
    with monkeypatch.context() as m:
        m.setattr(deltaserve.llm, "fuse_shared_experts", lambda model: None)
        plain = llm()
    assert all(moe.shared_expert is not None for moe in _moes(plain))
    for (lp, toks), (lp_ref, toks_ref) in zip(_generate(fused), _generate(plain)):
        assert max(abs(a - b) for a, b in zip(lp, lp_ref)) < 1e-5
        assert toks == toks_ref


def test_fp8_experts_take_a_stacked_gate_up_and_refuse_other_blocks():
    """After to_kernel_layout (I a whole number of scale blocks: gate and up one stack) the shared expert joins as
    [gate; up]; a shared expert quantized with other blocks, or 16-bit, stays apart and changes nothing."""
    from deltaserve.layers.fp8 import Fp8Experts, Fp8Linear
    from deltaserve.layers.linear import ProjectionGroup

    def fp8(n, k, block=(128, 128), e=None):
        lin = Fp8Linear(k, n, block, e)
        lin.weight.data = torch.randn(lin.weight.shape).to(torch.float8_e4m3fn)
        lin.weight_scale_inv.data = torch.rand(lin.weight_scale_inv.shape)
        return lin

    experts = Fp8Experts(4, 256, 128, (128, 128))  # H=256, I=128
    for name in ("gate_proj", "up_proj", "down_proj"):
        lin = getattr(experts, name)
        setattr(experts, name, fp8(lin.out_features, lin.in_features, e=4))
    experts.to_kernel_layout()
    assert experts.gate_up is not None
    before = experts.gate_up.weight.clone()
    other = ProjectionGroup([("gate_proj", fp8(128, 256, (64, 128))), ("up_proj", fp8(128, 256, (64, 128)))])
    assert not experts.append_expert(other, fp8(256, 128))
    assert not experts.append_expert(nn.Linear(256, 256, bias=False), fp8(256, 128))
    assert experts.gate_up.weight.shape[0] == experts.down_proj.weight.shape[0] == 4
    gate, up, down = fp8(128, 256), fp8(128, 256), fp8(256, 128)
    assert experts.append_expert(ProjectionGroup([("gate_proj", gate), ("up_proj", up)]), down)
    g_u, dn = experts.dense(torch.float32)
    assert g_u.shape == (5, 256, 256) and dn.shape == (5, 256, 128)
    torch.testing.assert_close(g_u[4], torch.cat([gate.dequant(torch.float32), up.dequant(torch.float32)]))
    torch.testing.assert_close(dn[4], down.dequant(torch.float32))
    assert torch.equal(experts.gate_up.weight[:4].view(torch.uint8), before.view(torch.uint8))


def test_a_shared_expert_of_another_size_stays_apart():
    llm = _llm("awq", _cfg(shared_expert_intermediate_size=32))  # the experts' intermediate size is 64
    assert all(moe.shared_expert is not None for moe in _moes(llm))
    assert all(len(toks) == 8 for _, toks in _generate(llm))


def test_no_fusion_across_formats_or_under_expert_parallelism():
    cfg = _cfg()
    moe = SparseMoE(cfg)
    moe.experts = QuantExperts("awq", cfg.num_experts, cfg.hidden_size, cfg.moe_intermediate_size, 32)
    assert not moe.fuse_shared_expert() and moe.shared_expert is not None  # int4 experts, 16-bit shared expert
    assert moe.experts.gate_up_proj.qweight.shape[0] == cfg.num_experts  # untouched
    half = SparseMoE(cfg, experts=(0, cfg.num_experts // 2))  # expert parallel: this rank holds 4 of 8
    assert not half.fuse_shared_expert() and isinstance(half.experts, Experts)
    whole = SparseMoE(cfg)
    assert whole.fuse_shared_expert() and whole.shared_expert is None
    assert whole.experts.gate_up_proj.shape == (cfg.num_experts + 1, 2 * cfg.moe_intermediate_size, cfg.hidden_size)
    assert isinstance(whole.shared_expert_gate, nn.Linear)  # kept: the router computes the gate from it
    x = torch.randn(3, cfg.hidden_size)
    assert whole(x).shape == x.shape


@pytest.mark.gpu
@pytest.mark.parametrize("t", [1, 5, 64])
def test_fused_block_is_as_accurate_as_the_unfused_on_the_gpu(t, monkeypatch):
    """35B-A3B shapes (256 experts top-8, H=2048, I=512), mixed AWQ int4, bf16 on the GPU: the fused block's error
    against the fp32 reference (the unfused block's weights dequantized, fp32 throughout) is no larger than the
    unfused bf16 block's. Fusing also drops two bf16 roundings (the shared expert's output and the gated add): the
    shared expert's share is summed in fp32 with the routed ones."""
    import copy

    from deltaserve.bench import preset_config

    cfg = preset_config("qwen3.5-35b-a3b", 1)

    def moe_of(fuse: bool) -> SparseMoE:
        with monkeypatch.context() as m:
            if not fuse:
                m.setattr(deltaserve.llm, "fuse_shared_experts", lambda model: None)
            llm = LLM.from_config(cfg, device="cuda", dtype="bfloat16", quantization="awq", max_num_seqs=4,
                                  num_kv_blocks=16, max_model_len=64, seed=11, enforce_eager=True)
        return llm.model.layers[0].mlp

    fused, plain = moe_of(True), moe_of(False)
    assert fused.shared_expert is None and plain.shared_expert is not None
    x = torch.randn(t, cfg.hidden_size, device="cuda", generator=torch.Generator("cuda").manual_seed(t)).bfloat16()
    with torch.no_grad():
        ref = copy.deepcopy(plain).float()(x.float())  # int4 with an fp32 x: every weight dequantized, fp32 GEMMs
        err_fused = ((fused(x).float() - ref).norm() / ref.norm()).item()
        err_plain = ((plain(x).float() - ref).norm() / ref.norm()).item()
    assert err_fused <= 1.05 * err_plain + 1e-4, f"fused {err_fused:.3e} against unfused {err_plain:.3e}"
