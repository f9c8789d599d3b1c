"""config.json keys that vLLM / transformers checkpoints carry beyond the usual ones: a compressed-tensors
`compression_config` (older llm-compressor / sparseml exports) and a missing dtype."""
import json
import os

import pytest
from quant_helpers import assert_matches_twin
from test_config import assert_one_sentence, parse, raw_config, text_fields
from test_quantized import GROUP, write_ct

from deltaserve import LLM
from deltaserve.config import ConfigError
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
