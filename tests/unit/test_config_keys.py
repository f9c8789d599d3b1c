"""config.json keys that vLLM / transformers checkpoints carry beyond the usual ones: a compressed-tensors
`compression_config` (older llm-compressor / sparseml exports) and a missing dtype."""
import json
import logging
import os
import shutil

import pytest
import torch
from quant_helpers import GROUP, assert_matches_twin, write_ct
from safetensors import safe_open
from safetensors.torch import save_file
from test_config import assert_one_sentence, parse, raw_config, text_fields

from deltaserve import LLM, SamplingParams, cli
from deltaserve.config import ConfigError, ModelConfig
from deltaserve.llm import _resolve_dtype
from deltaserve.models.weights import WeightsError
from deltaserve.tiny import make_tiny

CT = {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"],
      "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
          "num_bits": 4, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP}}}}
AWQ = {"quant_method": "awq", "bits": 4, "group_size": 64, "version": "gemm", "zero_point": True}


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_tiny(str(tmp_path_factory.mktemp("keys") / "src"))


def _move_quant_config(path: str, to_text: bool, method: str = "compressed-tensors") -> None:
    """Rewrite config.json as an older export does: the settings under `compression_config`, not
    `quantization_config` (top-level, or under text_config)."""
    file = os.path.join(path, "config.json")
    with open(file) as f:
        raw = json.load(f)
    q = raw.pop("quantization_config")
    q["quant_method"] = method
    (raw["text_config"] if to_text else raw)["compression_config"] = q
    with open(file, "w") as f:
        json.dump(raw, f)


@pytest.mark.parametrize("to_text, method", [(False, "compressed-tensors"), (True, "compressed-tensors"),
                                             (False, "compressed_tensors")],
                         ids=["top_level", "text_config", "underscore_method"])
def test_compression_config_loads_as_compressed_tensors_int4(source, tmp_path, to_text, method):
    """It was ignored: the loader found weight_packed tensors, said config.json had no quantization_config and
    refused the checkpoint (transformers ignores the key too; vLLM reads it after quantization_config)."""
    q = write_ct(source, str(tmp_path / "ct"), zero_point=False)
    _move_quant_config(q, to_text, method)
    if to_text:  # the loaded model is the same as the top-level case's; the config is what differs
        llm = LLM(model=q, device="cpu", dtype="float32", num_kv_blocks=8, max_model_len=64)
    else:
        llm = assert_matches_twin(q, tmp_path)
    assert llm.config.quantization.method == "compressed-tensors" and llm.config.quantization.group_size == GROUP
    assert llm.model.layers[1].linear_attn.out_proj.fmt == "ct"


@pytest.mark.parametrize("where", ["top", "text"])
def test_quantization_config_wins_over_compression_config(where):
    """vLLM's order: quantization_config (top-level, then text_config) before compression_config."""
    text = text_fields()
    if where == "text":
        text["quantization_config"] = AWQ
        raw = raw_config("Qwen3_5ForConditionalGeneration", text, compression_config=CT)
    else:
        raw = raw_config("Qwen3_5ForConditionalGeneration", text, quantization_config=AWQ, compression_config=CT)
    assert parse(raw).quantization.method == "awq"
    assert parse(raw_config("Qwen3_5ForConditionalGeneration", compression_config=CT)).quantization.method == \
        "compressed-tensors"


@pytest.mark.parametrize("value, needle", [("int4", "'compression_config' must be an object"),
                                           ({"quant_method": "gptq"}, "compression_config.quant_method 'gptq'")],
                         ids=["not_an_object", "other_method"])
def test_bad_compression_config_is_named(value, needle):
    with pytest.raises(ConfigError) as e:
        parse(raw_config("Qwen3_5ForConditionalGeneration", compression_config=value))
    assert_one_sentence(str(e.value), needle)


# ---- a config.json that names no dtype ----

def _drop_dtype(path: str, stored: dict | None = None) -> str:
    """Remove every dtype key (`dtype`, `torch_dtype`, top-level and in text_config) from config.json; stored: tensor
    name suffix -> dtype to store those tensors in (the rest keep make_tiny's float32)."""
    file = os.path.join(path, "config.json")
    with open(file) as f:
        raw = json.load(f)
    for d in (raw, raw["text_config"]):
        d.pop("dtype", None)
        d.pop("torch_dtype", None)
    with open(file, "w") as f:
        json.dump(raw, f)
    weights = os.path.join(path, "model.safetensors")
    with safe_open(weights, framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    for suffix, dtype in (stored or {}).items():
        tensors.update({n: t.to(dtype) for n, t in tensors.items() if n.endswith(suffix)})
    save_file(tensors, weights)
    return path


@pytest.mark.parametrize("stored, want, cuda", [
    ({"": torch.float16}, "float16", torch.float16),
    ({"": torch.bfloat16}, "bfloat16", torch.bfloat16),
    ({}, "float32", torch.bfloat16),
    ({".weight": torch.bfloat16}, "float32", torch.bfloat16),  # bf16 beside fp32 A_log, dt_bias: the common dtype
], ids=["fp16_weights", "bf16_weights", "fp32_weights", "mixed"])
def test_missing_dtype_is_the_weights_dtype(source, tmp_path, caplog, stored, want, cuda):
    """As vLLM: the stored dtype, float32 run in bfloat16 on CUDA; on CPU dtype='auto' stays float32. An fp16
    checkpoint without a dtype key ran in bfloat16 on CUDA (config.json's missing dtype was taken as float32)."""
    path = _drop_dtype(shutil.copytree(source, tmp_path / "m"), stored)
    caplog.set_level(logging.INFO, logger="deltaserve")
    cfg = ModelConfig.from_hf_dir(path)
    assert cfg.torch_dtype == want
    assert _resolve_dtype("auto", cfg, torch.device("cuda")) == cuda
    assert _resolve_dtype("auto", cfg, torch.device("cpu")) == torch.float32
    assert "names no dtype" in caplog.text and f"taken as {want}" in caplog.text


def test_missing_dtype_runs_on_cpu_in_float32(source, tmp_path):
    """LLM(model=...) and the CLI's default dtype='auto': the tiny checkpoint loads and generates in float32."""
    path = _drop_dtype(shutil.copytree(source, tmp_path / "m"), {"": torch.bfloat16})
    llm = LLM(model=str(path), device="cpu", num_kv_blocks=8, max_model_len=64)
    assert llm.dtype == torch.float32 and next(llm.model.parameters()).dtype == torch.float32
    assert len(llm.generate("hello", SamplingParams(max_tokens=2, temperature=0), use_tqdm=False)[0].outputs[0]
               .token_ids) == 2


def test_missing_dtype_without_weights_is_the_loaders_one_sentence(source, tmp_path):
    path = _drop_dtype(shutil.copytree(source, tmp_path / "m"))
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(WeightsError) as e:
        LLM(model=str(path), device="cpu", num_kv_blocks=8, max_model_len=64)
    assert_one_sentence(str(e.value), "No model.safetensors")


@pytest.mark.parametrize("to_text", [False, True], ids=["top_level", "text_config"])
def test_dequantized_twin_drops_every_quantization_key(source, tmp_path, to_text):
    """write_dequantized removed only a top-level quantization_config: a compression_config (or a text_config one)
    stayed in the 16-bit twin's config.json, claiming compressed-tensors to vLLM for tensors it no longer holds."""
    from deltaserve.quantize import write_dequantized

    q = write_ct(source, str(tmp_path / "ct"), zero_point=False)
    _move_quant_config(q, to_text)
    twin = write_dequantized(q, str(tmp_path / "twin"))
    with open(os.path.join(twin, "config.json")) as f:
        raw = json.load(f)
    for where in (raw, raw.get("text_config", {})):
        assert "compression_config" not in where and "quantization_config" not in where
    assert ModelConfig.from_hf_dir(twin).quantization is None


# ---- config.json's dtype, as torch names it ----

SPELLINGS = {"float16": "float16", "half": "float16", "bfloat16": "bfloat16", "float32": "float32", "float": "float32",
             "float64": "float32", "double": "float32"}


@pytest.mark.parametrize("key", ["dtype", "torch_dtype"])
@pytest.mark.parametrize("value, want", SPELLINGS.items(), ids=SPELLINGS.keys())
def test_config_dtype_takes_torchs_names(key, value, want):
    """transformers reads the value as getattr(torch, value), so "half" and "float" are float16 and float32; an
    unknown string was taken as bfloat16 (a "half" checkpoint ran in bfloat16 on CUDA under dtype='auto')."""
    text = {k: v for k, v in text_fields().items() if k != "dtype"}
    cfg = parse(raw_config("Qwen3_5ForConditionalGeneration", {**text, key: value}))
    assert cfg.torch_dtype == want
    auto_cuda = torch.bfloat16 if want == "float32" else getattr(torch, want)
    assert _resolve_dtype("auto", cfg, torch.device("cuda")) == auto_cuda


BAD_DTYPES = {"fp16": "fp16", "int8": "int8", "case": "Float16", "auto": "auto", "not_a_string": 16}


@pytest.mark.parametrize("arch, name", [("Qwen3_5ForConditionalGeneration", "text_config.dtype"),
                                        ("Qwen3_5ForCausalLM", "dtype")], ids=["text_config", "flat"])
@pytest.mark.parametrize("value", BAD_DTYPES.values(), ids=BAD_DTYPES.keys())
def test_unknown_config_dtype_is_named(arch, name, value):
    with pytest.raises(ConfigError) as e:
        parse(raw_config(arch, text_fields(dtype=value)))
    assert_one_sentence(str(e.value), f"'{name}' is {value!r}", "'bfloat16', 'float16' or 'float32'")


def test_unknown_config_dtype_is_one_cli_line(source, tmp_path, capsys):
    """At load, before any weight is read: config.json's path and value in one `error:` line."""
    path = shutil.copytree(source, tmp_path / "m")
    file = os.path.join(path, "config.json")
    with open(file) as f:
        raw = json.load(f)
    raw["text_config"]["dtype"] = "fp16"
    with open(file, "w") as f:
        json.dump(raw, f)
    argv = ["generate", "--prompt", "x", "--model", str(path), "--device", "cpu", "--max-model-len", "64"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {file}: 'text_config.dtype' is 'fp16', not a dtype deltaserve runs; set it to "
                   f"'bfloat16', 'float16' or 'float32' (torch's names, 'half', 'float' and 'float64' too)."], err
