"""`deltaserve make-tiny` output is a real HF checkpoint: transformers loads it and computes what we compute."""
import pytest
import torch
from hf_checkpoints import hf_greedy, hf_logprobs

from deltaserve import LLM, SamplingParams
from deltaserve.tiny import make_tiny

transformers = pytest.importorskip("transformers")
TEXT = "The quick brown fox jumps over the lazy dog. " * 6


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def tiny(request, tmp_path_factory):
    path = make_tiny(str(tmp_path_factory.mktemp("tiny")), moe=request.param)
    cls = (transformers.Qwen3_5MoeForConditionalGeneration if request.param
           else transformers.Qwen3_5ForConditionalGeneration)
    hf = cls.from_pretrained(path, dtype=torch.float32).eval()
    llm = LLM(model=path, device="cpu", dtype="float32", max_model_len=512)
    return hf, llm


def test_hf_loads_every_text_weight_of_make_tiny(tiny):
    hf, llm = tiny
    ours = dict(llm.model.named_parameters())
    lm = hf.model.language_model
    assert torch.equal(lm.embed_tokens.weight, ours["embed_tokens.weight"])
    assert torch.equal(hf.lm_head.weight, ours["lm_head.weight"])
    assert torch.equal(lm.layers[0].linear_attn.A_log, ours["layers.0.linear_attn.A_log"])


def test_prompt_logprobs_and_greedy_match_hf(tiny):
    hf, llm = tiny
    ids = llm.tokenizer.encode(TEXT)
    assert len(ids) > 65  # crosses a GDN chunk boundary
    out = llm.generate(TEXT, SamplingParams(max_tokens=16, temperature=0, prompt_logprobs=0, ignore_eos=True),
                       use_tqdm=False)[0]
    ref = hf_logprobs(hf, ids)
    diff = max(abs(out.prompt_logprobs[i][ids[i]] - float(ref[i - 1, ids[i]])) for i in range(1, len(ids)))
    assert diff < 1e-4
    toks, gaps = hf_greedy(hf, ids, 16)
    for ours, theirs, gap in zip(out.outputs[0].token_ids, toks, gaps):
        if gap < 1e-3:
            break
        assert ours == theirs
    decoded = llm.tokenizer.decode(out.outputs[0].token_ids)
    if not decoded.endswith("\ufffd"):  # a held-back partial character is the one allowed difference
        assert out.outputs[0].text == decoded
