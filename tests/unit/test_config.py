"""ModelConfig: the four Qwen3.5 architectures parse, derived fields, and one-sentence ConfigErrors."""
import copy
import json
import os
import re

import pytest
from test_weights import make_unreadable

from deltaserve.config import SUPPORTED_ARCHITECTURES, ConfigError, ModelConfig
from deltaserve.tiny import make_tiny

ARCHS = list(SUPPORTED_ARCHITECTURES)


def text_fields(moe: bool = False, **over) -> dict:
    """Language-model fields shaped like a (shrunk) real Qwen3.5 config.json."""
    text = {
        "vocab_size": 1024, "hidden_size": 256, "num_hidden_layers": 8,
        "layer_types": ["linear_attention", "linear_attention", "linear_attention", "full_attention"] * 2,
        "num_attention_heads": 8, "num_key_value_heads": 2, "head_dim": 64,
        "linear_num_key_heads": 4, "linear_num_value_heads": 8, "linear_key_head_dim": 32,
        "linear_value_head_dim": 32, "linear_conv_kernel_dim": 4, "rms_norm_eps": 1e-6,
        "max_position_embeddings": 8192, "full_attention_interval": 4, "mamba_ssm_dtype": "float32",
        "rope_parameters": {"rope_type": "default", "rope_theta": 10000000, "partial_rotary_factor": 0.25,
                            "mrope_section": [11, 11, 10], "mrope_interleaved": True},
        "eos_token_id": 7, "dtype": "bfloat16",
    }
    if moe:
        text.update(num_experts=16, num_experts_per_tok=4, moe_intermediate_size=96,
                    shared_expert_intermediate_size=96)
    else:
        text["intermediate_size"] = 512
    text.update(over)
    return text


def raw_config(arch: str, text: dict | None = None, **top) -> dict:
    """A config.json dict for `arch`: fields under text_config for ConditionalGeneration, flat for CausalLM."""
    is_moe, nested = SUPPORTED_ARCHITECTURES[arch]
    text = text_fields(is_moe) if text is None else text
    raw = {"architectures": [arch], "text_config": text} if nested else {"architectures": [arch], **text}
    raw.update(top)
    return raw


def parse(raw: dict, gen: dict | None = None) -> ModelConfig:
    return ModelConfig.from_dict(raw, gen)


def assert_one_sentence(msg: str, *needles: str) -> None:
    """A user-facing error: one line, one sentence (no '. Next'), ending with a full stop, naming `needles`."""
    assert "\n" not in msg, msg
    assert msg.endswith("."), msg
    assert not re.search(r"[.!?]\s+[A-Z]", msg), f"more than one sentence: {msg}"
    for n in needles:
        assert n in msg, f"{n!r} not named in: {msg}"


def write_dir(path, raw, gen=None) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)
    if gen is not None:
        with open(os.path.join(path, "generation_config.json"), "w") as f:
            json.dump(gen, f)
    return str(path)


@pytest.fixture(scope="module", params=[False, True], ids=["dense", "moe"])
def tiny_dir(request, tmp_path_factory):
    return make_tiny(str(tmp_path_factory.mktemp("tiny")), moe=request.param)


# ---------------------------------------------------------------- the four architectures

@pytest.mark.parametrize("arch", ARCHS, ids=["cond_dense", "cond_moe", "causal_dense", "causal_moe"])
def test_architectures_parse(arch):
    is_moe, nested = SUPPORTED_ARCHITECTURES[arch]
    cfg = parse(raw_config(arch))
    assert (cfg.architecture, cfg.is_moe, cfg.nested) == (arch, is_moe, nested)
    assert (cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers) == (1024, 256, 8)
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (8, 2, 64)
    assert (cfg.linear_num_key_heads, cfg.linear_num_value_heads) == (4, 8)
    assert cfg.full_attention_layers == [3, 7]
    assert cfg.linear_attention_layers == [0, 1, 2, 4, 5, 6]
    assert cfg.torch_dtype == "bfloat16"
    if is_moe:
        assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.moe_intermediate_size,
                cfg.shared_expert_intermediate_size, cfg.intermediate_size) == (16, 4, 96, 96, 0)
    else:
        assert (cfg.intermediate_size, cfg.num_experts, cfg.moe_intermediate_size) == (512, 0, 0)


@pytest.mark.parametrize("arch", ["Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"],
                         ids=["dense", "moe"])
def test_conditional_generation_ignores_flat_fields(arch):
    """Nested architectures read text_config, not same-named top-level keys (e.g. vision sizes)."""
    raw = raw_config(arch, hidden_size=9999, num_hidden_layers=1)
    cfg = parse(raw)
    assert (cfg.hidden_size, cfg.num_hidden_layers) == (256, 8)


def test_make_tiny_dir_parses(tiny_dir):
    with open(os.path.join(tiny_dir, "config.json")) as f:
        raw = json.load(f)
    cfg = ModelConfig.from_hf_dir(tiny_dir)
    assert cfg.architecture == raw["architectures"][0]
    assert cfg.nested and cfg.is_moe == ("Moe" in cfg.architecture)
    assert cfg.vocab_size == raw["text_config"]["vocab_size"]
    assert cfg.layer_types == ("linear_attention",) * 3 + ("full_attention",)
    assert cfg.rotary_dim == 16 and cfg.rope_theta == 1e7
    assert cfg.torch_dtype == "float32" and cfg.state_dtype == "float32"


def test_make_tiny_dir_flattened_to_causal_lm_is_the_same_model(tiny_dir, tmp_path):
    """Moving text_config to the top level + a CausalLM architecture gives the same fields."""
    with open(os.path.join(tiny_dir, "config.json")) as f:
        raw = json.load(f)
    with open(os.path.join(tiny_dir, "generation_config.json")) as f:
        gen = json.load(f)
    nested = ModelConfig.from_hf_dir(tiny_dir)
    arch = "Qwen3_5MoeForCausalLM" if nested.is_moe else "Qwen3_5ForCausalLM"
    flat = ModelConfig.from_hf_dir(write_dir(tmp_path, {**raw["text_config"], "architectures": [arch]}, gen))
    assert (flat.architecture, flat.nested) == (arch, False)
    skip = {"architecture", "nested"}
    for field in nested.__dataclass_fields__:
        if field not in skip:
            assert getattr(flat, field) == getattr(nested, field), field


# ---------------------------------------------------------------- derived fields

@pytest.mark.parametrize(
    "interval, n_layers, full",
    [(4, 8, [3, 7]), (2, 5, [1, 3]), (1, 3, [0, 1, 2]), (None, 6, [3])],
    ids=["every_4th", "every_2nd", "all_full", "default_4"],
)
def test_layer_types_from_full_attention_interval(interval, n_layers, full):
    text = text_fields(num_hidden_layers=n_layers)
    del text["layer_types"]
    text.pop("full_attention_interval")
    if interval is not None:
        text["full_attention_interval"] = interval
    cfg = parse(raw_config("Qwen3_5ForConditionalGeneration", text))
    assert len(cfg.layer_types) == n_layers
    assert cfg.full_attention_layers == full
    assert set(cfg.linear_attention_layers) == set(range(n_layers)) - set(full)


def test_explicit_layer_types_win_over_interval():
    types = ["full_attention", "linear_attention"] * 4
    cfg = parse(raw_config("Qwen3_5ForCausalLM", text_fields(layer_types=types, full_attention_interval=4)))
    assert cfg.layer_types == tuple(types)


@pytest.mark.parametrize(
    "rope_fields, theta, rotary_dim",
    [
        ({"rope_parameters": {"rope_theta": 5000000, "partial_rotary_factor": 0.5}}, 5e6, 32),
        ({"rope_parameters": {"rope_theta": 1000}}, 1000.0, 16),  # partial_rotary_factor defaults to 0.25
        ({"rope_parameters": {"rope_theta": 1000}, "partial_rotary_factor": 1.0}, 1000.0, 64),
        ({"rope_theta": 250000.0, "partial_rotary_factor": 0.5}, 250000.0, 32),  # pre-rope_parameters layout
        ({"rope_parameters": {"rope_theta": 42.0, "partial_rotary_factor": 0.5}, "rope_theta": 7.0,
          "partial_rotary_factor": 1.0}, 42.0, 32),  # rope_parameters wins
    ],
    ids=["rope_parameters", "default_partial", "flat_partial", "legacy_flat", "rope_parameters_win"],
)
def test_rope_theta_and_partial_rotary_factor(rope_fields, theta, rotary_dim):
    text = text_fields(head_dim=64)
    del text["rope_parameters"]
    text.update(rope_fields)
    cfg = parse(raw_config("Qwen3_5ForConditionalGeneration", text))
    assert cfg.rope_theta == theta
    assert cfg.rotary_dim == rotary_dim


def test_head_dim_defaults_to_hf_default_256():
    """transformers' Qwen3_5TextConfig / Qwen3_5MoeTextConfig default head_dim to 256, never hidden // heads."""
    text = text_fields(hidden_size=256, num_attention_heads=8)
    del text["head_dim"]
    assert parse(raw_config("Qwen3_5ForCausalLM", text)).head_dim == 256
    moe = text_fields(moe=True, hidden_size=256, num_attention_heads=8)
    del moe["head_dim"]
    assert parse(raw_config("Qwen3_5MoeForConditionalGeneration", moe)).head_dim == 256


@pytest.mark.parametrize(
    "hk, hv, k, v",
    [(4, 12, 32, 64), (16, 48, 128, 128), (2, 2, 64, 32)],
    ids=["hv3x_k_ne_v", "27b_like_hv3x", "hv_eq_hk_v_lt_k"],
)
def test_gdn_head_shapes_accepted(hk, hv, k, v):
    text = text_fields(True, linear_num_key_heads=hk, linear_num_value_heads=hv, linear_key_head_dim=k,
                       linear_value_head_dim=v)
    cfg = parse(raw_config("Qwen3_5MoeForCausalLM", text))
    assert (cfg.linear_num_key_heads, cfg.linear_num_value_heads) == (hk, hv)
    assert (cfg.linear_key_head_dim, cfg.linear_value_head_dim) == (k, v)
    assert cfg.conv_dim == 2 * hk * k + hv * v


@pytest.mark.parametrize(
    "gen, text_eos, top_eos, expected",
    [
        ({"eos_token_id": [10, 11]}, 7, None, (10, 11, 7)),
        ({"eos_token_id": [7, 10]}, 7, None, (7, 10)),  # duplicates merged, generation_config order first
        ({"eos_token_id": 10}, 7, 12, (10, 7, 12)),
        (None, 7, None, (7,)),
        (None, [7, 8], None, (7, 8)),
        ({}, None, 12, (12,)),
    ],
    ids=["gen_list", "gen_list_dup", "gen_int_and_top", "no_gen", "config_list", "top_level_only"],
)
def test_eos_ids_merged(tmp_path, gen, text_eos, top_eos, expected):
    raw = raw_config("Qwen3_5ForConditionalGeneration", text_fields(eos_token_id=text_eos))
    if top_eos is not None:
        raw["eos_token_id"] = top_eos
    assert parse(raw, gen).eos_token_ids == expected
    assert ModelConfig.from_hf_dir(write_dir(tmp_path, raw, gen)).eos_token_ids == expected


def test_make_tiny_eos_ids_from_generation_config(tiny_dir):
    with open(os.path.join(tiny_dir, "generation_config.json")) as f:
        gen_eos = json.load(f)["eos_token_id"]
    cfg = ModelConfig.from_hf_dir(tiny_dir)
    assert isinstance(gen_eos, list) and len(gen_eos) == 2
    assert cfg.eos_token_ids == tuple(gen_eos)  # the config's own eos is gen_eos[0]: merged, not repeated


@pytest.mark.parametrize(
    "arch, top, text, expected",
    [
        ("Qwen3_5ForConditionalGeneration", True, False, True),
        ("Qwen3_5MoeForConditionalGeneration", False, True, False),
        ("Qwen3_5ForConditionalGeneration", None, True, True),  # falls back to text_config
        ("Qwen3_5ForConditionalGeneration", None, None, False),
        ("Qwen3_5ForCausalLM", None, True, True),
        ("Qwen3_5MoeForCausalLM", None, None, False),
    ],
    ids=["cond_top_true", "cond_top_false_wins", "cond_text_fallback", "cond_default", "causal_flat", "causal_default"],
)
def test_tie_word_embeddings(arch, top, text, expected):
    fields = text_fields(SUPPORTED_ARCHITECTURES[arch][0])
    if text is not None:
        fields["tie_word_embeddings"] = text
    raw = raw_config(arch, fields)
    if top is not None:
        raw["tie_word_embeddings"] = top
    assert parse(raw).tie_word_embeddings is expected


_AWQ = {"quant_method": "awq", "bits": 4, "group_size": 128, "version": "gemm"}


def _ct(**weights) -> dict:
    """A compressed-tensors int4 quantization_config, its weights' fields updated with `weights`."""
    return {"quant_method": "compressed-tensors", "format": "pack-quantized", "config_groups": {"group_0": {
        "weights": {"num_bits": 4, "type": "int", "strategy": "group", "group_size": 128, **weights}}}}


@pytest.mark.parametrize("text, top, gen, fname, field", [
    ({"attention_bias": "false"}, {}, {}, "config.json", "attention_bias"),
    ({"attention_bias": 1}, {}, {}, "config.json", "attention_bias"),
    ({"attention_bias": None}, {}, {}, "config.json", "attention_bias"),
    ({}, {"tie_word_embeddings": "false"}, {}, "config.json", "tie_word_embeddings"),
    ({}, {"quantization_config": {**_AWQ, "zero_point": "true"}}, {}, "config.json", "zero_point"),
    ({}, {"quantization_config": _ct(symmetric="false")}, {}, "config.json", "symmetric"),
    ({}, {}, {"do_sample": "false"}, "generation_config.json", "do_sample"),
], ids=["attention_bias_string", "attention_bias_int", "attention_bias_null", "tie_string", "awq_zero_point_string",
        "ct_symmetric_string", "do_sample_string"])
def test_boolean_fields_must_be_json_booleans(tmp_path, text, top, gen, fname, field):
    """A string "false" (or a 1) in a boolean field was taken as true (attention_bias "false" built q/k/v/o biases;
    do_sample "false" sampled: GenerationConfig keeps the string); transformers' config classes refuse these."""
    write_dir(tmp_path, raw_config("Qwen3_5ForCausalLM", text_fields(**text), **top), gen=gen)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_dir(str(tmp_path))
    assert_one_sentence(str(e.value), fname, f"'{field}' must be true or false")


_FP8 = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}


def _ct_group(group) -> dict:
    """A compressed-tensors quantization_config whose one config group is `group`."""
    return {**_ct(), "config_groups": {"group_0": group}}


@pytest.mark.parametrize("qcfg, needles", [
    (_ct_group([]), ["config_groups", "group_0", "object"]),
    (_ct_group({"weights": "int4"}), ["config_groups", "group_0", "'weights'", "object"]),
    ({**_AWQ, "modules_to_not_convert": 5}, ["modules_to_not_convert", "list of module names"]),
    ({**_ct(), "ignore": {"lm_head": True}}, ["ignore", "list of module names"]),
    ({**_FP8, "weight_block_size": [128.0, 128.0]}, ["weight_block_size", "[128.0, 128.0]"]),
], ids=["ct_group_list", "ct_weights_string", "awq_not_convert_int", "ct_ignore_object", "fp8_block_floats"])
def test_quantization_config_fields_of_the_wrong_json_type(qcfg, needles):
    """Each was a trace: AttributeError ('list' object has no attribute 'get'), TypeError ('int' object is not
    iterable), or, for float block sizes (equal to [128, 128] in Python), torch.empty's TypeError deep in building the
    FP8 model."""
    with pytest.raises(ConfigError) as e:
        parse(raw_config("Qwen3_5ForCausalLM", quantization_config=qcfg))
    assert_one_sentence(str(e.value), "quantization_config", *needles)


@pytest.mark.parametrize("arch", ["Qwen3_5ForConditionalGeneration", "Qwen3_5MoeForConditionalGeneration"],
                         ids=["dense", "moe"])
def test_quantization_config_under_text_config_is_read(arch):
    """Some multimodal exports keep quantization_config inside text_config (vLLM reads it there too): it used to be
    ignored, and the quantized weights then failed as 'config.json has no quantization_config'."""
    text = text_fields(SUPPORTED_ARCHITECTURES[arch][0], quantization_config=_FP8)
    cfg = parse(raw_config(arch, text))
    assert cfg.quantization is not None and cfg.quantization.method == "fp8"
    assert cfg.quantization.weight_block_size == (128, 128)
    top = parse(raw_config(arch, text, quantization_config=_AWQ))  # a top-level one still decides
    assert top.quantization.method == "awq"


def test_boolean_fields_read_as_given():
    cfg = parse(raw_config("Qwen3_5ForCausalLM", text_fields(attention_bias=True)), {"do_sample": False})
    assert cfg.attention_bias is True and ("temperature", 0.0) in cfg.sampling_defaults
    cfg = parse(raw_config("Qwen3_5ForCausalLM", text_fields()), {"do_sample": None, "temperature": 0.7})
    assert cfg.attention_bias is False and cfg.sampling_defaults == (("temperature", 0.7),)  # null: unset, as in HF


@pytest.mark.parametrize("text_keys, top_keys", [
    ({"torch_dtype": "float16"}, {}),
    ({}, {"torch_dtype": "float16"}),
    ({"dtype": "float16"}, {"torch_dtype": "bfloat16"}),
    ({"torch_dtype": "float16"}, {"dtype": "float16"}),
], ids=["text_torch_dtype_only", "top_torch_dtype_only", "text_dtype", "both_named_alike"])
def test_checkpoint_dtype_read_under_either_name(text_keys, top_keys):
    """`torch_dtype` (the older name) in text_config was ignored: the checkpoint read as float32, and dtype='auto' on
    CUDA then ran a float16 checkpoint in bfloat16."""
    text = text_fields()
    text.pop("dtype")
    text.update(text_keys)
    assert parse(raw_config("Qwen3_5ForConditionalGeneration", text, **top_keys)).torch_dtype == "float16"


@pytest.mark.parametrize("dtype", [None, "float32", "bfloat16", "float16"], ids=["default", "fp32", "bf16", "fp16"])
def test_mamba_ssm_dtype(dtype):
    text = text_fields()
    text.pop("mamba_ssm_dtype")
    if dtype is not None:
        text["mamba_ssm_dtype"] = dtype
    assert parse(raw_config("Qwen3_5ForConditionalGeneration", text)).state_dtype == (dtype or "float32")


# ---------------------------------------------------------------- errors: one sentence naming the problem

def test_unknown_architecture_lists_supported():
    with pytest.raises(ConfigError) as e:
        parse(raw_config("Qwen3_5ForCausalLM", architectures=["LlamaForCausalLM"]))
    assert_one_sentence(str(e.value), "'LlamaForCausalLM'", "not supported", *ARCHS)


def test_missing_architectures_lists_supported():
    raw = raw_config("Qwen3_5ForCausalLM")
    del raw["architectures"]
    with pytest.raises(ConfigError) as e:
        parse(raw)
    assert_one_sentence(str(e.value), "'architectures'", *ARCHS)


def test_architectures_given_as_string():
    """A bare string is a common hand-edit mistake; the message must name the string, not its first letter."""
    with pytest.raises(ConfigError) as e:
        parse(raw_config("Qwen3_5ForCausalLM", architectures="LlamaForCausalLM"))
    assert_one_sentence(str(e.value), "'LlamaForCausalLM'")


def test_missing_directory(tmp_path):
    path = str(tmp_path / "nope")
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_dir(path)
    assert_one_sentence(str(e.value), path, "does not exist")


@pytest.mark.parametrize("path, hub", [("Qwen/Qwen3.5-9B", True), ("org/no-such-model", True), ("./Qwen/x", False),
                                       ("a/b/c", False)], ids=["qwen_id", "other_id", "relative_dir", "deeper_path"])
def test_a_hub_id_is_said_to_need_a_download(path, hub, tmp_path, monkeypatch):
    """There are no downloads: a Hugging Face id was "does not exist" with no word of why; now the sentence says it."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_dir(path)
    assert_one_sentence(str(e.value), repr(path), "does not exist")
    assert ("Hugging Face model id" in str(e.value)) == hub, e.value
    if hub:
        assert_one_sentence(str(e.value), "downloads nothing", f"huggingface-cli download {path} --local-dir DIR")


def test_quantization_config_without_quant_method():
    """Was "quant_method None is not supported" (Python's None for JSON's absent field)."""
    with pytest.raises(ConfigError) as e:
        parse(raw_config("Qwen3_5ForCausalLM", quantization_config={"bits": 4, "group_size": 128}))
    assert_one_sentence(str(e.value), "quantization_config has no 'quant_method'", "'awq'")
    assert "None" not in str(e.value)


def test_missing_config_json(tmp_path):
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_dir(str(tmp_path))
    assert_one_sentence(str(e.value), os.path.join(str(tmp_path), "config.json"), "not found")


@pytest.mark.parametrize("fname", ["config.json", "generation_config.json"], ids=["config", "generation_config"])
def test_invalid_json(tmp_path, fname):
    write_dir(tmp_path, raw_config("Qwen3_5ForCausalLM"), gen={})
    (tmp_path / fname).write_text('{"architectures": [\n')
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_dir(str(tmp_path))
    assert_one_sentence(str(e.value), fname, "not valid JSON", "line")


@pytest.mark.parametrize("fname", ["config.json", "generation_config.json"], ids=["config", "generation_config"])
def test_unreadable_config_is_one_sentence(tmp_path, monkeypatch, fname):
    """config.json with mode 000: LLM(...) raised a PermissionError's trace."""
    write_dir(tmp_path, raw_config("Qwen3_5ForCausalLM"), gen={})
    make_unreadable(str(tmp_path / fname), monkeypatch)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_dir(str(tmp_path))
    assert_one_sentence(str(e.value), str(tmp_path / fname), "cannot be read", "Permission denied")


def test_config_not_an_object(tmp_path):
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_dir(str(tmp_path))
    assert_one_sentence(str(e.value), "config.json", "JSON object")


def test_conditional_generation_without_text_config():
    raw = raw_config("Qwen3_5ForConditionalGeneration")
    del raw["text_config"]
    with pytest.raises(ConfigError) as e:
        parse(raw)
    assert_one_sentence(str(e.value), "'text_config'")


@pytest.mark.parametrize(
    "arch, field",
    [
        ("Qwen3_5ForConditionalGeneration", "vocab_size"),
        ("Qwen3_5ForConditionalGeneration", "hidden_size"),
        ("Qwen3_5ForCausalLM", "num_hidden_layers"),
        ("Qwen3_5ForCausalLM", "num_key_value_heads"),
        ("Qwen3_5ForConditionalGeneration", "linear_num_value_heads"),
        ("Qwen3_5ForConditionalGeneration", "linear_key_head_dim"),
        ("Qwen3_5ForConditionalGeneration", "intermediate_size"),
        ("Qwen3_5MoeForConditionalGeneration", "num_experts"),
        ("Qwen3_5MoeForCausalLM", "moe_intermediate_size"),
        ("Qwen3_5MoeForCausalLM", "num_experts_per_tok"),
    ],
    ids=["vocab", "hidden", "layers", "kv_heads", "linear_v_heads", "linear_k_dim", "intermediate",
         "num_experts", "moe_intermediate", "experts_per_tok"],
)
def test_missing_required_field(arch, field):
    text = text_fields(SUPPORTED_ARCHITECTURES[arch][0])
    del text[field]
    with pytest.raises(ConfigError) as e:
        parse(raw_config(arch, text))
    assert_one_sentence(str(e.value), f"'{field}'", "missing")


def test_missing_rope_theta():
    text = text_fields()
    text["rope_parameters"] = {"partial_rotary_factor": 0.25}
    with pytest.raises(ConfigError) as e:
        parse(raw_config("Qwen3_5ForConditionalGeneration", text))
    assert_one_sentence(str(e.value), "rope_theta", "missing")


@pytest.mark.parametrize(
    "over, field",
    [
        ({"hidden_size": "256"}, "hidden_size"),
        ({"num_hidden_layers": 8.0}, "num_hidden_layers"),
        ({"vocab_size": True}, "vocab_size"),
        ({"rms_norm_eps": "1e-6"}, "rms_norm_eps"),
        ({"linear_conv_kernel_dim": None}, "linear_conv_kernel_dim"),
        ({"full_attention_interval": "4", "layer_types": None}, "full_attention_interval"),
        ({"rope_parameters": {"rope_theta": "ten million"}}, "rope_theta"),
        ({"rope_parameters": {"rope_theta": 1e7, "partial_rotary_factor": "quarter"}}, "partial_rotary_factor"),
        ({"rope_parameters": [10000000]}, "rope_parameters"),
    ],
    ids=["str_int", "float_int", "bool_int", "str_float", "null_int", "interval", "rope_theta_str",
         "partial_str", "rope_parameters_list"],
)
def test_wrong_type_names_field(over, field):
    text = text_fields()
    for k, v in over.items():
        if v is None and k == "layer_types":
            del text[k]
        else:
            text[k] = v
    with pytest.raises(ConfigError) as e:
        parse(raw_config("Qwen3_5ForConditionalGeneration", text))
    assert_one_sentence(str(e.value), field)


@pytest.mark.parametrize(
    "over, needles",
    [
        ({"linear_num_key_heads": 4, "linear_num_value_heads": 6}, ["'linear_num_value_heads' (6)", "(4)"]),
        ({"linear_num_key_heads": 16, "linear_num_value_heads": 8}, ["'linear_num_value_heads' (8)", "(16)"]),
        ({"num_attention_heads": 8, "num_key_value_heads": 3}, ["'num_attention_heads' (8)", "(3)"]),
        ({"num_attention_heads": 0}, ["'num_attention_heads'", "positive"]),
        ({"num_key_value_heads": 0}, ["'num_key_value_heads'", "positive"]),
        ({"linear_num_key_heads": 0}, ["'linear_num_key_heads'", "positive"]),
        ({"layer_types": ["linear_attention"] * 7}, ["'layer_types'", "(8)"]),
        ({"layer_types": "full_attention"}, ["'layer_types'", "(8)"]),
        ({"layer_types": ["linear_attention", "sliding_attention"] + ["full_attention"] * 6},
         ["layer_types[1]", "'sliding_attention'"]),
        ({"mamba_ssm_dtype": "int8"}, ["'mamba_ssm_dtype'", "'int8'"]),
        ({"rope_parameters": {"rope_theta": 1e7, "partial_rotary_factor": 0.0}}, ["partial_rotary_factor"]),
        ({"full_attention_interval": 0, "layer_types": None}, ["'full_attention_interval'"]),
    ],
    ids=["hv_not_multiple", "hv_lt_hk", "heads_not_divisible", "zero_heads", "zero_kv_heads", "zero_hk",
         "layer_types_short", "layer_types_str", "layer_types_unknown", "ssm_dtype", "rotary_zero",
         "interval_zero"],
)
def test_inconsistent_sizes_rejected(over, needles):
    text = text_fields()
    for k, v in over.items():
        if v is None:
            del text[k]
        else:
            text[k] = v
    with pytest.raises(ConfigError) as e:
        parse(raw_config("Qwen3_5ForConditionalGeneration", text))
    assert_one_sentence(str(e.value), *needles)


@pytest.mark.parametrize("top_k, n_experts", [(0, 16), (17, 16)], ids=["zero", "more_than_experts"])
def test_moe_experts_per_tok_range(top_k, n_experts):
    text = text_fields(True, num_experts_per_tok=top_k, num_experts=n_experts)
    with pytest.raises(ConfigError) as e:
        parse(raw_config("Qwen3_5MoeForConditionalGeneration", text))
    assert_one_sentence(str(e.value), f"'num_experts_per_tok' ({top_k})", f"({n_experts})")


def test_error_names_config_path(tmp_path):
    """from_hf_dir errors say which file is wrong."""
    raw = raw_config("Qwen3_5ForCausalLM", text_fields(mamba_ssm_dtype="fp8"))
    path = write_dir(tmp_path, raw)
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_dir(path)
    assert_one_sentence(str(e.value), os.path.join(path, "config.json"), "'mamba_ssm_dtype'")


def test_from_dict_does_not_mutate_input():
    raw = raw_config("Qwen3_5ForConditionalGeneration")
    before = copy.deepcopy(raw)
    parse(raw, {"eos_token_id": [1, 2]})
    assert raw == before


@pytest.mark.parametrize("device,dtype,expected", [
    ("cpu", "auto", "float32"), ("cpu", "bfloat16", "bfloat16"), ("cuda", "auto", "bfloat16"),
    ("cuda", "float16", "float16"), ("cuda", "float32", None), ("cpu", "fp8", None)],
    ids=["cpu-auto", "cpu-bf16", "cuda-auto", "cuda-fp16", "cuda-fp32-refused", "bad-name"])
def test_engine_dtype(tiny_dir, device, dtype, expected):
    """fp32 on CUDA is refused in one sentence (the Triton tiles are sized for 16-bit operands)."""
    import torch

    from deltaserve.llm import _resolve_dtype

    cfg = ModelConfig.from_hf_dir(tiny_dir)
    if expected is None:
        with pytest.raises(ValueError, match="dtype"):
            _resolve_dtype(dtype, cfg, torch.device(device))
    else:
        assert _resolve_dtype(dtype, cfg, torch.device(device)) == getattr(torch, expected)


@pytest.mark.parametrize("over, needles", [
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e7}}, ("'yarn'", "not supported")),
    ({"hidden_act": "gelu"}, ("'hidden_act'", "'gelu'", "'silu'")),
    ({"max_position_embeddings": 0}, ("'max_position_embeddings'", "positive")),
    ({"rms_norm_eps": -1.0}, ("'rms_norm_eps'", "positive")),
    ({"rope_parameters": {"rope_theta": 0, "partial_rotary_factor": 0.25}}, ("'rope_theta'", "positive")),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192}},
     ("rope_scaling", "'yarn'", "not supported")),
    ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, ("rope_scaling", "'linear'")),
], ids=["yarn", "gelu", "max_positions_zero", "negative_eps", "zero_theta", "legacy-rope-scaling-yarn",
        "legacy-rope-scaling-linear"])
def test_fields_the_model_cannot_honour(over, needles):
    """A setting deltaserve does not implement (or a value that makes the model garbage) is refused, not ignored."""
    with pytest.raises(ConfigError) as e:
        parse(raw_config("Qwen3_5ForCausalLM", text_fields(**over)))
    assert_one_sentence(str(e.value), *needles)


def test_legacy_rope_scaling_of_plain_rope_is_read():
    """The older spelling (rope_scaling next to rope_theta) was skipped without a word, so a YaRN setting ran as plain
    RoPE (max |logprob| difference 1.7 against HF); it is read like rope_parameters now."""
    text = text_fields(rope_theta=5e6, partial_rotary_factor=0.5, rope_scaling={"type": "mrope",
                                                                               "mrope_section": [8, 8, 8]})
    del text["rope_parameters"]
    cfg = parse(raw_config("Qwen3_5ForCausalLM", text))
    assert cfg.rope_theta == 5e6 and cfg.rotary_dim == 32


@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
def test_a_json_file_that_is_not_utf8_is_named(tmp_path, name):
    """A UTF-16 file gave "'utf-8' codec can't decode byte 0xff" (no file named) and a UnicodeDecodeError."""
    write_dir(tmp_path, raw_config("Qwen3_5ForCausalLM"), gen={})
    text = (tmp_path / name).read_text()
    (tmp_path / name).write_bytes(text.encode("utf-16"))
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_dir(str(tmp_path))
    assert_one_sentence(str(e.value), name, "not UTF-8")


def test_causal_lm_with_its_fields_under_text_config():
    """HF reads a *ForCausalLM checkpoint whose config keeps the fields under text_config (a composite config);
    it was refused as "required field 'num_hidden_layers' is missing"."""
    raw = {"architectures": ["Qwen3_5ForCausalLM"], "text_config": text_fields(), "tie_word_embeddings": True}
    cfg = parse(raw)
    assert (cfg.num_hidden_layers, cfg.nested, cfg.tie_word_embeddings) == (8, False, True)


def test_generation_config_not_an_object(tmp_path):
    write_dir(tmp_path, raw_config("Qwen3_5ForCausalLM"), gen=[1, 2])
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_dir(str(tmp_path))
    assert_one_sentence(str(e.value), "generation_config.json", "JSON object")


@pytest.mark.parametrize(
    "rope_fields, theta, rotary_dim",
    [
        # transformers' convert_rope_params_to_dict: `rope_scaling` replaces `rope_parameters` whole
        ({"rope_parameters": {"rope_theta": 42.0, "partial_rotary_factor": 0.5},
          "rope_scaling": {"rope_type": "default", "mrope_section": [11, 11, 10]}, "rope_theta": 7.0}, 7.0, 16),
        ({"rope_parameters": {"rope_theta": 42.0, "partial_rotary_factor": 0.5},
          "rope_scaling": {"rope_type": "default", "rope_theta": 9.0, "partial_rotary_factor": 1.0}}, 9.0, 64),
        ({"rope_parameters": {"rope_theta": 42.0, "partial_rotary_factor": 0.5}, "rope_scaling": None}, 42.0, 32),
    ],
    ids=["scaling_replaces_parameters", "scaling_own_fields", "null_scaling"],
)
def test_rope_scaling_replaces_rope_parameters_as_in_hf(rope_fields, theta, rotary_dim):
    text = text_fields(head_dim=64)
    del text["rope_parameters"]
    text.update(rope_fields)
    cfg = parse(raw_config("Qwen3_5ForConditionalGeneration", text))
    assert (cfg.rope_theta, cfg.rotary_dim) == (theta, rotary_dim)


def test_rope_scaling_without_theta_beside_rope_parameters_is_refused():
    """HF would run it with its default theta 10000, not the rope_parameters' value: said, not silently changed."""
    text = text_fields()
    text["rope_scaling"] = {"rope_type": "default", "mrope_section": [11, 11, 10]}
    with pytest.raises(ConfigError) as e:
        parse(raw_config("Qwen3_5ForConditionalGeneration", text))
    assert_one_sentence(str(e.value), "rope_theta", "missing")


@pytest.mark.parametrize("gen, text_eos, needle", [
    ({"eos_token_id": "10"}, 7, "generation_config.json"),
    ({"eos_token_id": [10, "11"]}, 7, "generation_config.json"),
    ({"eos_token_id": True}, 7, "generation_config.json"),
    ({}, "7", "config.json"),
    ({}, -1, "config.json"),
], ids=["gen_str", "gen_list_str", "gen_bool", "config_str", "config_negative"])
def test_eos_id_of_the_wrong_type_is_refused(tmp_path, gen, text_eos, needle):
    """An eos_token_id written as a string was dropped: generation ran past the end of the answer, silently."""
    raw = raw_config("Qwen3_5ForConditionalGeneration", text_fields(eos_token_id=text_eos))
    with pytest.raises(ConfigError) as e:
        ModelConfig.from_hf_dir(write_dir(tmp_path, raw, gen))
    assert_one_sentence(str(e.value), needle, "'eos_token_id'")
