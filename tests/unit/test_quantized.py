"""int4 checkpoints (AWQ gemm, compressed-tensors pack-quantized) on the CPU reference path.

The oracle for a quantized checkpoint is its dequantized twin: the same checkpoint with every int4 Linear written
back as the fp32 weight it decodes to, loaded by the ordinary 16-bit path. Equal outputs prove the int4 layouts,
the per-Linear format decisions and the mixed fused groups are read right; the quantization error itself is
bounded separately (|W - Ŵ| <= s/2 per group)."""
import json
import os
import re
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from deltaserve import LLM
from deltaserve.config import ConfigError, ModelConfig
from deltaserve.layers.linear import Linear, ProjectionGroup, QuantExperts, QuantLinear
from deltaserve.layers.quant import AWQ_ORDER, dequant_awq, dequant_ct, pack_int4, to_awq, to_ct, unpack_int4
from deltaserve.models.weights import WeightsError
from deltaserve.quantize import quantize_checkpoint
from deltaserve.tiny import make_tiny
from quant_helpers import GROUP, assert_matches_twin, library_ct, run_text, write_ct


@pytest.mark.parametrize("order", [AWQ_ORDER, tuple(range(8))], ids=["awq_order", "ct_order"])
def test_pack_unpack_round_trip(order):
    q = torch.randint(0, 16, (6, 40), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = pack_int4(q, order)
    assert packed.shape == (6, 5) and packed.dtype == torch.int32
    assert torch.equal(unpack_int4(packed, order), q)
    # the documented bit layout: element 8c + order[i] at bits 4i
    assert int((packed[2, 1] >> (4 * 3)) & 0xF) == int(q[2, 8 + order[3]])


def _pack_by_spec(q, order):
    """The spec, one element at a time: element 8c + order[i] of a row sits at bits 4i of int32 c."""
    rows, cols = q.shape
    out = torch.zeros(rows, cols // 8, dtype=torch.int64)
    for r in range(rows):
        for c in range(cols // 8):
            for i in range(8):
                out[r, c] |= int(q[r, 8 * c + order[i]]) << (4 * i)
    return (out - (out >= 2**31).long() * 2**32).to(torch.int32)  # as the int32 bit pattern


def test_dequant_matches_the_spec_formulas():
    """Independent of pack_int4: tensors packed element by element from the KERNELS.md layouts decode to
    W[k, n] = (q[k, n] - z[k // G, n]) * s[k // G, n] (AWQ) and W[n, k] = (q - 8) * scale[n, k // G] (CT)."""
    g = torch.Generator().manual_seed(4)
    k, n, grp = 64, 16, 16
    q = torch.randint(0, 16, (k, n), generator=g)
    z = torch.randint(0, 16, (k // grp, n), generator=g)
    s = torch.rand(k // grp, n, generator=g).half()
    w = dequant_awq(_pack_by_spec(q, AWQ_ORDER), _pack_by_spec(z, AWQ_ORDER), s, grp, torch.float32)
    ref = (q - z.repeat_interleave(grp, 0)).float() * s.float().repeat_interleave(grp, 0)  # [in, out]
    assert torch.equal(w, ref.t())
    qc = torch.randint(0, 16, (n, k), generator=g)  # stored +8
    sc = torch.rand(n, k // grp, generator=g).bfloat16()  # compressed-tensors keeps the model dtype
    wc = dequant_ct(_pack_by_spec(qc, tuple(range(8))), sc, None, grp, torch.float32)
    assert torch.equal(wc, (qc - 8).float() * sc.float().repeat_interleave(grp, 1))


def test_awq_dequant_within_rtn_bound():
    w = torch.randn(96, 128, generator=torch.Generator().manual_seed(1))
    t = to_awq(w, GROUP)
    assert t["qweight"].shape == (128, 12) and t["qzeros"].shape == (4, 12) and t["scales"].shape == (4, 96)
    assert t["scales"].dtype == torch.float16
    w_hat = dequant_awq(t["qweight"], t["qzeros"], t["scales"], GROUP, torch.float32)
    s = t["scales"].float().t().repeat_interleave(GROUP, dim=1)  # [out, in]
    err = (w - w_hat).abs()
    assert (err <= s / 2 * 1.01 + 1e-6).all(), float((err / s).max())
    assert err.max() > 0  # it did quantize


@pytest.mark.parametrize("zero_point", [False, True], ids=["symmetric", "zero_point"])
def test_ct_dequant_within_rtn_bound(zero_point):
    w = torch.randn(64, 128, generator=torch.Generator().manual_seed(2))
    t = to_ct(w, GROUP, zero_point)
    assert t["weight_packed"].shape == (64, 16) and t["weight_scale"].shape == (64, 4)
    # stored +8: a weight of exactly 0 sits at nibble 8 in the symmetric layout
    w_hat = dequant_ct(t["weight_packed"], t["weight_scale"], t.get("weight_zero_point"), GROUP, torch.float32)
    s = t["weight_scale"].float().repeat_interleave(GROUP, dim=1)
    assert ((w - w_hat).abs() <= s / 2 * 1.01 + 1e-6).all()


# ---- engine output on quantized tiny checkpoints == the dequantized twin ----

AWQ_CASES = {  # id -> (moe, extra modules_to_not_convert)
    "dense": (False, []),
    "dense_mixed": (False, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "layers.0.", "mlp.up_proj"]),
    "moe": (True, []),
    "moe_mixed": (True, ["layers.0.", "shared_expert.up_proj"]),
}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    return {moe: make_tiny(str(root / f"src_{moe}"), moe=moe) for moe in (False, True)}


@pytest.mark.parametrize("case", list(AWQ_CASES), ids=list(AWQ_CASES))
def test_awq_checkpoint_matches_dequantized_twin(case, sources, tmp_path):
    moe, not_convert = AWQ_CASES[case]
    q = quantize_checkpoint(sources[moe], str(tmp_path / "q"), group_size=GROUP, not_convert=not_convert,
                            progress=False)
    llm = assert_matches_twin(q, tmp_path)
    mods = dict(llm.model.named_modules())
    # every Linear decided its own format: in_proj_a/b 16-bit beside int4 in_proj_qkv/z
    assert isinstance(mods["layers.1.linear_attn.in_proj"], ProjectionGroup)
    # ... and after loading each run of one format is one Linear (merge_projection_runs): int4 qkv|z, 16-bit b|a
    assert isinstance(mods["layers.1.linear_attn.in_proj.in_proj_qkv+in_proj_z"], QuantLinear)
    assert type(mods["layers.1.linear_attn.in_proj.in_proj_b+in_proj_a"]) is Linear
    assert isinstance(mods["layers.3.self_attn.o_proj"], QuantLinear)
    if "layers.0." in not_convert:  # a whole layer left 16-bit keeps its one fused GEMM
        assert type(mods["layers.0.linear_attn.in_proj"]) is Linear
        assert type(mods["layers.0.linear_attn.out_proj"]) is Linear
    if "self_attn.q_proj" in not_convert:  # 16-bit q/k/v, int4 o_proj: q|k|v still one fused GEMM
        assert type(mods["layers.3.self_attn.qkv_proj"]) is Linear
    if moe:  # int4 experts, 16-bit router and shared_expert_gate
        assert isinstance(mods["layers.1.mlp.experts"], QuantExperts)
        assert type(mods["layers.1.mlp.gate"]) is Linear
        assert type(mods["layers.1.mlp.shared_expert_gate"]) is Linear
    with open(os.path.join(q, "config.json")) as f:
        qcfg = json.load(f)["quantization_config"]
    assert qcfg["version"] == "gemm" and qcfg["group_size"] == GROUP and "in_proj_a" in qcfg["modules_to_not_convert"]


@pytest.mark.parametrize("zero_point", [False, True], ids=["symmetric", "zero_point"])
def test_dequant_ct_matches_the_compressed_tensors_package(zero_point):
    """The package's own pack and decompress against dequant_ct, bit for bit (bf16 scales, as llm-compressor
    writes them)."""
    w = torch.randn(64, 4 * GROUP, generator=torch.Generator().manual_seed(7)).bfloat16()
    packed, back = library_ct(w, zero_point)
    assert ("weight_zero_point" in packed) == zero_point and packed["weight_scale"].dtype == torch.bfloat16
    ours = dequant_ct(packed["weight_packed"], packed["weight_scale"], packed.get("weight_zero_point"), GROUP,
                      torch.bfloat16)
    assert torch.equal(ours, back)
    assert (back.float() - w.float()).abs().max() > 0, "sanity: the package quantized something"


@pytest.mark.parametrize("moe, zero_point", [(False, True), (True, False)], ids=["dense_zero_point", "moe_symmetric"])
def test_compressed_tensors_package_checkpoint_matches_its_decompressed_twin(moe, zero_point, sources, tmp_path):
    """A checkpoint packed by the compressed-tensors package: prompt logprobs within 1e-4 of the twin holding the
    package's own decompressed weights, and the same greedy tokens."""
    q = write_ct(sources[moe], str(tmp_path / "ct"), zero_point, library=True)
    assert_matches_twin(q, tmp_path, twin=q + "_twin")


@pytest.mark.parametrize("moe, zero_point", [(False, False), (True, True)], ids=["dense_symmetric", "moe_zero_point"])
def test_compressed_tensors_checkpoint_matches_dequantized_twin(moe, zero_point, sources, tmp_path):
    q = write_ct(sources[moe], str(tmp_path / "ct"), zero_point)
    llm = assert_matches_twin(q, tmp_path)
    assert llm.model.layers[1].linear_attn.out_proj.fmt == ("ct_zp" if zero_point else "ct")


def test_compressed_tensors_channel_strategy_names_the_strategy(sources, tmp_path):
    """A channel-strategy checkpoint (llm-compressor writes group_size null) was refused for a missing group_size."""
    q = write_ct(sources[False], str(tmp_path / "ct"), False)
    with open(os.path.join(q, "config.json")) as f:
        raw = json.load(f)
    raw["quantization_config"]["config_groups"]["group_0"]["weights"].update(strategy="channel", group_size=None)
    with open(os.path.join(q, "config.json"), "w") as f:
        json.dump(raw, f)
    msg = _error(q)
    assert "'group' strategy" in msg and "strategy 'channel'" in msg, msg


@pytest.mark.parametrize("weights, needle", [
    ({"group_size": -1}, "group_size must be a positive number of input channels per scale, got -1"),
    ({"actorder": "group"}, "activation ordering (actorder 'group'"),
], ids=["group-size-minus-1", "actorder-group"])
def test_compressed_tensors_settings_deltaserve_cannot_run_are_named(sources, tmp_path, weights, needle):
    """group_size -1 was refused as "must be int 4-bit with the 'group' strategy (got 4 bits, type 'int', strategy
    'group')", every value quoted valid; actorder "group" loaded without a word (or, with its weight_g_idx tensors,
    was blamed on config.json)."""
    q = write_ct(sources[False], str(tmp_path / "ct"), False)
    with open(os.path.join(q, "config.json")) as f:
        raw = json.load(f)
    raw["quantization_config"]["config_groups"]["group_0"]["weights"].update(weights)
    with open(os.path.join(q, "config.json"), "w") as f:
        json.dump(raw, f)
    msg = _error(q)
    assert needle in msg, msg


def test_compressed_tensors_static_activation_order_loads(sources, tmp_path):
    """actorder "weight" (also spelled "static") reorders columns while quantizing only, with no g_idx stored: such
    checkpoints run as any other."""
    q = write_ct(sources[False], str(tmp_path / "ct"), False)
    with open(os.path.join(q, "config.json")) as f:
        raw = json.load(f)
    raw["quantization_config"]["config_groups"]["group_0"]["weights"]["actorder"] = "weight"
    with open(os.path.join(q, "config.json"), "w") as f:
        json.dump(raw, f)
    assert_matches_twin(q, tmp_path)


def test_not_convert_may_name_a_part_that_is_always_16bit(sources, tmp_path):
    """--not-convert mtp on a checkpoint without an MTP head: already kept 16-bit, so not a typo to refuse."""
    quantize_checkpoint(sources[False], str(tmp_path / "q"), group_size=GROUP, not_convert=["mtp"], progress=False)


def test_calib_without_a_tokenizer_says_so(sources, tmp_path):
    """A source without tokenizer files: "--calib ... holds fewer than 2 tokens of text" for a 2 KB text file."""
    src = tmp_path / "src"
    shutil.copytree(sources[False], src)
    for name in os.listdir(src):
        if name.startswith("tokenizer"):
            os.remove(src / name)
    calib = tmp_path / "calib.txt"
    calib.write_text("Calibration text. " * 100)
    with pytest.raises(ValueError, match="has no tokenizer.json"):
        quantize_checkpoint(str(src), str(tmp_path / "q"), group_size=GROUP, calib=str(calib), progress=False)


def test_compressed_tensors_activation_quantization_is_reported(sources, tmp_path, caplog):
    """A checkpoint that also quantizes activations runs W4A16 (it matches its dequantized twin): said in the log."""
    q = write_ct(sources[False], str(tmp_path / "ct"), False)
    with open(os.path.join(q, "config.json")) as f:
        raw = json.load(f)
    raw["quantization_config"]["config_groups"]["group_0"]["input_activations"] = {
        "num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "dynamic": True}
    with open(os.path.join(q, "config.json"), "w") as f:
        json.dump(raw, f)
    with caplog.at_level("WARNING", logger="deltaserve"):
        assert_matches_twin(q, tmp_path)
    assert "input_activations" in caplog.text and "16-bit activations" in caplog.text



def test_awq_exllama_version_and_quant_config_json_load(sources, tmp_path):
    """version "exllama" (the same gemm tensors, repacked at load time) was refused as a layout we cannot read; an
    older AutoAWQ export keeps its settings only in quant_config.json (w_bit, q_group_size, version "GEMM"), which was
    refused as quantized tensors without a quantization_config. The dequantized twin must not copy quant_config.json
    (it would describe 16-bit tensors as AWQ)."""
    q = quantize_checkpoint(sources[False], str(tmp_path / "q"), group_size=GROUP, progress=False)
    _edit_config(q, version="exllama")
    assert_matches_twin(q, tmp_path / "exllama")
    _settings_in_quant_config_json(q)
    assert ModelConfig.from_hf_dir(q).quantization.group_size == GROUP
    assert_matches_twin(q, tmp_path)
    assert not os.path.exists(tmp_path / "twin" / "quant_config.json")
    with open(os.path.join(q, "quant_config.json"), "w") as f:
        json.dump({"zero_point": True, "q_group_size": GROUP, "w_bit": 4, "version": "GEMV"}, f)
    msg = _error(q)
    assert "quant_config.json" in msg and "version is 'gemv'" in msg, msg


def test_compressed_tensors_kv_cache_scales_are_ignored_and_sparsity_refused(sources, tmp_path, caplog):
    """A kv_cache_scheme's k_scale / v_scale tensors were refused as tensors of another checkpoint's config.json; a
    sparsity_config's sparse-compressed weights loaded as if dense."""
    q = write_ct(sources[False], str(tmp_path / "ct"), False)
    _edit_config(q, kv_cache_scheme={"num_bits": 8, "type": "float", "strategy": "tensor", "symmetric": True})
    file = os.path.join(q, "model.safetensors")
    with safe_open(file, framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    for name in [n for n in tensors if n.endswith("self_attn.o_proj.weight_packed")]:
        tensors[name.replace("o_proj.weight_packed", "k_scale")] = torch.tensor(0.5)
        tensors[name.replace("o_proj.weight_packed", "v_scale")] = torch.tensor(0.5)
    save_file(tensors, file)
    with caplog.at_level("WARNING", logger="deltaserve"):
        assert_matches_twin(q, tmp_path)
    assert "kv_cache_scheme" in caplog.text
    _edit_config(q, sparsity_config={"format": "sparse-bitmask", "sparsity_structure": "unstructured"})
    msg = _error(q)
    assert "quantization_config.sparsity_config.format is 'sparse-bitmask'" in msg, msg


@pytest.mark.parametrize("zero_point", [True, False], ids=["zero_points_config_symmetric", "asymmetric_no_zp"])
def test_compressed_tensors_symmetric_that_disagrees_with_the_tensors_is_named(zero_point, sources, tmp_path):
    """Zero points under symmetric: true were blamed on quantization_config.quant_method."""
    q = write_ct(sources[False], str(tmp_path / "ct"), zero_point)
    with open(os.path.join(q, "config.json")) as f:
        raw = json.load(f)
    raw["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = zero_point
    with open(os.path.join(q, "config.json"), "w") as f:
        json.dump(raw, f)
    msg = _error(q)
    assert "symmetric" in msg and "weight_zero_point" in msg and "quant_method" not in msg, msg


# ---- user errors: one sentence naming the tensor or field ----

def _settings_in_quant_config_json(q: str) -> None:
    """Move checkpoint q's AWQ settings from config.json to quant_config.json, as an older AutoAWQ export has them."""
    with open(os.path.join(q, "config.json")) as f:
        raw = json.load(f)
    del raw["quantization_config"]
    with open(os.path.join(q, "config.json"), "w") as f:
        json.dump(raw, f)
    with open(os.path.join(q, "quant_config.json"), "w") as f:
        json.dump({"zero_point": True, "q_group_size": GROUP, "w_bit": 4, "version": "GEMM"}, f)


def _edit_config(path: str, section: str = "quantization_config", **changes) -> None:
    """Update config.json's `section` object with `changes`."""
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    raw[section].update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)


def _drop_tensor(path: str, suffix: str) -> str:
    file = os.path.join(path, "model.safetensors")
    with safe_open(file, framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    dropped = next(n for n in sorted(tensors) if n.endswith(suffix))
    del tensors[dropped]
    save_file(tensors, file)
    return dropped


def _retype_tensor(path: str, suffix: str, dtype: torch.dtype) -> None:
    """Store one tensor in another dtype (values cast): what a broken export writes."""
    file = os.path.join(path, "model.safetensors")
    with safe_open(file, framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    name = next(n for n in sorted(tensors) if n.endswith(suffix))
    tensors[name] = tensors[name].to(dtype)
    save_file(tensors, file)


def _error(path: str) -> str:
    with pytest.raises((ConfigError, WeightsError)) as e:
        LLM(model=path, device="cpu", dtype="float32", num_kv_blocks=8, max_model_len=64)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("break_it, needle", [
    (lambda p: _edit_config(p, bits=8), "quantization_config.bits is 8"),
    (lambda p: _edit_config(p, version="gemv"), "'gemv'"),
    (lambda p: _edit_config(p, group_size=48), "layers.0.linear_attn.in_proj_qkv.qweight"),
    (lambda p: _drop_tensor(p, "self_attn.o_proj.scales"), "model.language_model.layers.3.self_attn.o_proj.scales"),
    (lambda p: _drop_tensor(p, "mlp.down_proj.qzeros"), "model.language_model.layers.0.mlp.down_proj.qzeros"),
    # each used to load (copy_ casts) and give other tokens than the right checkpoint
    (lambda p: _retype_tensor(p, "self_attn.o_proj.qweight", torch.float32), "o_proj.qweight is float32"),
    (lambda p: _retype_tensor(p, "self_attn.o_proj.qweight", torch.int16), "o_proj.qweight is int16"),
    (lambda p: _retype_tensor(p, "self_attn.o_proj.scales", torch.int32), "o_proj.scales is int32"),
], ids=["bits8", "version_gemv", "group_not_dividing", "missing_scales", "missing_qzeros", "qweight_float",
        "qweight_int16", "scales_int"])
def test_user_errors_name_the_tensor(break_it, needle, sources, tmp_path):
    q = quantize_checkpoint(sources[False], str(tmp_path / "q"), group_size=GROUP, progress=False)
    break_it(q)
    msg = _error(q)
    assert needle in msg, msg
    if "group" in needle or "in_proj_qkv" in needle:
        assert "does not divide" in msg


def _drop_module(path: str, module: str) -> None:
    file = os.path.join(path, "model.safetensors")
    with safe_open(file, framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys() if f".{module}." not in n}
    save_file(tensors, file)


def _set_num_experts(path: str, n: int) -> None:
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    raw["text_config"]["num_experts"] = n
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)


def _expert_16bit(path: str, src: str, module: str) -> None:
    """One expert Linear stored 16-bit (its source weight) among int4 ones."""
    _drop_module(path, module)
    file, name = os.path.join(path, "model.safetensors"), f"model.language_model.{module}.weight"
    with safe_open(file, framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    with safe_open(os.path.join(src, "model.safetensors"), framework="pt") as f:
        tensors[name] = f.get_tensor(name)
    save_file(tensors, file)


@pytest.mark.parametrize("break_it, needle", [
    (lambda p, src: _set_num_experts(p, 7), "holds quantized expert layers.0.mlp.experts.7.down_proj, but config.json "
                                            "has num_experts=7"),
    # a missing expert was also "has no quantized tensors (it is 16-bit or missing); ... all in one quantized format"
    (lambda p, src: _drop_module(p, "layers.1.mlp.experts.5.up_proj"),
     "holds no tensor of expert layers.1.mlp.experts.5.up_proj, though config.json has num_experts=8"),
    (lambda p, src: _expert_16bit(p, src, "layers.1.mlp.experts.5.up_proj"),
     "layers.1.mlp.experts.5.up_proj has no quantized tensors (it is 16-bit or missing)"),
], ids=["expert_past_num_experts", "expert_without_tensors", "expert_stored_16bit"])
def test_int4_experts_that_do_not_match_the_config_are_named(break_it, needle, sources, tmp_path):
    """Each was "Experts of layer N mix formats ({'awq'})" / "(16-bit ...)": a mix of formats the checkpoint does
    not have (but for the expert stored 16-bit)."""
    q = quantize_checkpoint(sources[True], str(tmp_path / "q"), group_size=GROUP, progress=False)
    break_it(q, sources[True])
    msg = _error(q)
    assert needle in msg, msg


@pytest.fixture(scope="module")
def every_format(sources, tmp_path_factory):
    """(format, moe) -> a tiny checkpoint in that format: "16bit" (the source itself), "awq", "ct" or "fp8"."""
    root = tmp_path_factory.mktemp("formats")
    out = {}
    for moe, src in sources.items():
        kind = "moe" if moe else "dense"
        out["16bit", moe] = src
        out["awq", moe] = quantize_checkpoint(src, str(root / f"awq_{kind}"), group_size=GROUP, progress=False)
        out["ct", moe] = write_ct(src, str(root / f"ct_{kind}"), zero_point=False)
        out["fp8", moe] = quantize_checkpoint(src, str(root / f"fp8_{kind}"), method="fp8", progress=False)
    return out


def _other_model(other: dict):
    """config.json of the other kind of model (dense <-> MoE), the checkpoint's own quantization_config kept."""
    def edit(raw: dict) -> None:
        raw.update({k: v for k, v in other.items() if k != "quantization_config"})
    return edit


def _layer_types_rotated(raw: dict) -> None:  # full attention first: layers 0 and 3 swap token mixers
    raw["text_config"]["layer_types"] = ["full_attention"] + ["linear_attention"] * 3


def _three_layers(raw: dict) -> None:
    raw["text_config"].update(num_hidden_layers=3, layer_types=raw["text_config"]["layer_types"][:3])


CONFIG_NOT_OF_THE_WEIGHTS = {  # id: (the weights are MoE, edit of their config.json, regex the sentence matches)
    "moe-config-on-dense-weights": (False, "moe", r"layers\.0\.mlp\.down_proj"),
    "dense-config-on-moe-weights": (True, "dense", r"layers\.0\.mlp\.experts\.0\.down_proj"),
    "layer-types-of-another-model": (False, _layer_types_rotated, r"layers\.0\.linear_attn\."),
    "fewer-layers": (True, _three_layers, r"layers\.3\."),
    # sizes no int4 packing holds (not a multiple of 8) were blamed on quantization_config.group_size
    "intermediate-size": (False, lambda raw: raw["text_config"].update(intermediate_size=250),
                          r"layers\.0\.mlp\.(gate|down)_proj\.\w+ has shape \[[\d, ]+\], but the model expects"),
    "moe-intermediate-size": (True, lambda raw: raw["text_config"].update(moe_intermediate_size=44),
                              r"layers\.0\.mlp\.experts\.0\.(gate|down)_proj\.\w+ has shape \[[\d, ]+\], but "
                              r"the model expects"),
    # experts 8-15 absent were "not all quantized alike: ... has no quantized tensors (it is 16-bit or missing)"
    "more-experts": (True, lambda raw: raw["text_config"].update(num_experts=16),
                     r"layers\.0\.mlp\.(gate\.weight has shape \[8, 128\], but the model expects \[16, 128\]|"
                     r"experts\.8\.gate_proj.*num_experts=16)"),
}


@pytest.mark.parametrize("fmt", ["16bit", "awq", "ct", "fp8"])
@pytest.mark.parametrize("moe, edit, pattern", CONFIG_NOT_OF_THE_WEIGHTS.values(), ids=CONFIG_NOT_OF_THE_WEIGHTS.keys())
def test_config_json_of_other_weights_is_one_sentence_naming_the_tensor(every_format, tmp_path, fmt, moe, edit,
                                                                         pattern):
    """config.json and the weights disagree (an MoE config over dense weights, layer types, sizes, num_experts): one
    sentence naming the first tensor or module that does not fit and blaming config.json, in every format. The
    quantized ones were an AttributeError from deep in apply_formats (SparseMoE has no attribute `gate_up_proj`,
    DecoderLayer has no attribute `linear_attn`) or a sentence with the wrong advice (keep it 16-bit, fix
    group_size, experts not quantized alike); 16-bit checkpoints already said so."""
    path = tmp_path / "ckpt"
    shutil.copytree(every_format[fmt, moe], path)
    with open(path / "config.json") as f:
        raw = json.load(f)
    if isinstance(edit, str):
        with open(os.path.join(every_format["16bit", not moe], "config.json")) as f:
            edit = _other_model(json.load(f))
    edit(raw)
    (path / "config.json").write_text(json.dumps(raw))
    msg = _error(str(path))
    assert re.search(pattern, msg) and "config.json" in msg, msg


def test_quantized_tensors_without_quantization_config(sources, tmp_path):
    q = quantize_checkpoint(sources[False], str(tmp_path / "q"), group_size=GROUP, progress=False)
    with open(os.path.join(q, "config.json")) as f:
        raw = json.load(f)
    del raw["quantization_config"]
    with open(os.path.join(q, "config.json"), "w") as f:
        json.dump(raw, f)
    assert "no quantization_config" in _error(q)
    # nor is it quantized again as if 16-bit (that wrote a checkpoint which failed to load)
    with pytest.raises(WeightsError, match="no quantization_config"):
        quantize_checkpoint(q, str(tmp_path / "again"), group_size=GROUP, progress=False)
    assert not (tmp_path / "again").exists()


def test_quantize_rejects_group_size_that_does_not_divide(sources, tmp_path):
    with pytest.raises(ValueError, match="does not divide its in_features 128"):
        quantize_checkpoint(sources[False], str(tmp_path / "q"), group_size=48, progress=False)
    assert not os.path.exists(tmp_path / "q")  # checked before anything is written


def test_quantize_refuses_a_dst_it_cannot_create_before_calibrating(monkeypatch, sources, tmp_path):
    """A DST under a file (or a read-only directory) was found out by the first write, which --calib makes come
    after the calibration run (the whole model in float32 on the CPU); then as a bare OSError from os.makedirs."""
    import deltaserve.quantize as quantize

    monkeypatch.setattr(quantize, "calibrate", lambda *a, **kw: pytest.fail("calibrated before checking DST"))
    (tmp_path / "file").write_text("not a directory")
    calib = tmp_path / "calib.txt"
    calib.write_text("Calibration text. " * 100)
    with pytest.raises(ValueError, match=r"cannot write the quantized checkpoint to .*file/q: .*file is not a "
                                         r"writable directory"):
        quantize_checkpoint(sources[False], str(tmp_path / "file" / "q"), group_size=GROUP, calib=str(calib),
                            progress=False)


@pytest.mark.parametrize("existed", [False, True], ids=["new-dst", "empty-dst"])
def test_quantize_that_fails_while_writing_leaves_no_half_checkpoint(monkeypatch, existed, sources, tmp_path):
    """A write that failed (a full disk, Ctrl-C) left the copied 16-bit config.json and side files in DST: the next
    run refused DST as not empty, and a DST with some quantized shards read as a 16-bit config.json."""
    import deltaserve.quantize as quantize

    def full_disk(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(quantize, "save_file", full_disk)
    dst = tmp_path / "q"
    if existed:
        dst.mkdir()
    with pytest.raises(OSError, match="No space left"):
        quantize_checkpoint(sources[False], str(dst), group_size=GROUP, progress=False)
    assert (os.listdir(dst) == []) if existed else not dst.exists()


def test_quantize_refuses_an_already_quantized_source_and_a_dst_in_use(sources, tmp_path):
    """DST not empty (or DST = SRC) is never written into; an AWQ source whose settings are only in AutoAWQ's
    quant_config.json was refused as \"does not load as it is\" (quantized tensors, no quantization_config)."""
    q = quantize_checkpoint(sources[False], str(tmp_path / "q"), group_size=GROUP, progress=False)
    for dst in (q, sources[False]):
        with pytest.raises(ValueError, match="already exists and is not an empty directory"):
            quantize_checkpoint(sources[False], dst, group_size=GROUP, progress=False)
    _settings_in_quant_config_json(q)
    with pytest.raises(ValueError, match=r"is already quantized \(awq\); quantize a 16-bit checkpoint"):
        quantize_checkpoint(q, str(tmp_path / "again"), group_size=GROUP, progress=False)
    assert not (tmp_path / "again").exists()


@pytest.mark.parametrize("pattern, needle", [
    ("layer.0.", "'layer.0.' matches no tensor of the checkpoint"),
    ("layers", "nothing would be quantized"),
], ids=["typo-matches-nothing", "matches-everything"])
def test_quantize_refuses_not_convert_patterns_that_match_nothing_or_everything(sources, tmp_path, pattern, needle):
    """A typo quantized what it meant to keep, and 'layers' wrote an "AWQ" checkpoint without one int4 tensor,
    both with exit 0."""
    with pytest.raises(ValueError, match=needle):
        quantize_checkpoint(sources[False], str(tmp_path / "q"), group_size=GROUP, not_convert=[pattern],
                            progress=False)
    assert not os.path.exists(tmp_path / "q")


def _write_config(path: str, text: str) -> None:
    with open(os.path.join(path, "config.json"), "w") as f:
        f.write(text)


SOURCES_THAT_DO_NOT_LOAD = {  # name: (break the copy of the dense source, given the MoE one; what the sentence says)
    "no-config": (lambda p, moe: os.remove(os.path.join(p, "config.json")), "config.json not found"),
    "config-not-json": (lambda p, moe: _write_config(p, '{"architectures": ['), "not valid JSON"),
    "not-qwen3.5": (lambda p, moe: _write_config(p, '{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}'),
                    "architecture 'LlamaForCausalLM' is not supported"),
    "no-weights": (lambda p, moe: os.remove(os.path.join(p, "model.safetensors")), "No model.safetensors"),
    # config.json and the weights disagree: each was quantized (exit 0) into a checkpoint that then failed to load
    "moe-config-on-dense-weights": (lambda p, moe: shutil.copy(os.path.join(moe, "config.json"), p),
                                    "tensor(s) this Qwen3_5MoeForConditionalGeneration model does not use"),
    "tensor-missing": (lambda p, moe: _drop_tensor(p, "layers.1.input_layernorm.weight"),
                       "missing 1 tensor(s), e.g. model.language_model.layers.1.input_layernorm.weight"),
    "tensor-of-another-shape": (lambda p, moe: _edit_config(p, "text_config", intermediate_size=512),
                                "down_proj.weight has shape [128, 256], but the model expects [128, 512]"),
}


@pytest.mark.parametrize("break_it, needle", SOURCES_THAT_DO_NOT_LOAD.values(), ids=SOURCES_THAT_DO_NOT_LOAD.keys())
def test_quantize_refuses_a_source_that_does_not_load_before_any_work(monkeypatch, sources, tmp_path, break_it,
                                                                       needle):
    """SRC is checked as the loader checks it (config.json, then every tensor's name and shape against it, from the
    safetensors headers) before calibrating or writing anything; the sentence names SRC."""
    import deltaserve.quantize as quantize

    monkeypatch.setattr(quantize, "calibrate", lambda *a, **kw: pytest.fail("calibrated before checking SRC"))
    src, dst = tmp_path / "src", tmp_path / "q"
    shutil.copytree(sources[False], src)
    break_it(str(src), sources[True])
    calib = tmp_path / "calib.txt"
    calib.write_text("Calibration text. " * 100)
    with pytest.raises(ValueError) as e:
        quantize_checkpoint(str(src), str(dst), group_size=GROUP, calib=str(calib), progress=False)
    msg = str(e.value)
    assert needle in msg and str(src) in msg and "\n" not in msg, msg
    assert not dst.exists()


# ---- activation-aware scales (quantize --calib) ----

def test_folded_scales_leave_the_16bit_model_unchanged(sources, tmp_path):
    """The fold ((1 + w) / s - 1 on the norm, W · diag(s) on its readers) is exact: with no quantization at all
    the folded checkpoint computes what the source does, dense and MoE readers alike."""
    from deltaserve.calibrate import NormScale, fold
    from deltaserve.config import ModelConfig
    from deltaserve.models.weights import strip_name

    src = sources[True]
    cfg = ModelConfig.from_hf_dir(src)
    g = torch.Generator().manual_seed(3)
    scales = {f"layers.{i}.{n}": NormScale(torch.rand(cfg.hidden_size, generator=g) * 3 + 0.2, 0.5, 0.0, 0.0)
              for i in range(cfg.num_hidden_layers) for n in ("input_layernorm", "post_attention_layernorm")}
    dst = tmp_path / "folded"
    dst.mkdir()
    with safe_open(os.path.join(src, "model.safetensors"), framework="pt") as f:
        tensors = {n: fold(strip_name(n, cfg) or n, f.get_tensor(n), scales) for n in f.keys()}
    assert not torch.equal(tensors["model.language_model.layers.1.mlp.gate.weight"],
                           safe_open(os.path.join(src, "model.safetensors"), "pt").get_tensor(
                               "model.language_model.layers.1.mlp.gate.weight"))
    save_file(tensors, str(dst / "model.safetensors"))
    for name in os.listdir(src):
        if not name.endswith(".safetensors"):
            (dst / name).write_bytes(open(os.path.join(src, name), "rb").read())
    _, lp, toks = run_text(str(dst))
    _, lp_ref, toks_ref = run_text(src)
    assert max(abs(a - b) for a, b in zip(lp, lp_ref)) < 1e-4
    assert toks == toks_ref


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_calibrated_scales_beat_rtn_and_load(moe, sources, tmp_path):
    from deltaserve.config import ModelConfig
    from deltaserve.models.weights import checkpoint_files
    from deltaserve.quantize import calibrate, not_convert_list

    calib = tmp_path / "calib.txt"
    calib.write_text("Calibration text: the quick brown fox jumps over the lazy dog, twice or thrice. " * 12)
    src = sources[moe]
    cfg = ModelConfig.from_hf_dir(src)
    scales = calibrate(src, cfg, checkpoint_files(src), str(calib), not_convert_list(cfg, []), GROUP)
    assert len(scales) == 2 * cfg.num_hidden_layers
    assert all(s.loss <= s.loss_rtn for s in scales.values())  # alpha = 0 (RTN) is in the grid
    assert sum(s.loss for s in scales.values()) < sum(s.loss_rtn for s in scales.values())
    q = quantize_checkpoint(src, str(tmp_path / "q"), group_size=GROUP, calib=str(calib), progress=False)
    assert_matches_twin(q, tmp_path)


@pytest.mark.parametrize("method, calib", [("awq", False), ("awq", True), ("fp8", False)],
                         ids=["awq", "awq-calib", "fp8"])
def test_packed_experts_are_quantized_like_per_expert_ones(method, calib, sources, tmp_path):
    """Experts stored packed (transformers' gate_up_proj [E, 2I, H] / down_proj [E, H, I], which the loader reads)
    were written back 16-bit without a word, and --calib rescaled their norm but not them (the model changed). They
    are now split into per-expert Linears: the output equals the per-expert source's, tensor for tensor."""
    from safetensors.torch import load_file, save_file

    from test_weights import pack_experts

    src = sources[True]
    packed = tmp_path / "packed"
    shutil.copytree(src, packed)
    sd = load_file(str(packed / "model.safetensors"))
    pack_experts(sd)
    assert any(n.endswith("experts.gate_up_proj") for n in sd)
    save_file(sd, str(packed / "model.safetensors"), metadata={"format": "pt"})
    kw = dict(method=method, group_size=GROUP if method == "awq" else 128, progress=False)
    if calib:
        text = tmp_path / "calib.txt"
        text.write_text("Calibration text: the quick brown fox jumps over the lazy dog, twice or thrice. " * 12)
        kw["calib"] = str(text)
    want = load_file(os.path.join(quantize_checkpoint(src, str(tmp_path / "q_ref"), **kw), "model.safetensors"))
    got = load_file(os.path.join(quantize_checkpoint(str(packed), str(tmp_path / "q"), **kw), "model.safetensors"))
    assert sorted(got) == sorted(want) and any(".experts.3.up_proj." in n for n in got)
    for name, t in want.items():
        assert torch.equal(got[name], t), name


def test_calib_reads_a_prefix_and_refuses_binary(monkeypatch, sources, tmp_path):
    """Only 512 tokens are kept, so only a prefix is read (a 60 MB one-line corpus took 92 s and 10 GB to
    tokenize whole); a file that is not UTF-8 is one sentence naming --calib."""
    import deltaserve.calibrate as cal
    from deltaserve.tokenizer import Tokenizer

    big = tmp_path / "big.txt"
    big.write_text("word " * 2_000_000)  # 10 MB
    seen, encode = [], Tokenizer.encode
    monkeypatch.setattr(Tokenizer, "encode",
                        lambda self, text, **kw: seen.append(len(text)) or encode(self, text, **kw))
    rows = cal.collect_inputs(sources[False], str(big), max_tokens=64)
    assert rows and max(seen) <= 64 * cal._CHARS_PER_TOKEN
    binary = tmp_path / "calib.bin"
    binary.write_bytes(b"\x80\xb7" * 100)
    with pytest.raises(ValueError, match=r"^--calib .*calib.bin is not UTF-8 text"):
        cal.collect_inputs(sources[False], str(binary))



def test_not_convert_that_splits_a_layers_experts_is_refused(sources, tmp_path):
    """The MoE kernels read a layer's experts all int4 or all 16-bit: quantize refuses the split before writing."""
    with pytest.raises(ValueError, match="the experts of layer 0 must be all quantized or all 16-bit"):
        quantize_checkpoint(sources[True], str(tmp_path / "q"), group_size=GROUP, not_convert=["experts.0."],
                            progress=False)
    assert not (tmp_path / "q").exists()


@pytest.mark.parametrize("method", ["awq", "fp8"])
def test_mtp_head_experts_do_not_count_as_layer_0s(method, sources, tmp_path):
    """Qwen3.5 MoE releases ship an MTP head with its own experts (`mtp.layers.0.mlp.experts.E.*`, kept 16-bit):
    quantize refused them as a --not-convert split of layer 0's experts, so no released MoE could be quantized."""
    from safetensors.torch import load_file

    src = tmp_path / "src"
    shutil.copytree(sources[True], src)
    sd = load_file(str(src / "model.safetensors"))
    for n in [n for n in sd if n.startswith("model.language_model.layers.3.")]:
        sd["mtp.layers.0." + n[len("model.language_model.layers.3."):]] = sd[n].clone()
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})
    q = quantize_checkpoint(str(src), str(tmp_path / "q"), method=method, group_size=GROUP if method == "awq" else 128,
                            progress=False)
    with safe_open(os.path.join(q, "model.safetensors"), framework="pt") as f:
        assert "mtp.layers.0.mlp.experts.0.gate_proj.weight" in f.keys()  # the head stays 16-bit
    assert_matches_twin(q, tmp_path)


def test_one_shard_index_is_rewritten(sources, tmp_path):
    """A source with an index over a single shard: the copied index would list the 16-bit names; it is rewritten."""
    import shutil

    src, shard = tmp_path / "src", "model-00001-of-00001.safetensors"
    shutil.copytree(sources[False], src)
    os.rename(src / "model.safetensors", src / shard)
    with safe_open(str(src / shard), framework="pt") as f:
        names = list(f.keys())
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {n: shard for n in names}}))
    q = quantize_checkpoint(str(src), str(tmp_path / "q"), group_size=GROUP, progress=False)
    with open(os.path.join(q, "model.safetensors.index.json")) as fh:
        listed = json.load(fh)["weight_map"]
    with safe_open(os.path.join(q, shard), framework="pt") as f:
        assert set(listed) == set(f.keys()) and set(listed.values()) == {shard}
