"""kv_cache_dtype = "int8" | "int4" | "fp8" end to end on the CPU reference path (fp32 tiny checkpoint): output within
a documented tolerance of the unquantized KV cache, the engine invariants still hold with int8 KV, the pool is sized
by the real bytes per block, one clear error for an unknown value.

Tolerances (README, "KV cache quantization"): max |logprob difference| against kv_cache_dtype="auto" over prompt
logprobs (3 prompts of 40 / 150 / 300 tokens, chunked prefill at 64 tokens a step, so later chunks read earlier ones
from the quantized cache) and over the logprobs of 24 greedy tokens up to the first token that differs. Measured on
the tiny checkpoint: int8 5.4e-3 / 2.8e-3, fp8 2.3e-2 / 8.9e-3, int4 1.2e-1 / 2.8e-2 (prompt / decode); the bounds
below leave ~3x. Greedy tokens: measured equal for all 24 tokens (int8, int4) and 21 of 24 (fp8): 16 are required.
"""
from __future__ import annotations

import random

import pytest
import torch
from engine_helpers import (
    Models,
    StepLog,
    assert_close_logprobs,
    assert_engine_idle,
    assert_same_completion,
    greedy,
    make_llm,
    random_prompt,
)

import deltaserve.llm as llm_module
from deltaserve.worker.model_runner import kv_bytes_per_block

LOGPROB_BOUND = {"int8": 2e-2, "fp8": 8e-2, "int4": 0.4}
SAME_GREEDY_PREFIX = 16
# batched vs solo / chunked vs one shot with quantized KV: a key that moves by one fp32 rounding (another batch shape)
# can land on the other side of a rounding edge and move one code by one step (~1/255 of its row's range). Measured
# 9.5e-5 here; a leaked or stale state moves logprobs by >1e-2 (engine_helpers.LOGPROB_ATOL is for exact fp32 paths).
INT8_BATCH_ATOL = 1e-3


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return Models(tmp_path_factory)


@pytest.fixture(scope="module")
def auto_outputs(models):
    return run_three_prompts(models, "auto")


def run_three_prompts(models, kv_cache_dtype):
    rng = random.Random(3)
    prompts = [random_prompt(rng, n, models.vocab()) for n in (40, 150, 300)]
    llm = make_llm(models.path("dense"), max_num_seqs=4, max_num_batched_tokens=64, block_size=8,
                   kv_cache_dtype=kv_cache_dtype)
    outs = llm.generate(prompts, greedy(24, prompt_logprobs=0), use_tqdm=False)
    assert_engine_idle(llm)
    return outs


def max_logprob_error(ref: list, out: list) -> float:
    return max(abs(r[t] - o[t]) for r, o in zip(ref, out) if r is not None for t in r)


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_quantized_kv_within_tolerance_of_auto(models, auto_outputs, kind):
    outs = run_three_prompts(models, kind)
    prompt_err = decode_err = 0.0
    for i, (ref, out) in enumerate(zip(auto_outputs, outs)):
        prompt_err = max(prompt_err, max_logprob_error(ref.prompt_logprobs, out.prompt_logprobs))
        rt, ot = ref.outputs[0].token_ids, out.outputs[0].token_ids
        same = next((j for j, (a, b) in enumerate(zip(rt, ot)) if a != b), len(rt))
        assert same >= SAME_GREEDY_PREFIX, f"{kind} prompt {i}: greedy tokens differ from auto at {same}"
        decode_err = max(decode_err, max_logprob_error(ref.outputs[0].logprobs[:same], out.outputs[0].logprobs[:same]))
    assert prompt_err <= LOGPROB_BOUND[kind] and decode_err <= LOGPROB_BOUND[kind], \
        f"{kind}: prompt logprob error {prompt_err:.2e}, decode {decode_err:.2e} (bound {LOGPROB_BOUND[kind]:.0e})"
    assert prompt_err > 1e-6, f"{kind}: identical to the unquantized cache: was the KV cache quantized at all?"


def test_int8_batched_equals_solo(models):
    """Chunked prefills mixed with decodes, requests queued behind max_num_seqs: each request's output equals the
    same request run alone, both with int8 KV."""
    rng = random.Random(1)
    lengths = [1, 5, 16, 17, 33, 64, 65, 129, 201, 300]
    prompts = [random_prompt(rng, n, models.vocab()) for n in lengths]
    rng.shuffle(prompts)
    params = [greedy(m) for m in [1, 20] + [rng.randint(1, 20) for _ in prompts[2:]]]
    llm = make_llm(models.path("dense"), max_num_seqs=4, max_num_batched_tokens=64, block_size=8,
                   kv_cache_dtype="int8")
    log = StepLog.attach(llm)
    outs = llm.generate(prompts, params, use_tqdm=False)
    assert log.mixed_steps() > 0 and any(st.num_waiting for st in log.steps)
    solo = make_llm(models.path("dense"), max_num_seqs=4, max_num_batched_tokens=512, kv_cache_dtype="int8")
    for i, (p, sp, out) in enumerate(zip(prompts, params, outs)):
        ref = solo.generate([p], sp, use_tqdm=False)[0]
        assert_same_completion(f"req{i}[{len(p['prompt_token_ids'])} tokens]", ref.outputs[0], out.outputs[0],
                               INT8_BATCH_ATOL)
    assert_engine_idle(llm)


@pytest.mark.parametrize("kind", ["int8", "int4"])
def test_chunked_prefill_equals_one_shot(models, kind):
    """A 300-token prompt in chunks of 29 (each reading the earlier chunks from the quantized cache) gives the prompt
    logprobs and tokens of a one-step prefill, which reads its own keys back quantized too."""
    prompt = random_prompt(random.Random(2), 300, models.vocab())
    sp = greedy(8, prompt_logprobs=0)
    one = make_llm(models.path("dense"), max_num_seqs=2, max_num_batched_tokens=512, kv_cache_dtype=kind)
    chunked = make_llm(models.path("dense"), max_num_seqs=2, max_num_batched_tokens=29, kv_cache_dtype=kind)
    ref, out = (m.generate([prompt], sp, use_tqdm=False)[0] for m in (one, chunked))
    assert_close_logprobs("prompt_logprobs", ref.prompt_logprobs, out.prompt_logprobs, INT8_BATCH_ATOL)
    assert_same_completion("completion", ref.outputs[0], out.outputs[0], INT8_BATCH_ATOL)


@pytest.mark.parametrize("kind", ["int8", "int4", "fp8"])
def test_pool_sized_by_real_bytes(models, kind, monkeypatch):
    """Auto-sizing divides the budget by the quantized bytes per block (codes + scales + zeros), and the caches the
    runner allocates take exactly that many bytes."""
    cfg = models.solo("dense").config
    per_auto = kv_bytes_per_block(cfg, 16, torch.float32)
    per = kv_bytes_per_block(cfg, 16, torch.float32, kind)
    monkeypatch.setattr(llm_module, "CPU_KV_BUDGET_BYTES", 200 * per_auto)
    llm = make_llm(models.path("dense"), max_num_seqs=64, max_model_len=1024, kv_cache_dtype=kind)
    # fp32 model: int8 / fp8 codes are 1/4 of its bytes, int4 1/8, plus 8 (4 for fp8) bytes a row of 64
    assert llm.runner.num_kv_blocks == 200 * per_auto // per > 200 * 3, (llm.runner.num_kv_blocks, per, per_auto)
    held = sum(t.numel() * t.element_size() for k, v in llm.runner.caches.kv for t in k.tensors() + v.tensors())
    assert held == llm.runner.num_kv_blocks * per


def test_unknown_kv_cache_dtype_is_one_clear_error(models):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of 'auto', 'int8', 'int4', 'fp8', got 'int3'"):
        make_llm(models.path("dense"), kv_cache_dtype="int3")


def test_fp8_on_a_gpu_without_e4m3_is_one_clear_error(monkeypatch):
    """Triton compiles fp8e4nv only for compute capability >= 8.9: an A100 must be refused up front, not fail in a
    kernel compile at warm-up."""
    from deltaserve.kernels.paged_attention.kv_quant import check_kv_cache_device

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match="kv_cache_dtype='fp8' needs a GPU of compute capability 8.9 or later.*8.0"):
        check_kv_cache_device("fp8", torch.device("cuda", 0))
    check_kv_cache_device("int8", torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_kv_cache_device("fp8", torch.device("cuda", 0))
