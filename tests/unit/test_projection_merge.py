"""merge_projection_runs: each run of same-format pieces of a ProjectionGroup becomes one Linear.

The oracle is the group before merging: the merged group must give the same output, column for column (pieces get
different random weights and sizes, so a wrong order or a wrong concatenation axis changes it), and a merged int4
weight must dequantize to exactly the pieces' weights stacked in order. The engine-level tests build the same random
model twice, one with the merge switched off, and compare what they generate."""
import math

import pytest
import torch

import deltaserve.llm
from deltaserve import LLM, SamplingParams
from deltaserve.config import ModelConfig
from deltaserve.layers.fp8 import Fp8Linear, quantize_blocks
from deltaserve.layers.linear import Linear, ProjectionGroup, QuantLinear, merge_projection_runs
from deltaserve.layers.quant import to_awq, to_ct
from deltaserve.tiny import tiny_config

IN = 128
TOL = dict(rtol=1e-6, atol=1e-6)  # fp32: the same products, the GEMM may block a wider N differently


def _weight(out_f: int, seed: int) -> torch.Tensor:
    return torch.randn(out_f, IN, generator=torch.Generator().manual_seed(seed)) / math.sqrt(IN)


def dense(out_f: int, seed: int) -> Linear:
    """A 16-bit piece (fp32 here), no bias like the pieces apply_formats builds."""
    linear = Linear(IN, out_f, bias=False)
    linear.weight.data.copy_(_weight(out_f, seed))
    return linear


def quant(out_f: int, seed: int, group: int = 32, fmt: str = "awq", kpack: bool = False) -> QuantLinear:
    """An int4 piece: a random weight RTN-quantized (layers/quant.to_awq / to_ct), scales fp32 as loaded;
    kpack: K-packed for the kernels (QuantLinear.to_kernel_layout; CPU then reads it through the reference)."""
    linear = QuantLinear(fmt, IN, out_f, group)
    w = _weight(out_f, seed)
    tensors = to_awq(w, group) if fmt == "awq" else to_ct(w, group, zero_point=fmt == "ct_zp")
    for kind, t in tensors.items():
        getattr(linear, kind).data.copy_(t)
    if kpack:
        linear.to_kernel_layout()
        assert linear.kpack
    return linear


def fp8(out_f: int, seed: int) -> Fp8Linear:
    linear = Fp8Linear(IN, out_f, (128, 128))
    linear.weight.data, linear.weight_scale_inv.data = quantize_blocks(_weight(out_f, seed), (128, 128))
    return linear


# id -> (pieces as (kind, out_features, extra kwargs), the children's types after merging, in order)
CASES = {
    "dense_awq_dense": ([("d", 16, {}), ("q", 24, {}), ("d", 8, {})], [Linear, QuantLinear, Linear]),
    "all_dense": ([("d", 16, {}), ("d", 40, {}), ("d", 4, {}), ("d", 4, {})], [Linear]),
    "awq_same_group": ([("q", 64, {}), ("q", 24, {})], [QuantLinear]),
    "awq_other_group": ([("q", 64, {}), ("q", 24, {"group": 64})], [QuantLinear, QuantLinear]),
    "gdn_awq_full": ([("q", 48, {}), ("q", 32, {}), ("d", 4, {}), ("d", 4, {})], [QuantLinear, Linear]),
    "awq_kpack": ([("q", 64, {"group": 64, "kpack": True}), ("q", 16, {"group": 64, "kpack": True})],
                  [QuantLinear]),
    "awq_kpack_and_not": ([("q", 64, {"group": 64, "kpack": True}), ("q", 16, {"group": 64})],
                          [QuantLinear, QuantLinear]),
    "ct": ([("q", 24, {"fmt": "ct"}), ("q", 12, {"fmt": "ct"})], [QuantLinear]),
    "ct_zp": ([("q", 24, {"fmt": "ct_zp"}), ("q", 16, {"fmt": "ct_zp"})], [QuantLinear]),
    "ct_and_awq": ([("q", 24, {"fmt": "ct"}), ("q", 16, {})], [QuantLinear, QuantLinear]),
    "fp8_stay_apart": ([("f", 32, {}), ("f", 16, {}), ("d", 8, {}), ("d", 8, {})], [Fp8Linear, Fp8Linear, Linear]),
}
MAKERS = {"d": dense, "q": quant, "f": fp8}


def build(pieces) -> ProjectionGroup:
    return ProjectionGroup([(f"p{i}", MAKERS[kind](out_f, seed=i, **kw)) for i, (kind, out_f, kw) in
                            enumerate(pieces)])


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_merged_group_gives_the_same_output(case):
    pieces, want = CASES[case]
    group = build(pieces)
    x = torch.randn(5, IN, generator=torch.Generator().manual_seed(99))
    ref = group(x)
    merge_projection_runs(group)
    assert [type(m) for m in group.children()] == want
    out = group(x)
    assert out.shape == ref.shape == (5, sum(out_f for _, out_f, _ in pieces))
    torch.testing.assert_close(out, ref, **TOL)


def test_merged_children_are_named_like_their_pieces_in_order():
    group = build(CASES["gdn_awq_full"][0])
    merge_projection_runs(group)
    assert [name for name, _ in group.named_children()] == ["p0+p1", "p2+p3"]


@pytest.mark.parametrize("kw", [{}, {"group": 64, "kpack": True}, {"fmt": "ct_zp"}], ids=["awq", "kpack", "ct_zp"])
def test_merged_int4_weight_is_the_pieces_stacked_exactly(kw):
    """Bit-exact: the merged weight dequantizes to the pieces' weights one after the other (a wrong axis or order
    of the packed tensors would not)."""
    a, b = quant(64, 0, **kw), quant(16, 1, **kw)
    want = torch.cat([a.dequant(torch.float32), b.dequant(torch.float32)])
    group = ProjectionGroup([("a", a), ("b", b)])
    merge_projection_runs(group)
    (merged,) = group.children()
    assert merged.out_features == 80 and merged.kpack == a.kpack and merged.fmt == a.fmt
    assert torch.equal(merged.dequant(torch.float32), want)


def test_scales_of_different_dtypes_meet_exactly():
    """use_int4_kernels narrows each piece's scales on its own (fp16 here, fp32 there): the merged scales hold
    both exactly."""
    a, b = quant(64, 0), quant(16, 1)
    b.scales.data = b.scales.data * (1 + 2**-20)  # no longer fp16- or bf16-exact: stays fp32
    a.scales.data = a.scales.data.half()  # RTN scales are fp16 values
    want = torch.cat([a.dequant(torch.float32), b.dequant(torch.float32)])
    group = ProjectionGroup([("a", a), ("b", b)])
    merge_projection_runs(group)
    (merged,) = group.children()
    assert merged.scales.dtype == torch.float32
    assert torch.equal(merged.dequant(torch.float32), want)


def test_merge_is_idempotent():
    group = build(CASES["gdn_awq_full"][0])
    merge_projection_runs(group)
    before = {n: p.clone() for n, p in group.named_parameters()}
    merge_projection_runs(group)
    after = dict(group.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


# ---- a whole random model: merged groups, same generation ----

GROUP = 32


def _llm(moe: bool, quantization: str) -> LLM:
    cfg = ModelConfig.from_dict(tiny_config(256, moe, 4))  # GDN, GDN, GDN, full attention
    return LLM.from_config(cfg, device="cpu", dtype="float32", quantization=quantization, group_size=GROUP,
                           max_num_seqs=4, num_kv_blocks=32, max_model_len=128, seed=3)


def _generate(llm: LLM):
    """-> per prompt (prompt logprobs, 8 greedy tokens); a batch of two prompts of different lengths."""
    outs = llm.generate([{"prompt_token_ids": list(range(3, 3 + n))} for n in (37, 11)],
                        SamplingParams(max_tokens=8, temperature=0, prompt_logprobs=0, ignore_eos=True),
                        use_tqdm=False)
    return [([lp for step in o.prompt_logprobs[1:] for lp in step.values()], o.outputs[0].token_ids) for o in outs]


def _children(llm: LLM) -> dict[str, list[tuple[str, type]]]:
    """Every ProjectionGroup of the model -> its children (name, type), in order."""
    return {n: [(c, type(m)) for c, m in g.named_children()] for n, g in llm.model.named_modules()
            if isinstance(g, ProjectionGroup)}


def _mlp(moe: bool, layer: int) -> str:
    return f"layers.{layer}.mlp.shared_expert.gate_up_proj" if moe else f"layers.{layer}.mlp.gate_up_proj"


# quantization -> the groups (per layer of the tiny model) and their children after merging
WANT = {
    # 16-bit q|k|v and in_proj stay one fused Linear (no group); gate|up, both int4, become one QuantLinear
    "awq": lambda moe: {_mlp(moe, i): [("gate_proj+up_proj", QuantLinear)] for i in range(4)},
    # int4 in_proj_qkv|z, 16-bit in_proj_b|a: 2 GEMMs, not 4; int4 q|k|v and gate|up: one QuantLinear each
    "awq-full": lambda moe: {
        **{f"layers.{i}.linear_attn.in_proj": [("in_proj_qkv+in_proj_z", QuantLinear),
                                               ("in_proj_b+in_proj_a", Linear)] for i in range(3)},
        "layers.3.self_attn.qkv_proj": [("q_proj+k_proj+v_proj", QuantLinear)],
        **{_mlp(moe, i): [("gate_proj+up_proj", QuantLinear)] for i in range(4)}},
}


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("quantization", list(WANT), ids=list(WANT))
def test_random_model_merges_its_groups_and_generates_the_same(quantization, moe, monkeypatch):
    # the shared expert's merged gate|up stays in its group here (stacking it with the experts: its own test file)
    monkeypatch.setattr(deltaserve.llm, "fuse_shared_experts", lambda model: None)
    merged = _llm(moe, quantization)
    assert _children(merged) == WANT[quantization](moe)
    with monkeypatch.context() as m:  # the reference: the same seed and weights, the groups left as built
        m.setattr(deltaserve.llm, "merge_projection_runs", lambda model: None)
        plain = _llm(moe, quantization)
    pieces = {n: [p for name, _ in c for p in name.split("+")] for n, c in WANT[quantization](moe).items()}
    assert {n: [name for name, _ in c] for n, c in _children(plain).items()} == pieces  # one child per piece
    for (lp, toks), (lp_ref, toks_ref) in zip(_generate(merged), _generate(plain)):
        assert max(abs(a - b) for a, b in zip(lp, lp_ref)) < 1e-5
        assert toks == toks_ref
