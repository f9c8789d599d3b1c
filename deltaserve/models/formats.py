"""Which format each Linear of a checkpoint is in, decided before the model is built, and the model built to match.

`plan_formats` reads only the safetensors headers (tensor names and dtypes, no data) and config.json's
quantization_config: a module holding `qweight`/`qzeros`/`scales` is AWQ int4, one holding
`weight_packed`/`weight_scale` is compressed-tensors int4, one whose `weight` is F8_E4M3 (with `weight_scale_inv`)
is block FP8, anything else stays 16-bit. (modules_to_not_convert is how the writer chose; the tensors
are what the reader trusts.) `apply_formats` then swaps the matching modules of a freshly built (meta) model.
Both hold the quantized Linears against config.json before anything is built (each one's weight shape, every expert
present, a module of the model for each), so a config.json of other weights is one sentence, as in the 16-bit loader.
`awq_formats` plans the same dict without a checkpoint (random-weight benchmarks): the mixed pattern of
Qwen3.5 AWQ checkpoints, or the all-int4 one `deltaserve quantize` writes. `tp_problems` says (before any process
starts) why a tensor-parallel size cannot cut the int4 Linears: a shard must hold whole packed int32s and whole
quantization groups.
"""
from __future__ import annotations

import functools
import re
from collections import defaultdict

from safetensors import safe_open
from torch import nn

from ..config import ModelConfig, QuantConfig
from ..layers.fp8 import FP8_DTYPES, Fp8Experts, Fp8Linear
from ..layers.linear import Linear, ProjectionGroup, QuantExperts, QuantLinear
from ..layers.quant import FORMATS, QUANT_SUFFIXES, check_shapes

# Linears Qwen3.5 AWQ checkpoints typically keep 16-bit (issue 5; module-name suffixes, matched at a dot): attention q/k/v,
# the GDN in-projections, the MoE router and the shared expert's gate. o_proj, out_proj, MLPs, the shared expert's
# MLP and the experts are int4; embeddings, lm_head, norms and conv1d are never quantized.
AWQ_MIXED_16BIT = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "linear_attn.in_proj_qkv",
                   "linear_attn.in_proj_z", "linear_attn.in_proj_b", "linear_attn.in_proj_a", "mlp.gate",
                   "mlp.shared_expert_gate")
# The pattern `deltaserve quantize` writes (quantize.not_convert_list): every projection int4 but the GDN in_proj_a/b
# (HV outputs), the MoE router and the shared expert's gate.
AWQ_FULL_16BIT = ("linear_attn.in_proj_b", "linear_attn.in_proj_a", "mlp.gate", "mlp.shared_expert_gate")
# `quantization` of a random-weight model (LLM.from_config, bench --quantization) -> the Linears it keeps 16-bit
RANDOM_AWQ_PATTERNS = {"awq": AWQ_MIXED_16BIT, "awq-full": AWQ_FULL_16BIT}
EXPERT = re.compile(r"^(?P<moe>layers\.\d+\.mlp\.experts)\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)$")


class FormatError(ValueError):
    """Raised as WeightsError by the loader (kept separate to avoid an import cycle)."""


def plan_formats(cfg: ModelConfig, files: list[str], strip) -> dict[str, str]:
    """Checkpoint module name (prefix stripped, e.g. `layers.3.self_attn.o_proj`) -> "awq" | "ct" | "ct_zp" | "fp8"
    for every quantized module; modules not listed are 16-bit. strip(name) -> stripped name or None (skipped)."""
    kinds: dict[str, dict[str, str]] = defaultdict(dict)  # module -> suffix -> full tensor name
    fp8: dict[str, str] = {}  # module -> full name of its float8 `weight`
    names: set[str] = set()
    shapes: dict[str, list[int]] = {}  # full name -> shape, of the quantized Linears' tensors
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for full in f.keys():
                name = strip(full)
                if name is None:
                    continue
                names.add(name)
                module, _, suffix = name.rpartition(".")
                if suffix in QUANT_SUFFIXES or suffix == "weight_scale_inv":
                    kinds[module][suffix] = full
                    shapes[full] = f.get_slice(full).get_shape()
                elif suffix == "weight" and f.get_slice(full).get_dtype().startswith("F8"):
                    _check_fp8_dtype(full, f.get_slice(full).get_dtype())
                    fp8[module] = full
                    shapes[full] = f.get_slice(full).get_shape()
    if not kinds and not fp8:
        return {}
    q = cfg.quantization
    first = next(iter(fp8.values())) if fp8 else next(iter(next(iter(kinds.values())).values()))
    if q is None:
        raise FormatError(f"Checkpoint holds quantized tensor {first} but config.json has no quantization_config "
                          f"(nor compression_config); use the config.json that came with the checkpoint.")
    if fp8 or q.method == "fp8":
        formats = _plan_fp8(kinds, fp8, q.method, first)
    else:
        fmt = "awq" if q.method == "awq" else ("ct_zp" if q.zero_point else "ct")
        formats = {module: _check_module(module, found, fmt, q.method, names) for module, found in kinds.items()}
    weights = {module: fp8[module] if fmt == "fp8" else kinds[module][next(iter(FORMATS[fmt]))]
               for module, fmt in formats.items()}
    _check_sizes(cfg, formats, {module: (full, shapes[full]) for module, full in weights.items()})
    _check_experts_present(cfg, formats, {name.rpartition(".")[0] for name in names})
    return formats


def _check_fp8_dtype(full: str, dtype: str) -> None:
    if dtype not in FP8_DTYPES:
        raise FormatError(f"Tensor {full} is {dtype}; deltaserve reads FP8 weights as e4m3 (F8_E4M3) only.")


def _plan_fp8(kinds: dict[str, dict[str, str]], fp8: dict[str, str], method: str, first: str) -> dict[str, str]:
    """Every module with an F8_E4M3 weight is "fp8" and must hold weight_scale_inv, and nothing else quantized."""
    if method != "fp8":
        raise FormatError(f"Checkpoint holds FP8 tensor {first} but config.json's quantization_config.quant_method "
                          f"is {method!r}; use the config.json that came with the checkpoint.")
    for module, found in kinds.items():
        for suffix, full in found.items():
            if suffix != "weight_scale_inv":
                raise FormatError(f"Tensor {full} is not part of the fp8 format config.json names "
                                  f"(quantization_config.quant_method).")
            if module not in fp8:
                raise FormatError(f"Checkpoint holds {full} but {full[: -len('_scale_inv')]} is not "
                                  f"float8_e4m3fn; an FP8 Linear stores its weight in e4m3.")
    for module, full in fp8.items():
        if module not in kinds:
            raise FormatError(f"Checkpoint is missing tensor {full}_scale_inv: every FP8 Linear needs weight "
                              f"(float8_e4m3fn) and weight_scale_inv.")
    return {module: "fp8" for module in fp8}


def _check_module(module: str, found: dict[str, str], fmt: str, method: str, names: set[str]) -> str:
    full = next(iter(found.values()))
    prefix = full[: len(full) - len(module) - len(full.rpartition(".")[2]) - 1]
    for suffix in found:
        if suffix not in FORMATS[fmt]:
            if suffix == "weight_zero_point" and fmt == "ct":  # else blamed on quant_method, which is right
                raise FormatError(f"Checkpoint holds zero point {found[suffix]}, but config.json's quantization_config "
                                  f"weights are symmetric (symmetric true or absent); set \"symmetric\": false.")
            raise FormatError(f"Tensor {found[suffix]} is not part of the {method} format config.json names "
                              f"(quantization_config.quant_method).")
    for suffix in FORMATS[fmt]:
        if suffix == "weight_zero_point" and suffix not in found:
            raise FormatError(f"Checkpoint is missing tensor {prefix}{module}.weight_zero_point, which config.json's "
                              f"quantization_config weights call for (\"symmetric\": false).")
        if suffix not in found:
            raise FormatError(f"Checkpoint is missing tensor {prefix}{module}.{suffix}: every {method} int4 Linear "
                              f"needs {', '.join(FORMATS[fmt])}.")
    if f"{module}.weight" in names:
        raise FormatError(f"Checkpoint holds both {prefix}{module}.weight and {full}; a Linear is either 16-bit or "
                          f"quantized, not both.")
    return fmt


def _check_sizes(cfg: ModelConfig, formats: dict[str, str], weights: dict[str, tuple[str, list[int]]]) -> None:
    """Each quantized Linear's weight tensor (qweight, weight_packed, the FP8 weight: shapes free of the group size;
    weights: module -> (full name, header shape)) has the shape config.json gives that Linear. Checked before the
    model is built, as a size the format cannot hold (250 outputs, not a whole number of int32s) would otherwise be
    blamed on quantization_config.group_size; the loader checks every other tensor against the built model."""
    linears = linear_modules(cfg)
    for module in (m for m in linears if m in formats):  # in layer order: the first misfit is the one named
        fmt, (in_f, out_f) = formats[module], linears[module]
        want = [out_f, in_f] if fmt == "fp8" else list(next(iter(FORMATS[fmt].values())).shape(in_f, out_f, 1))
        full, shape = weights[module]
        if list(shape) != want:
            raise FormatError(f"Tensor {full} has shape {list(shape)}, but the model expects {want} for it (from "
                              f"config.json).")


def _check_experts_present(cfg: ModelConfig, formats: dict[str, str], modules: set[str]) -> None:
    """A layer with quantized experts holds every expert config.json's num_experts gives it. One without any tensor
    is a config.json of other weights (or a partial download), not the mix of formats apply_formats reports for
    an expert stored 16-bit."""
    for moe in sorted({m["moe"] for name in formats if (m := EXPERT.match(name))}):
        absent = next((f"{moe}.{e}.{p}" for e in range(cfg.num_experts) for p in ("gate_proj", "up_proj", "down_proj")
                       if f"{moe}.{e}.{p}" not in modules), None)
        if absent is not None:
            raise FormatError(f"Checkpoint holds no tensor of expert {absent}, though config.json has num_experts="
                              f"{cfg.num_experts}: an incomplete download, or a config.json that does not belong to "
                              f"these weights.")


def _unplaced(model: nn.Module, cfg: ModelConfig, formats: dict[str, str]) -> list[str]:
    """Quantized modules of the checkpoint that the model config.json describes has no place for: MoE weights under a
    dense config or the reverse, a layer of the other token mixer, a layer past num_hidden_layers. An expert past
    num_experts of a layer that has experts is left to _apply_experts, which says so."""
    linears, out = linear_modules(cfg), []
    for name in formats:
        m = EXPERT.match(name)
        owner = m["moe"] if m and cfg.is_moe else name
        if name not in linears and _get(model, owner) is None:
            out.append(name)
    return sorted(out)


def apply_formats(model: nn.Module, cfg: ModelConfig, formats: dict[str, str],
                  blocks: dict[str, tuple[int, int]] | None = None) -> None:
    """Swap the modules of `model` (built on the meta device, all 16-bit) for the formats of `formats`. cfg: the
    shapes the model holds (under TP its rank's shard_config). blocks: FP8 module -> its (BN, BK) where a TP shard
    refined the checkpoint's (weights.fp8_shard_blocks); others keep quantization_config.weight_block_size."""
    if not formats:
        return
    from .weights import fused_layout

    unplaced = _unplaced(model, cfg, formats)
    if unplaced:  # else an AttributeError from get_submodule below (SparseMoE has no attribute `gate_up_proj`)
        raise FormatError(f"Checkpoint has {len(unplaced)} quantized module(s) this {cfg.architecture} model does "
                          f"not have, e.g. {', '.join(unplaced[:3])}: config.json and the weights disagree; is "
                          f"config.json from the same checkpoint?")
    q, blocks = cfg.quantization, blocks or {}
    left = dict(formats)
    for i in range(cfg.num_hidden_layers):
        for fused, pieces in fused_layout(cfg).items():
            path = f"layers.{i}.{fused}"
            module = fused.rsplit(".", 1)[0]
            fmts = [left.pop(f"layers.{i}.{module}.{piece}", None) for piece, _ in pieces]
            if any(fmts):
                old = model.get_submodule(path)
                pieces_ = [(piece, _linear(fmt, old.in_features, rows, q, f"layers.{i}.{module}.{piece}", blocks,
                                           old.bias is not None))
                           for (piece, rows), fmt in zip(pieces, fmts)]
                model.set_submodule(path, ProjectionGroup(pieces_))
        _apply_experts(model, cfg, i, left, q, blocks)
    for name in sorted(left):
        old = _get(model, name)
        if not isinstance(old, nn.Linear) or name == "lm_head":
            raise FormatError(f"Checkpoint module {name} is quantized ({left[name]}), but deltaserve reads quantized "
                              f"weights only for the decoder layers' Linear projections and experts; keep it 16-bit.")
        model.set_submodule(name, _linear(left[name], old.in_features, old.out_features, q, name, blocks,
                                          old.bias is not None))


def _apply_experts(model: nn.Module, cfg: ModelConfig, layer: int, left: dict[str, str], q: QuantConfig,
                   blocks: dict[str, tuple[int, int]]) -> None:
    moe = f"layers.{layer}.mlp.experts"
    found = {k: left.pop(k) for k in [k for k in left if k.startswith(moe + ".") and EXPERT.match(k)]}
    if not found:
        return
    want = {f"{moe}.{e}.{p}" for e in range(cfg.num_experts) for p in ("gate_proj", "up_proj", "down_proj")}
    fmts = set(found.values())
    extra = sorted(set(found) - want)
    if extra:  # an expert id past num_experts (16-bit ones are reported as unused tensors by the loader)
        raise FormatError(f"Checkpoint holds quantized expert {extra[0]}, but config.json has num_experts="
                          f"{cfg.num_experts}; is config.json from the same checkpoint?")
    if set(found) != want or len(fmts) != 1:
        missing = sorted(want - set(found))
        what = f"{missing[0]} has no quantized tensors (it is 16-bit or missing)" if missing else \
            f"they hold {' and '.join(sorted(fmts))}"
        raise FormatError(f"Experts of layer {layer} are not all quantized alike: {what}; deltaserve reads a layer's "
                          f"experts all in one quantized format or all 16-bit.")
    fmt, group = fmts.pop(), q.group_size
    if fmt == "fp8":  # any shape: partial blocks at the edges have their own scales
        block = q.weight_block_size
        model.set_submodule(moe, Fp8Experts(cfg.num_local_experts, cfg.hidden_size, cfg.moe_intermediate_size,
                                            blocks.get(f"{moe}.0.gate_proj", block),
                                            blocks.get(f"{moe}.0.down_proj", block)))
        return
    h, inter = cfg.hidden_size, cfg.moe_intermediate_size
    for name, i, o in ((f"{moe}.0.gate_proj", h, 2 * inter), (f"{moe}.0.down_proj", inter, h)):
        reason = check_shapes(fmt, i, o, group, name)
        if reason:
            raise FormatError(f"Quantized tensor {name}.{next(iter(FORMATS[fmt]))} cannot be read: {reason}.")
    model.set_submodule(moe, QuantExperts(fmt, cfg.num_local_experts, h, inter, group))


def _linear(fmt: str | None, in_features: int, out_features: int, q: QuantConfig | None, name: str,
            blocks: dict[str, tuple[int, int]], bias: bool = False) -> nn.Module:
    """bias: the replaced 16-bit module had one (attention_bias), so the checkpoint holds it beside the weight."""
    if fmt is None:
        return Linear(in_features, out_features, bias=bias)
    if fmt == "fp8":
        return Fp8Linear(in_features, out_features, blocks.get(name, q.weight_block_size), bias=bias)
    group = q.group_size
    reason = check_shapes(fmt, in_features, out_features, group, name)
    if reason:
        raise FormatError(f"Quantized tensor {name}.{next(iter(FORMATS[fmt]))} cannot be read: {reason} "
                          f"(quantization_config.group_size; keep such a Linear 16-bit).")
    return QuantLinear(fmt, in_features, out_features, group, bias=bias)


def _get(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def linear_modules(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """Checkpoint name of every decoder-layer Linear (e.g. `layers.3.self_attn.o_proj`, experts one per expert and
    projection) -> (in_features, out_features), in layer order."""
    from .weights import fused_layout

    h, pieces = cfg.hidden_size, fused_layout(cfg)
    out: dict[str, tuple[int, int]] = {}
    for i, kind in enumerate(cfg.layer_types):
        if kind == "full_attention":
            fused, last = "self_attn.qkv_proj", ("self_attn.o_proj", cfg.num_attention_heads * cfg.head_dim)
        else:
            fused = "linear_attn.in_proj"
            last = ("linear_attn.out_proj", cfg.linear_num_value_heads * cfg.linear_value_head_dim)
        mlps = ["mlp.shared_expert.gate_up_proj"] if cfg.is_moe else ["mlp.gate_up_proj"]
        for f in [fused] + mlps:
            module = f.rsplit(".", 1)[0]
            out.update({f"layers.{i}.{module}.{piece}": (h, rows) for piece, rows in pieces[f]})
            if f != fused:
                out[f"layers.{i}.{module}.down_proj"] = (pieces[f][0][1], h)
        out[f"layers.{i}.{last[0]}"] = (last[1], h)
        if cfg.is_moe:
            out[f"layers.{i}.mlp.gate"] = (h, cfg.num_experts)
            out[f"layers.{i}.mlp.shared_expert_gate"] = (h, 1)
            inter = cfg.moe_intermediate_size
            for e in range(cfg.num_experts):
                out.update({f"layers.{i}.mlp.experts.{e}.gate_proj": (h, inter),
                            f"layers.{i}.mlp.experts.{e}.up_proj": (h, inter),
                            f"layers.{i}.mlp.experts.{e}.down_proj": (inter, h)})
    return out


@functools.lru_cache(maxsize=8)
def weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """linear_modules as the [out, in] shape of each weight (cached: TP cuts look every Linear up; do not mutate)."""
    return {module: (out_f, in_f) for module, (in_f, out_f) in linear_modules(cfg).items()}


def awq_formats(cfg: ModelConfig, keep_16bit: tuple[str, ...] = AWQ_MIXED_16BIT) -> dict[str, str]:
    """Module -> "awq" for every decoder-layer Linear not named by a suffix in `keep_16bit` (the dict plan_formats
    would read from such a checkpoint). cfg.quantization gives the group size; one that does not divide a quantized
    Linear's in-features raises ValueError."""
    if cfg.quantization is None or cfg.quantization.method != "awq":
        raise ValueError("awq_formats needs a config whose quantization is AWQ (it holds the group size)")
    group = cfg.quantization.group_size
    formats = {}
    for name, (in_f, out_f) in linear_modules(cfg).items():
        if any(name == s or name.endswith("." + s) for s in keep_16bit):
            continue
        reason = check_shapes("awq", in_f, out_f, group, name)
        if reason:
            raise ValueError(f"{name} cannot be AWQ int4: {reason}; pick a group size that divides it (e.g. 32 or "
                             f"64) or keep it 16-bit")
        formats[name] = "awq"
    return formats


def tp_problems(cfg: ModelConfig, formats: dict[str, str], world: int) -> list[str]:
    """The first reason (a one-item list, or none) `world` ranks cannot cut the int4 Linears of `formats`: every
    rank's range of each cut (GDN [q | k | v] segments, gate / up, kv heads: weights.weight_cut) must start and end
    on whole elements of every tensor of the format (8 packed channels, a quantization group). FP8 takes any cut:
    the shard refines its scale blocks (layers/fp8.shard_block). World 1 cuts nothing (a Linear the format cannot
    hold at all is apply_formats' error, naming its tensor)."""
    from .weights import weight_cut

    if world == 1:
        return []
    for module, fmt in formats.items():
        m = EXPERT.match(module)
        if fmt == "fp8" or (m and m["e"] != "0"):  # every expert is cut like expert 0
            continue
        cuts = [c for rank in range(world) if (c := weight_cut(module, cfg, rank, world)) is not None]
        problem = next((p for dim, ranges in cuts if (p := _cut_problem(cfg, module, fmt, dim, ranges, world))), None)
        if problem:
            return [problem]
    return []


def _cut_problem(cfg: ModelConfig, module: str, fmt: str, dim: int, ranges: list[tuple[int, int]],
                 world: int) -> str | None:
    """Why one rank's `ranges` (channels along dim 0 = out / 1 = in of the [out, in] weight) split an element of
    one of the format's tensors, or None."""
    group = cfg.quantization.group_size
    for kind, spec in FORMATS[fmt].items():
        unit = spec.unit_along(dim, group)[1]
        bad = next(((a, b) for a, b in ranges if a % unit or b % unit), None)
        if bad is None:
            continue
        io, n = ("output", "input")[dim], bad[1] - bad[0]
        where = f"at channel {bad[0]}" if n % unit == 0 else f"into {'pieces of ' if len(ranges) > 1 else ''}{n}"
        why = f"the int4 group size {group}" if dim == 1 and spec.per_in is None else \
            f"{unit} (its {kind} packs {unit} {io} channels per int32)"
        size = weight_shapes(cfg)[module][dim]
        return f"tensor_parallel_size={world} splits {module}'s {size} {io} channels {where}, not a multiple of {why}"
    return None
