"""Tensor parallelism over quantized checkpoints on CPU (gloo, float32): AWQ int4, compressed-tensors int4 and block
FP8, dense and MoE, mixed with 16-bit pieces.

Each rank reads its rows of every int4 tensor in the tensor's own units (8 packed channels, quantization groups) and,
for FP8, the scale of the checkpoint block each of its finer blocks lies in. The oracles: a rank's dequantized shard
equals the full dequantized weight cut by hand (exact), and TP=2 equals TP=1 (prompt logprobs within 1e-4, the same
tokens: TP only reorders fp32 sums). A TP size that splits a packed int32 or a group fails up front in one sentence.
"""
from __future__ import annotations

import dataclasses
import multiprocessing
import time

import pytest
import torch
from quant_helpers import GROUP, write_ct
from test_tensor_parallel import assert_same_outputs, load_shard, run_prompts

from deltaserve import LLM, SamplingParams
from deltaserve.config import ModelConfig, QuantConfig
from deltaserve.kernels.fp8_gemm import dequant_blocks
from deltaserve.layers.fp8 import Fp8Experts, Fp8Linear, quantize_blocks, scale_ranges, shard_block
from deltaserve.layers.linear import Linear, ProjectionGroup, QuantExperts, QuantLinear
from deltaserve.layers.quant import FORMATS
from deltaserve.models.formats import AWQ_MIXED_16BIT, awq_formats, tp_problems
from deltaserve.models.weights import read_formats
from deltaserve.quantize import quantize_checkpoint
from deltaserve.tiny import make_tiny

CPU = torch.device("cpu")
MIXED = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "layers.0."]  # 16-bit q/k/v and layer 0
CASES = {  # id -> (tiny source, how the quantized checkpoint is written from it)
    "awq-dense-mixed": ("dense", lambda src, dst: quantize_checkpoint(src, dst, group_size=GROUP, not_convert=MIXED,
                                                                    progress=False)),
    "awq-moe-mixed": ("moe", lambda src, dst: quantize_checkpoint(
        src, dst, group_size=GROUP, not_convert=MIXED + ["shared_expert.up_proj"], progress=False)),
    "ct-dense": ("dense", lambda src, dst: write_ct(src, dst, zero_point=False)),
    "ct-moe-zero-point": ("moe", lambda src, dst: write_ct(src, dst, zero_point=True)),
    # one KV head: both ranks read all of int4 k_proj / v_proj (replicated), half of q_proj
    "ct-kv1-replicated": ("kv1", lambda src, dst: write_ct(src, dst, zero_point=True)),
    "fp8-dense-mixed": ("dense", lambda src, dst: quantize_checkpoint(src, dst, method="fp8",
                                                                    not_convert=["self_attn.k_proj"], progress=False)),
    "fp8-moe": ("moe", lambda src, dst: quantize_checkpoint(src, dst, method="fp8", progress=False)),
}


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    root = tmp_path_factory.mktemp("tpq")
    sources = {"dense": make_tiny(str(root / "dense")), "moe": make_tiny(str(root / "moe"), moe=True),
               "kv1": make_tiny(str(root / "kv1"), text_overrides={"num_key_value_heads": 1})}
    return {case: write(sources[src], str(root / case)) for case, (src, write) in CASES.items()}


# ---------------------------------------------------------------- pure arithmetic

def test_int4_cuts_in_tensor_units():
    """A cut of the [out, in] weight -> each tensor's dim and element ranges (AWQ packs out, compressed-tensors in)."""
    awq, ct = FORMATS["awq"], FORMATS["ct_zp"]
    assert awq["qweight"].cut(0, [(16, 32), (48, 64)], GROUP) == (1, [(2, 4), (6, 8)])  # 8 outputs per int32
    assert awq["qweight"].cut(1, [(64, 128)], GROUP) == (0, [(64, 128)])  # one row per input channel
    assert awq["scales"].cut(1, [(64, 128)], GROUP) == (0, [(2, 4)])  # one row per group
    assert ct["weight_packed"].cut(1, [(64, 128)], GROUP) == (1, [(8, 16)])
    assert ct["weight_zero_point"].cut(0, [(16, 32)], GROUP) == (0, [(2, 4)])
    with pytest.raises(ValueError, match="do not fall on"):
        awq["qzeros"].cut(1, [(0, 48)], GROUP)


@pytest.mark.parametrize("dim, size, world", [(0, 200, 2), (1, 300, 3), (0, 256, 4), (1, 96, 2)],
                         ids=["rows-200-tp2", "cols-300-tp3", "rows-256-tp4-aligned", "cols-96-tp2-one-block"])
def test_fp8_shard_with_partial_blocks_dequantizes_to_its_cut(dim, size, world):
    """Cuts inside 128-blocks (and a last, partial block): each shard's refined blocks read the right scales, so
    its dequantized weight is exactly its rows / columns of the full one."""
    shape = (size, 160) if dim == 0 else (160, size)
    ramp = torch.linspace(0.1, 4, size).unsqueeze(1 - dim)  # blocks with different ranges, so different scales
    w = torch.randn(shape, generator=torch.Generator().manual_seed(size)) * ramp
    q, s = quantize_blocks(w, (128, 128))
    full = dequant_blocks(q, s, (128, 128), torch.float32)
    n = size // world
    for r in range(world):
        ranges = [(r * n, (r + 1) * n)]
        block = [128, 128]
        block[dim] = shard_block(ranges, 128)
        rows = torch.cat([s.narrow(dim, a, b - a) for a, b in scale_ranges(ranges, 128)], dim)
        part = dequant_blocks(q.narrow(dim, r * n, n), rows, tuple(block), torch.float32)
        assert torch.equal(part, full.narrow(dim, r * n, n)), r
    if size == 256:
        assert shard_block([(64, 128)], 128) == 64 and scale_ranges([(128, 256)], 128) == [(1, 2)]


# ---------------------------------------------------------------- per-rank loading (no processes)

def _dense(model: torch.nn.Module, name: str):
    """A quantized module of `model` -> its dequantized weight [out, in] (experts: (gate_up, down))."""
    m = model.get_submodule(name)
    if isinstance(m, (QuantExperts, Fp8Experts)):
        return m.dense(torch.float32)
    assert isinstance(m, (QuantLinear, Fp8Linear)), f"{name} is {type(m).__name__}"
    return m.dequant(torch.float32)


@pytest.mark.parametrize("case", ["awq-moe-mixed", "ct-moe-zero-point", "fp8-moe", "fp8-dense-mixed"])
def test_each_rank_dequantizes_to_its_cut(ckpts, case):
    """Rank r of 2: row-parallel out_proj / o_proj / down_proj hold input columns r, column-parallel in_proj_qkv
    its rows of q, k and v, experts their rows of gate and of up and columns of down: exactly the full model's
    dequantized weights cut by hand."""
    path = ckpts[case]
    cfg = ModelConfig.from_hf_dir(path)
    formats = read_formats(cfg, path)
    full = load_shard(cfg, path, 0, 1, formats)
    moe = cfg.is_moe
    down = "layers.1.mlp.shared_expert.down_proj" if moe else "layers.1.mlp.down_proj"
    for rank in range(2):
        part = load_shard(cfg, path, rank, 2, formats)
        row_parallel = [("layers.1.linear_attn.out_proj", 64), ("layers.3.self_attn.o_proj", 128),
                        (down, 32 if moe else 128)]
        for name, n in row_parallel:
            assert torch.equal(_dense(part, name), _dense(full, name)[:, rank * n: (rank + 1) * n]), name
        qkv = _dense(full, "layers.1.linear_attn.in_proj.in_proj_qkv")  # [q 64 | k 64 | v 128] rows
        want = torch.cat([qkv[rank * 32: rank * 32 + 32], qkv[64 + rank * 32: 96 + rank * 32],
                          qkv[128 + rank * 64: 192 + rank * 64]])
        assert torch.equal(_dense(part, "layers.1.linear_attn.in_proj.in_proj_qkv"), want)
        if moe:
            (gu, dn), (gu_r, dn_r) = _dense(full, "layers.1.mlp.experts"), _dense(part, "layers.1.mlp.experts")
            gate, up = gu[:, rank * 32: rank * 32 + 32], gu[:, 64 + rank * 32: 96 + rank * 32]
            assert torch.equal(gu_r, torch.cat([gate, up], 1))
            assert torch.equal(dn_r, dn[:, :, rank * 32: rank * 32 + 32])
    if case.startswith("fp8"):  # 64 of a 128-column block per rank: the shard refined its blocks
        assert part.get_submodule("layers.1.linear_attn.out_proj").block == (128, 64)
    if case == "awq-moe-mixed":  # mixed groups survive sharding: 16-bit q|k|v fused, int4 gate beside 16-bit up
        assert type(part.get_submodule("layers.3.self_attn.qkv_proj")) is Linear
        assert isinstance(part.get_submodule("layers.1.mlp.shared_expert.gate_up_proj"), ProjectionGroup)


# ---------------------------------------------------------------- TP=2 == TP=1 (spawned gloo workers)

@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_quantized_tp2_equals_tp1(ckpts, case):
    assert_same_outputs(case, run_prompts(ckpts[case], 1), run_prompts(ckpts[case], 2))


@pytest.mark.parametrize("quantization", ["awq", "awq-full"])
def test_from_config_awq_tp2_generates(wide, quantization):
    """Random-weight AWQ (bench --quantization awq[-full] --tp 2): each rank draws its own shard, so only that it
    runs; awq-full also cuts int4 q/k/v and in_proj_qkv/z (merged into one int4 run after loading)."""
    cfg = ModelConfig.from_hf_dir(wide)
    llm = LLM.from_config(cfg, device="cpu", dtype="float32", max_model_len=64, quantization=quantization,
                          group_size=32, tensor_parallel_size=2)
    try:
        assert isinstance(llm.model.get_submodule("layers.3.self_attn.o_proj"), QuantLinear)
        if quantization == "awq-full":
            assert isinstance(llm.model.get_submodule("layers.0.linear_attn.in_proj.in_proj_qkv+in_proj_z"),
                              QuantLinear)
        out = llm.generate([{"prompt_token_ids": [1, 2, 3, 4]}], SamplingParams(max_tokens=4, ignore_eos=True),
                           use_tqdm=False)
        assert len(out[0].outputs[0].token_ids) == 4
    finally:
        llm.shutdown()


# ---------------------------------------------------------------- up-front divisibility errors

@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> str:
    """A tiny checkpoint TP=4 can shard (8 q heads, 2 kv heads, Hk=4, HV=8): only quantization limits it."""
    return make_tiny(str(tmp_path_factory.mktemp("tpq") / "wide"), text_overrides={
        "num_attention_heads": 8, "linear_num_key_heads": 4, "linear_num_value_heads": 8})


def _awq_config(group: int) -> QuantConfig:
    return QuantConfig("awq", 4, group, True, AWQ_MIXED_16BIT)


@pytest.mark.parametrize("group, inter, world, message", [
    (16, 96, 4, "tensor_parallel_size=4 splits layers.0.mlp.down_proj's 96 input channels into 24, not a multiple of "
                "the int4 group size 16; valid sizes: 1, 2"),
    (8, 80, 4, "tensor_parallel_size=4 splits layers.0.mlp.gate_proj's 80 output channels into 20, not a multiple of "
               "8 (its qweight packs 8 output channels per int32); valid sizes: 1, 2"),
], ids=["group", "packing"])
def test_from_config_error_names_the_linear_and_valid_sizes(wide, group, inter, world, message):
    cfg = ModelConfig.from_hf_dir(wide)
    t0 = time.monotonic()
    with pytest.raises(ValueError) as e:
        LLM.from_config(dataclasses.replace(cfg, intermediate_size=inter), device="cpu", dtype="float32",
                        quantization="awq", group_size=group, tensor_parallel_size=world)
    assert str(e.value) == message
    assert multiprocessing.active_children() == [] and time.monotonic() - t0 < 5


def test_gdn_segment_cut_is_checked(wide):
    """Every [q | k | v] segment of an int4 in_proj_qkv is cut: 4 key heads of 4 channels leave 4 q (and k) rows
    per rank at TP=4, half a packed int32, though the whole projection (288 rows) splits into multiples of 8."""
    q = dataclasses.replace(ModelConfig.from_hf_dir(wide), linear_key_head_dim=4, quantization=_awq_config(32))
    formats = awq_formats(q, keep_16bit=tuple(s for s in AWQ_MIXED_16BIT if s != "linear_attn.in_proj_qkv"))
    assert formats["layers.0.linear_attn.in_proj_qkv"] == "awq"
    assert tp_problems(q, formats, 2) == []
    assert tp_problems(q, formats, 4) == [
        "tensor_parallel_size=4 splits layers.0.linear_attn.in_proj_qkv's 288 output channels into pieces of 4, "
        "not a multiple of 8 (its qweight packs 8 output channels per int32)"]


def test_checkpoint_error_before_any_process_starts(wide, tmp_path):
    q = quantize_checkpoint(wide, str(tmp_path / "q"), group_size=128, progress=False)
    t0 = time.monotonic()
    with pytest.raises(ValueError) as e:
        LLM(q, device="cpu", dtype="float32", max_model_len=64, tensor_parallel_size=4)
    assert str(e.value) == ("tensor_parallel_size=4 splits layers.0.linear_attn.out_proj's 256 input channels into "
                            "64, not a multiple of the int4 group size 128; valid sizes: 1, 2")
    assert multiprocessing.active_children() == [] and time.monotonic() - t0 < 5


# ---------------------------------------------------------------- attention_bias beside quantized weights

@pytest.mark.parametrize("method, group", [("awq", GROUP), ("fp8", 128)], ids=["awq", "fp8"])
def test_quantized_attention_bias_loads_and_tp2_equals_tp1(tmp_path, method, group):
    """attention_bias=true: a quantized checkpoint holds q/k/v/o_proj's 16-bit biases beside their int4 / FP8
    weights. They were 'tensors this model does not use' (QuantLinear, Fp8Linear and a ProjectionGroup's pieces had
    no bias), at every TP size. Now they load: the model equals its dequantized twin, and at TP=2 (o_proj's bias
    added by rank 0 only) equals TP=1."""
    from quant_helpers import assert_matches_twin

    src = make_tiny(str(tmp_path / "src"), moe=True, text_overrides={"attention_bias": True})
    q = quantize_checkpoint(src, str(tmp_path / "q"), method=method, group_size=group, progress=False)
    llm = assert_matches_twin(q, tmp_path)
    o_proj = llm.model.get_submodule("layers.3.self_attn.o_proj")
    assert isinstance(o_proj, (QuantLinear, Fp8Linear)) and o_proj.bias is not None
    assert_same_outputs(f"{method}-attention-bias", run_prompts(q, 1), run_prompts(q, 2))


@pytest.mark.parametrize("method, group", [("awq", GROUP), ("fp8", 128)], ids=["awq", "fp8"])
def test_zero_width_shared_expert_quantizes_and_tp2_equals_tp1(tmp_path, method, group):
    """shared_expert_intermediate_size=0 (HF's config allows it; the 16-bit model runs): `quantize --method awq`
    crashed packing its 0-row weights, and the FP8 checkpoint's TP=2 load died in read_ranges (torch.cat of no
    scale rows). Both now work, and TP=2 equals TP=1."""
    src = make_tiny(str(tmp_path / "src"), moe=True, text_overrides={"shared_expert_intermediate_size": 0})
    q = quantize_checkpoint(src, str(tmp_path / "q"), method=method, group_size=group, progress=False)
    assert_same_outputs(f"{method}-no-shared-expert", run_prompts(q, 1), run_prompts(q, 2))
