"""A block-FP8 checkpoint as `deltaserve quantize --method fp8` writes it (the official Qwen FP8 layout: e4m3 weights,
`weight_scale_inv` per 128 x 128 block) read by transformers' own FP8 loader (`FineGrainedFP8Config(dequantize=True)`,
its CPU path), and by deltaserve: the two compute the same prompt logprobs and greedy tokens. Beside the
dequantized-twin tests (tests/unit/test_fp8.py), whose twin deltaserve writes itself, this reference shares no code
with us: it proves the checkpoint is one transformers reads as we do."""
import pytest
import torch
from hf_checkpoints import hf_greedy, hf_logprobs

from deltaserve import LLM, SamplingParams
from deltaserve.quantize import quantize_checkpoint
from deltaserve.tiny import make_tiny

transformers = pytest.importorskip("transformers")
TEXT = "The quick brown fox jumps over the lazy dog. " * 6


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def fp8_pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    src = make_tiny(str(root / "src"), moe=request.param)
    path = quantize_checkpoint(src, str(root / "fp8"), method="fp8", not_convert=["layers.0."], progress=False)
    cls = (transformers.Qwen3_5MoeForConditionalGeneration if request.param
           else transformers.Qwen3_5ForConditionalGeneration)
    hf = cls.from_pretrained(path, dtype=torch.float32,
                             quantization_config=transformers.FineGrainedFP8Config(dequantize=True)).eval()
    return hf, LLM(model=path, device="cpu", dtype="float32", max_model_len=512)


def test_hf_reads_the_fp8_weights_as_we_do(fp8_pair):
    """One FP8 Linear, one of a 16-bit layer (layers.0 kept 16-bit): the same fp32 values on both sides."""
    hf, llm = fp8_pair
    ours = llm.model.layers[3].self_attn.o_proj
    theirs = hf.model.language_model.layers[3].self_attn.o_proj.weight
    assert ours.weight.dtype == torch.float8_e4m3fn, "sanity: the checkpoint's o_proj is FP8"
    from deltaserve.kernels.fp8_gemm import dequant_blocks

    assert torch.equal(dequant_blocks(ours.weight, ours.weight_scale_inv, (128, 128), torch.float32), theirs)


def test_prompt_logprobs_and_greedy_match_hf(fp8_pair):
    hf, llm = fp8_pair
    ids = llm.tokenizer.encode(TEXT)
    out = llm.generate(TEXT, SamplingParams(max_tokens=16, temperature=0, prompt_logprobs=0, ignore_eos=True),
                       use_tqdm=False)[0]
    ref = hf_logprobs(hf, ids)
    diff = max(abs(out.prompt_logprobs[i][ids[i]] - float(ref[i - 1, ids[i]])) for i in range(1, len(ids)))
    assert diff < 1e-4, diff
    toks, gaps = hf_greedy(hf, ids, 16)
    for ours, theirs, gap in zip(out.outputs[0].token_ids, toks, gaps):
        if gap < 1e-3:
            break
        assert ours == theirs
