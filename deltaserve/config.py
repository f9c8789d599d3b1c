"""ModelConfig: every Hugging Face config field the math needs, read once, typed and validated.

Layers never read `config.json` themselves; they take a `ModelConfig`. A checkpoint problem (unknown
architecture, missing field, sizes that do not fit together) raises `ConfigError` with one sentence that
names the field and the fix.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import re
from dataclasses import dataclass

SUPPORTED_ARCHITECTURES = {
    # architecture name -> (is_moe, fields nested under "text_config")
    "Qwen3_5ForConditionalGeneration": (False, True),
    "Qwen3_5MoeForConditionalGeneration": (True, True),
    "Qwen3_5ForCausalLM": (False, False),
    "Qwen3_5MoeForCausalLM": (True, False),
}
LAYER_TYPES = ("linear_attention", "full_attention")


class ConfigError(ValueError):
    """A checkpoint's config.json (or generation_config.json) cannot be used; the message says why."""


# AutoAWQ versions whose checkpoints hold the "gemm" tensors (exllama repacks them at load time, as we do)
AWQ_GEMM_VERSIONS = ("gemm", "exllama")


@dataclass(frozen=True)
class QuantConfig:
    """config.json `quantization_config`, for the int4 weight-only formats and block-wise FP8 we read.

    Which Linears are quantized is decided per Linear from the tensors the checkpoint holds (see
    models/weights.plan_formats); this says how to read them."""
    method: str  # "awq" (AutoAWQ gemm layout), "compressed-tensors" (pack-quantized) or "fp8" (block e4m3)
    bits: int  # 4 (int4) or 8 (fp8)
    group_size: int  # input channels sharing one scale (and zero point); fp8: the block's BK
    zero_point: bool  # AWQ: qzeros present (asymmetric); compressed-tensors: weight_zero_point present
    modules_to_not_convert: tuple[str, ...] = ()  # AWQ substrings / compressed-tensors `ignore` entries
    weight_block_size: tuple[int, int] = ()  # fp8: (BN, BK) output x input channels per weight_scale_inv entry

    @classmethod
    def from_dict(cls, q: dict, source: str, key: str = "quantization_config") -> "QuantConfig":
        """key: the config.json field `q` came from (quantization_config, or an older export's compression_config)."""
        if not isinstance(q, dict):
            raise ConfigError(f"{source}: '{key}' must be an object, got {q!r}.")
        method = q.get("quant_method")
        if isinstance(method, str):  # as vLLM: any case, and the library's import name compressed_tensors
            method = method.lower().replace("compressed_tensors", "compressed-tensors")
        if method == "awq":
            return cls._awq(q, source)
        if method == "compressed-tensors":
            return cls._compressed_tensors(q, source)
        if method == "fp8":
            return cls._fp8(q, source)
        what = f"{key} has no 'quant_method'" if method is None else \
            f"{key}.quant_method {method!r} is not supported"
        raise ConfigError(f"{source}: {what}; deltaserve reads 'awq' and 'compressed-tensors' int4 and block-wise "
                          f"'fp8' checkpoints.")

    @classmethod
    def _fp8(cls, q: dict, source: str) -> "QuantConfig":
        """The official Qwen FP8 layout: e4m3 weights, 128 x 128 blocks, activations quantized at run time."""
        fmt, scheme, block = q.get("fmt", "e4m3"), q.get("activation_scheme", "dynamic"), q.get("weight_block_size")
        if fmt != "e4m3":
            raise ConfigError(f"{source}: quantization_config.fmt is {fmt!r}; deltaserve reads FP8 weights in 'e4m3' "
                              f"only.")
        if scheme != "dynamic":
            raise ConfigError(f"{source}: quantization_config.activation_scheme is {scheme!r}; deltaserve reads FP8 "
                              f"checkpoints with 'dynamic' activation scales only (no stored input scales).")
        if block != [128, 128] or any(isinstance(b, float) for b in block):  # 128.0: torch.empty refused it
            raise ConfigError(f"{source}: quantization_config.weight_block_size is {block!r}; deltaserve reads "
                              f"block-wise FP8 with [128, 128] blocks only (per-tensor FP8 is not supported).")
        return cls("fp8", 8, block[1], False, _module_names(q, "modules_to_not_convert", source), (block[0], block[1]))

    @classmethod
    def _awq(cls, q: dict, source: str) -> "QuantConfig":
        f = _Fields(q, f"{source} quantization_config")
        # AutoAWQ's own quant_config.json spells bits and group_size w_bit and q_group_size (vLLM reads both)
        bits = f.int("bits" if "bits" in q else "w_bit", 4)
        group = f.int("group_size" if "group_size" in q else "q_group_size", 128)
        version = str(q.get("version", "gemm")).lower()
        if bits != 4:
            raise ConfigError(f"{source}: quantization_config.bits is {bits}; deltaserve reads 4-bit AWQ only.")
        if version not in AWQ_GEMM_VERSIONS:
            raise ConfigError(f"{source}: quantization_config.version is {version!r}; deltaserve reads the AutoAWQ "
                              f"'gemm' tensor layout only ('exllama' checkpoints hold the same tensors; 'gemv', "
                              f"'gemv_fast' and 'marlin' pack theirs differently), so re-export it with "
                              f"version='gemm'.")
        if group < 1:
            raise ConfigError(f"{source}: quantization_config.group_size must be positive, got {group} "
                              f"(-1, one group per row, is not supported).")
        if not f.bool("zero_point", True):
            raise ConfigError(f"{source}: quantization_config.zero_point is false; deltaserve reads AWQ with zero "
                              f"points (qzeros) only.")
        return cls("awq", bits, group, True, _module_names(q, "modules_to_not_convert", source))

    @classmethod
    def _compressed_tensors(cls, q: dict, source: str) -> "QuantConfig":
        fmt = q.get("format")
        groups = q.get("config_groups") or {}
        if fmt != "pack-quantized" or not isinstance(groups, dict) or len(groups) != 1:
            raise ConfigError(f"{source}: compressed-tensors checkpoints are read in the 'pack-quantized' format with "
                              f"one config group only (got format {fmt!r}, {len(groups)} group(s)).")
        (name, scheme), = groups.items()
        w = scheme.get("weights") if isinstance(scheme, dict) else None
        if not isinstance(scheme, dict) or not isinstance(w, (dict, type(None))):
            raise ConfigError(f"{source}: quantization_config.config_groups[{name!r}] must be an object with a "
                              f"'weights' object, got {scheme!r}.")
        w = w or {}
        f = _Fields(w, f"{source} quantization_config weights")
        bits = f.int("num_bits")
        # the strategy first: channel / tensor checkpoints (e.g. W8A8) write group_size null
        group = f.int("group_size", 128) if w.get("strategy", "group") == "group" else 0
        if bits != 4 or w.get("type", "int") != "int" or w.get("strategy", "group") != "group":
            raise ConfigError(f"{source}: compressed-tensors weights must be int 4-bit with the 'group' strategy "
                              f"(got {bits} bits, type {w.get('type')!r}, strategy {w.get('strategy')!r}).")
        if group < 1:
            raise ConfigError(f"{source}: compressed-tensors group_size must be a positive number of input channels "
                              f"per scale, got {group} (one scale per row is the 'channel' strategy, not supported).")
        if w.get("actorder") not in (None, False, "static", "weight"):  # these reorder while quantizing only
            raise ConfigError(f"{source}: compressed-tensors activation ordering (actorder {w['actorder']!r}, "
                              f"weight_g_idx) is not supported; use a checkpoint quantized without it.")
        sparsity = q.get("sparsity_config")
        if isinstance(sparsity, dict) and sparsity.get("format", "dense") not in ("dense", None):
            raise ConfigError(f"{source}: quantization_config.sparsity_config.format is {sparsity['format']!r}; "
                              f"deltaserve reads dense compressed-tensors weights only (not sparse-compressed ones).")
        if q.get("kv_cache_scheme"):  # its k_scale / v_scale tensors are skipped by the loader (weights.SKIP)
            logging.getLogger("deltaserve").warning(
                "%s: the checkpoint also quantizes the KV cache (kv_cache_scheme); deltaserve ignores its stored "
                "k_scale / v_scale and keeps the KV cache as --kv-cache-dtype says", source)
        if scheme.get("input_activations"):  # e.g. W4A8: said, not silently dropped
            logging.getLogger("deltaserve").warning(
                "%s: the checkpoint also quantizes activations (input_activations); deltaserve runs its int4 weights "
                "with 16-bit activations", source)
        return cls("compressed-tensors", bits, group, not f.bool("symmetric", True), _module_names(q, "ignore", source))


@dataclass(frozen=True)
class ModelConfig:
    architecture: str
    is_moe: bool
    nested: bool  # weights live under model.language_model.* (ConditionalGeneration) rather than model.*
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    layer_types: tuple[str, ...]  # "linear_attention" (GDN) or "full_attention", one per layer
    rms_norm_eps: float
    tie_word_embeddings: bool
    max_position_embeddings: int
    # gated full attention
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rotary_dim: int  # head_dim * partial_rotary_factor, even
    rope_theta: float
    attention_bias: bool
    # Gated DeltaNet
    linear_num_key_heads: int  # Hk
    linear_num_value_heads: int  # HV, a multiple of Hk
    linear_key_head_dim: int  # K
    linear_value_head_dim: int  # V
    linear_conv_kernel_dim: int
    # MLP / MoE (intermediate_size is 0 for MoE; the MoE sizes are 0 for dense)
    intermediate_size: int
    num_experts: int
    num_experts_per_tok: int
    moe_intermediate_size: int
    shared_expert_intermediate_size: int
    # generation
    eos_token_ids: tuple[int, ...]
    state_dtype: str  # recurrent-state dtype, from mamba_ssm_dtype (float32 by default)
    torch_dtype: str  # the checkpoint's dtype ("bfloat16", "float32", ...), used by dtype="auto"
    quantization: QuantConfig | None = None  # config.json quantization_config (None: a 16-bit checkpoint)
    # generation_config.json's sampling settings, (SamplingParams field, value) pairs: the defaults of a request that
    # does not set them (LLM(generation_config="auto"))
    sampling_defaults: tuple[tuple[str, float | int], ...] = ()
    # expert parallelism, a run-time choice (LLM(enable_expert_parallel=True)), not a config.json field
    expert_parallel: bool = False  # under TP, each rank holds num_experts / world whole experts (not a slice of all)
    expert_shards: int = 1  # in a rank's shard_config under expert parallelism: the ranks the experts are split over

    @property
    def num_local_experts(self) -> int:
        """Experts whose weights this config's model holds: all, or one rank's share under expert parallelism."""
        return self.num_experts // self.expert_shards

    @property
    def full_attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "full_attention"]

    @property
    def linear_attention_layers(self) -> list[int]:
        return [i for i, t in enumerate(self.layer_types) if t == "linear_attention"]

    @property
    def conv_dim(self) -> int:
        """Channels of the GDN depthwise conv: [q | k | v]."""
        return 2 * self.linear_num_key_heads * self.linear_key_head_dim + (
            self.linear_num_value_heads * self.linear_value_head_dim
        )

    @classmethod
    def from_hf_dir(cls, path: str) -> "ModelConfig":
        cfg_path = os.path.join(path, "config.json")
        if not os.path.isdir(path):
            what = "is a file, not a directory" if os.path.exists(path) else "does not exist"
            raise ConfigError(f"Model directory {path!r} {what}{hub_id_hint(path)}.")
        if not os.path.isfile(cfg_path):
            raise ConfigError(f"{cfg_path} not found: a Hugging Face model directory must contain config.json.")
        raw = _read_json(cfg_path)
        gen = _read_generation_config(path)
        cfg = cls.from_dict(raw, gen, source=cfg_path)
        if cfg.quantization is None:
            cfg = _quant_config_json(path, cfg)
        if _config_dtype(raw, cfg_path) is None:
            cfg = dataclasses.replace(cfg, torch_dtype=_missing_dtype(path, cfg_path))
        return cfg

    @classmethod
    def from_dict(cls, raw: dict, generation_config: dict | None = None, source: str = "config") -> "ModelConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"{source} must hold a JSON object.")
        arch = _architecture(raw, source)
        is_moe, nested = SUPPORTED_ARCHITECTURES[arch]
        # the language-model fields sit under text_config whenever there is one (HF also reads a *ForCausalLM
        # checkpoint's composite config that way); `nested` only decides the weights' names
        composite = isinstance(raw.get("text_config"), dict)
        text = raw.get("text_config") if composite or nested else raw
        if not isinstance(text, dict):
            raise ConfigError(f"{source}: {arch} needs a 'text_config' object holding the language-model fields.")
        f = _Fields(text, source)
        n_layers = f.int("num_hidden_layers")
        # transformers' Qwen3_5(Moe)TextConfig default (the released models' value), not hidden_size // heads
        head_dim = f.int("head_dim", 256)
        rope = _rope_parameters(text, source)
        rope_f = _Fields({**text, **rope}, source)
        partial = rope_f.float("partial_rotary_factor", 0.25)
        theta = rope_f.float("rope_theta", None)
        # The top-level flag decides for ConditionalGeneration checkpoints (that is what HF ties on).
        tie = raw.get("tie_word_embeddings", text.get("tie_word_embeddings", False)) if composite else text.get(
            "tie_word_embeddings", False
        )
        if not isinstance(tie, bool):
            raise ConfigError(f"{source}: 'tie_word_embeddings' must be true or false, got {tie!r}.")
        if text.get("hidden_act", "silu") != "silu":
            raise ConfigError(f"{source}: 'hidden_act' is {text['hidden_act']!r}; Qwen3.5's MLPs use 'silu', the "
                              f"only activation deltaserve implements.")
        if head_dim * partial != int(head_dim * partial):
            raise ConfigError(f"{source}: head_dim ({head_dim}) x partial_rotary_factor ({partial}) must be a "
                              f"whole number of rotary dims.")
        cfg = cls(
            architecture=arch,
            is_moe=is_moe,
            nested=nested,
            vocab_size=f.int("vocab_size"),
            hidden_size=f.int("hidden_size"),
            num_hidden_layers=n_layers,
            layer_types=_layer_types(text, n_layers, source),
            rms_norm_eps=f.float("rms_norm_eps", 1e-6),
            tie_word_embeddings=tie,
            max_position_embeddings=f.int("max_position_embeddings", 32768),
            num_attention_heads=f.int("num_attention_heads"),
            num_key_value_heads=f.int("num_key_value_heads"),
            head_dim=head_dim,
            rotary_dim=int(head_dim * partial),
            rope_theta=theta,
            attention_bias=f.bool("attention_bias", False),
            linear_num_key_heads=f.int("linear_num_key_heads"),
            linear_num_value_heads=f.int("linear_num_value_heads"),
            linear_key_head_dim=f.int("linear_key_head_dim"),
            linear_value_head_dim=f.int("linear_value_head_dim"),
            linear_conv_kernel_dim=f.int("linear_conv_kernel_dim", 4),
            intermediate_size=0 if is_moe else f.int("intermediate_size"),
            num_experts=f.int("num_experts") if is_moe else 0,
            num_experts_per_tok=f.int("num_experts_per_tok") if is_moe else 0,
            moe_intermediate_size=f.int("moe_intermediate_size") if is_moe else 0,
            shared_expert_intermediate_size=f.int("shared_expert_intermediate_size") if is_moe else 0,
            eos_token_ids=_eos_ids(text, raw, generation_config or {}, source),
            sampling_defaults=_sampling_defaults(generation_config or {}, source),
            state_dtype=str(text.get("mamba_ssm_dtype", raw.get("mamba_ssm_dtype", "float32"))),
            # from_hf_dir: the weights' dtype where config.json names none
            torch_dtype=_config_dtype(raw, source) or "float32",
            quantization=_quantization(raw, text, source),
        )
        cfg._validate(source)
        return cfg

    def _validate(self, source: str) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ConfigError(f"{source}: {msg}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "head_dim", "linear_num_key_heads", "linear_num_value_heads",
                     "linear_key_head_dim", "linear_value_head_dim", "linear_conv_kernel_dim",
                     "max_position_embeddings"):
            need(getattr(self, name) > 0, f"'{name}' must be a positive integer, got {getattr(self, name)}.")
        for name in ("rms_norm_eps", "rope_theta"):
            need(math.isfinite(getattr(self, name)) and getattr(self, name) > 0,
                 f"'{name}' must be a positive number, got {getattr(self, name)}.")
        need(self.num_attention_heads % self.num_key_value_heads == 0,
             f"'num_attention_heads' ({self.num_attention_heads}) must be a multiple of "
             f"'num_key_value_heads' ({self.num_key_value_heads}).")
        need(self.linear_num_value_heads % self.linear_num_key_heads == 0,
             f"'linear_num_value_heads' ({self.linear_num_value_heads}) must be a multiple of "
             f"'linear_num_key_heads' ({self.linear_num_key_heads}).")
        need(self.rotary_dim % 2 == 0 and 0 < self.rotary_dim <= self.head_dim,
             f"head_dim * partial_rotary_factor must be an even number of dims in (0, head_dim], "
             f"got {self.rotary_dim}.")
        if self.is_moe:
            need(0 < self.num_experts_per_tok <= self.num_experts,
                 f"'num_experts_per_tok' ({self.num_experts_per_tok}) must be in 1..num_experts ({self.num_experts}).")
            need(self.moe_intermediate_size > 0, "'moe_intermediate_size' must be a positive integer.")
        else:
            need(self.intermediate_size > 0, "'intermediate_size' must be a positive integer.")
        need(self.state_dtype in ("float32", "bfloat16", "float16"),
             f"'mamba_ssm_dtype' must be float32, bfloat16 or float16, got {self.state_dtype!r}.")


# config.json's dtype -> ours: torch's names for the float dtypes (transformers reads the value as
# getattr(torch, value), so "half" and "float" are spellings too; "fp16" is not a torch name). A float64 checkpoint
# counts as a full-precision one, as float32 does: dtype="auto" runs it in float32 on CPU, bfloat16 on CUDA.
_CONFIG_DTYPES = {"float32": "float32", "float": "float32", "float64": "float32", "double": "float32",
                  "bfloat16": "bfloat16", "float16": "float16", "half": "float16"}


# owner/name, as on the Hugging Face Hub ("Qwen/Qwen3.5-9B"); a path that exists is never taken for one
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")


def hub_id_hint(path: str) -> str:
    """For a model path that does not exist but reads as a Hub id: the rest of the sentence saying deltaserve loads
    local directories only (it downloads nothing), else ''."""
    if os.path.exists(path) or not _HUB_ID.match(path):
        return ""
    return (f"; it looks like a Hugging Face model id, but deltaserve loads local directories only and downloads "
            f"nothing: fetch it first (huggingface-cli download {path} --local-dir DIR) and pass DIR")


def _config_dtype(raw: dict, source: str) -> str | None:
    """The checkpoint dtype config.json names, text_config's first; `torch_dtype`, the older name, read (as
    transformers does) wherever `dtype` is absent. None: it names none. A value that names no dtype deltaserve runs
    is refused (it was taken as bfloat16 without a word)."""
    text = raw.get("text_config") if isinstance(raw.get("text_config"), dict) else raw
    for fields in (text, raw):
        for key in ("dtype", "torch_dtype"):
            value = fields.get(key)
            if value and not (isinstance(value, str) and value in _CONFIG_DTYPES):
                name = key if fields is raw else f"text_config.{key}"
                raise ConfigError(f"{source}: '{name}' is {value!r}, not a dtype deltaserve runs; set it to "
                                  f"'bfloat16', 'float16' or 'float32' (torch's names, 'half', 'float' and "
                                  f"'float64' too).")
            if value:
                return _CONFIG_DTYPES[value]
    return None


# safetensors header dtype -> ours; integer and FP8 tensors (packed int4 weights, zero points, FP8 weights) say
# nothing of the model dtype
_STORED_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def _missing_dtype(path: str, source: str) -> str:
    """torch_dtype for a config.json that names no dtype: as vLLM (_find_dtype), the dtype the weights are stored in,
    float32 where they mix several (the one all cast to losslessly) or none can be read; dtype='auto' then runs a
    float32 one in bfloat16 on CUDA. Said in one logged line."""
    from safetensors import safe_open

    from .models.weights import checkpoint_files

    stored = set()
    try:
        for file in checkpoint_files(path):
            with safe_open(file, framework="pt", device="cpu") as f:
                stored.update(_STORED_DTYPES.get(f.get_slice(name).get_dtype()) for name in f.keys())
    except ValueError:  # no or broken weight files: the loader names the file
        stored = set()
    stored.discard(None)
    log = logging.getLogger("deltaserve")
    if len(stored) == 1:
        dtype = stored.pop()
        log.info("%s names no dtype (neither 'dtype' nor 'torch_dtype'); it is taken as %s, the dtype its weights "
                 "are stored in (dtype='auto': %s on CUDA, float32 on CPU)", source, dtype,
                 "bfloat16" if dtype == "float32" else dtype)
        return dtype
    found = f"its weights mix {' and '.join(sorted(stored))}" if stored else "no 16/32-bit weights were read"
    log.warning("%s names no dtype (neither 'dtype' nor 'torch_dtype') and %s; it is taken as float32 "
                "(dtype='auto': bfloat16 on CUDA, float32 on CPU)", source, found)
    return "float32"


def _quantization(raw: dict, text: dict, source: str) -> QuantConfig | None:
    """config.json's quantization_config: top-level, else under text_config, where some multimodal exports keep it;
    else `compression_config`, where older llm-compressor / sparseml exports put their compressed-tensors settings.
    vLLM reads the same places in this order (get_quant_config); None for a 16-bit checkpoint."""
    for key in ("quantization_config", "compression_config"):
        for where in (raw, text) if text is not raw else (raw,):
            if where.get(key) is not None:
                return QuantConfig.from_dict(where[key], source, key)
    return None


def _quant_config_json(path: str, cfg: "ModelConfig") -> "ModelConfig":
    """cfg with the AWQ settings of AutoAWQ's quant_config.json (older AutoAWQ exports write them only there:
    w_bit, q_group_size, zero_point, version "GEMM"), read as vLLM reads it when config.json has no
    quantization_config; cfg unchanged without such a file."""
    qpath = os.path.join(path, "quant_config.json")
    if not os.path.isfile(qpath):
        return cfg
    q = _read_json(qpath)
    if not isinstance(q, dict):
        raise ConfigError(f"{qpath} must hold a JSON object.")
    return dataclasses.replace(cfg, quantization=QuantConfig.from_dict({"quant_method": "awq", **q}, qpath,
                                                                       "quant_config.json"))


def _module_names(q: dict, key: str, source: str) -> tuple[str, ...]:
    """quantization_config's list of module names `key` (modules_to_not_convert, ignore); null or absent: none."""
    names = q.get(key)
    if names is None:
        return ()
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"{source}: quantization_config.{key} must be a list of module names, got {names!r}.")
    return tuple(names)


class _Fields:
    """Typed reads of one config dict, each failure naming the field."""

    def __init__(self, d: dict, source: str):
        self.d, self.source = d, source

    def int(self, name: str, default: int | None = None) -> int:
        v = self.d.get(name, default)
        if v is None:
            raise ConfigError(f"{self.source}: required field '{name}' is missing.")
        if isinstance(v, bool) or not isinstance(v, int):
            raise ConfigError(f"{self.source}: '{name}' must be an integer, got {v!r}.")
        return v

    def float(self, name: str, default: float | None) -> float:
        v = self.d.get(name, default)
        if v is None:
            raise ConfigError(f"{self.source}: required field '{name}' is missing.")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"{self.source}: '{name}' must be a number, got {v!r}.")
        return float(v)

    def bool(self, name: str, default: bool) -> bool:
        """A JSON true / false: a string "false", a 0 / 1 or a null is refused (as transformers' config classes do),
        not taken as truthy or falsy."""
        v = self.d.get(name, default)
        if not isinstance(v, bool):
            raise ConfigError(f"{self.source}: '{name}' must be true or false, got {v!r}.")
        return v


def _architecture(raw: dict, source: str) -> str:
    archs = raw.get("architectures") or []
    if isinstance(archs, str):
        archs = [archs]
    if not isinstance(archs, list):
        raise ConfigError(f"{source}: 'architectures' must be a list of names, got {archs!r}.")
    supported = ", ".join(SUPPORTED_ARCHITECTURES)
    for a in archs:
        if a in SUPPORTED_ARCHITECTURES:
            return a
    if not archs:
        raise ConfigError(f"{source} has no 'architectures' field; deltaserve supports: {supported}.")
    raise ConfigError(f"{source}: architecture {archs[0]!r} is not supported; deltaserve supports: {supported}.")


def _layer_types(text: dict, n_layers: int, source: str) -> tuple[str, ...]:
    types = text.get("layer_types")
    if types is None:
        interval = text.get("full_attention_interval", 4)
        if not isinstance(interval, int) or interval < 1:
            raise ConfigError(f"{source}: 'full_attention_interval' must be a positive integer, got {interval!r}.")
        types = ["linear_attention" if (i + 1) % interval else "full_attention" for i in range(n_layers)]
    if not isinstance(types, list) or len(types) != n_layers:
        raise ConfigError(f"{source}: 'layer_types' must list one entry per layer ({n_layers}).")
    for i, t in enumerate(types):
        if t not in LAYER_TYPES:
            raise ConfigError(f"{source}: layer_types[{i}] is {t!r}; expected 'linear_attention' or 'full_attention'.")
    return tuple(types)


def _rope_parameters(text: dict, source: str) -> dict:
    """The RoPE settings: `rope_parameters`, or the older `rope_scaling` (HF reads it the same way), refused unless
    they describe Qwen3.5's plain RoPE (its mrope sections collapse to 1-D positions for text). Where both are set,
    `rope_scaling` replaces `rope_parameters` whole, as in transformers' convert_rope_params_to_dict (rope_theta and
    partial_rotary_factor then come from the top-level keys; HF's 10000 for a missing rope_theta is refused)."""
    found = {}
    for key in ("rope_scaling", "rope_parameters"):
        value = text.get(key)
        if value is None or key == "rope_parameters" and text.get("rope_scaling"):
            continue
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: '{key}' must be an object, got {value!r}.")
        kind = value.get("rope_type", value.get("type", "default"))
        if kind not in ("default", "mrope", None):
            raise ConfigError(f"{source}: {key} type {kind!r} is not supported; deltaserve implements Qwen3.5's "
                              f"default RoPE (no yarn, linear or dynamic scaling): remove it, or serve with a context "
                              f"no longer than max_position_embeddings.")
        found.update(value)
    return found


def _eos_ids(text: dict, raw: dict, gen: dict, source: str = "config") -> tuple[int, ...]:
    """EOS ids from generation_config.json first (what HF generate stops on), then config.json. An id that is not a
    non-negative integer ("151645", true) is refused: dropped, generation silently ran past the end of its answer."""
    ids: list[int] = []
    for v, where in ((gen.get("eos_token_id"), f"generation_config.json (beside {source})"),
                     (text.get("eos_token_id"), source), (raw.get("eos_token_id"), source)):
        for i in v if isinstance(v, list) else [] if v is None else [v]:
            if isinstance(i, bool) or not isinstance(i, int) or i < 0:
                raise ConfigError(f"{where}: 'eos_token_id' must be a token id (a non-negative integer) or a list of "
                                  f"them, got {v!r}.")
            if i not in ids:
                ids.append(i)
    return tuple(ids)


# generation_config.json fields a request's sampling takes as defaults (vLLM reads the same), with their types
_SAMPLING_FIELDS = {"temperature": float, "top_p": float, "top_k": int, "min_p": float, "repetition_penalty": float,
                    "max_new_tokens": int}
_AS_SAMPLING_PARAM = {"max_new_tokens": "max_tokens"}  # HF's name -> SamplingParams' (vLLM maps it the same way)


def _sampling_defaults(gen: dict, source: str) -> tuple[tuple[str, float | int], ...]:
    """generation_config.json -> (field, value) pairs. `do_sample: false` means greedy (temperature 0), as in HF's
    generate."""
    out = []
    for name, kind in _SAMPLING_FIELDS.items():
        value = gen.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or \
                kind is int and value != int(value):
            raise ConfigError(f"generation_config.json (beside {source}): '{name}' must be a number, got {value!r}.")
        if name == "max_new_tokens" and value < 1:
            raise ConfigError(f"generation_config.json (beside {source}): 'max_new_tokens' must be at least 1, got "
                              f"{value!r}.")
        out.append((_AS_SAMPLING_PARAM.get(name, name), kind(value)))
    do_sample = gen.get("do_sample")  # null: unset, as in transformers' GenerationConfig
    if do_sample is not None and not isinstance(do_sample, bool):  # GenerationConfig keeps "false", which samples
        raise ConfigError(f"generation_config.json (beside {source}): 'do_sample' must be true or false, got "
                          f"{do_sample!r}.")
    if do_sample is False:  # the rest stays: a request that asks for a temperature samples with it
        out = [(name, value) for name, value in out if name != "temperature"] + [("temperature", 0.0)]
    return tuple(out)


def _read_generation_config(path: str) -> dict:
    gpath = os.path.join(path, "generation_config.json")
    if not os.path.isfile(gpath):
        return {}
    gen = _read_json(gpath)
    if not isinstance(gen, dict):
        raise ConfigError(f"{gpath} must hold a JSON object, got a {type(gen).__name__}.")
    return gen


def _read_json(path: str):
    """The JSON in `path`; ConfigError naming the file when it cannot be read or is not UTF-8 JSON."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except OSError as e:  # e.g. permission denied: a PermissionError's trace came out of LLM(...)
        raise ConfigError(f"{path} cannot be read ({e.strerror or type(e).__name__}).") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}).") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text; save it as UTF-8 JSON.") from None
