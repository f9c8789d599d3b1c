"""Expert parallelism on CPU (gloo, float32): each of N ranks holds num_experts / N whole experts, computes only the
(token, expert) pairs routed to them (the others carry id -1 and cost nothing) and the MoE's one all-reduce sums the
ranks' parts with the TP-sharded shared expert.

EP changes only the order of fp32 sums, so TP=N with EP agrees with TP=1 to LOGPROB_ATOL (1e-4) with identical greedy
tokens; a wrong local expert id, a skipped pair counted twice or a shared expert added N times moves logprobs by
>1e-2. Kernel tests run the fused MoE paths (reference, grouped GEMM, Triton GEMMs and int4 decode GEMVs under
TRITON_INTERPRET=1) with -1 ids against the reference over only the kept pairs.
"""
from __future__ import annotations

import dataclasses
import logging
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_tensor_parallel import CPU, assert_same_outputs, load_shard, run_prompts
from test_tp_quantized import CASES as TP_QUANT_CASES
from test_weights import pack_experts, shard as split_into_two_files, variant

from deltaserve import LLM
from deltaserve.config import ModelConfig, QuantConfig
from deltaserve.kernels.fused_moe import ExpertWeights, _grouped_moe, fused_moe_reference
from deltaserve.kernels.fused_moe.align import moe_align
from deltaserve.kernels.fused_moe.align_triton import moe_align_triton
from deltaserve.kernels.fused_moe.triton import fused_moe_triton
from deltaserve.layers.fp8 import Fp8Experts
from deltaserve.layers.linear import QuantExperts
from deltaserve.layers.moe import local_expert_ids
from deltaserve.models.formats import AWQ_MIXED_16BIT, awq_formats, tp_problems
from deltaserve.models.weights import WeightsError, read_formats
from deltaserve.tiny import make_tiny
from deltaserve.worker.distributed import check_tp_size, expert_range, shard_config, valid_tp_sizes

sys.path.insert(0, str(Path(__file__).parents[1] / "kernels"))  # the fused MoE tests' input helpers
from test_fused_moe_triton import ATOL_FP32, int4_experts, moe_inputs  # noqa: E402

E = 8  # the tiny MoE: 8 experts, top-2, moe_intermediate_size 64


@pytest.fixture(scope="module")
def ckpts(tmp_path_factory):
    """moe: the tiny MoE with per-expert tensors (Hk=2: TP 1 or 2); packed: the same weights with packed experts
    in two files; wide: 8 q heads, Hk=4, HV=8 and moe_intermediate_size 50, so TP=4 works only with EP (50 % 4)."""
    root = tmp_path_factory.mktemp("ep")
    moe = make_tiny(str(root / "moe"), moe=True)
    packed = variant(moe, root / "packed", pack_experts)
    split_into_two_files(packed)
    wide = make_tiny(str(root / "wide"), moe=True, text_overrides={
        "num_attention_heads": 8, "linear_num_key_heads": 4, "linear_num_value_heads": 8, "moe_intermediate_size": 50})
    return {"moe": moe, "packed": packed, "wide": wide}


def _ep(cfg: ModelConfig) -> ModelConfig:
    return dataclasses.replace(cfg, expert_parallel=True)


# ---------------------------------------------------------------- shapes, checks, per-rank loading (no processes)

def test_shard_config_holds_whole_experts(ckpts):
    cfg = _ep(ModelConfig.from_hf_dir(ckpts["moe"]))
    local = shard_config(cfg, 2)
    assert (local.num_experts, local.num_local_experts, local.moe_intermediate_size,
            local.shared_expert_intermediate_size, local.num_attention_heads) == (8, 4, 64, 32, 2)
    assert [expert_range(local, r) for r in range(2)] == [(0, 4), (4, 8)]
    assert expert_range(shard_config(ModelConfig.from_hf_dir(ckpts["moe"]), 2), 1) == (0, 8)  # TP inside experts


@pytest.mark.parametrize("ep, world, message", [
    (False, 4, "tensor_parallel_size=4 does not divide moe_intermediate_size=50; valid sizes: 1, 2"),
    (True, 3, "tensor_parallel_size=3 does not divide num_attention_heads=8; valid sizes: 1, 2, 4"),
], ids=["tp4-without-ep", "tp3-ep"])
def test_ep_lifts_the_expert_column_constraint(ckpts, ep, world, message):
    cfg = ModelConfig.from_hf_dir(ckpts["wide"])
    cfg = _ep(cfg) if ep else cfg
    with pytest.raises(ValueError) as e:
        check_tp_size(cfg, world, CPU)
    assert str(e.value) == message
    if ep:
        check_tp_size(cfg, 4, CPU)  # moe_intermediate_size=50 stays whole under EP


def test_divisibility_error_names_num_experts(ckpts):
    cfg = _ep(dataclasses.replace(ModelConfig.from_hf_dir(ckpts["wide"]), num_experts=6))
    assert valid_tp_sizes(cfg) == [1, 2]
    t0 = time.monotonic()
    with pytest.raises(ValueError, match=r"^tensor_parallel_size=4 does not divide num_experts=6; valid sizes: 1, 2$"):
        LLM.from_config(cfg, device="cpu", dtype="float32", tensor_parallel_size=4, enable_expert_parallel=True)
    assert multiprocessing.active_children() == [] and time.monotonic() - t0 < 5


@pytest.mark.parametrize("layout", ["moe", "packed"], ids=["per-expert", "packed-two-files"])
def test_each_rank_loads_only_its_experts(ckpts, layout):
    """Rank r holds experts [4r, 4r + 4) whole (all 64 columns), the router whole, the shared expert TP-sharded."""
    cfg = _ep(ModelConfig.from_hf_dir(ckpts[layout]))
    full = dict(load_shard(ModelConfig.from_hf_dir(ckpts["moe"]), ckpts["moe"], 0, 1).named_parameters())
    for rank in range(2):
        part = dict(load_shard(cfg, ckpts[layout], rank, 2).named_parameters())
        for layer in range(cfg.num_hidden_layers):
            p = f"layers.{layer}.mlp."
            assert part[p + "experts.gate_up_proj"].shape == (4, 128, 128)
            assert torch.equal(part[p + "experts.gate_up_proj"], full[p + "experts.gate_up_proj"][4 * rank: 4 * rank + 4])
            assert torch.equal(part[p + "experts.down_proj"], full[p + "experts.down_proj"][4 * rank: 4 * rank + 4])
            assert torch.equal(part[p + "gate.weight"], full[p + "gate.weight"])  # router: all 8 experts
            sgu = full[p + "shared_expert.gate_up_proj.weight"]
            want = torch.cat([sgu[rank * 32: rank * 32 + 32], sgu[64 + rank * 32: 64 + rank * 32 + 32]])
            assert torch.equal(part[p + "shared_expert.gate_up_proj.weight"], want)
        expert_elems = sum(v.numel() for k, v in part.items() if ".experts." in k)
        assert expert_elems == sum(v.numel() for k, v in full.items() if ".experts." in k) // 2


def test_missing_expert_is_reported_by_the_rank_that_holds_it(ckpts, tmp_path):
    """Expert 5 is rank 1's local expert 1: rank 0 never looks at it, rank 1 names it."""
    path = variant(ckpts["moe"], tmp_path / "missing",
                   lambda sd: sd.pop("model.language_model.layers.2.mlp.experts.5.up_proj.weight"))
    cfg = _ep(ModelConfig.from_hf_dir(path))
    load_shard(cfg, path, 0, 2)
    with pytest.raises(WeightsError, match=r"missing 1 tensor\(s\), e\.g\. model\.language_model\.layers\.2\.mlp\."
                                           r"experts\.5\.up_proj\.weight:"):
        load_shard(cfg, path, 1, 2)


# ---------------------------------------------------------------- TP=N with EP == TP=1 (spawned gloo workers)

@pytest.fixture(scope="module")
def tp1_moe(ckpts):
    return run_prompts(ckpts["moe"], 1)  # the packed variant holds the same weights


@pytest.mark.parametrize("name, tp", [("moe", 2), ("packed", 2), ("wide", 4)],
                         ids=["per-expert-tp2", "packed-tp2", "wide-tp4"])
def test_ep_equals_tp1(ckpts, tp1_moe, name, tp):
    ref = tp1_moe if name != "wide" else run_prompts(ckpts[name], 1)
    assert_same_outputs(f"{name}-ep", ref, run_prompts(ckpts[name], tp, enable_expert_parallel=True))


@pytest.mark.parametrize("name", ["dense", "moe-tp1"])
def test_ep_is_ignored_with_a_log_line_where_it_means_nothing(ckpts, tmp_path, caplog, name):
    path = make_tiny(str(tmp_path / "dense")) if name == "dense" else ckpts["moe"]
    with caplog.at_level(logging.INFO, logger="deltaserve"):
        llm = LLM(path, device="cpu", dtype="float32", max_model_len=64, enable_expert_parallel=True)
    assert not llm.config.expert_parallel
    reason = "is a dense model" if name == "dense" else "tensor_parallel_size=1"
    assert any("enable_expert_parallel ignored" in r.message and reason in r.message for r in caplog.records)


# ---------------------------------------------------------------- quantized experts (AWQ, compressed-tensors, FP8)

QUANTIZED = ["awq-moe-mixed", "ct-moe-zero-point", "fp8-moe"]  # test_tp_quantized.CASES written from the tiny MoE


@pytest.fixture(scope="module")
def quantized(ckpts, tmp_path_factory):
    root = tmp_path_factory.mktemp("epq")
    return {case: TP_QUANT_CASES[case][1](ckpts["moe"], str(root / case)) for case in QUANTIZED}


@pytest.mark.parametrize("case", QUANTIZED)
def test_each_rank_holds_its_quantized_experts_whole(quantized, case):
    """Rank r's int4 / FP8 experts are the checkpoint's experts [4r, 4r + 4), every column, in the checkpoint's own
    packing and scale blocks: their dequantized weights equal the full model's, exactly."""
    path = quantized[case]
    cfg = ModelConfig.from_hf_dir(path)
    formats = read_formats(cfg, path)
    full = load_shard(cfg, path, 0, 1, formats)
    for rank in range(2):
        part = load_shard(_ep(cfg), path, rank, 2, formats)
        kinds = []
        for layer in range(cfg.num_hidden_layers):  # awq-moe-mixed keeps layer 0 16-bit
            experts = part.get_submodule(f"layers.{layer}.mlp.experts")
            whole = full.get_submodule(f"layers.{layer}.mlp.experts")
            assert type(experts) is type(whole)
            kinds.append(type(experts))
            for mine, all_e in zip(experts.dense(torch.float32), whole.dense(torch.float32)):
                assert mine.shape[0] == 4 and torch.equal(mine, all_e[4 * rank: 4 * rank + 4]), (case, layer, rank)
        assert {QuantExperts, Fp8Experts} & set(kinds), kinds


@pytest.mark.parametrize("case", QUANTIZED)
def test_quantized_ep_equals_tp1(quantized, case):
    path = quantized[case]
    assert_same_outputs(f"{case}-ep", run_prompts(path, 1), run_prompts(path, 2, enable_expert_parallel=True))


def test_ep_lifts_the_int4_expert_cut(ckpts):
    """Cut by TP, each expert's down_proj would hold 32 of its 64 input channels, half an int4 group of 64: refused.
    Under EP a rank holds whole experts and nothing is refused (the shared expert's down_proj, still cut, is 16-bit)."""
    cfg = ModelConfig.from_hf_dir(ckpts["moe"])
    group64 = dataclasses.replace(cfg, quantization=QuantConfig("awq", 4, 64, True, AWQ_MIXED_16BIT))
    formats = awq_formats(group64, keep_16bit=AWQ_MIXED_16BIT + ("shared_expert.down_proj",))
    assert tp_problems(group64, formats, 2) == [
        "tensor_parallel_size=2 splits layers.0.mlp.experts.0.down_proj's 64 input channels into 32, not a multiple "
        "of the int4 group size 64"]
    assert tp_problems(_ep(group64), formats, 2) == []


# ---------------------------------------------------------------- fused MoE with -1 ids (experts on other ranks)

def _split(ids: torch.Tensor, world: int) -> list[torch.Tensor]:
    """Each rank's local ids of `ids` (router ids over E experts)."""
    n = E // world
    return [local_expert_ids(ids, r * n, n) for r in range(world)]


def _kept_only(x, gate_up, down, weights, ids, first, n):
    """The oracle: the full reference with every pair outside experts [first, first + n) given weight 0."""
    keep = (ids >= first) & (ids < first + n)
    return fused_moe_reference(x, gate_up, down, torch.where(keep, weights, 0.0), ids)


def test_reference_skips_minus_one_and_ranks_sum_to_the_full_moe():
    x, gate_up, down, weights, ids = moe_inputs(19, E, 3, 64, 48, seed=1)
    parts = []
    for r, local in enumerate(_split(ids, 4)):
        out = fused_moe_reference(x, gate_up[2 * r: 2 * r + 2], down[2 * r: 2 * r + 2], weights, local)
        torch.testing.assert_close(out, _kept_only(x, gate_up, down, weights, ids, 2 * r, 2), rtol=0, atol=1e-6)
        parts.append(out)
    torch.testing.assert_close(sum(parts), fused_moe_reference(x, gate_up, down, weights, ids), rtol=0, atol=1e-5)
    none_here = torch.full_like(ids, -1)
    assert torch.equal(fused_moe_reference(x, gate_up, down, weights, none_here), torch.zeros_like(x))


@pytest.mark.skipif(not hasattr(torch, "_grouped_mm"), reason="torch has no _grouped_mm")
def test_grouped_moe_skips_minus_one():
    x, gate_up, down, weights, ids = moe_inputs(23, E, 2, 64, 32, seed=2)
    for r, local in enumerate(_split(ids, 2)):
        g, d = gate_up[4 * r: 4 * r + 4], down[4 * r: 4 * r + 4]
        assert (_grouped_moe(x, g, d, weights, local) - fused_moe_reference(x, g, d, weights, local)).abs().max() < 1e-5


@pytest.mark.parametrize("align", [moe_align, moe_align_triton], ids=["torch", "triton"])
def test_align_gives_minus_one_pairs_no_rows(align):
    """Only the rank's pairs are placed (padding counts only its experts' runs), so no GEMM row is spent on others."""
    ids = moe_inputs(13, E, 2, 16, 16, seed=3)[4]
    local = _split(ids, 2)[1]
    al, bm = align(local, 4, 16), 16
    flat = local.reshape(-1)
    counts = torch.bincount(flat[flat >= 0], minlength=4)
    used = int(al.num_tokens_post_pad)
    assert used == int(((counts + bm - 1) // bm * bm).sum())
    rows = al.sorted_ids[:used].long()
    placed = rows[rows < flat.numel()]
    assert sorted(placed.tolist()) == torch.nonzero(flat >= 0).flatten().tolist()
    assert (al.sorted_ids[used:] == flat.numel()).all()
    ref = moe_align(local, 4, bm)
    assert all(torch.equal(getattr(ref, n), getattr(al, n)) for n in ("sorted_ids", "expert_ids", "num_tokens_post_pad"))


TRITON_PATHS = {"int4-decode-gemv": (True, {"decode_gemv": True}),
                "int4-gemm-torch-align": (True, {"decode_gemv": False}),
                "int4-gemm-triton-align": (True, {"decode_gemv": False, "triton_align": True}),
                "16bit-gemm": (False, {})}


@pytest.mark.parametrize("int4, path", TRITON_PATHS.values(), ids=TRITON_PATHS.keys())
def test_triton_fused_moe_skips_minus_one(int4, path):
    """Interpreter, fp32: rank 1 of 2 (experts 4..7) on 5 tokens top-3, and a rank no pair is routed to."""
    x, gate_up, down, weights, ids = moe_inputs(5, E, 3, 64, 48, seed=4)
    g, d = gate_up[4:], down[4:]
    gu, dn = (int4_experts(g, 32), int4_experts(d, 16)) if int4 else (ExpertWeights(weight=g), ExpertWeights(weight=d))
    local = _split(ids, 2)[1]
    assert (local == -1).any() and (local >= 0).any()
    ref = fused_moe_reference(x, gu.dense(x.dtype), dn.dense(x.dtype), weights, local)
    err = (fused_moe_triton(x, gu, dn, weights, local, **path) - ref).abs().max().item()
    assert err <= ATOL_FP32, f"error {err:.2e}"
    out = fused_moe_triton(x, gu, dn, weights, torch.full_like(ids, -1), **path)
    assert torch.equal(out, torch.zeros_like(x))


# ---------------------------------------------------------------- CLI

@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["chat"], ["serve"], ["bench"]],
                         ids=["generate", "chat", "serve", "bench"])
def test_cli_flag_reaches_the_engine(command):
    from deltaserve.cli import build_parser, engine_kwargs

    args = build_parser().parse_args([*command, "--tp", "2", "--enable-expert-parallel"])
    assert args.enable_expert_parallel and args.tp == 2
    if command[0] != "bench":  # bench passes it to LLM / LLM.from_config itself
        assert engine_kwargs(args)["enable_expert_parallel"] is True


def test_cli_generate_ep_prints_what_tp1_prints(ckpts):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [sys.executable, "-m", "deltaserve.cli", "generate", "--model", ckpts["moe"], "--prompt", "hello world",
            "--max-tokens", "6", "--ignore-eos", "--device", "cpu"]
    one = subprocess.run(args, capture_output=True, text=True, env=env, timeout=180)
    ep = subprocess.run([*args, "--tp", "2", "--enable-expert-parallel"], capture_output=True, text=True, env=env,
                        timeout=180)
    assert one.returncode == 0 and ep.returncode == 0, ep.stderr
    assert "expert parallel: each of 2 ranks holds 4 of the 8 experts whole" in ep.stderr, ep.stderr
    assert ep.stdout == one.stdout
