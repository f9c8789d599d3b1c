"""Load a Hugging Face Qwen3.5 checkpoint into our model, one tensor at a time.

Table-driven: `RULES` maps a checkpoint name (prefix already stripped) to a target parameter slice and a small pure
transform. Tensors stream from safetensors (memory-mapped) straight into the preallocated parameters on the target
device and dtype, so peak host memory stays about one tensor, never a second copy of the model. Every problem is a
`WeightsError` naming the tensor or file. Quantized checkpoints: `read_formats` (headers only) tells `build_model`
which Linears are int4 or FP8 (models/formats.py); their tensors (`qweight`, `weight_packed`, `weight_scale_inv`,
...) load by the same rules, each into a parameter of its own dtype (an FP8 `weight` is copied as e4m3, never cast
to the model dtype).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from dataclasses import dataclass
from typing import Callable

import torch
from safetensors import safe_open
from torch import nn

from ..config import ModelConfig
from ..layers.fp8 import Fp8Experts, Fp8Linear, scale_ranges, shard_block
from ..layers.gated_deltanet import GatedDeltaNet
from ..layers.linear import ProjectionGroup, QuantLinear
from ..layers.quant import QUANT_SUFFIXES, SPECS
from ..worker.distributed import (
    SINGLE, TPGroup, expert_range, kv_head_range, read_ranges, segments, shard_config, vocab_range,
)
from .formats import FormatError, apply_formats, plan_formats, tp_problems, weight_shapes
from .registry import model_class

PREFIXES = ("model.language_model.", "model.")  # ConditionalGeneration, CausalLM
# k_scale / v_scale (and q / prob / kv_scale): a compressed-tensors kv_cache_scheme's stored KV-cache scales, not read
SKIP = re.compile(r"^(model\.visual\.|visual\.|mtp\.|model\.mtp\.)|rotary_emb\.inv_freq$|\.weight_shape$|"
                  r"\.self_attn\.(k|v|q|kv|prob)_scale$")
QUANT_KINDS = "|".join([*QUANT_SUFFIXES, "weight_scale_inv"])  # int4 (layers/quant.py FORMATS) and FP8 scales


class WeightsError(ValueError):
    """The checkpoint's tensors do not match the model; the message names the tensor or file."""


@dataclass(frozen=True)
class Target:
    param: str  # our parameter name
    index: tuple  # slice of the parameter this tensor fills (() = all of it)
    parts: tuple[str, ...]  # coverage keys this tensor provides (for the missing-tensor report)
    transform: Callable[[torch.Tensor], torch.Tensor] = lambda t: t
    source: tuple | None = None  # (dim, [(start, stop), ...]): the rows of the checkpoint tensor this rank reads


def _experts_slice(m: re.Match, cfg: ModelConfig, split: frozenset) -> Target:
    """One expert's gate/up/down tensor (16-bit `weight` or an int4 tensor) -> its slice of the layer's stack; FP8
    experts (in `split`: an Fp8Experts) keep gate, up and down apart, as the checkpoint does."""
    layer, e, proj, kind = m["layer"], int(m["e"]), m["proj"], m["kind"]
    if f"layers.{layer}.mlp.experts" in split:
        p = f"layers.{layer}.mlp.experts.{proj}.{kind}"
        return Target(p, (e,), (f"{p}[{e}]",))
    suffix = "" if kind == "weight" else f".{kind}"
    inter = cfg.moe_intermediate_size
    if proj == "down_proj":
        p = f"layers.{layer}.mlp.experts.down_proj{suffix}"
        return Target(p, (e,), (f"{p}[{e}]",))
    p = f"layers.{layer}.mlp.experts.gate_up_proj{suffix}"
    spec = SPECS.get(kind)
    dim, per = (0, 1) if spec is None else (spec.out_dim, spec.per_out)  # where the output channels run
    start = 0 if proj == "gate_proj" else inter // per
    rows = slice(start, start + inter // per)
    return Target(p, (e,) + (slice(None),) * dim + (rows,), (f"{p}[{e}].{proj}",))


def _experts_packed(m: re.Match, cfg: ModelConfig, split: frozenset) -> Target:
    p = f"layers.{m['layer']}.mlp.experts.{m['proj']}"
    return Target(p, (), expected_parts(p, cfg))


def fused_layout(cfg: ModelConfig) -> dict[str, list[tuple[str, int]]]:
    """Our fused projections (one GEMM each) -> the checkpoint's pieces, in row order, with their row counts."""
    d, hkv = cfg.head_dim, cfg.num_key_value_heads
    hv_v = cfg.linear_num_value_heads * cfg.linear_value_head_dim
    return {
        "self_attn.qkv_proj": [("q_proj", 2 * cfg.num_attention_heads * d), ("k_proj", hkv * d),
                               ("v_proj", hkv * d)],
        "linear_attn.in_proj": [("in_proj_qkv", cfg.conv_dim), ("in_proj_z", hv_v),
                                ("in_proj_b", cfg.linear_num_value_heads),
                                ("in_proj_a", cfg.linear_num_value_heads)],
        "mlp.gate_up_proj": [("gate_proj", cfg.intermediate_size), ("up_proj", cfg.intermediate_size)],
        "mlp.shared_expert.gate_up_proj": [("gate_proj", cfg.shared_expert_intermediate_size),
                                           ("up_proj", cfg.shared_expert_intermediate_size)],
    }


def _fused_piece(m: re.Match, cfg: ModelConfig, split: frozenset) -> Target:
    """A piece of a fused projection -> its row slice of the fused weight, or, where the group is split (a
    ProjectionGroup: pieces in different formats), the piece's own Linear."""
    module, piece = m["module"], m["piece"]
    for fused, pieces in fused_layout(cfg).items():
        if fused.rsplit(".", 1)[0] == module and piece in (n for n, _ in pieces):
            if f"layers.{m['layer']}.{fused}" in split:
                p = f"layers.{m['layer']}.{fused}.{piece}.{m['kind']}"
                return Target(p, (), (p,))
            start = sum(rows for _, rows in pieces[: [n for n, _ in pieces].index(piece)])
            rows = dict(pieces)[piece]
            p = f"layers.{m['layer']}.{fused}.{m['kind']}"
            return Target(p, (slice(start, start + rows),), (f"{p}.{piece}",))
    return Target(m[0], (), (m[0],))  # not one we fuse: reported as unexpected by name


RULES: list[tuple[re.Pattern, Callable[[re.Match, ModelConfig, frozenset], Target]]] = [
    (re.compile(r"^layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<e>\d+)\.(?P<proj>gate_proj|up_proj|down_proj)\."
                rf"(?P<kind>weight|{QUANT_KINDS})$"), _experts_slice),
    (re.compile(r"^layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<proj>gate_up_proj|down_proj)$"), _experts_packed),
    (re.compile(r"^layers\.(?P<layer>\d+)\.(?P<module>self_attn|linear_attn|mlp|mlp\.shared_expert)\."
                r"(?P<piece>q_proj|k_proj|v_proj|in_proj_qkv|in_proj_z|in_proj_b|in_proj_a|gate_proj|up_proj)\."
                rf"(?P<kind>weight|bias|{QUANT_KINDS})$"), _fused_piece),
    (re.compile(r"^(?P<p>layers\.\d+\.linear_attn\.conv1d\.weight)$"),  # [C, 1, W] -> [C, W]
     lambda m, cfg, split: Target(m["p"], (), (m["p"],),
                                  lambda t: t[:, 0] if t.dim() == 3 and t.shape[1] == 1 else t)),
    (re.compile(r"^(?P<p>.+)$"), lambda m, cfg, split: Target(m["p"], (), (m["p"],))),
]


# ---------------------------------------------------------------- tensor parallelism: what each rank reads
# Column-parallel tensors (and per-head vectors) are cut along their output rows, per segment where one tensor
# stacks several (GDN [q | k | v] channels, packed experts' [gate | up]); row-parallel ones along their input
# columns. Anything not listed (norms, router, shared_expert_gate) is replicated; the embedding and lm_head are
# vocab-parallel (the same rows of the vocabulary on a rank). A quantized Linear's tensors are cut where its
# [out, in] weight is (weight_cut), in their own units: int4 tensors by TensorSpec.cut (packed columns, groups),
# FP8 scales one checkpoint block per fine block of the shard (layers/fp8.scale_ranges).

def _even(dim: int):
    return lambda cfg, shape, r, w: (dim, segments([shape[dim]], r, w))


def _gdn_channels(cfg: ModelConfig, shape, r: int, w: int):
    hk_k = cfg.linear_num_key_heads * cfg.linear_key_head_dim
    return 0, segments([hk_k, hk_k, cfg.linear_num_value_heads * cfg.linear_value_head_dim], r, w)


def _kv_rows(cfg: ModelConfig, shape, r: int, w: int):
    a, b = kv_head_range(cfg.num_key_value_heads, r, w)
    return 0, [(a * cfg.head_dim, b * cfg.head_dim)]


SHARD_RULES: list[tuple[re.Pattern, Callable]] = [
    (re.compile(r"self_attn\.q_proj\.(weight|bias)$"), _even(0)),  # whole heads: [query | gate] per head
    (re.compile(r"self_attn\.[kv]_proj\.(weight|bias)$"), _kv_rows),
    (re.compile(r"linear_attn\.(in_proj_qkv|conv1d)\.weight$"), _gdn_channels),
    (re.compile(r"linear_attn\.(in_proj_[zab]\.weight|A_log|dt_bias)$"), _even(0)),
    (re.compile(r"mlp\.(shared_expert\.|experts\.\d+\.)?(gate|up)_proj\.weight$"), _even(0)),
    (re.compile(r"mlp\.experts\.gate_up_proj$"),  # packed [E, 2I, H]: the rank's rows of gate and of up
     lambda cfg, shape, r, w: (1, segments([shape[1] // 2, shape[1] // 2], r, w))),
    (re.compile(r"mlp\.experts\.down_proj$"), _even(2)),  # packed [E, H, I]
    (re.compile(r"(o_proj|out_proj|down_proj)\.weight$"), _even(1)),
    (re.compile(r"^(lm_head|embed_tokens)\.weight$"), lambda cfg, shape, r, w: (0, [vocab_range(shape[0], r, w)])),
]
ROW_PARALLEL_BIAS = re.compile(r"(o_proj|out_proj|down_proj)\.bias$")  # added once: rank 0 holds it, others zeros


def _source(name: str, cfg: ModelConfig, shape, rank: int, world: int) -> tuple | None:
    module, _, kind = name.rpartition(".")
    if kind not in SPECS and kind != "weight_scale_inv":
        return _rule_source(name, cfg, shape, rank, world)
    cut = weight_cut(module, cfg, rank, world)
    if cut is None:
        return None
    if kind == "weight_scale_inv":
        dim, ranges = cut
        return dim, scale_ranges(ranges, cfg.quantization.weight_block_size[dim])
    return SPECS[kind].cut(*cut, cfg.quantization.group_size)


def _rule_source(name: str, cfg: ModelConfig, shape, rank: int, world: int) -> tuple | None:
    for pattern, rows in SHARD_RULES:
        if pattern.search(name):
            return rows(cfg, shape, rank, world)
    return None


def weight_cut(module: str, cfg: ModelConfig, rank: int, world: int) -> tuple[int, list[tuple[int, int]]] | None:
    """Rank `rank`'s cut of decoder-layer Linear `module`'s [out, in] weight (checkpoint name, e.g.
    `layers.3.self_attn.o_proj`; full shapes from cfg): (0 = output rows or 1 = input columns, the rank's ranges in
    channels), or None where it is replicated, whole (an expert under expert parallelism) or not a Linear we know."""
    shape = weight_shapes(cfg).get(module)
    if shape is None or (cfg.expert_parallel and cfg.is_moe and EXPERT_TENSOR.match(module)):
        return None
    return _rule_source(f"{module}.weight", cfg, shape, rank, world)


def fp8_shard_blocks(cfg: ModelConfig, formats: dict[str, str], rank: int, world: int) -> dict[str, tuple[int, int]]:
    """FP8 module -> the (BN, BK) rank `rank` holds it in: quantization_config.weight_block_size, refined along the
    cut dim where a cut falls inside a scale block (layers/fp8.shard_block)."""
    out: dict[str, tuple[int, int]] = {}
    if world == 1:
        return out
    for module in (m for m, fmt in formats.items() if fmt == "fp8"):
        cut = weight_cut(module, cfg, rank, world)
        if cut is not None:
            block = list(cfg.quantization.weight_block_size)
            block[cut[0]] = shard_block(cut[1], block[cut[0]])
            out[module] = tuple(block)
    return out


def expected_parts(param: str, cfg: ModelConfig) -> tuple[str, ...]:
    """Coverage keys a parameter needs: a fused projection one key per checkpoint piece; packed experts can arrive
    whole or one expert (and half) at a time."""
    m = re.match(r"^layers\.\d+\.(?P<fused>.+)\.(weight|bias)$", param)
    if m and m["fused"] in fused_layout(cfg):
        return tuple(f"{param}.{piece}" for piece, _ in fused_layout(cfg)[m["fused"]])
    if re.search(rf"experts\.gate_up_proj(\.({QUANT_KINDS}))?$", param):
        return tuple(f"{param}[{e}].{h}" for e in range(cfg.num_local_experts) for h in ("gate_proj", "up_proj"))
    if re.search(rf"experts\.down_proj(\.({QUANT_KINDS}))?$|experts\.(gate|up|down)_proj\.weight(_scale_inv)?$",
                 param):
        return tuple(f"{param}[{e}]" for e in range(cfg.num_local_experts))
    return (param,)


def strip_name(name: str, cfg: ModelConfig) -> str | None:
    """Checkpoint tensor name -> our naming (prefix dropped), or None for tensors we deliberately skip."""
    if SKIP.search(name) or (name == "lm_head.weight" and cfg.tie_word_embeddings):
        return None
    for prefix in PREFIXES:
        if name.startswith(prefix):
            return name[len(prefix):]
    return name


def resolve(name: str, cfg: ModelConfig, shape=None, rank: int = 0, world: int = 1,
            split: frozenset = frozenset()) -> Target | None:
    """Checkpoint tensor name -> Target (for rank `rank` of `world`: its parameter slice and the checkpoint rows
    it reads, given the tensor's full `shape`), or None for tensors we deliberately skip (under expert parallelism
    also other ranks' per-expert tensors, never read). split: modules whose checkpoint pieces load whole into their
    own Linears: our fused projections built as ProjectionGroups, and Fp8Experts."""
    name = strip_name(name, cfg)
    if name is None:
        return None
    local = shard_config(cfg, world)
    if local.expert_shards > 1:
        name = _local_expert(name, local, rank)
        if name is None:
            return None
    for pattern, make in RULES:
        m = pattern.match(name)
        if m:
            target = make(m, local, split)
            break
    if world == 1:
        return target
    if ROW_PARALLEL_BIAS.search(name) and rank > 0:
        return dataclasses.replace(target, transform=torch.zeros_like)
    if local.expert_shards > 1 and EXPERT_TENSOR.match(name):  # whole experts: a per-expert tensor is read whole
        return dataclasses.replace(target, source=(0, [expert_range(local, rank)]) if PACKED_EXPERTS.match(name)
                                   else None)
    return dataclasses.replace(target, source=_source(name, cfg, shape, rank, world))


# ---------------------------------------------------------------- expert parallelism: whole experts per rank
EXPERT_TENSOR = re.compile(r"^layers\.\d+\.mlp\.experts\.")
PACKED_EXPERTS = re.compile(r"^layers\.\d+\.mlp\.experts\.(gate_up_proj|down_proj)$")  # [E, ...]: rows on dim 0
PER_EXPERT = re.compile(r"^(?P<base>layers\.\d+\.mlp\.experts\.)(?P<e>\d+)(?P<rest>\..+)$")


def _local_expert(name: str, local: ModelConfig, rank: int) -> str | None:
    """Under expert parallelism: a per-expert tensor of expert E -> the same name with the rank's local index of E,
    or None (skipped unread) when another rank holds E. An E past num_experts keeps its name (reported as unused)."""
    m = PER_EXPERT.match(name)
    if m is None:
        return name
    e = int(m["e"])
    start, stop = expert_range(local, rank)
    if start <= e < stop:
        return f"{m['base']}{e - start}{m['rest']}"
    return None if e < local.num_experts else name


def unfuse(name: str, tensor: torch.Tensor, cfg: ModelConfig) -> list[tuple[str, torch.Tensor]]:
    """One of our parameters -> the checkpoint-named pieces it was loaded from (for writing HF checkpoints)."""
    m = re.match(r"^(?P<prefix>layers\.\d+\.)(?P<fused>.+)\.(?P<kind>weight|bias)$", name)
    if not m or m["fused"] not in fused_layout(cfg):
        return [(name, tensor)]
    module = m["fused"].rsplit(".", 1)[0]
    out, start = [], 0
    for piece, rows in fused_layout(cfg)[m["fused"]]:
        out.append((f"{m['prefix']}{module}.{piece}.{m['kind']}", tensor[start: start + rows]))
        start += rows
    return out


def checkpoint_files(path: str) -> list[str]:
    """The safetensors files of a checkpoint directory, checked to exist: model.safetensors when there is one (as
    transformers picks it over an index beside it), else the shards of model.safetensors.index.json."""
    index = os.path.join(path, "model.safetensors.index.json")
    single = os.path.join(path, "model.safetensors")
    if os.path.isfile(single):
        files = [single]
    elif os.path.isfile(index):
        shards = set(_weight_map(index).values())
        bad = [s for s in shards if not isinstance(s, str)]
        if bad:  # os.path.join raised TypeError on it
            raise WeightsError(f"{index} is not a valid safetensors index: its 'weight_map' names shard {bad[0]!r}, "
                               f"not a file name.")
        files = [os.path.join(path, s) for s in sorted(shards)]
        for f in files:
            if not os.path.isfile(f):
                raise WeightsError(f"Shard {os.path.basename(f)} listed in {index} is missing from {path}.")
    else:
        raise WeightsError(f"No model.safetensors or model.safetensors.index.json in {path}.")
    for file in files:
        _check_header(file)
    return files


def _weight_map(index: str) -> dict:
    """model.safetensors.index.json's weight_map: checkpoint tensor -> shard file name (values not yet checked)."""
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except OSError as e:
        raise WeightsError(f"{index} cannot be read ({e.strerror or type(e).__name__}).") from None
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
        weight_map = None
    if not isinstance(weight_map, dict):
        raise WeightsError(f"{index} is not a valid safetensors index (needs a 'weight_map' object).")
    return weight_map


def _check_header(file: str) -> None:
    """A truncated, empty, foreign or unreadable file fails here in one sentence, not deep inside the loader."""
    try:  # safetensors reports a file it may not read as "No such file or directory"
        with open(file, "rb"):
            pass
    except OSError as e:
        raise WeightsError(f"{file} cannot be read ({e.strerror or type(e).__name__}).") from None
    try:
        with safe_open(file, framework="pt", device="cpu"):
            pass
    except Exception as e:  # safetensors' own SafetensorError, or an OSError
        reason = _damage(file) or f" ({(str(e).splitlines() or [type(e).__name__])[0]})"
        raise WeightsError(f"{file} is not a readable safetensors file{reason}.") from None


def _damage(file: str) -> str | None:
    """What is wrong with a file safe_open refused, where its bytes tell (safetensors says "header too large" of
    both a Git LFS pointer and an HTML error page, "invalid header length" of a cut download), else None. A
    safetensors file is an 8-byte little-endian header length, that many bytes of JSON, then the tensors' data."""
    size = os.path.getsize(file)
    if size < 9:  # not even a header length and its opening brace
        return f": it is {'empty' if size == 0 else 'cut short'} ({size} bytes); download it again"
    with open(file, "rb") as f:
        head = f.read(64)
        if head.startswith(b"version https://git-lfs"):
            return ": it is a Git LFS pointer, not the weights; fetch them with `git lfs install && git lfs pull`"
        n = int.from_bytes(head[:8], "little")
        if head[8:9] != b"{" or n > 100_000_000:  # not a safetensors JSON header (100 MB: safetensors' limit)
            return None
        f.seek(8)
        text = f.read(n)
    try:
        header = json.loads(text)
        need = 8 + n + max([0] + [v["data_offsets"][1] for v in header.values()
                                  if isinstance(v, dict) and "data_offsets" in v])
    except (ValueError, TypeError, KeyError, IndexError):  # the header is cut short (or malformed)
        need = 8 + n
    if size >= need:
        return None
    return f": it is truncated ({size} of at least {need} bytes), an interrupted download or copy; download it again"


def has_own_lm_head(cfg: ModelConfig, path: str) -> bool:
    """Whether a checkpoint whose config ties the embeddings still holds an lm_head.weight different from the
    embedding. transformers does not tie such a checkpoint (it warns and keeps both), so the head it holds is the one
    that runs; a head equal to the embedding (the usual tied save) changes nothing."""
    if not cfg.tie_word_embeddings:
        return False
    try:
        files = checkpoint_files(path)
    except WeightsError:
        return False  # reported, in one sentence, when the weights load
    head = embed = None  # (file, name): the names first, the two tensors read only when both are there
    for file in files:
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                if name == "lm_head.weight":
                    head = (file, name)
                elif not SKIP.search(name) and strip_name(name, cfg) == "embed_tokens.weight":
                    embed = (file, name)
    if head is None or embed is None:
        return False
    a, b = (_read_tensor(*where) for where in (head, embed))
    return not (a.shape == b.shape and torch.equal(a, b))


def _read_tensor(file: str, name: str) -> torch.Tensor:
    with safe_open(file, framework="pt", device="cpu") as f:
        return f.get_tensor(name)


def read_formats(cfg: ModelConfig, path: str) -> dict[str, str]:
    """Checkpoint module -> int4 / FP8 format for every quantized Linear of the checkpoint at `path` (names only, no
    tensor data is read); see models/formats.py."""
    try:
        return plan_formats(cfg, checkpoint_files(path), lambda n: strip_name(n, cfg))
    except FormatError as e:
        raise WeightsError(str(e)) from None


def build_model(cfg: ModelConfig, device: torch.device, dtype: torch.dtype, tp: TPGroup = SINGLE,
                formats: dict[str, str] | None = None) -> nn.Module:
    """Allocate the model (the shard of rank tp.rank: cfg is the full config) on `device` in `dtype` without
    initialising it (the loader fills every parameter). formats: from read_formats (None: every Linear 16-bit)."""
    problems = tp_problems(cfg, formats, tp.world) if formats and tp.world > 1 else []
    if problems:  # LLM checks this before any process starts; here for callers that build a shard directly
        raise WeightsError(problems[0])
    with torch.device("meta"):
        model = model_class(cfg)(cfg, tp)
        try:
            apply_formats(model, shard_config(cfg, tp.world), formats or {},
                          fp8_shard_blocks(cfg, formats or {}, tp.rank, tp.world))
        except FormatError as e:
            raise WeightsError(str(e)) from None
        model = model.to(dtype)
        for m in model.modules():
            if isinstance(m, GatedDeltaNet):  # decay parameters stay fp32 (see GatedDeltaNet)
                m.A_log.data, m.dt_bias.data = m.A_log.data.float(), m.dt_bias.data.float()
            if isinstance(m, (QuantLinear, Fp8Linear)):
                m.keep_scales_fp32()
    return model.to_empty(device=device).eval()


def load_weights(model: nn.Module, cfg: ModelConfig, path: str, progress: bool = False, rank: int = 0,
                 world: int = 1) -> None:
    """Fill every parameter of `model` (rank `rank`'s shard of the full config `cfg`) from the checkpoint at
    `path`, reading only that rank's rows of each tensor; raises WeightsError on any mismatch."""
    params = dict(model.named_parameters())
    local = shard_config(cfg, world)
    split = frozenset(n for n, m in model.named_modules() if isinstance(m, (ProjectionGroup, Fp8Experts)))
    needed = {part for name in params for part in expected_parts(name, local)}
    loaded: dict[str, str] = {}  # coverage key -> the checkpoint tensor that filled it
    unexpected: list[str] = []
    files = checkpoint_files(path)
    held: dict[str, set[str]] = {}  # checkpoint tensor -> the files holding it
    for file in _progress(files, progress):
        with safe_open(file, framework="pt", device="cpu") as f:
            for name in f.keys():
                held.setdefault(name, set()).add(file)
                sl = f.get_slice(name)
                target = resolve(name, cfg, sl.get_shape(), rank, world, split)
                if target is None:
                    continue
                if target.param not in params or not _index_fits(params[target.param], target.index):
                    unexpected.append(name)
                    continue
                if params[target.param].is_meta:  # check_weights: the header's shape and dtype, no data read
                    tensor = _header_tensor(sl, name)
                else:
                    tensor = f.get_tensor(name) if target.source is None else read_ranges(sl, *target.source)
                if any(part in loaded for part in target.parts):  # a second copy: the same values, or refused
                    _check_duplicate(params[target.param], target, tensor, name, loaded, file)
                    continue
                _copy_into(params[target.param], target, tensor, name)
                loaded.update(dict.fromkeys(target.parts, name))
    if rank == 0:
        _check_index(path, files, held)
    if unexpected:
        raise WeightsError(f"Checkpoint has {len(unexpected)} tensor(s) this {cfg.architecture} model does not "
                           f"use, e.g. {', '.join(unexpected[:3])}; is config.json from the same checkpoint?")
    missing = sorted(needed - loaded.keys())
    if missing:
        first = expert_range(local, rank)[0]  # under expert parallelism a rank's expert 0 is the router's `first`
        names = ", ".join(dict.fromkeys(checkpoint_name(part, cfg, first) for part in missing[:3]))
        raise WeightsError(f"Checkpoint is missing {len(missing)} tensor(s), e.g. {names}: an incomplete download, "
                           f"or a config.json that does not belong to these weights.")


def _check_index(path: str, files: list[str], held: dict[str, set[str]]) -> None:
    """Warn where model.safetensors.index.json's weight_map places a tensor in a shard that does not hold it (a shard
    of another export, a stale index). Every tensor is read from the shards' own headers and the missing ones are
    WeightsErrors, so the model is right; but the files disagree, and that is said rather than passed over."""
    index = os.path.join(path, "model.safetensors.index.json")
    if files == [os.path.join(path, "model.safetensors")] or not os.path.isfile(index):
        return
    wrong = [(name, shard) for name, shard in _weight_map(index).items()
             if os.path.join(path, shard) not in held.get(name, ())]
    if wrong:
        name, shard = wrong[0]
        where = f"found in {', '.join(sorted(map(os.path.basename, held[name])))}" if name in held else \
            "held by no shard"
        logging.getLogger("deltaserve").warning(
            "%s does not match its shards: %d tensor(s) of its weight_map are not where it says, e.g. %s, listed in "
            "%s but %s; the tensors the shards hold are what loads", index, len(wrong), name, shard, where)


def check_weights(cfg: ModelConfig, path: str) -> None:
    """What load_weights checks, from the safetensors headers alone (no tensor data is read): every tensor has a
    place in the model config.json describes, of its shape and kind, and none is missing; WeightsError naming the
    tensor. Values (finite, equal duplicates) are checked only when the weights load."""
    model = build_model(cfg, torch.device("meta"), torch.float32, formats=read_formats(cfg, path))
    load_weights(model, cfg, path)


_HEADER_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                  "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64,
                  "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U64": torch.uint64, "U32": torch.uint32,
                  "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool}


def _header_tensor(sl, name: str) -> torch.Tensor:
    """A safetensors slice's shape and dtype as a meta tensor (what load_weights checks, without the data)."""
    dtype = _HEADER_DTYPES.get(sl.get_dtype())
    if dtype is None:
        raise WeightsError(f"Tensor {name} is stored as {sl.get_dtype()}, a dtype deltaserve does not read.")
    return torch.empty(sl.get_shape(), dtype=dtype, device="meta")


# coverage key (Target.parts) -> the checkpoint tensor it stands for (our name, prefix still off)
_FUSED, _PIECE = r"(?:qkv_proj|in_proj|gate_up_proj)", r"(?:[qkv]_proj|in_proj_[a-z]+|gate_proj|up_proj)"
_PART_NAMES = [
    # a piece of a fused projection: a row slice of the fused tensor, or its own Linear (a ProjectionGroup)
    (re.compile(rf"^(?P<l>layers\.\d+\.[\w.]+?)\.{_FUSED}\.(?P<kind>\w+)\.(?P<piece>{_PIECE})$"),
     r"\g<l>.\g<piece>.\g<kind>"),
    (re.compile(rf"^(?P<l>layers\.\d+\.[\w.]+?)\.{_FUSED}\.(?P<piece>{_PIECE})\.(?P<kind>\w+)$"),
     r"\g<l>.\g<piece>.\g<kind>"),
    # half of one packed expert's gate|up
    (re.compile(r"^(?P<l>layers\.\d+\.mlp\.experts)\.gate_up_proj(?:\.(?P<kind>\w+))?\[(?P<e>\d+)\]\.(?P<h>\w+)$"),
     None),
    # one expert's down (or an FP8 expert's gate / up / down)
    (re.compile(r"^(?P<l>layers\.\d+\.mlp\.experts)\.(?P<h>\w+_proj)(?:\.(?P<kind>\w+))?\[(?P<e>\d+)\]$"),
     None),
]


def checkpoint_name(part: str, cfg: ModelConfig, first_expert: int = 0) -> str:
    """A coverage key of load_weights ('layers.3.self_attn.qkv_proj.weight.k_proj', 'layers.1.mlp.experts.
    gate_up_proj[3].up_proj') -> the checkpoint tensor name that provides it
    ('model.language_model.layers.3.self_attn.k_proj.weight', '...layers.1.mlp.experts.3.up_proj.weight');
    first_expert: the router id of expert index 0 in the keys (a rank's first expert under expert parallelism)."""
    name = part
    for pattern, repl in _PART_NAMES:
        m = pattern.match(part)
        if m and repl is not None:
            name = m.expand(repl)
            break
        if m:
            name = f"{m['l']}.{first_expert + int(m['e'])}.{m['h']}.{m['kind'] or 'weight'}"
            break
    if name.startswith("lm_head."):
        return name
    return (PREFIXES[0] if cfg.nested else PREFIXES[1]) + name


def _index_fits(param: torch.Tensor, index: tuple) -> bool:
    """An expert index past num_experts is a tensor this config has no place for."""
    return not index or not isinstance(index[0], int) or index[0] < param.shape[0]


def _copy_into(param: torch.Tensor, target: Target, tensor: torch.Tensor, name: str) -> None:
    dst = param.data[target.index] if target.index else param.data
    src = target.transform(tensor)
    if tuple(src.shape) != tuple(dst.shape):
        raise WeightsError(f"Tensor {name} has shape {list(tensor.shape)}, but the model expects "
                           f"{list(dst.shape)} for it (from config.json).")
    if src.dtype in _FP8_TORCH and dst.dtype not in _FP8_TORCH:  # copy_ dropped the scale: a wrong model, no error
        raise WeightsError(f"Tensor {name} is stored in FP8 ({str(tensor.dtype)[6:]}), but deltaserve reads FP8 only "
                           f"as a Linear's weight beside its weight_scale_inv, experts one per expert "
                           f"(experts.E.gate_proj.weight), not packed; use a checkpoint in that layout or a 16-bit "
                           f"one.")
    # copy_ casts anything: an F32 qweight / qzeros or I32 scales loaded "fine" and gave wrong outputs
    if dst.is_floating_point() != src.is_floating_point() or src.dtype == torch.bool or (
            not dst.is_floating_point() and src.element_size() < dst.element_size()):
        kind = "floating-point" if dst.is_floating_point() else f"{dst.element_size() * 8}-bit or wider integer"
        raise WeightsError(f"Tensor {name} is {str(tensor.dtype).replace('torch.', '')}, but the model expects a "
                           f"{kind} tensor there.")
    if dst.is_meta:  # check_weights: no values to copy or check
        return
    dst.copy_(src)
    if dst.dtype in _CHECKED_FINITE and not _all_finite(dst):  # else the model writes token 0, nan logprobs
        if src.dtype in _CHECKED_FINITE and _all_finite(src):
            raise WeightsError(f"Tensor {name} holds values beyond the range of {str(dst.dtype)[6:]} "
                               f"(up to {src.abs().max().item():.4g}), which become inf in it; load the model in "
                               f"bfloat16 (dtype='bfloat16').")
        raise WeightsError(f"Tensor {name} holds NaN or infinite values: the checkpoint is corrupt or was badly "
                           f"converted.")


_FP8_TORCH = (torch.float8_e4m3fn, torch.float8_e5m2)
# 16-bit weights, fp32 scales / decay params and FP8 weights
_CHECKED_FINITE = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn)


def _all_finite(t: torch.Tensor) -> bool:
    if t.dtype == torch.float8_e4m3fn:  # no isfinite for it; no inf either, NaN is the bit pattern S.1111.111
        return not (t.view(torch.uint8) & 0x7F).eq(0x7F).any()
    return bool(torch.isfinite(t).all())


def _check_duplicate(param: torch.Tensor, target: Target, tensor: torch.Tensor, name: str,
                     loaded: dict[str, str], file: str) -> None:
    """A tensor filling what another one already filled (the same name in two shards, both the model.language_model.*
    and model.* names, per-expert and packed experts): as transformers, a copy with the same values loads; one with
    other values is refused, not silently the one read last."""
    first = next(loaded[part] for part in target.parts if part in loaded)
    dst = param.data[target.index] if target.index else param.data
    src = target.transform(tensor)
    if not all(part in loaded for part in target.parts) or tuple(src.shape) != tuple(dst.shape) or \
            not dst.is_meta and not torch.equal(dst, src.to(dst.dtype)):  # meta (check_weights): no values yet
        raise WeightsError(f"Checkpoint holds {first} twice (again as {name} in {os.path.basename(file)}) with "
                           f"different values; remove the stray copy, a leftover of another export?")


def _progress(files: list[str], enabled: bool):
    if not enabled or len(files) < 2:
        return files
    from tqdm import tqdm

    return tqdm(files, desc="Loading safetensors shards", unit="shard")
