"""GDN recurrent state held in bfloat16 (`state_dtype="bfloat16"`, `--state-dtype`): the engine's answers stay within
a measured distance of the float32 state, the pool really is bf16, and bad values fail in one sentence.

The state is rounded to bf16 once per step (every update runs in fp32), so the error grows with the number of steps
a state lives through: chunked prefill and decode, not a one-shot prefill. Measured on the tiny checkpoints (fp32
model, CPU, 2026-11-28): prompt logprobs with a 16-token chunked prefill differ from the fp32-state run by at most
8.5e-4 (dense) / 1.7e-3 (MoE), greedy-token logprobs over 40 decode steps by at most 3.2e-3 / 3.6e-3, and the greedy
tokens are the same. Bound: 2e-2 (about 5x the largest measured error).
"""
import random

import pytest
import torch
from engine_helpers import Models, make_llm, random_prompt

from deltaserve import LLM, SamplingParams

BOUND = 2e-2


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return Models(tmp_path_factory)


def _run(path: str, state_dtype: str):
    llm = make_llm(path, max_num_seqs=4, max_num_batched_tokens=16, state_dtype=state_dtype)
    rng = random.Random(5)
    prompts = [random_prompt(rng, n, llm.config.vocab_size) for n in (70, 33, 9)]
    params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, logprobs=0, prompt_logprobs=0)
    outs = llm.generate(prompts, params, use_tqdm=False)
    pool = llm.runner.caches.recurrent[0]
    prompt_lp = [[d[t] for d, t in zip(o.prompt_logprobs[1:], p["prompt_token_ids"][1:])]
                 for o, p in zip(outs, prompts)]
    gen_lp = [[d[t] for d, t in zip(o.outputs[0].logprobs, o.outputs[0].token_ids)] for o in outs]
    return prompt_lp, gen_lp, [o.outputs[0].token_ids for o in outs], pool.dtype


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_bf16_state_close_to_fp32_state(models, kind):
    p32, g32, t32, d32 = _run(models.path(kind), "float32")
    p16, g16, t16, d16 = _run(models.path(kind), "bfloat16")
    assert d32 == torch.float32 and d16 == torch.bfloat16
    prompt_err = max(abs(a - b) for x, y in zip(p32, p16) for a, b in zip(x, y))
    # compare decode logprobs up to the first differing token (after it the two runs see different inputs)
    gen_err = 0.0
    for a_toks, b_toks, a_lp, b_lp in zip(t32, t16, g32, g16):
        n = next((i for i, (x, y) in enumerate(zip(a_toks, b_toks)) if x != y), len(a_toks))
        gen_err = max([gen_err] + [abs(x - y) for x, y in zip(a_lp[:n + 1], b_lp[:n + 1])])
    print(f"\n{kind}: bf16 state vs fp32 state: prompt {prompt_err:.2e}, decode {gen_err:.2e}, "
          f"same greedy tokens: {t32 == t16}")
    assert 0 < prompt_err < BOUND, "chunked prefill must carry the bf16 state (0 means it was never rounded)"
    assert gen_err < BOUND


def test_state_dtype_errors(models):
    with pytest.raises(ValueError, match="state_dtype is 'float16'.*'float32' or 'bfloat16'"):
        LLM(models.path("dense"), state_dtype="float16")


def _with_ssm_dtype(src: str, dst, dtype: str) -> str:
    """A copy of checkpoint src whose config says mamba_ssm_dtype = dtype."""
    import json
    import shutil

    shutil.copytree(src, dst)
    cfg_path = dst / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.get("text_config", cfg)["mamba_ssm_dtype"] = dtype
    cfg_path.write_text(json.dumps(cfg))
    return str(dst)


def test_state_dtype_auto_follows_the_checkpoints_mamba_ssm_dtype(models, tmp_path):
    path = _with_ssm_dtype(models.path("dense"), tmp_path / "bf16", "bfloat16")
    params = SamplingParams(max_tokens=4, temperature=0, ignore_eos=True)
    for requested, expected in (("auto", torch.bfloat16), ("float32", torch.float32)):
        llm = make_llm(path, max_num_seqs=2, state_dtype=requested)
        assert llm.runner.caches.recurrent[0].dtype == expected
        assert len(llm.generate(["hello there"], params, use_tqdm=False)[0].outputs[0].token_ids) == 4
    fp16 = _with_ssm_dtype(models.path("dense"), tmp_path / "fp16", "float16")
    with pytest.raises(ValueError, match="the checkpoint's mamba_ssm_dtype is 'float16'"):
        LLM(fp16)
    assert make_llm(fp16, max_num_seqs=2, state_dtype="float32").runner.caches.recurrent[0].dtype == torch.float32
