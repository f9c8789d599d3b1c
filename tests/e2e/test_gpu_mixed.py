"""GPU: mixed steps (running decodes beside prefilling sequences) with their decode rows on the split-K decode kernel
(kernels/paged_attention/triton_decode.py::paged_attention_mixed, the engine's path) against the same run with every
row on the varlen prefill kernel, on the embedded tiny checkpoints in bf16. Only the attention of the decode rows
differs (its bf16 rounding), so tokens agree until a near-tie and logprobs within 0.05 nats; the CPU tests check
both kernels against the reference under the interpreter."""
import random

import pytest
import torch

from deltaserve import LLM, SamplingParams
from deltaserve.tiny import make_tiny

pytestmark = pytest.mark.gpu

NEAR_TIE = 0.05  # nats between the top two
LENGTHS = (5, 300, 40, 700, 17, 130, 1, 64)


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def tiny(tmp_path_factory, request) -> str:
    kind = "moe" if request.param else "dense"
    return make_tiny(str(tmp_path_factory.mktemp(f"gpu_mixed_{kind}") / "tiny"), moe=request.param)


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"], ids=["kv16", "kv_int8"])
def test_mixed_steps_split_matches_prefill_kernel(tiny, kv_cache_dtype, monkeypatch):
    import deltaserve.kernels.paged_attention.triton as pa_prefill
    import deltaserve.kernels.paged_attention.triton_decode as pa

    def all_on_prefill(q, k_cache, v_cache, block_tables, cu_seqlens, context_lens, scale, gate, query_lens,
                       context_lens_cpu, decode_rows):
        return pa_prefill.paged_attention_prefill(q, k_cache, v_cache, block_tables, cu_seqlens, context_lens, scale,
                                                  gate, query_lens, context_lens_cpu)

    rng = random.Random(0)
    prompts = [{"prompt_token_ids": [rng.randrange(500) for _ in range(n)]} for n in LENGTHS]
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=2)
    outs = {}
    engine_path = pa.paged_attention_mixed
    for split in (False, True):
        rows = []

        def spy(*args, rows=rows, real=engine_path if split else all_on_prefill):
            rows.append(args[10])  # decode_rows
            return real(*args)
        monkeypatch.setattr(pa, "paged_attention_mixed", spy)
        llm = LLM(tiny, device="cuda", dtype="bfloat16", max_model_len=1024, max_num_seqs=4,
                  max_num_batched_tokens=256, enforce_eager=True, enable_prefix_caching=False,
                  kv_cache_dtype=kv_cache_dtype)
        outs[split] = llm.generate(prompts, params, use_tqdm=False)
        del llm
        torch.cuda.empty_cache()
        assert rows and max(rows) >= 2, f"no mixed step with decode rows ran: {rows}"
    worst = 0.0
    for i, (r, o) in enumerate(zip(outs[False], outs[True])):
        for j, (a, b) in enumerate(zip(r.outputs[0].token_ids, o.outputs[0].token_ids)):
            top = sorted((v.logprob for v in r.outputs[0].logprobs[j].values()), reverse=True)
            if a != b:
                assert top[0] - top[1] < NEAR_TIE, f"prompt {i} token {j}: {b} != {a}, a gap of {top[0] - top[1]}"
                break
            worst = max(worst, abs(o.outputs[0].logprobs[j][a].logprob - r.outputs[0].logprobs[j][a].logprob))
    print(f"decode rows on split-K against the prefill kernel ({kv_cache_dtype}): largest logprob difference "
          f"{worst:.2e}")
    assert worst < 0.05, f"largest logprob difference {worst}"
