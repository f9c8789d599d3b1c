"""Block-wise FP8 checkpoints (the official Qwen FP8 layout) on the CPU reference path.

As for int4 (test_quantized.py), the oracle of an FP8 checkpoint is its dequantized twin: every FP8 Linear written
back as the fp32 weight it decodes to (weight * weight_scale_inv per 128 x 128 block) and loaded by the ordinary
16-bit path. Equal engine outputs prove the layout, the per-Linear format decisions (from the tensors' dtypes),
the mixed fused groups and the separate FP8 expert tensors are read right; the quantization error itself is bounded
separately (e4m3 keeps 3 mantissa bits: |W - Ŵ| <= 2^-4 |W| + 2^-10 scale_inv)."""
import json
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from deltaserve import LLM, SamplingParams
from deltaserve.cli import main as cli_main
from deltaserve.config import ConfigError
from deltaserve.kernels.fp8_gemm import dequant_blocks, fp8_linear, quant_act
from deltaserve.layers.fp8 import Fp8Experts, Fp8Linear, quantize_blocks
from deltaserve.layers.linear import Linear, ProjectionGroup
from deltaserve.models.weights import WeightsError
from deltaserve.quantize import quantize_checkpoint, write_dequantized
from deltaserve.tiny import make_tiny
from quant_helpers import TEXT, assert_matches_twin

BLOCK = (128, 128)
PREFIX = "model.language_model."


def e4m3_bound(w: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Worst-case round-to-nearest error of e4m3 with per-element scale `scale`: half an ulp of 3 mantissa bits
    for normals, half the subnormal step 2^-9 below 2^-6 (both in units of the scale)."""
    return 2.0**-4 * w.abs() + 2.0**-10 * scale


def test_quantize_blocks_layout_and_bound():
    """Odd sizes: partial blocks at the edges get their own scale; W = weight * scale_inv[n // 128, k // 128]."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(200, 300, generator=g) * torch.linspace(0.01, 3.0, 300)  # blocks with different ranges
    q, s = quantize_blocks(w, BLOCK)
    assert q.dtype == torch.float8_e4m3fn and q.shape == (200, 300)
    assert s.dtype == torch.float32 and s.shape == (2, 3)
    # the spec formula, one block at a time (independent of dequant_blocks' repeat_interleave)
    w_hat = torch.empty(200, 300)
    for i in range(2):
        for j in range(3):
            rows, cols = slice(128 * i, 128 * (i + 1)), slice(128 * j, 128 * (j + 1))
            w_hat[rows, cols] = q[rows, cols].float() * s[i, j]
            assert s[i, j] == w[rows, cols].abs().amax() / 448  # amax maps onto the largest e4m3
    assert torch.equal(dequant_blocks(q, s, BLOCK, torch.float32), w_hat)
    per_elem = s.repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    err = (w - w_hat).abs()
    assert (err <= e4m3_bound(w, per_elem) * 1.001).all(), float((err / e4m3_bound(w, per_elem)).max())
    assert err.max() > 0  # it did quantize


def test_quant_act_bound_and_zero_rows():
    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(1)) * 4
    x[2] = 0  # an all-zero token: scale floored, quantizes to zeros (no NaN)
    xq, xs = quant_act(x, 128)
    assert xq.shape == (5, 300) and xs.shape == (5, 3)
    back = dequant_blocks(xq[None], xs[None], (1, 128), torch.float32)[0]
    per_elem = xs.repeat_interleave(128, 1)[:, :300]
    assert ((x - back).abs() <= e4m3_bound(x, per_elem) * 1.001).all()
    assert torch.equal(back[2], torch.zeros(300))


def test_fp8_linear_cpu_is_dequantize_then_linear():
    g = torch.Generator().manual_seed(2)
    q, s = quantize_blocks(torch.randn(96, 160, generator=g), BLOCK)
    x = torch.randn(3, 160, generator=g)
    assert torch.equal(fp8_linear(x, q, s, BLOCK), x @ dequant_blocks(q, s, BLOCK, torch.float32).t())
    with pytest.raises(ValueError, match=r"weight_scale_inv must be \[1, 2\]"):
        fp8_linear(x, q, s[:, :1], BLOCK)


# ---- engine output on FP8 tiny checkpoints == the dequantized twin ----

@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    return {moe: make_tiny(str(root / f"src_{moe}"), moe=moe) for moe in (False, True)}


CASES = {"dense": (False, []), "dense_mixed": (False, ["layers.0.", "self_attn.k_proj"]),
         "moe": (True, []), "moe_mixed": (True, ["layers.0."])}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_fp8_checkpoint_matches_dequantized_twin(case, sources, tmp_path):
    moe, not_convert = CASES[case]
    q = quantize_checkpoint(sources[moe], str(tmp_path / "q"), method="fp8", not_convert=not_convert,
                            progress=False)
    with safe_open(os.path.join(q, "model.safetensors"), framework="pt") as f:
        w = f.get_tensor(f"{PREFIX}layers.3.self_attn.o_proj.weight")
        s = f.get_tensor(f"{PREFIX}layers.3.self_attn.o_proj.weight_scale_inv")
        assert f.get_tensor(f"{PREFIX}layers.1.linear_attn.in_proj_a.weight").dtype == torch.float32  # 16-bit kept
    assert w.dtype == torch.float8_e4m3fn and s.dtype == torch.float32 and s.shape == (1, 2)  # [128, 256]
    llm = assert_matches_twin(q, tmp_path)
    mods = dict(llm.model.named_modules())
    o_proj = mods["layers.3.self_attn.o_proj"]
    assert isinstance(o_proj, Fp8Linear) and o_proj.weight.dtype == torch.float8_e4m3fn  # not cast to fp32
    assert o_proj.weight_scale_inv.dtype == torch.float32
    assert isinstance(mods["layers.1.linear_attn.in_proj"], ProjectionGroup)
    assert isinstance(mods["layers.1.linear_attn.in_proj.in_proj_qkv"], Fp8Linear)
    assert type(mods["layers.1.linear_attn.in_proj.in_proj_b+in_proj_a"]) is Linear  # 16-bit b|a: one GEMM
    if "layers.0." in not_convert:  # a whole layer left 16-bit keeps its fused GEMMs
        assert type(mods["layers.0.linear_attn.in_proj"]) is Linear
    if "self_attn.k_proj" in not_convert:  # 16-bit k beside FP8 q and v
        assert type(mods["layers.3.self_attn.qkv_proj.k_proj"]) is Linear
        assert isinstance(mods["layers.3.self_attn.qkv_proj.q_proj"], Fp8Linear)
    if moe:  # FP8 experts (moe_intermediate_size 64: gate and up blocks kept apart), 16-bit router and gate
        assert isinstance(mods["layers.1.mlp.experts"], Fp8Experts)
        assert type(mods["layers.1.mlp.gate"]) is Linear
        assert type(mods["layers.1.mlp.shared_expert_gate"]) is Linear
    with open(os.path.join(q, "config.json")) as f:
        qcfg = json.load(f)["quantization_config"]
    assert qcfg == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                    "weight_block_size": [128, 128], "modules_to_not_convert": qcfg["modules_to_not_convert"]}
    assert "in_proj_a" in qcfg["modules_to_not_convert"]


@pytest.mark.parametrize("module", ["mlp.shared_expert_gate", "mlp.gate"], ids=["shared_expert_gate", "router"])
def test_moe_with_an_fp8_gate_matches_its_twin(module, sources, tmp_path):
    """A checkpoint that quantized the shared expert's gate (or the router) too: the gate's FP8 weight used to reach
    the stacked shared expert's routing raw (a dtype error on the first step); the unstacked path runs it now."""
    q = quantize_checkpoint(sources[True], str(tmp_path / "q"), method="fp8", progress=False)
    path = os.path.join(q, "model.safetensors")
    with safe_open(path, framework="pt") as f:
        t = {n: f.get_tensor(n) for n in f.keys()}
    for name in [n for n in t if n.endswith(f"{module}.weight")]:
        t[name], t[name[:-len("weight")] + "weight_scale_inv"] = quantize_blocks(t[name], BLOCK)
    save_file(t, path, metadata={"format": "pt"})
    llm = assert_matches_twin(q, tmp_path)
    assert isinstance(dict(llm.model.named_modules())[f"layers.1.{module}"], Fp8Linear)


def test_fp8_weights_within_e4m3_bound_of_source(sources, tmp_path):
    q = quantize_checkpoint(sources[True], str(tmp_path / "q"), method="fp8", progress=False)
    twin = write_dequantized(q, str(tmp_path / "twin"))
    name = f"{PREFIX}layers.2.mlp.experts.5.down_proj.weight"
    with safe_open(os.path.join(sources[True], "model.safetensors"), "pt") as a, \
            safe_open(os.path.join(twin, "model.safetensors"), "pt") as b, \
            safe_open(os.path.join(q, "model.safetensors"), "pt") as c:
        w, w_hat = a.get_tensor(name), b.get_tensor(name)
        s = c.get_tensor(name + "_scale_inv")
    assert s.shape == (1, 1)  # [128, 64]: one partial block
    err = (w.float() - w_hat).abs()
    assert (err <= e4m3_bound(w.float(), s) * 1.001).all() and err.max() > 0


def test_cli_quantize_fp8(sources, tmp_path, capsys):
    assert cli_main(["quantize", sources[False], str(tmp_path / "q"), "--method", "fp8"]) == 0
    with open(tmp_path / "q" / "config.json") as f:
        assert json.load(f)["quantization_config"]["quant_method"] == "fp8"
    assert cli_main(["quantize", sources[False], str(tmp_path / "q2"), "--method", "fp8", "--group-size", "64"]) == 2
    assert "--method fp8 uses fixed 128 x 128 blocks" in capsys.readouterr().err


# ---- user errors: one sentence naming the tensor or field ----

def _edit_config(path: str, **changes) -> None:
    with open(os.path.join(path, "config.json")) as f:
        raw = json.load(f)
    raw["quantization_config"].update(changes)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(raw, f)


def _edit_tensors(path: str, edit) -> None:
    file = os.path.join(path, "model.safetensors")
    with safe_open(file, framework="pt") as f:
        tensors = {n: f.get_tensor(n) for n in f.keys()}
    edit(tensors)
    save_file(tensors, file)


def _drop(suffix):
    return lambda t: t.pop(next(n for n in sorted(t) if n.endswith(suffix)))


def _reshape(suffix):
    def edit(t):
        name = next(n for n in sorted(t) if n.endswith(suffix))
        t[name] = torch.ones(3, 3)
    return edit


def _cast_weight(suffix, dtype):
    def edit(t):
        name = next(n for n in sorted(t) if n.endswith(suffix))
        t[name] = t[name].float().to(dtype)
    return edit


def _nan_byte(suffix):
    """One e4m3 NaN (bit pattern S.1111.111; e4m3fn has no inf) in an FP8 weight: it loaded, and the model wrote token
    0 with nan logprobs, where a NaN in a 16-bit weight or a scale is refused."""
    def edit(t):
        name = next(n for n in sorted(t) if n.endswith(suffix))
        t[name] = t[name].clone()
        t[name].view(torch.uint8)[1, 2] = 0xFF
    return edit


@pytest.mark.parametrize("break_it, needle", [
    (lambda p: _edit_tensors(p, _drop("layers.3.self_attn.o_proj.weight_scale_inv")),
     f"missing tensor {PREFIX}layers.3.self_attn.o_proj.weight_scale_inv"),
    (lambda p: _edit_tensors(p, _reshape("layers.3.self_attn.o_proj.weight_scale_inv")),
     f"Tensor {PREFIX}layers.3.self_attn.o_proj.weight_scale_inv has shape [3, 3], but the model expects [1, 2]"),
    (lambda p: _edit_tensors(p, _cast_weight("layers.3.self_attn.o_proj.weight", torch.float32)),
     f"{PREFIX}layers.3.self_attn.o_proj.weight is not float8_e4m3fn"),
    (lambda p: _edit_tensors(p, _cast_weight("layers.3.self_attn.o_proj.weight", torch.float8_e5m2)),
     f"Tensor {PREFIX}layers.3.self_attn.o_proj.weight is F8_E5M2"),
    (lambda p: _edit_config(p, weight_block_size=[64, 64]), "weight_block_size is [64, 64]"),
    (lambda p: _edit_config(p, weight_block_size=None), "per-tensor FP8 is not supported"),
    (lambda p: _edit_config(p, fmt="e5m2"), "quantization_config.fmt is 'e5m2'"),
    (lambda p: _edit_config(p, activation_scheme="static"), "activation_scheme is 'static'"),
    (lambda p: _edit_config(p, quant_method="awq", bits=4, group_size=32), "quant_method is 'awq'"),
    (lambda p: _edit_tensors(p, _nan_byte("layers.3.self_attn.o_proj.weight")),
     f"Tensor {PREFIX}layers.3.self_attn.o_proj.weight holds NaN"),
], ids=["missing_scale_inv", "wrong_scale_shape", "scale_without_fp8_weight", "e5m2_weight", "block_64", "per_tensor", "fmt_e5m2",
        "static_activations", "config_says_awq", "nan_in_fp8_weight"])
def test_user_errors_name_the_tensor(break_it, needle, sources, tmp_path):
    q = quantize_checkpoint(sources[False], str(tmp_path / "q"), method="fp8", progress=False)
    break_it(q)
    with pytest.raises((ConfigError, WeightsError)) as e:
        LLM(model=q, device="cpu", dtype="float32", num_kv_blocks=8, max_model_len=64)
    msg = str(e.value)
    assert "\n" not in msg
    assert needle in msg, msg


# ---- on the GPU: the Triton FP8 GEMM inside the engine ----

def _run_cuda(path: str, enforce_eager: bool):
    llm = LLM(model=path, device="cuda", dtype="bfloat16", max_model_len=256, num_kv_blocks=32, max_num_seqs=2,
              enforce_eager=enforce_eager)
    out = llm.generate(TEXT, SamplingParams(max_tokens=8, temperature=0, prompt_logprobs=0, ignore_eos=True),
                       use_tqdm=False)[0]
    ids = llm.tokenizer.encode(TEXT)
    return [out.prompt_logprobs[i][ids[i]] for i in range(1, len(ids))], out.outputs[0].token_ids


@pytest.mark.gpu
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_fp8_engine_on_cuda(moe, sources, tmp_path):
    """CUDA graphs replay the FP8 GEMMs as eager runs them (no host syncs): bit for bit in the dense model; the MoE's
    prefill pieces run at their bucket's row count, whose expert tiles round otherwise, and this chaotic model turns
    that into tenths of a nat (tests/e2e/test_gpu_graphs.py), so it gets the twin's bounds. W8A8 (prefill) stays near
    the bf16 twin. Activation rounding to e4m3 (~2.6% relative per GEMM) moves this chaotic tiny model's prompt
    logprobs by 0.147 mean / 0.515 max (dense) and 0.155 / 0.845 (MoE) on an H100 (2026-11-28); a wrong scale or
    layout moves them by whole nats. Bounds: 2x the measured mean, and 1.5 nats max."""
    q = quantize_checkpoint(sources[moe], str(tmp_path / "q"), method="fp8", progress=False)
    lp, toks = _run_cuda(q, enforce_eager=False)
    lp_eager, toks_eager = _run_cuda(q, enforce_eager=True)
    if moe:
        diffs = [abs(a - b) for a, b in zip(lp, lp_eager)]
        assert sum(diffs) / len(diffs) < 0.3 and max(diffs) < 1.5, (sum(diffs) / len(diffs), max(diffs))
    else:
        assert toks == toks_eager and max(abs(a - b) for a, b in zip(lp, lp_eager)) < 1e-3
    lp_twin, _ = _run_cuda(write_dequantized(q, str(tmp_path / "twin"), torch.bfloat16), enforce_eager=True)
    diffs = [abs(a - b) for a, b in zip(lp, lp_twin)]
    assert sum(diffs) / len(diffs) < 0.3 and max(diffs) < 1.5, (sum(diffs) / len(diffs), max(diffs))
