"""Shared by the quantized-checkpoint tests (int4 and FP8): run a tiny checkpoint and compare it with its dequantized
16-bit twin (`deltaserve.quantize.write_dequantized`), the reference model a quantized one must reproduce."""
import json
import os

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deltaserve import LLM, SamplingParams
from deltaserve.layers.quant import to_ct
from deltaserve.quantize import QUANTIZABLE, _copy_side_files, write_dequantized

TEXT = "The quick brown fox jumps over the lazy dog. " * 3
GROUP = 32  # int4 group size of the tests' checkpoints


def run_text(path: str):
    """-> (llm, prompt logprobs of TEXT, 8 greedy tokens), fp32 on CPU."""
    llm = LLM(model=path, device="cpu", dtype="float32", max_model_len=256, num_kv_blocks=32, max_num_seqs=2)
    out = llm.generate(TEXT, SamplingParams(max_tokens=8, temperature=0, prompt_logprobs=0, ignore_eos=True),
                       use_tqdm=False)[0]
    ids = llm.tokenizer.encode(TEXT)
    return llm, [out.prompt_logprobs[i][ids[i]] for i in range(1, len(ids))], out.outputs[0].token_ids


def assert_matches_twin(path: str, tmp_path, twin: str | None = None) -> LLM:
    """Prompt logprobs within 1e-4 of the dequantized twin's and the same greedy tokens; -> the quantized LLM.
    twin: a twin written elsewhere (default: write_dequantized's, under tmp_path)."""
    twin = twin or write_dequantized(path, str(tmp_path / "twin"))
    llm, lp, toks = run_text(path)
    _, lp_ref, toks_ref = run_text(twin)
    diff = max(abs(a - b) for a, b in zip(lp, lp_ref))
    assert diff < 1e-4, diff
    assert toks == toks_ref
    return llm


def library_ct(w: torch.Tensor, zero_point: bool) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """w [out, in] -> (its pack-quantized tensors as the compressed-tensors package writes them, scales and zero
    points from the package's calculate_qparams over each group's min / max, as llm-compressor's default observer
    does; the weight the package's decompress returns from them)."""
    from compressed_tensors.compressors import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams

    args = QuantizationArgs(num_bits=4, type="int", symmetric=not zero_point, strategy="group", group_size=GROUP)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    groups = w.reshape(w.shape[0], -1, GROUP)
    scale, zp = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    packed = PackedQuantizationCompressor.compress({"weight": w, "weight_scale": scale, "weight_zero_point": zp},
                                                   scheme)
    return packed, PackedQuantizationCompressor.decompress(dict(packed), scheme)["weight"]


def _save_beside(src: str, dst: str, tensors: dict[str, torch.Tensor]) -> None:
    """tensors as dst's model.safetensors, with src's other files (config, tokenizer) copied as quantize copies them."""
    _copy_side_files(src, dst)
    save_file(tensors, os.path.join(dst, "model.safetensors"))


def write_ct(src: str, dst: str, zero_point: bool, library: bool = False) -> str:
    """A compressed-tensors pack-quantized checkpoint of `src` (what llm-compressor writes, W4A16). library: each
    Linear packed by the compressed-tensors package itself (library_ct), and at dst + "_twin" the source with those
    Linears replaced by what the package's decompress returns: a reference that shares no code with deltaserve."""
    out, twin = {}, {}
    with safe_open(os.path.join(src, "model.safetensors"), framework="pt") as f:
        for name in f.keys():
            t, module = f.get_tensor(name), name.rpartition(".")[0]
            twin[name] = t
            if name.endswith(".weight") and t.dim() == 2 and ".layers." in name and \
                    module.rsplit(".", 1)[1] in QUANTIZABLE:
                if library:
                    packed, back = library_ct(t, zero_point)
                    twin[name] = back.to(t.dtype)
                else:
                    packed = to_ct(t, GROUP, zero_point)
                    packed["weight_shape"] = torch.tensor(list(t.shape))
                out.update({f"{module}.{k}": v for k, v in packed.items()})
            else:
                out[name] = t
    _save_beside(src, dst, out)
    if library:
        _save_beside(src, dst + "_twin", twin)
    with open(os.path.join(dst, "config.json")) as f:
        raw = json.load(f)
    raw["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 4, "type": "int", "symmetric": not zero_point, "strategy": "group", "group_size": GROUP}}}}
    with open(os.path.join(dst, "config.json"), "w") as f:
        json.dump(raw, f)
    return dst
