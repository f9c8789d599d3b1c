"""A config that ties the embeddings over a checkpoint holding its own, different lm_head.weight: transformers keeps
both (it warns and does not tie), so that head is the one that runs."""
import json
import os

import torch
from hf_checkpoints import build_hf, hf_logprobs

import transformers
from deltaserve import LLM, SamplingParams


def test_tied_flag_with_a_different_lm_head_uses_the_head(tmp_path):
    path = str(tmp_path)
    build_hf("dense-cond").save_pretrained(path)  # untied: its lm_head.weight differs from the embedding
    cfg_path = os.path.join(path, "config.json")
    cfg = json.load(open(cfg_path))
    cfg["tie_word_embeddings"] = cfg["text_config"]["tie_word_embeddings"] = True
    json.dump(cfg, open(cfg_path, "w"))
    hf = transformers.Qwen3_5ForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    toks = torch.randint(0, 384, (40,), generator=torch.Generator().manual_seed(1)).tolist()
    ref = hf_logprobs(hf, toks)
    llm = LLM(model=path, device="cpu", dtype="float32", max_model_len=64)
    assert not llm.config.tie_word_embeddings
    out = llm.generate([{"prompt_token_ids": toks}], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=0),
                       use_tqdm=False)[0]
    diff = max(abs(out.prompt_logprobs[i][toks[i]] - float(ref[i - 1, toks[i]])) for i in range(1, len(toks)))
    assert diff < 1e-4
