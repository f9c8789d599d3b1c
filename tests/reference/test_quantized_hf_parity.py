"""Quantized checkpoints read by transformers' own loaders and by deltaserve: the same weights, prompt logprobs and
greedy tokens. Beside the dequantized-twin tests (tests/unit/test_fp8.py, test_quantized.py), whose twins deltaserve
writes itself, this reference shares no code with us.
- fp8: block FP8 as `deltaserve quantize --method fp8` writes it (the official Qwen FP8 layout: e4m3 weights,
  `weight_scale_inv` per 128 x 128 block), read by `FineGrainedFP8Config(dequantize=True)` (its CPU path);
- ct: compressed-tensors pack-quantized int4 as the compressed-tensors package packs it (quant_helpers.library_ct),
  read by `CompressedTensorsConfig(run_compressed=False)` (the package decompresses)."""
import os
import sys

import pytest
import torch
from hf_checkpoints import hf_greedy, hf_logprobs

from deltaserve import LLM, SamplingParams
from deltaserve.quantize import quantize_checkpoint
from deltaserve.tiny import make_tiny

transformers = pytest.importorskip("transformers")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "unit"))  # the quantized tests' helpers
from quant_helpers import write_ct  # noqa: E402

TEXT = "The quick brown fox jumps over the lazy dog. " * 6
CASES = {"fp8_dense": ("fp8", False), "fp8_moe": ("fp8", True), "ct_zero_point_dense": ("ct_zp", False),
         "ct_symmetric_moe": ("ct", True)}


def quantized(kind: str, src: str, dst: str):
    """-> (checkpoint path, the transformers quantization config that loads it dequantized)."""
    if kind == "fp8":
        path = quantize_checkpoint(src, dst, method="fp8", not_convert=["layers.0."], progress=False)
        return path, transformers.FineGrainedFP8Config(dequantize=True)
    return write_ct(src, dst, kind == "ct_zp", library=True), transformers.CompressedTensorsConfig(run_compressed=False)


@pytest.fixture(scope="module", params=list(CASES), ids=list(CASES))
def pair(request, tmp_path_factory):
    kind, moe = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    path, qcfg = quantized(kind, make_tiny(str(root / "src"), moe=moe), str(root / "q"))
    cls = transformers.Qwen3_5MoeForConditionalGeneration if moe else transformers.Qwen3_5ForConditionalGeneration
    hf = cls.from_pretrained(path, dtype=torch.float32, quantization_config=qcfg).eval()
    return kind, hf, LLM(model=path, device="cpu", dtype="float32", max_model_len=512)


def test_hf_reads_the_quantized_weights_as_we_do(pair):
    """One quantized Linear (o_proj of the first attention layer): the same fp32 values on both sides."""
    kind, hf, llm = pair
    ours = llm.model.layers[3].self_attn.o_proj
    theirs = hf.model.language_model.layers[3].self_attn.o_proj.weight
    if kind == "fp8":
        from deltaserve.kernels.fp8_gemm import dequant_blocks

        assert ours.weight.dtype == torch.float8_e4m3fn, "sanity: the checkpoint's o_proj is FP8"
        w = dequant_blocks(ours.weight, ours.weight_scale_inv, (128, 128), torch.float32)
    else:
        assert ours.fmt == kind, "sanity: the checkpoint's o_proj is int4"
        w = ours.dequant(torch.float32)
    assert torch.equal(w, theirs)


def test_prompt_logprobs_and_greedy_match_hf(pair):
    _, hf, llm = pair
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
