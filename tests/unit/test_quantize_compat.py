"""What `deltaserve quantize` writes, read as other tools read it: AutoAWQ's "gemm" tensors unpacked by an
independent implementation of its documented algorithm, the quantization_config as transformers parses it, and
modules_to_not_convert as vLLM matches it against its own (fused, renamed) module names. None of these readers is
installed here: each check re-implements the reader's documented rule, not deltaserve's own code."""
import json
import math
import os
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from deltaserve.quantize import quantize_checkpoint, write_dequantized
from deltaserve.tiny import make_tiny

# AutoAWQ gemm: logical column 8c + ORDER[i] of a row sits at bits 4i of int32 c (qweight and qzeros alike)
AUTOAWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Tiny dense and MoE checkpoints in bfloat16 (the released dtype), so "kept in the source dtype" is visible,
    with a few Linears of the vision tower and the MTP head, as the releases have (both always stay 16-bit)."""
    out = {}
    for moe in (False, True):
        d = make_tiny(str(tmp_path_factory.mktemp("src") / ("moe" if moe else "dense")), moe=moe)
        sd = load_file(os.path.join(d, "model.safetensors"))
        g = torch.Generator().manual_seed(1)
        sd.update({"model.visual.blocks.0.attn.qkv.weight": torch.randn(96, 32, generator=g),
                   "model.visual.blocks.0.attn.qkv.bias": torch.randn(96, generator=g),
                   "model.visual.merger.linear_fc2.weight": torch.randn(128, 128, generator=g),
                   "mtp.fc.weight": torch.randn(128, 256, generator=g)})
        save_file({k: v.to(torch.bfloat16) for k, v in sd.items()}, os.path.join(d, "model.safetensors"),
                  metadata={"format": "pt"})
        out[moe] = d
    return out


def _tensors(path):
    out = {}
    for f in sorted(os.listdir(path)):
        if f.endswith(".safetensors"):
            out.update(load_file(os.path.join(path, f)))
    return out


def _unpack_autoawq(packed: torch.Tensor) -> torch.Tensor:
    """[rows, cols/8] int32 -> [rows, cols] nibbles 0..15, AutoAWQ's gemm order, one nibble at a time."""
    p = packed.to(torch.int64) & 0xFFFFFFFF
    rows, words = p.shape
    out = torch.empty(rows, words * 8, dtype=torch.int64)
    for i in range(8):
        out[:, AUTOAWQ_ORDER[i]::8] = (p >> (4 * i)) & 0xF
    return out


def _vllm_prefixes(names):
    """Checkpoint Linear module names -> {vLLM module prefix: [checkpoint modules it loads]} for Qwen3.5: vLLM's
    hf_to_vllm_mapper renames `model.language_model.` to `language_model.model.` and the model fuses q/k/v into
    qkv_proj, gate/up into gate_up_proj, in_proj_qkv/z into in_proj_qkvz and in_proj_b/a into in_proj_ba; the
    experts of a layer are one FusedMoE `mlp.experts`."""
    fuse = {"q_proj": "qkv_proj", "k_proj": "qkv_proj", "v_proj": "qkv_proj", "gate_proj": "gate_up_proj",
            "up_proj": "gate_up_proj", "in_proj_qkv": "in_proj_qkvz", "in_proj_z": "in_proj_qkvz",
            "in_proj_b": "in_proj_ba", "in_proj_a": "in_proj_ba"}
    out = {}
    for n in names:
        if n.startswith("mtp."):
            continue  # not a module of vLLM's main model (its MTP drafter is another model)
        v = n.replace("model.language_model.", "language_model.model.", 1).replace("model.visual.", "visual.", 1)
        m = re.match(r"^(.*\.mlp\.experts)\.\d+\.", v)
        if m:
            v = m[1]
        else:
            head, _, leaf = v.rpartition(".")
            v = f"{head}.{fuse.get(leaf, leaf)}"
        out.setdefault(v, []).append(n)
    return out


VLLM_PACKED = {"qkv_proj": ["q_proj", "k_proj", "v_proj"], "gate_up_proj": ["gate_proj", "up_proj"],
               "in_proj_qkvz": ["in_proj_qkv", "in_proj_z"], "in_proj_ba": ["in_proj_b", "in_proj_a"]}


def _vllm_is_skipped(prefix, ignored, substr):
    """vLLM's quant_utils.is_layer_skipped: a fused module is skipped when its shards are (all or none, else an
    error); entries match by substring (AWQ) or as whole prefixes (FP8, the default); experts by substring of an
    `experts` entry."""
    match = (lambda p: any(e in p for e in ignored)) if substr else (lambda p: p in ignored)
    proj = prefix.split(".")[-1]
    if proj in VLLM_PACKED:
        shards = {match(prefix.replace(proj, s)) for s in VLLM_PACKED[proj]}
        assert len(shards) == 1, f"vLLM refuses {prefix}: some but not all shards are quantized"
        return shards.pop()
    if "experts" in prefix and not substr:
        return any(prefix in e for e in ignored if "experts" in e)
    return match(prefix)


def _hf_to_vllm(entries):
    """vLLM applies the model's hf_to_vllm_mapper to FP8's ignored layers (prefix renames only)."""
    renames = {"model.language_model.": "language_model.model.", "model.visual.": "visual."}
    return [next((new + e[len(old):] for old, new in renames.items() if e.startswith(old)), e) for e in entries]


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
@pytest.mark.parametrize("method", ["awq", "fp8"])
def test_vllm_skips_exactly_the_modules_kept_16bit(method, moe, sources, tmp_path):
    """vLLM decides per Linear from modules_to_not_convert (AWQ: substrings; FP8: whole module prefixes after its
    name mapping, the form the official Qwen FP8 configs use). The FP8 list held only short substrings
    ("in_proj_a", "mlp.gate"), which match no vLLM prefix exactly: vLLM built FP8 Linears for the 16-bit
    in_proj_a/b (and the router), and refused or misread the checkpoint."""
    not_convert = ["layers.3.self_attn.", "layers.1."]
    dst = quantize_checkpoint(sources[moe], str(tmp_path / "q"), method=method,
                              group_size=64 if method == "awq" else 128, not_convert=not_convert, progress=False)
    qcfg = json.load(open(os.path.join(dst, "config.json")))["quantization_config"]
    ignored = qcfg["modules_to_not_convert"]
    assert all(isinstance(e, str) and e for e in ignored)
    tensors = _tensors(dst)
    quantized = {n.rsplit(".", 1)[0] for n in tensors if n.endswith((".qweight", ".weight_scale_inv"))}
    linears = {n[:-len(".weight")] for n, t in tensors.items() if n.endswith(".weight") and t.dim() == 2
               and "embed_tokens" not in n and "lm_head" not in n} | quantized
    ignored = ignored if method == "awq" else _hf_to_vllm(ignored)
    for prefix, members in _vllm_prefixes(sorted(linears)).items():
        want = not any(m in quantized for m in members)
        assert all((m in quantized) != want for m in members), prefix  # a fused module is all one or the other
        assert _vllm_is_skipped(prefix, ignored, substr=method == "awq") == want, prefix


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_awq_tensors_unpack_as_autoawq_reads_them(moe, sources, tmp_path):
    """Names, dtypes and shapes of AutoAWQ gemm, and an independent unpacking of qweight/qzeros in AutoAWQ's
    nibble order decodes to exactly the weights deltaserve's own dequantized twin holds (transposed)."""
    g = 64
    dst = quantize_checkpoint(sources[moe], str(tmp_path / "q"), method="awq", group_size=g, progress=False)
    twin = _tensors(write_dequantized(dst, str(tmp_path / "twin"), dtype=torch.float32))
    q, src = _tensors(dst), _tensors(sources[moe])
    modules = [n[:-len(".qweight")] for n in q if n.endswith(".qweight")]
    assert modules
    for m in modules:
        qw, qz, s = q[f"{m}.qweight"], q[f"{m}.qzeros"], q[f"{m}.scales"]
        out, inp = src[f"{m}.weight"].shape
        assert (qw.dtype, qz.dtype, s.dtype) == (torch.int32, torch.int32, torch.float16), m
        assert qw.shape == (inp, out // 8) and qz.shape == (inp // g, out // 8) and s.shape == (inp // g, out), m
        assert f"{m}.weight" not in q
        iw, iz = _unpack_autoawq(qw), _unpack_autoawq(qz)
        w = (iw - iz.repeat_interleave(g, 0)).double() * s.double().repeat_interleave(g, 0)  # [in, out]
        torch.testing.assert_close(w.t().float(), twin[f"{m}.weight"], rtol=0, atol=0)
        # and it is a quantization of the source: within half a step of each group's scale
        err = (w.t() - src[f"{m}.weight"].double()).abs()
        assert (err <= s.double().t().repeat_interleave(g, 1) / 2 + 1e-3).all(), m
    # everything else keeps its name, shape and dtype (bfloat16 here), bit for bit
    for n, t in src.items():
        if n.rsplit(".", 1)[0] not in modules:
            assert q[n].dtype == t.dtype and torch.equal(q[n], t), n


@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_fp8_tensors_as_the_official_layout(moe, sources, tmp_path):
    """e4m3 `weight` [out, in] and fp32 `weight_scale_inv` [ceil(out/128), ceil(in/128)] (partial blocks round
    up: the tiny experts are 64 x 128), W = weight * scale_inv per block; the rest unchanged."""
    dst = quantize_checkpoint(sources[moe], str(tmp_path / "q"), method="fp8", progress=False)
    twin = _tensors(write_dequantized(dst, str(tmp_path / "twin"), dtype=torch.float32))
    q, src = _tensors(dst), _tensors(sources[moe])
    modules = [n[:-len(".weight_scale_inv")] for n in q if n.endswith(".weight_scale_inv")]
    assert modules
    for m in modules:
        w, s = q[f"{m}.weight"], q[f"{m}.weight_scale_inv"]
        out, inp = src[f"{m}.weight"].shape
        assert w.dtype == torch.float8_e4m3fn and w.shape == (out, inp), m
        assert s.dtype == torch.float32 and s.shape == (math.ceil(out / 128), math.ceil(inp / 128)), m
        full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[:out, :inp]
        torch.testing.assert_close(w.float() * full, twin[f"{m}.weight"], rtol=0, atol=0)
    for n, t in src.items():
        if n.rsplit(".", 1)[0] not in modules:
            assert q[n].dtype == t.dtype and torch.equal(q[n], t), n


@pytest.mark.parametrize("method", ["awq", "fp8"])
def test_config_and_side_files_as_transformers_reads_them(method, sources, tmp_path):
    """The side files are copied unchanged, the quantization_config carries the keys of its format, and
    transformers parses config.json and the quantization config."""
    transformers = pytest.importorskip("transformers")
    src = sources[True]
    dst = quantize_checkpoint(src, str(tmp_path / "q"), method=method, group_size=64 if method == "awq" else 128,
                              progress=False)
    for f in os.listdir(src):
        if not f.endswith(".safetensors") and f != "config.json":
            assert open(os.path.join(dst, f), "rb").read() == open(os.path.join(src, f), "rb").read(), f
    raw, before = (json.load(open(os.path.join(d, "config.json"))) for d in (dst, src))
    qcfg = raw.pop("quantization_config")
    assert raw == before  # nothing else changed
    if method == "awq":
        assert {k: qcfg[k] for k in ("quant_method", "bits", "group_size", "zero_point", "version")} == \
            {"quant_method": "awq", "bits": 4, "group_size": 64, "zero_point": True, "version": "gemm"}
        parsed = transformers.AwqConfig.from_dict(dict(qcfg))
        assert (parsed.bits, parsed.group_size, parsed.zero_point) == (4, 64, True)
    else:
        assert {k: qcfg[k] for k in ("quant_method", "fmt", "activation_scheme", "weight_block_size")} == \
            {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
        parsed = transformers.FineGrainedFP8Config.from_dict(dict(qcfg))
        assert tuple(parsed.weight_block_size) == (128, 128)
    cfg = transformers.AutoConfig.from_pretrained(dst)
    assert cfg.quantization_config["quant_method"] == method


@pytest.mark.parametrize("method", ["awq", "fp8"])
def test_transformers_skips_exactly_the_modules_kept_16bit(method, sources, tmp_path):
    """transformers (AWQ and FP8 alike) matches modules_to_not_convert from the start of a module's name, at a
    module boundary, or as a suffix of it; its Qwen3.5 module names are the checkpoint's. The AWQ list held only
    substrings: "visual" and a --not-convert "layers.1." are neither, so transformers built int4 Linears for the
    16-bit vision tower and layer 1 and found no qweight for them."""
    utils = pytest.importorskip("transformers.quantizers.quantizers_utils")
    dst = quantize_checkpoint(sources[True], str(tmp_path / "q"), method=method,
                              group_size=64 if method == "awq" else 128, not_convert=["layers.1."], progress=False)
    ignored = json.load(open(os.path.join(dst, "config.json")))["quantization_config"]["modules_to_not_convert"]
    tensors = _tensors(dst)
    quantized = {n.rsplit(".", 1)[0] for n in tensors if n.endswith((".qweight", ".weight_scale_inv"))}
    linears = {n[:-len(".weight")] for n, t in tensors.items() if n.endswith(".weight") and t.dim() == 2} | quantized
    linears = {m for m in linears if ".mlp.experts." not in m}  # transformers packs a layer's experts: no Linears
    assert any(m.startswith("model.visual.") for m in linears) and any(".layers.1." in m for m in linears)
    wrong = sorted(m for m in linears if utils.should_convert_module(m, ignored) != (m in quantized))
    assert not wrong, wrong


@pytest.mark.parametrize("pattern, warned", [("self_attn.q_proj", True), ("layers.0.mlp.gate_proj", True),
                                             ("linear_attn.in_proj_z", True), ("self_attn.", False),
                                             ("layers.0.", False)])
def test_not_convert_that_splits_a_vllm_fused_linear_is_warned(pattern, warned, sources, tmp_path, caplog):
    """vLLM fuses q/k/v, gate/up and in_proj_qkv/z into one Linear each and refuses a checkpoint that quantizes
    only some pieces of one (deltaserve loads it): a --not-convert that does that was silent."""
    with caplog.at_level("WARNING", logger="deltaserve"):
        quantize_checkpoint(sources[False], str(tmp_path / "q"), group_size=64, not_convert=[pattern], progress=False)
    msgs = [r.getMessage() for r in caplog.records if "fused" in r.getMessage()]
    assert bool(msgs) == warned, msgs
    if warned:
        assert len(msgs) == 1 and "\n" not in msgs[0] and "vLLM" in msgs[0]
