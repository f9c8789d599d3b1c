"""Shared by the quantized-checkpoint tests (int4 and FP8): run a tiny checkpoint and compare it with its dequantized
16-bit twin (`deltaserve.quantize.write_dequantized`), the reference model a quantized one must reproduce."""
from deltaserve import LLM, SamplingParams
from deltaserve.quantize import write_dequantized

TEXT = "The quick brown fox jumps over the lazy dog. " * 3


def run_text(path: str):
    """-> (llm, prompt logprobs of TEXT, 8 greedy tokens), fp32 on CPU."""
    llm = LLM(model=path, device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=32, max_num_seqs=2)
    out = llm.generate(TEXT, SamplingParams(max_tokens=8, temperature=0, prompt_logprobs=0, ignore_eos=True),
                       use_tqdm=False)[0]
    ids = llm.tokenizer.encode(TEXT)
    return llm, [out.prompt_logprobs[i][ids[i]] for i in range(1, len(ids))], out.outputs[0].token_ids


def assert_matches_twin(path: str, tmp_path) -> LLM:
    """Prompt logprobs within 1e-4 of the dequantized twin's and the same greedy tokens; -> the quantized LLM."""
    twin = write_dequantized(path, str(tmp_path / "twin"))
    llm, lp, toks = run_text(path)
    _, lp_ref, toks_ref = run_text(twin)
    diff = max(abs(a - b) for a, b in zip(lp, lp_ref))
    assert diff < 1e-4, diff
    assert toks == toks_ref
    return llm
